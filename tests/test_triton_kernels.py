"""The Triton kernels themselves, against fp64: on CPU through the interpreter, and on a GPU.

Shapes are small and odd on purpose (not multiples of any block size, one
token, r = 1): the interpreter is slow, and ragged edges are where masks break.
Full sizes run in test_gpu.py and the benchmarks.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from helpers import assert_close
from triton_interpreter import interpreting

from dora_fused.kernels import factored_norm
from dora_fused.kernels.common import adapter_terms
from dora_fused.kernels.compose import (
    compose_backward_reference,
    compose_backward_triton,
    compose_forward_triton,
    triton_supports_compose,
)
from dora_fused.kernels.factored_norm import dense_row_norm_reference, factored_row_norm_triton
from dora_fused.kernels.gram import GramPlan, gram_fp32, gram_plan, gram_triton
from dora_fused.kernels.lora_up_compose import (
    IEEE_FP32,
    lora_up_compose_reference,
    lora_up_compose_triton,
    lora_up_scaled_sum,
    lora_up_scaled_sum_reference,
    lora_up_scaled_sum_triton,
    triton_supports_lora_up_compose,
)
from dora_fused.kernels.norm_plan import norm_plan, norm_splits

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]
DTYPE_PAIRS = [  # (weight / base dtype, adapter dtype)
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16),
    (torch.float16, torch.float32),
    (torch.float32, torch.float32),
]
NORM_SHAPES = [(1, 1, 1), (37, 53, 5), (70, 33, 40), (130, 100, 17), (200, 70, 1), (60, 90, 150)]  # (d_out, d_in, r)


def _gen(device: str, *key: object) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(zlib.crc32(repr(key).encode()))


def _ulp_slack(dtype: torch.dtype, device: str) -> float:
    """Rounding allowed for a once-rounded output, in ulps: the interpreter truncates fp32 → bf16."""
    return 1.0 if (device == "cpu" and dtype == torch.bfloat16) else 0.5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
@pytest.mark.parametrize("dtype,adapter_dtype", [p for p in DTYPE_PAIRS if p[0] != torch.float32])
def test_norm_kernel_matches_fp64(device, shape, dtype, adapter_dtype):
    d_out, d_in, r = shape
    gen = _gen(device, shape, dtype, adapter_dtype)
    w = (torch.randn(d_out, d_in, device=device, generator=gen) / d_in**0.5).to(dtype)
    a = (torch.randn(r, d_in, device=device, generator=gen) / d_in**0.5).to(adapter_dtype)
    b = (torch.randn(d_out, r, device=device, generator=gen) / r**0.5).to(adapter_dtype)
    got = factored_row_norm_triton(w, a, b, 1.3)
    assert got.dtype == torch.float32 and got.shape == (d_out,)
    _assert_fp32_level(got, w, a, b, 1.3)


def _assert_fp32_level(got, w, a, b, s):
    """fp32-level accuracy relative to the terms of the identity (test_kernels.py explains the bound)."""
    w64, a64, b64 = w.double(), a.double(), b.double()
    expected = dense_row_norm_reference(w64, a64, b64, s)
    terms = (w64.norm(dim=1) + s * (b64 @ a64).norm(dim=1)).square()
    excess = (got.double().square() - expected.square()).abs() - 2e-6 * terms
    assert (excess <= 0).all(), f"norm² off by {(excess + 2e-6 * terms).max():.3g} (terms {terms.max():.3g})"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "config",
    [
        dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, BLOCK_R=16, num_warps=4),  # three column tiles, then the finish
        dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, BLOCK_R=32, num_warps=4),  # two ragged column tiles
        dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, BLOCK_R=16, num_warps=4),  # one tile: the kernel finishes itself
        dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, BLOCK_R=16, SPLIT_K=3, num_warps=4),  # d_in and B·G in 3 shares
        dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, BLOCK_R=16, SPLIT_K=3, num_warps=4),  # 2 chunks of G a tile
        dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, SUB_K=16, BLOCK_R=16, SPLIT_K=2, num_warps=4),  # 4 dots a chunk
        dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, BLOCK_R=16, W_SQUARES=False, num_warps=4),  # ‖W‖² in its own pass
        dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, BLOCK_R=16, SPLIT_K=5, W_SQUARES=False, num_warps=4),
        dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, BLOCK_R=16, U_FROM="cublas", num_warps=4),  # U from a product
        dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, BLOCK_R=16, U_FROM="cublas", SPLIT_K=2, num_warps=4),  # B·G shared
    ],
    ids=[
        "3-tiles",
        "2-tiles",
        "1-tile",
        "split-3",
        "split-3-two-chunks-a-tile",
        "split-2-sub-4",
        "own-squares",
        "split-5-own-squares",
        "u-in",
        "u-in-split-2",
    ],
)
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float16)])
def test_norm_kernel_tilings(device, config, dtype, adapter_dtype):
    """Every tiling gives the same fp32-level norm: row, column and d_in tiles all ragged here."""
    gen = _gen(device, "tilings", dtype, adapter_dtype)
    w = (torch.randn(70, 129, device=device, generator=gen) / 11).to(dtype)
    a = (torch.randn(40, 129, device=device, generator=gen) / 11).to(adapter_dtype)
    b = (torch.randn(70, 40, device=device, generator=gen) / 6).to(adapter_dtype)
    _assert_fp32_level(factored_row_norm_triton(w, a, b, 0.7, config=config), w, a, b, 0.7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("squares", [True, False], ids=["fused-squares", "own-squares"])
def test_norm_kernels_never_read_after(device, adapter_dtype, squares):
    """``after`` only orders the launches: a NaN-filled one leaves the norm bit for bit as it was."""
    gen = _gen(device, "after", adapter_dtype, squares)
    w = (torch.randn(37, 53, device=device, generator=gen) / 7).to(torch.bfloat16)
    a = (torch.randn(5, 53, device=device, generator=gen) / 7).to(adapter_dtype)
    b = (torch.randn(37, 5, device=device, generator=gen) / 3).to(adapter_dtype)
    config = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, BLOCK_R=16, W_SQUARES=squares, num_warps=4)
    after = torch.full((3, 37), float("nan"), device=device, dtype=torch.bfloat16)
    expected = factored_row_norm_triton(w, a, b, 0.7, config=config)
    assert torch.equal(factored_row_norm_triton(w, a, b, 0.7, config=config, after=after), expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("r,d_in", [(1, 1), (5, 300), (40, 33), (70, 129), (17, 2100), (190, 300)])
@pytest.mark.parametrize("gram", [gram_fp32, gram_triton])
def test_gram_is_fp32_exact(device, adapter_dtype, r, d_in, gram):
    """``A·Aᵀ`` to fp32 accuracy; d_in = 2100 makes gram_triton add many chunks, the last one ragged;
    r = 190 with fp32 adapters stacks 570 rows of terms, which take the plan's 128-row tiles."""
    gen = _gen(device, r, d_in, adapter_dtype)
    a = (torch.randn(r, d_in, device=device, generator=gen) * torch.rand(d_in, device=device, generator=gen)).to(
        adapter_dtype
    )
    got = gram(a)
    exact = a.double() @ a.double().T
    scale = (a.double().abs() @ a.double().abs().T).max().item()
    # fp32 accumulation over d_in products: sqrt(d_in) roundings of 2^-24 (cuBLAS's fp32 product needs it at 2100)
    assert_close(got, exact, rtol=0, atol=max(4e-7, d_in**0.5 * 2**-24) * scale, what="A·Aᵀ")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adapter_terms_rebuild_fp32_adapters(device, dtype):
    """Three 16-bit terms carry an fp32 A (fp16 through a power-of-two scale), across a wide range."""
    gen = _gen(device, "terms", dtype)
    a = torch.randn(7, 300, device=device, generator=gen) * torch.logspace(-6, 1, 300, device=device)
    terms, scale = adapter_terms(a, dtype)
    assert terms.dtype == dtype and terms.shape == (21, 300)
    rebuilt = terms.double().view(3, 7, 300).sum(0) / (1.0 if scale is None else scale.double())
    assert (scale is None) == (dtype == torch.bfloat16)  # bf16 has fp32's range: no scale
    assert ((rebuilt - a.double()).abs() <= 2**-23 * a.double().abs() + 2**-24 * a.double().abs().max() * 2**-14).all()


