"""The training compose whose backward folds the DoRA scale into B (``kernels/folded_compose.py``)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from dora_fused.kernels import (
    compose_reference,
    compose_torch,
    compose_with_base_reference,
    compose_with_base_torch,
    lora_up_compose_reference,
    lora_up_folded_compose_torch,
    lora_up_folded_compose_with_base_torch,
)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _inputs(gen, tokens, d_out, r, dtype, adapter_dtype, vec_dtype, with_bias, device="cpu"):
    """``result [*tokens, d_out]``, ``h [*tokens, r]``, ``B``, ``m``, ``n`` (no grad, as DoRA detaches it), ``b``."""

    def make(t, dtype):
        return t.to(device, dtype)

    result = make(torch.randn(*tokens, d_out, generator=gen), dtype).requires_grad_()
    hidden = make(torch.randn(*tokens, r, generator=gen), adapter_dtype).requires_grad_()
    lora_B = make(torch.randn(d_out, r, generator=gen) / r**0.5, adapter_dtype).requires_grad_()
    magnitude = make(torch.rand(d_out, generator=gen) + 0.5, vec_dtype).requires_grad_()
    weight_norm = make(torch.rand(d_out, generator=gen) + 0.5, vec_dtype)
    bias = make(torch.randn(d_out, generator=gen), dtype).requires_grad_() if with_bias else None
    return result, hidden, lora_B, magnitude, weight_norm, bias


@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_gradcheck_in_fp64(with_bias):
    """The hand-written backward of the elementwise part, with autograd through the fold, is the exact gradient."""
    gen = torch.Generator().manual_seed(21)
    result, hidden, lora_B, m, n, bias = _inputs(gen, (2, 3), 7, 3, *(torch.float64,) * 3, with_bias)
    n.requires_grad_()  # every input, the norm too
    inputs = (result, hidden, lora_B, m, n) + ((bias,) if with_bias else ())

    def f(*t):
        return lora_up_folded_compose_torch(*t[:5], t[5] if with_bias else None, 0.7, torch.float64)

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize(
    "dtype,adapter_dtype,vec_dtype",
    [
        (torch.float64, torch.float64, torch.float64),
        (torch.bfloat16, torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32, torch.float32),  # PEFT's default: fp32 adapters on a bf16 base
        (torch.float16, torch.float16, torch.float32),
    ],
    ids=["fp64", "bf16", "bf16-base-fp32-adapters", "fp16"],
)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("device", DEVICES)
def test_same_value_and_gradients_as_the_unfolded_compose(dtype, adapter_dtype, vec_dtype, with_bias, device):
    """Output and every gradient as the unfolded compose gives them (fp64, same math), at the dtypes' rounding.

    On CUDA, ``P = dyᵀ·h`` of 16-bit operands is one tensor-core product with an fp32 result."""
    gen = torch.Generator().manual_seed(22)
    ours = _inputs(gen, (3, 5), 11, 4, dtype, adapter_dtype, vec_dtype, with_bias, device)
    exact = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in ours]
    out_dtype = torch.promote_types(dtype, adapter_dtype)
    out = lora_up_folded_compose_torch(*ours, 0.7, out_dtype)
    lora64 = torch.nn.functional.linear(exact[1], exact[2])
    expected = compose_reference(exact[0], lora64, *exact[3:], 0.7, torch.float64)
    assert out.dtype == out_dtype
    tol = 1e-12 if dtype == torch.float64 else 2.0 * torch.finfo(dtype).eps
    scale = expected.abs().max().item()
    assert_close(out.double(), expected, rtol=0, atol=tol * scale, what="output")

    dy = torch.randn(out.shape, generator=gen).to(device, out_dtype)
    out.backward(dy)
    expected.backward(dy.double())
    for name, a, e in zip(("result", "h", "B", "m", "bias"), (*ours[:4], ours[5]), (*exact[:4], exact[5]), strict=True):
        if a is None:
            continue
        assert a.grad.dtype == a.dtype, name
        bound = (tol if a.dtype == torch.float64 else 2.0 * torch.finfo(a.dtype).eps) * e.grad.abs().max().item()
        if a.dtype != torch.float64:
            bound *= 4  # a gradient formed from dy and rounded products, then rounded to its dtype
        assert_close(a.grad.double(), e.grad, rtol=0, atol=bound, what=f"d_{name}")


def test_forward_is_the_unfolded_compose_bit_for_bit():
    """The forward is the up-projection, then ``compose_reference``: the same value as the unfolded path."""
    gen = torch.Generator().manual_seed(23)
    for dtype, adapter_dtype in [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]:
        for with_bias in (False, True):
            args = _inputs(gen, (9,), 13, 5, dtype, adapter_dtype, adapter_dtype, with_bias)
            out_dtype = torch.promote_types(dtype, adapter_dtype)
            got = lora_up_folded_compose_torch(*args, 1.5, out_dtype)
            assert torch.equal(got, lora_up_compose_reference(*args, 1.5, out_dtype))


def _saved_bytes(fn) -> list[tuple[int, ...]]:
    """Shapes of the tensors autograd saves for backward while ``fn`` runs."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


