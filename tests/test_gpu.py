"""The same checks on a CUDA GPU, at full layer sizes (run on an H100/H200; skipped without CUDA)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import TINY_LLAMA, assert_close, dora_module_names, relative_error, tiny_llama_dora

import dora_fused
from dora_fused.kernels import compose, factored_norm, factored_row_norm
from dora_fused.kernels.factored_norm import dense_row_norm_reference

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize(
    "dtype,adapter_dtype",
    [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float16, torch.float16)],
    ids=["bf16", "fp32-adapters", "fp16"],
)
@pytest.mark.parametrize("d_in,d_out", [(4096, 4096), (8192, 8192), (4096, 14336), (14336, 4096)])
def test_factored_norm_full_size(d_in, d_out, dtype, adapter_dtype):
    assert (
        factored_norm._tensor_core_terms(
            torch.empty(1, device="cuda", dtype=dtype), torch.empty(1, dtype=adapter_dtype)
        )
        > 0
    )
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(d_out, d_in, device="cuda", generator=gen) / d_in**0.5).to(dtype)
    a = (torch.randn(384, d_in, device="cuda", generator=gen) / d_in**0.5).to(adapter_dtype)
    b = (torch.randn(d_out, 384, device="cuda", generator=gen) / 384**0.5).to(adapter_dtype)
    got = factored_row_norm(w, a, b, 1.0)
    exact = dense_row_norm_reference(w.double(), a.double(), b.double(), 1.0)
    assert_close(got, exact, rtol=2e-6, atol=0, what="factored norm")


def test_compose_full_size_matches_fp64():
    gen = torch.Generator(device="cuda").manual_seed(1)
    result = torch.randn(4096, 8192, device="cuda", generator=gen).bfloat16()
    lora = torch.randn(4096, 8192, device="cuda", generator=gen)
    m, n = torch.rand(8192, device="cuda", generator=gen) + 1, torch.rand(8192, device="cuda", generator=gen) + 1
    out = compose(result, lora, m, n, None, 0.5)
    exact = (m.double() / n.double()) * (result.double() + 0.5 * lora.double())
    assert_close(out, exact, rtol=2e-7, atol=1e-6, what="compose")


@pytest.mark.parametrize("case", ["bf16", "fp32-adapters"])
def test_tiny_llama_on_cuda_trains_like_peft(case):
    adapter = torch.bfloat16 if case == "bf16" else None
    model = tiny_llama_dora(torch.bfloat16, adapter).cuda().train()
    gen = torch.Generator().manual_seed(1)
    embeds = (torch.randn(2, 9, TINY_LLAMA["hidden_size"], generator=gen) * 0.5).bfloat16().cuda()

    def run(m, e):
        e = e.clone().requires_grad_()
        logits = m(inputs_embeds=e).logits
        (logits.double() * torch.linspace(-1, 1, logits.shape[-1], device="cuda", dtype=torch.float64)).sum().backward()
        grads = {k.removeprefix("_orig_mod."): p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}
        m.zero_grad(set_to_none=True)
        return logits.detach(), grads, e.grad

    eager = run(model, embeds)
    exact = run(copy.deepcopy(model).double(), embeds.double())
    ours = run(torch.compile(model, backend="dora_fused"), embeds)
    assert set(dora_fused.last_report().rewritten) == dora_module_names(model)
    for what, pick in [
        ("logits", lambda r: r[0]),
        ("input", lambda r: r[2]),
        ("lora_B", lambda r: torch.cat([g.flatten().double() for k, g in sorted(r[1].items()) if "lora_B" in k])),
        ("magnitude", lambda r: torch.cat([g.flatten().double() for k, g in sorted(r[1].items()) if "magn" in k])),
    ]:
        ours_err = relative_error(pick(ours), pick(exact))
        peft_err = relative_error(pick(eager), pick(exact))
        assert ours_err <= 1.1 * peft_err + 1e-6, f"{what}: {ours_err:.3g} vs PEFT {peft_err:.3g}"
