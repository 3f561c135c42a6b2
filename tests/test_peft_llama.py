"""Tiny Llama with PEFT DoRA on every linear layer, compiled with the backend.

One graph, every DoRA module rewritten, and outputs and gradients (lora_A,
lora_B, magnitude, input) that match PEFT eager: tightly in fp32, and in
bf16 / fp32-adapters-on-bf16 no further from an fp64 run of the same math than
PEFT eager itself is.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import TINY_LLAMA, assert_close, dora_module_names, relative_error, tiny_llama_dora

import dora_fused

SEQ = 7

# fp32: compiled vs PEFT eager, element-wise.
FP32_TOL = dict(rtol=2e-5, atol=2e-6)
# bf16 and fp32-adapters-on-bf16: our error against fp64 may be at most RATIO × PEFT eager's, plus ATOL.
# Errors are ||x - x64|| / ||x64|| over a group (the logits, the input gradient, all lora_A gradients,
# all lora_B gradients, all magnitude gradients): one tensor's max error is bf16 rounding noise that
# moves ±15% with any change of rounding order, a group's is stable.
RATIO, ATOL = 1.1, 1e-6
GROUPS = ("lora_A", "lora_B", "lora_magnitude_vector")

CASES = {
    "fp32": (torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "bf16-base-fp32-adapters": (torch.bfloat16, None),  # PEFT's default adapter dtype
    "fp16": (torch.float16, torch.float16),
}


def _inputs(dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(2, SEQ, TINY_LLAMA["hidden_size"], generator=gen) * 0.5).to(dtype)


def _run(model, embeds: torch.Tensor, train: bool):
    """Logits, and in training the gradients of a fixed random projection of them."""
    model.train(train)
    embeds = embeds.detach().clone().requires_grad_(train)
    logits = model(inputs_embeds=embeds).logits
    if not train:
        return logits.detach(), {}
    gen = torch.Generator().manual_seed(2)
    projection = torch.randn(logits.shape, generator=gen, dtype=torch.float64).to(logits.dtype)
    (logits * projection).float().sum().backward()
    grads = {"input": embeds.grad}
    for name, param in model.named_parameters():
        if param.grad is not None:
            grads[name.removeprefix("_orig_mod.")] = param.grad.detach().clone()
    model.zero_grad(set_to_none=True)
    return logits.detach(), grads


def _compile(model, ops: str):
    before = len(dora_fused.reports())
    torch._dynamo.utils.counters.clear()
    # the registered name (ops chosen per module), and a configured backend inserting the Triton ops
    backend = "dora_fused" if ops == "auto" else dora_fused.backend(ops=ops)
    compiled = torch.compile(model, backend=backend)
    return compiled, before


@pytest.mark.slow
@pytest.mark.parametrize("ops", ["auto", "triton"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", list(CASES))
def test_tiny_llama_matches_peft(case, train, ops):
    base_dtype, adapter_dtype = CASES[case]
    model = tiny_llama_dora(base_dtype, adapter_dtype)
    expected_modules = dora_module_names(model)
    assert len(expected_modules) == 14  # 7 linear layers x 2 decoder layers

    embeds = _inputs(base_dtype)
    eager_out, eager_grads = _run(model, embeds, train)
    reference = copy.deepcopy(model).to(torch.float64)
    ref_out, ref_grads = _run(reference, embeds.double(), train)

    compiled, before = _compile(model, ops)
    out, grads = _run(compiled, embeds, train)

    # one graph, no break, every DoRA module rewritten
    assert len(dora_fused.reports()) == before + 1, "expected exactly one graph"
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    report = dora_fused.last_report()
    assert report.error is None, report.error
    assert set(report.rewritten) == expected_modules
    assert report.skipped == []

    assert out.dtype == eager_out.dtype
    if train:
        assert set(grads) == set(eager_grads)
        assert sum("lora_" in k for k in grads) == 3 * len(expected_modules)
    if case == "fp32":
        assert_close(out, eager_out, **FP32_TOL, what="logits")
        for key in grads:
            assert grads[key].dtype == eager_grads[key].dtype, key
            assert_close(grads[key], eager_grads[key], **FP32_TOL, what=key)
        return
    groups = {"logits": ((out,), (eager_out,), (ref_out,))}
    if train:
        groups["input"] = ((grads["input"],), (eager_grads["input"],), (ref_grads["input"],))
        for group in GROUPS:
            keys = sorted(k for k in grads if f".{group}." in k)
            groups[group] = tuple(tuple(g[k] for k in keys) for g in (grads, eager_grads, ref_grads))
    for what, (ours, peft, exact) in groups.items():
        ours_err = relative_error(_flat(ours), _flat(exact))
        peft_err = relative_error(_flat(peft), _flat(exact))
        assert ours_err <= RATIO * peft_err + ATOL, f"{what}: error {ours_err:.3g} vs PEFT eager's {peft_err:.3g}"


def _flat(tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return torch.cat([t.double().flatten() for t in tensors])