def test_saves_no_lora_output_for_backward():
    """The unfolded path saves ``result`` and the LoRA output ``[tokens, d_out]``; the folded one ``result`` alone."""
    gen = torch.Generator().manual_seed(24)
    result, hidden, lora_B, m, n, bias = _inputs(gen, (40,), 24, 3, torch.float32, torch.float32, torch.float32, True)

    def folded():
        lora_up_folded_compose_torch(result, hidden, lora_B, m, n, bias, 0.5, torch.float32)

    def unfolded():
        lora = torch.nn.functional.linear(hidden, lora_B)
        compose_torch(result, lora, m, n, bias, 0.5, torch.float32)

    assert _saved_bytes(unfolded).count((40, 24)) == 2
    assert _saved_bytes(folded).count((40, 24)) == 1


# --- the dropout form: out = result + (g - 1)·base + g·s·h·Bᵀ ------------------------------------


def test_with_base_gradcheck_in_fp64():
    gen = torch.Generator().manual_seed(26)
    result, hidden, lora_B, m, n, _ = _inputs(gen, (2, 3), 7, 3, *(torch.float64,) * 3, False)
    base = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64).requires_grad_()
    n.requires_grad_()

    def f(result, base, hidden, lora_B, m, n):
        return lora_up_folded_compose_with_base_torch(result, base, hidden, lora_B, m, n, 0.7, torch.float64)

    assert torch.autograd.gradcheck(f, (result, base, hidden, lora_B, m, n))


@pytest.mark.parametrize(
    "dtype,adapter_dtype",
    [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)],
    ids=["bf16", "bf16-base-fp32-adapters"],
)
@pytest.mark.parametrize("device", DEVICES)
def test_with_base_matches_the_unfolded_dropout_compose(dtype, adapter_dtype, device):
    """Forward bit for bit as ``compose_with_base_reference``; gradients as the unfolded path's, in fp64."""
    gen = torch.Generator().manual_seed(27)
    result, hidden, lora_B, m, n, _ = _inputs(gen, (3, 5), 11, 4, dtype, adapter_dtype, adapter_dtype, False, device)
    base = torch.randn(3, 5, 11, generator=gen).to(device, dtype).requires_grad_()
    ours = (result, base, hidden, lora_B, m, n)
    out_dtype = torch.promote_types(dtype, adapter_dtype)
    out = lora_up_folded_compose_with_base_torch(*ours, 0.7, out_dtype)
    lora = torch.nn.functional.linear(hidden, lora_B)
    assert torch.equal(out, compose_with_base_reference(result, base, lora, m, n, 0.7, out_dtype))

    exact = [t.detach().double().requires_grad_(t.requires_grad) for t in ours]
    lora64 = torch.nn.functional.linear(exact[2], exact[3])
    expected = compose_with_base_torch(exact[0], exact[1], lora64, exact[4], exact[5], 0.7, torch.float64)
    dy = torch.randn(out.shape, generator=gen).to(device, out_dtype)
    out.backward(dy)
    expected.backward(dy.double())
    for name, a, e in zip(("result", "base", "h", "B", "m"), ours[:5], exact[:5], strict=True):
        assert a.grad.dtype == a.dtype, name
        bound = 8.0 * torch.finfo(a.dtype).eps * e.grad.abs().max().item()
        assert_close(a.grad.double(), e.grad, rtol=0, atol=bound, what=f"d_{name}")
