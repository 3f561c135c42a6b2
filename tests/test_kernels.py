"""The ops against fp64 references of the same math, at odd shapes and every dtype."""

from __future__ import annotations

import zlib

import pytest
import torch
from helpers import assert_close

from dora_fused.kernels import (
    compose,
    compose_reference,
    compose_torch,
    compose_with_base_reference,
    compose_with_base_torch,
    factored_norm,
    factored_row_norm,
)
from dora_fused.kernels.common import split_terms
from dora_fused.kernels.factored_norm import dense_row_norm_reference, factored_row_norm_reference

SHAPES = [(1, 1, 1), (7, 5, 1), (33, 17, 3), (64, 40, 24), (40, 64, 63)]  # (d_out, d_in, r)

# Max error of the factored n² against the fp64 dense n², relative to (||W_i|| + |s|·||(BA)_i||)².
NORM_RTOL = {torch.float32: 2e-6, torch.float64: 1e-12}


def _adapter(d_out: int, d_in: int, r: int, dtype: torch.dtype, adapter_dtype: torch.dtype, gen: torch.Generator):
    w = (torch.randn(d_out, d_in, generator=gen) / d_in**0.5).to(dtype)
    a = (torch.randn(r, d_in, generator=gen) / d_in**0.5).to(adapter_dtype)
    b = (torch.randn(d_out, r, generator=gen) / r**0.5).to(adapter_dtype)
    return w, a, b


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "dtype,adapter_dtype",
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.float32),
        (torch.float64, torch.float64),
    ],
)
def test_factored_norm_matches_fp64_dense(shape, dtype, adapter_dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, dtype, adapter_dtype)).encode()))
    w, a, b = _adapter(*shape, dtype, adapter_dtype, gen)
    scaling = 1.7
    got = factored_row_norm(w, a, b, scaling)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert got.dtype == acc and got.shape == (shape[0],)
    # The exact norm of the same (already rounded) inputs. The factored sum ||W||² + 2s<W,BA> + s²||BA||²
    # carries rounding relative to its terms, (||W_i|| + |s|·||(BA)_i||)², not to the result: where
    # W_i + s(BA)_i cancels, the relative error of n_i grows by that ratio (DoRA's ||sBA|| << ||W|| avoids it).
    w64, a64, b64 = w.double(), a.double(), b.double()
    expected = dense_row_norm_reference(w64, a64, b64, scaling)
    terms = (w64.norm(dim=1) + abs(scaling) * (b64 @ a64).norm(dim=1)).square()
    excess = (got.double().square() - expected.square()).abs() - NORM_RTOL[acc] * terms
    assert (excess <= 0).all(), (
        f"factored norm² off by {(excess + NORM_RTOL[acc] * terms).max():.3g} (terms {terms.max():.3g})"
    )


def test_factored_norm_is_at_least_as_precise_as_the_dense_bf16_path():
    gen = torch.Generator().manual_seed(1)
    w, a, b = _adapter(96, 80, 16, torch.bfloat16, torch.bfloat16, gen)
    exact = dense_row_norm_reference(w.double(), a.double(), b.double(), 2.0)
    dense_bf16 = torch.linalg.norm(w + 2.0 * (b @ a), dim=1)  # what PEFT computes in bf16
    ours = factored_row_norm(w, a, b, 2.0)
    assert (ours.double() - exact).abs().max() <= (dense_bf16.double() - exact).abs().max()


def test_split_terms_reconstruct_fp32_exactly():
    gen = torch.Generator().manual_seed(8)
    a = torch.randn(64, 200, generator=gen) * torch.logspace(-20, 20, 200)
    parts = split_terms(a, torch.bfloat16, 3)
    assert all(p.dtype == torch.bfloat16 for p in parts)
    rebuilt = sum(p.double() for p in parts)
    # three 8-bit slices hold the 24-bit significand (the last one rounds at most half an fp32 ulp)
    assert ((rebuilt - a.double()).abs() <= a.double().abs() * 2**-24).all()
    # bf16 W times the parts, accumulated in fp32, is the fp32 product: what the tensor-core path computes
    w = torch.randn(5, 200, generator=gen).bfloat16()
    split = sum(w.float() @ p.float().T for p in parts)
    assert_close(
        split,
        w.double() @ a.double().T,
        rtol=1e-5,
        atol=1e-6 * (w.double().abs() @ a.double().abs().T).max().item(),
        what="W·Aᵀ",
    )