@pytest.mark.parametrize("device", DEVICES)
def test_norm_kernel_reads_strided_weights(device):
    """A transposed weight (fan_in_fan_out storage) is read through its strides, not copied."""
    gen = _gen(device, "strided")
    w_t = torch.randn(45, 38, device=device, generator=gen).bfloat16()  # stored [d_in, d_out]
    a = torch.randn(6, 45, device=device, generator=gen) / 7
    b = torch.randn(38, 6, device=device, generator=gen) / 3
    got = factored_row_norm_triton(w_t.T, a, b, 0.9)
    # the products may take other cuBLAS kernels for another layout: equal to fp32 accumulation
    assert_close(got, factored_row_norm_triton(w_t.T.contiguous(), a, b, 0.9), rtol=1e-6, atol=0, what="strided")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,adapter_dtype", DTYPE_PAIRS)
@pytest.mark.parametrize("tokens,d_out", [((1,), 1), ((1,), 131), ((3, 37), 129), ((300,), 20)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_compose_kernels_match_fp64(device, dtype, adapter_dtype, tokens, d_out, with_bias):
    gen = _gen(device, dtype, adapter_dtype, tokens, d_out, with_bias)
    out_dtype = torch.promote_types(dtype, adapter_dtype)
    result = (torch.randn(*tokens, d_out, device=device, generator=gen) * 3).to(dtype)
    lora = torch.randn(*tokens, d_out, device=device, generator=gen).to(adapter_dtype)
    m = (torch.rand(d_out, device=device, generator=gen) + 0.5).to(adapter_dtype)
    n = torch.rand(d_out, device=device, generator=gen) + 0.5
    bias = torch.randn(d_out, device=device, generator=gen).to(dtype) if with_bias else None
    s = 0.75

    out = compose_forward_triton(result, lora, m, n, bias, s, out_dtype)
    assert out.dtype == out_dtype and out.shape == result.shape
    g = m.double() / n.double()
    b64 = bias.double() if with_bias else 0.0
    exact = g * (result.double() - b64 + s * lora.double()) + b64
    ulp = torch.finfo(out_dtype).eps * exact.abs()
    # fp32 math rounded once: within the output's rounding, plus fp32 noise far below it
    assert ((out.double() - exact).abs() <= _ulp_slack(out_dtype, device) * ulp + 1e-6 * exact.abs().max()).all()

    dy = torch.randn(*tokens, d_out, device=device, generator=gen).to(out_dtype)
    d_result, d_lora, v, dy_sum = compose_backward_triton(dy, result, lora, m, n, bias, s)
    want = compose_backward_reference(dy, result, lora, m, n, bias, s, (True, True, True, False, True))
    assert d_result.dtype == dtype and d_lora.dtype == adapter_dtype
    for got_t, want_t, what in [(d_result, want[0], "d_result"), (d_lora, want[1], "d_lora")]:
        eps = torch.finfo(got_t.dtype).eps
        slack = 2.0 if device == "cpu" and got_t.dtype == torch.bfloat16 else 1.0
        assert_close(got_t, want_t, rtol=slack * eps, atol=0, what=what)
    # the token sums in fp32, against fp64
    v_exact = (dy.double() * (result.double() - b64 + s * lora.double())).reshape(-1, d_out).sum(0)
    b_abs = bias.double().abs() if with_bias else 0.0
    scale = (dy.double().abs() * (result.double().abs() + b_abs + s * lora.double().abs())).reshape(-1, d_out).sum(0)
    assert ((v.double() - v_exact).abs() <= 1e-6 * scale + 1e-30).all()
    if with_bias:
        dy_rows = dy.double().reshape(-1, d_out)
        assert ((dy_sum.double() - dy_rows.sum(0)).abs() <= 1e-6 * dy_rows.abs().sum(0)).all()
    else:
        assert dy_sum.numel() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compose_kernel_is_stable_near_unity(device, dtype):
    """g = 1 ± 1%: the kernel's output stays at the rounding floor; PEFT's (g-1) form in dtype does not."""
    gen = _gen(device, "unity", dtype)
    d_out, s = 160, 2.0
    bias = (torch.randn(d_out, device=device, generator=gen) * 8).to(dtype)
    result = (torch.randn(48, d_out, device=device, generator=gen) * 8 + bias.float()).to(dtype)
    lora = (torch.randn(48, d_out, device=device, generator=gen) * 0.1).to(dtype)
    n = (torch.rand(d_out, device=device, generator=gen) + 1).to(dtype)
    m = (n.double() * (1 + 1e-2 * torch.randn(d_out, device=device, generator=gen, dtype=torch.float64))).to(dtype)
    g64 = m.double() / n.double()
    exact = result.double() + (g64 - 1) * (result.double() - bias.double()) + g64 * lora.double() * s

    fused = compose_forward_triton(result, lora, m, n, bias, s, dtype)
    g = (m / n).view(1, -1)
    naive = result + (g - 1) * (result - bias) + g * lora * s
    visible = exact.abs() > 1e-3 * exact.abs().max()
    ulp = torch.finfo(dtype).eps * exact.abs()
    fused_ulps = ((fused.double() - exact).abs() / ulp)[visible]
    naive_ulps = ((naive.double() - exact).abs() / ulp)[visible]
    assert fused_ulps.max() <= _ulp_slack(dtype, device) + 1e-2, f"kernel off by {fused_ulps.max():.3f} ulp"
    assert (naive_ulps > 0.5 + 1e-2).float().mean() > 0.05, "the naive form was expected to lose bits here"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens,d_out,r", [((1,), 1, 1), ((3, 37), 129, 5), ((300,), 20, 40), ((130,), 45, 150)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_lora_up_compose_kernel_matches_fp64(device, dtype, tokens, d_out, r, with_bias):
    """``g·(result - b + s·h·Bᵀ) + b``: the product accumulated in fp32, composed, rounded once."""
    gen = _gen(device, "lora_up", dtype, tokens, d_out, r, with_bias)
    result = (torch.randn(*tokens, d_out, device=device, generator=gen) * 3).to(dtype)
    hidden = torch.randn(*tokens, r, device=device, generator=gen).to(dtype)
    lora_B = (torch.randn(d_out, r, device=device, generator=gen) / r**0.5).to(dtype)
    m = (torch.rand(d_out, device=device, generator=gen) + 0.5).to(dtype)
    n = torch.rand(d_out, device=device, generator=gen) + 0.5
    bias = torch.randn(d_out, device=device, generator=gen).to(dtype) if with_bias else None
    s = 0.75

    out = lora_up_compose_triton(result, hidden, lora_B, m, n, bias, s, dtype)
    assert out.dtype == dtype and out.shape == result.shape
    g = m.double() / n.double()
    b64 = bias.double() if with_bias else 0.0
    lora = hidden.double() @ lora_B.double().T
    exact = g * (result.double() - b64 + s * lora) + b64
    ulp = torch.finfo(dtype).eps * exact.abs()
    # fp32 accumulation of r exact products: at most r·2^-24 of Σ|h·B| (times g·s)
    accumulation = r * 2**-24 * g * s * (hidden.double().abs() @ lora_B.double().abs().T)
    fp32_math = 2**-22 * exact.abs()  # g = m / n and the compose in fp32, before the one rounding
    assert ((out.double() - exact).abs() <= _ulp_slack(dtype, device) * ulp + fp32_math + accumulation + 1e-30).all()
    # never less precise than the unfused path (LoRA output rounded to the adapter dtype, then composed)
    unfused = lora_up_compose_reference(result, hidden, lora_B, m, n, bias, s, dtype)
    assert (out.double() - exact).abs().max() <= (unfused.double() - exact).abs().max() + ulp.max()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "adapter_dtype,config",
    [(torch.bfloat16, None), (torch.float32, None), (torch.float32, dict(PRODUCT=IEEE_FP32))],
    ids=["bf16", "fp32", "fp32-ieee"],
)
@pytest.mark.parametrize("tokens,d_out,r", [((1,), 1, 1), ((3, 37), 129, 5), ((300,), 20, 40), ((70,), 45, 64)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_lora_up_scaled_sum_kernel_matches_fp64(device, adapter_dtype, config, tokens, d_out, r, with_bias, out_dtype):
    """Training's forward: ``g`` given, bf16 base; bf16 adapters, or PEFT's default fp32 ones (as terms, or IEEE fp32).

    An fp32 output shows the product's own precision (a TF32 or bf16 product would fail it).
    """
    gen = _gen(device, "scaled_sum", adapter_dtype, tokens, d_out, r, with_bias)
    result = (torch.randn(*tokens, d_out, device=device, generator=gen) * 3).bfloat16()
    hidden = torch.randn(*tokens, r, device=device, generator=gen).to(adapter_dtype)
    lora_B = (torch.randn(d_out, r, device=device, generator=gen) / r**0.5).to(adapter_dtype)
    g = torch.rand(d_out, device=device, generator=gen) + 0.5
    bias = torch.randn(d_out, device=device, generator=gen).bfloat16() if with_bias else None
    s = 0.75

    out = lora_up_scaled_sum_triton(result, hidden, lora_B, g, bias, s, out_dtype, config)
    assert out.dtype == out_dtype and out.shape == result.shape
    b64 = bias.double() if with_bias else 0.0
    exact = g.double() * (result.double() - b64 + s * (hidden.double() @ lora_B.double().T)) + b64
    ulp = torch.finfo(out_dtype).eps * exact.abs()
    # r products (exact in fp32 for bf16 operands, rounded for fp32 ones; as terms, the dropped term products
    # of order 3 and 4 are under 2^-23 of each) accumulated in fp32
    accumulation = (r + 4) * 2**-24 * g.double() * s * (hidden.double().abs() @ lora_B.double().abs().T)
    fp32_math = 2**-22 * exact.abs()
    assert (
        (out.double() - exact).abs() <= _ulp_slack(out_dtype, device) * ulp + fp32_math + accumulation + 1e-30
    ).all()
    unfused = lora_up_scaled_sum_reference(result, hidden, lora_B, g, bias, s, out_dtype)
    assert (out.double() - exact).abs().max() <= (unfused.double() - exact).abs().max() + ulp.max()


def test_lora_up_scaled_sum_off_cuda_is_the_reference_bit_for_bit():
    """The op's CPU branch is the unfused up-projection then the fp32 sum: what the training compose ran before."""
    gen = torch.Generator().manual_seed(3)
    result = torch.randn(2, 9, 33, generator=gen).bfloat16()
    hidden, lora_B = torch.randn(2, 9, 6, generator=gen), torch.randn(33, 6, generator=gen)
    g, bias = torch.rand(33, generator=gen) + 0.5, torch.randn(33, generator=gen).bfloat16()
    got = lora_up_scaled_sum(result, hidden, lora_B, g, bias, 0.5, torch.bfloat16)
    assert torch.equal(got, lora_up_scaled_sum_reference(result, hidden, lora_B, g, bias, 0.5, torch.bfloat16))


def test_lora_up_kernel_takes_16_and_32_bit_adapters():
    """16-bit and fp32 adapters at any rank, with a 16-bit base output; no mixed pair, no fp64."""
    result = torch.ones(4, 8, dtype=torch.bfloat16)

    def supports(dtype, r, b_dtype=None):
        return triton_supports_lora_up_compose(
            result, torch.ones(4, r, dtype=dtype), torch.ones(8, r, dtype=b_dtype or dtype)
        )

    assert supports(torch.bfloat16, 384) and supports(torch.float16, 16)
    assert supports(torch.float32, 8) and supports(torch.float32, 384)
    assert not supports(torch.float32, 8, torch.bfloat16) and not supports(torch.float64, 8)
    assert not triton_supports_lora_up_compose(result.float(), torch.ones(4, 8), torch.ones(8, 8))


def test_triton_dtype_support():
    """fp64 stays on the plain-torch branch of the ops; 16/32-bit floats take the kernels on CUDA."""
    assert triton_supports_compose(*(torch.ones(2, 3, dtype=torch.bfloat16),) * 2, torch.ones(3), torch.ones(3))
    assert not triton_supports_compose(*(torch.ones(2, 3, dtype=torch.float64),) * 2, torch.ones(3), torch.ones(3))
    assert factored_norm.triton_supports_norm(*(torch.ones(2, 2, dtype=torch.bfloat16),) * 3)
    assert factored_norm.triton_supports_norm(torch.ones(2, 2, dtype=torch.float16), *(torch.ones(2, 2),) * 2)
    assert not factored_norm.triton_supports_norm(*(torch.ones(2, 2, dtype=torch.float64),) * 3)
    assert not factored_norm.triton_supports_norm(*(torch.ones(2, 2),) * 3)  # an fp32 W: plain torch
    with pytest.raises(ValueError, match="bf16/fp16 weight"):
        factored_row_norm_triton(*(torch.ones(2, 2),) * 3, 1.0)


def test_gram_plan_tiles_and_shares():
    """Large stacks take 128-row tiles; every split is a whole number of accumulations and covers d_in."""
    assert gram_plan(384, 8192, 3).block == 128  # fp32 adapters: 1152 rows of terms
    assert gram_plan(384, 8192, 1).block == 64
    assert gram_plan(16, 8192, 3).block == 32
    assert gram_plan(384, 8192, 3, tiles=(64, 64, 4)) == GramPlan(64, 64, 4, 1, 8192)
    for r, d_in, count in [(384, 8192, 3), (384, 14336, 1), (16, 4096, 3), (190, 300, 3), (1, 1, 1)]:
        plan = gram_plan(r, d_in, count)
        assert plan.k_per_split % plan.block_k == 0
        assert (plan.splits - 1) * plan.k_per_split < d_in <= plan.splits * plan.k_per_split


def test_norm_splits_fill_the_last_wave():
    """Split-K only where it shortens the waves, and never below _MIN_SPLIT_K columns a split."""
    assert norm_splits(192, 8192, 132) == 2  # 2 waves (the second 45% full) → 1.5
    assert norm_splits(96, 14336, 132) == 4  # 0.73 of one wave → 384 programs, 3 waves of 4
    assert norm_splits(264, 8192, 132) == 1  # already two full waves
    assert norm_splits(336, 4096, 132) == 1  # 3 → 2.67 waves: not worth an epilogue per split
    assert norm_splits(96, 1500, 132) == 1  # d_in too short to share
    assert norm_splits(5, 8192, 1) == 1  # the interpreter


def test_norm_config_needs_two_dots_a_chunk():
    """One dot per chunk would let the compiler fold the fp32 add into one long tensor-core sum."""
    with pytest.raises(ValueError, match="two SUB_K dots"):
        norm_plan(4, 8, 2, 3, 1, config=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, SUB_K=32, BLOCK_R=16))


def test_norm_config_chunks_of_g_divide_a_tile():
    """The epilogue's half of ``B·G`` counts each chunk of G's rows as before or inside a tile."""
    with pytest.raises(ValueError, match="BLOCK_R must divide BLOCK_N"):
        norm_plan(4, 8, 2, 3, 1, config=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, BLOCK_R=32))