def test_chunked_rows_match_the_unchunked_reference(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    w, a, b = _adapter(37, 29, 5, torch.float32, torch.float32, gen)
    monkeypatch.setattr(factored_norm, "CHUNK_BYTES", 29 * 4 * 3)  # three rows at a time, ragged last chunk
    got = factored_row_norm(w, a, b, 0.5)
    assert_close(got, factored_row_norm_reference(w, a, b, 0.5), rtol=1e-6, atol=0, what="chunked")


def test_factored_norm_clamps_cancellation_at_zero():
    # W = -s·B·A exactly: the true norm is 0 and rounding may make the sum negative.
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(4, 9, generator=gen, dtype=torch.float64).float()
    b = torch.randn(6, 4, generator=gen, dtype=torch.float64).float()
    w = (-(b.double() @ a.double())).float()
    got = factored_row_norm(w, a, b, 1.0)
    assert torch.isfinite(got).all() and (got >= 0).all()
    assert got.max() < 1e-2


def test_ops_pass_opcheck():
    gen = torch.Generator().manual_seed(4)
    w, a, b = _adapter(11, 7, 3, torch.float32, torch.float32, gen)
    torch.library.opcheck(torch.ops.dora_fused.factored_row_norm.default, (w, a, b, 0.5))
    after = torch.randn(2, 11, generator=gen)  # never read: orders the launches in compiled code
    torch.library.opcheck(torch.ops.dora_fused.factored_row_norm.default, (w, a, b, 0.5, after))
    result = torch.randn(2, 3, 11, generator=gen, requires_grad=True)
    lora = torch.randn(2, 3, 11, generator=gen, requires_grad=True)
    m = torch.rand(11, generator=gen).add(0.5).requires_grad_()
    n = torch.rand(11, generator=gen).add(0.5)
    bias = torch.randn(11, generator=gen)
    for args in [
        (result, lora, m, n, bias, 0.5, torch.float32),
        (result, lora, m, n, None, 2.0, torch.float32),
        (result, lora, m, n.clone().requires_grad_(), bias.clone().requires_grad_(), 2.0, torch.float32),
    ]:
        torch.library.opcheck(torch.ops.dora_fused.compose.default, args)


def _peft_compose_fp64(result, lora, m, n, bias, s):
    """PEFT's compose expression, evaluated in fp64 (the reference the op must meet)."""
    g = (m.double() / n.double()).view(1, -1)
    base = result.double() - bias.double() if bias is not None else result.double()
    return result.double() + (g - 1) * base + g * lora.double() * s


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_compose_forward_and_backward_match_fp64(dtype, with_bias):
    gen = torch.Generator().manual_seed(5)
    d_out, s = 13, 1.25
    result = torch.randn(3, 5, d_out, generator=gen).to(dtype).requires_grad_()
    lora = torch.randn(3, 5, d_out, generator=gen).to(dtype).requires_grad_()
    m = (torch.rand(d_out, generator=gen) + 0.5).to(dtype).requires_grad_()
    n = (torch.rand(d_out, generator=gen) + 0.5).to(dtype).requires_grad_()
    bias = torch.randn(d_out, generator=gen).to(dtype).requires_grad_() if with_bias else None
    out = compose(result, lora, m, n, bias, s)
    assert out.dtype == dtype

    inputs = [t for t in (result, lora, m, n, bias) if t is not None]
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    ref = _peft_compose_fp64(*leaves[:4], leaves[4] if with_bias else None, s)
    eps = torch.finfo(dtype).eps
    assert_close(out, ref, rtol=eps, atol=eps * ref.abs().max().item(), what="compose forward")

    grad = torch.randn(out.shape, generator=gen).to(dtype)
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(ref, leaves, grad.double())
    for name, g_got, g_want in zip(("result", "lora", "magnitude", "norm", "bias"), got, want, strict=False):
        assert g_got.dtype == dtype
        # token sums (magnitude, norm, bias) round once at the end; 15 terms of fp32 accumulation is exact enough
        assert_close(g_got, g_want, rtol=2 * eps, atol=2 * eps * g_want.abs().max().item(), what=f"d_{name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compose_is_stable_near_unity(dtype):
    """With g = 1 ± 1%, the fused op rounds correctly (≤ ½ ulp) everywhere; PEFT's form in dtype does not."""
    gen = torch.Generator().manual_seed(6)
    d_out, s = 256, 2.0
    bias = (torch.randn(d_out, generator=gen) * 8).to(dtype)
    result = (torch.randn(64, d_out, generator=gen) * 8 + bias.float()).to(dtype)
    lora = (torch.randn(64, d_out, generator=gen) * 0.1).to(dtype)
    n = (torch.rand(d_out, generator=gen) + 1).to(dtype)
    m = (n.double() * (1 + 1e-2 * torch.randn(d_out, generator=gen, dtype=torch.float64))).to(dtype)
    exact = _peft_compose_fp64(result, lora, m, n, bias, s)

    fused = compose(result, lora, m, n, bias, s)
    g = (m / n).view(1, -1)
    naive = result + (g - 1) * (result - bias) + g * lora * s  # PEFT's expression in dtype
    # error in units of the dtype's relative spacing at the exact value; elements that are
    # near zero relative to the output (where fp32 intermediates dominate) are left out
    visible = exact.abs() > 1e-3 * exact.abs().max()
    ulp = torch.finfo(dtype).eps * exact.abs()
    fused_ulps = ((fused.double() - exact).abs() / ulp)[visible]
    naive_ulps = ((naive.double() - exact).abs() / ulp)[visible]
    assert fused_ulps.max() <= 0.5 + 1e-2, f"fused op off by {fused_ulps.max():.3f} ulp"
    assert (naive_ulps > 0.5 + 1e-2).float().mean() > 0.05, "the naive form was expected to lose bits here"


def test_compose_reference_is_the_op():
    gen = torch.Generator().manual_seed(7)
    args = (torch.randn(4, 9, generator=gen), torch.randn(4, 9, generator=gen), torch.rand(9, generator=gen) + 1)
    n, bias = torch.rand(9, generator=gen) + 1, torch.randn(9, generator=gen)
    assert torch.equal(compose(*args, n, bias, 0.3), compose_reference(*args, n, bias, 0.3, torch.float32))


@pytest.mark.parametrize("with_bias", [False, True])
def test_compose_torch_backward_is_autograds(with_bias):
    """compose_torch's hand-written backward: gradcheck in fp64, and equal to autograd through the
    reference in bf16 (the same fp32 math, each gradient rounded once)."""
    gen = torch.Generator().manual_seed(11)

    def inputs(dtype, vec_dtype):
        result = torch.randn(2, 5, 7, generator=gen).to(dtype)
        lora = torch.randn(2, 5, 7, generator=gen).to(dtype)
        m, n = (torch.rand(7, generator=gen) + 0.5).to(vec_dtype), (torch.rand(7, generator=gen) + 0.5).to(vec_dtype)
        bias = torch.randn(7, generator=gen).to(dtype) if with_bias else None
        return [t.requires_grad_() if t is not None else None for t in (result, lora, m, n, bias)]

    r, lo, m, n, b = inputs(torch.float64, torch.float64)
    assert torch.autograd.gradcheck(lambda *t: compose_torch(*t, b, 0.7, torch.float64), (r, lo, m, n))
    # channels first (PEFT Conv): vectors [1, C, 1], broadcast over dims 0 and 2
    r, lo = (torch.randn(2, 7, 5, dtype=torch.float64, generator=gen).requires_grad_() for _ in range(2))
    m, n = ((torch.rand(1, 7, 1, dtype=torch.float64, generator=gen) + 0.5).requires_grad_() for _ in range(2))
    b = torch.randn(1, 7, 1, dtype=torch.float64, generator=gen).requires_grad_() if with_bias else None
    assert torch.autograd.gradcheck(lambda *t: compose_torch(*t, 0.7, torch.float64), (r, lo, m, n, b))

    for dtype, vec_dtype in [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)]:
        ours, ref = inputs(dtype, vec_dtype), None
        ref = [t.detach().clone().requires_grad_() if t is not None else None for t in ours]
        dy = torch.randn(2, 5, 7, generator=gen).to(dtype)
        compose_torch(*ours[:4], ours[4], 0.7, dtype).backward(dy)
        compose_reference(*ref[:4], ref[4], 0.7, dtype).backward(dy)
        for a, e in zip(ours, ref, strict=True):
            if a is not None:
                assert a.grad.dtype == e.grad.dtype
                assert_close(a.grad.float(), e.grad.float(), rtol=1e-2, atol=1e-2)


def test_compose_with_base_torch_backward_is_autograds():
    """The dropout compose's hand-written backward: gradcheck in fp64 (Linear and channels-first
    vectors), and equal to autograd through the reference in bf16."""
    gen = torch.Generator().manual_seed(12)

    def t(*shape, dtype=torch.float64, positive=False):
        x = torch.rand(*shape, generator=gen) + 0.5 if positive else torch.randn(*shape, generator=gen)
        return x.to(dtype).requires_grad_()

    for shape, vec in [((2, 5, 7), (7,)), ((2, 7, 5), (1, 7, 1))]:
        args = (t(*shape), t(*shape), t(*shape), t(*vec, positive=True), t(*vec, positive=True))
        assert torch.autograd.gradcheck(lambda *a: compose_with_base_torch(*a, 0.7, torch.float64), args)

    ours = [t(2, 5, 7, dtype=torch.bfloat16) for _ in range(3)]
    ours += [t(7, dtype=torch.float32, positive=True) for _ in range(2)]
    ref = [x.detach().clone().requires_grad_() for x in ours]
    dy = torch.randn(2, 5, 7, generator=gen).to(torch.bfloat16)
    compose_with_base_torch(*ours, 0.7, torch.bfloat16).backward(dy)
    compose_with_base_reference(*ref, 0.7, torch.bfloat16).backward(dy)
    for a, e in zip(ours, ref, strict=True):
        assert a.grad.dtype == e.grad.dtype
        assert_close(a.grad.float(), e.grad.float(), rtol=1e-2, atol=1e-2)
