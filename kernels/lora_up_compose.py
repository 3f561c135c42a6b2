"""LoRA up-projection with the DoRA compose in its epilogue: one kernel, for inference and training's forward.

PEFT's DoRA Linear ends with two passes over ``[tokens, d_out]``: the LoRA
up-projection writes ``lora = h·Bᵀ`` (``h = A·x``, ``[tokens, r]``), then the
compose reads it back beside the base output. This op computes, per output tile::

    out = g ⊙ (result - b + s·(h·Bᵀ)) + b,      g = m / n  per output feature

with ``h·Bᵀ`` accumulated in fp32 and kept in registers, so ``lora`` never
reaches memory: one read of ``result``, one write of ``out``. 16-bit adapters
multiply on tensor cores; fp32 adapters (PEFT's default on a bf16 base) too, as
three exact bf16 terms of each operand (``common.dot_terms``: the term products
of order ≤ 2, each exact in fp32, at fp32 accuracy). It is also one rounding
fewer than the unfused path (``lora`` is not rounded to the adapter dtype before
the compose): never less precise.

Two ops, no autograd of their own:
- ``lora_up_compose`` takes ``m`` and ``n`` (``g = m / n`` formed in the kernel):
  the rewrite uses it where the DoRA output needs no gradient (inference);
- ``lora_up_scaled_sum`` takes ``g`` itself: the forward of the training compose
  (``folded_compose``), whose backward is its own, and which the backward
  recomputes by calling it again, bit for bit.

Layout: pure-torch reference → Triton kernel → launcher → ``torch.library`` ops
(Triton on CUDA where ``triton_supports_lora_up_compose``; the reference elsewhere).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .common import as_rows, bf16_terms, dot_terms, feature_vectors, scale_and_bias
from .compose import compose_reference, scaled_sum

__all__ = [
    "FP32_TERMS",
    "IEEE_FP32",
    "TENSOR_CORES",
    "lora_up_compose",
    "lora_up_compose_reference",
    "lora_up_compose_triton",
    "lora_up_scaled_sum",
    "lora_up_scaled_sum_reference",
    "lora_up_scaled_sum_triton",
    "triton_supports_lora_up_compose",
]

# ----------------------------------------------------------------------------
# Reference


def lora_up_compose_reference(
    result: Tensor,
    hidden: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    weight_norm: Tensor,
    bias: Tensor | None,
    scaling: float,
    out_dtype: torch.dtype,
) -> Tensor:
    """``compose_reference(result, linear(hidden, B), ...)``: the unfused path, ``lora`` in ``hidden``'s dtype."""
    return compose_reference(
        result, torch.nn.functional.linear(hidden, lora_B), magnitude, weight_norm, bias, scaling, out_dtype
    )


def lora_up_scaled_sum_reference(
    result: Tensor,
    hidden: Tensor,
    lora_B: Tensor,
    g: Tensor,
    bias: Tensor | None,
    scaling: float,
    out_dtype: torch.dtype,
) -> Tensor:
    """``scaled_sum(result, linear(hidden, B), g, ...)``: ``g·(result - b + s·h·Bᵀ) + b``, rounded once."""
    return scaled_sum(result, torch.nn.functional.linear(hidden, lora_B), g, bias, scaling, out_dtype)


# ----------------------------------------------------------------------------
# Triton kernel. result/out are row-major [T, N]; hidden [T, R]; B [N, R];
# per-feature vectors [N] (MAG holds g where G_GIVEN).


@triton.jit
def _lora_up_compose_kernel(
    RESULT,
    HIDDEN,
    B,
    MAG,
    NORM,
    BIAS,
    OUT,
    T,
    N,
    R,
    scaling,
    stride_ht,
    stride_hr,
    stride_bn,
    stride_br,
    HAS_BIAS: tl.constexpr,
    G_GIVEN: tl.constexpr,
    PRODUCT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_T: tl.constexpr,
):
    """``out[t, j] = g_j·(result[t, j] - b_j + s·Σ_k hidden[t, k]·B[j, k]) + b_j`` for one tile.

    ``g = m / n`` from ``MAG`` and ``NORM``, or ``MAG`` itself where ``G_GIVEN``. ``PRODUCT``:
    ``TENSOR_CORES`` (16-bit operands), ``IEEE_FP32`` (fp32 operands on FMA units, not TF32) or
    ``FP32_TERMS`` (fp32 operands as three bf16 terms each, ``dot_terms`` on tensor cores, each
    block's sum started from zero and added in fp32). Programs walk ``GROUP_T`` token tiles
    down one column band before the next, so the band of ``B`` and the rows of ``hidden``
    are reused from L2.
    """
    pid = tl.program_id(0)
    tiles_t = tl.cdiv(T, BLOCK_T)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_T * tiles_n
    first_t = (pid // per_group) * GROUP_T
    group_rows = tl.minimum(tiles_t - first_t, GROUP_T)
    tile_t = first_t + (pid % per_group) % group_rows
    tile_n = (pid % per_group) // group_rows

    rows = tile_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < T
    cmask = cols < N
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, R, BLOCK_R):
        ks = k0 + tl.arange(0, BLOCK_R)
        kmask = ks < R
        h = tl.load(
            HIDDEN + rows.to(tl.int64)[:, None] * stride_ht + ks[None, :] * stride_hr,
            mask=rmask[:, None] & kmask[None, :],
            other=0.0,
        )
        b_t = tl.load(
            B + cols[None, :] * stride_bn + ks[:, None] * stride_br, mask=kmask[:, None] & cmask[None, :], other=0.0
        )
        if PRODUCT == 1:  # IEEE_FP32
            acc = tl.dot(h, b_t, acc, input_precision="ieee")
        elif PRODUCT == 2:  # FP32_TERMS
            h0, h1, h2 = bf16_terms(h, 3)
            b0, b1, b2 = bf16_terms(b_t, 3)
            acc += dot_terms(h0, h1, h2, b0, b1, b2, tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32), 3, 3)
        else:
            acc = tl.dot(h, b_t, acc)

    s = tl.cast(scaling, tl.float32)  # Inductor passes Python floats as fp64
    g, b = scale_and_bias(MAG, NORM, BIAS, cols, cmask, HAS_BIAS, G_GIVEN)
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    mask = rmask[:, None] & cmask[None, :]
    res = tl.load(RESULT + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        out = g[None, :] * (res - b[None, :] + s * acc) + b[None, :]
    else:
        out = g[None, :] * (res + s * acc)
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------
# Launcher (also runs eagerly on CPU tensors under TRITON_INTERPRET=1)

_TRITON_DTYPES = (torch.bfloat16, torch.float16)
_ADAPTER_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
TENSOR_CORES, IEEE_FP32, FP32_TERMS = 0, 1, 2  # the kernel's PRODUCT


def triton_supports_lora_up_compose(result: Tensor, hidden: Tensor, lora_B: Tensor) -> bool:
    """16-bit ``result``; ``hidden`` and ``B`` of one dtype, 16-bit or fp32."""
    return result.dtype in _TRITON_DTYPES and hidden.dtype == lora_B.dtype and hidden.dtype in _ADAPTER_DTYPES


def lora_up_config(r: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Tile sizes and product of ``_lora_up_compose_kernel`` for rank ``r`` and adapters of ``dtype``.

    16-bit, from an H100 sweep at 4096 tokens, d_out 4096-14336 (``benchmarks/ops.py --parts
    lora_up``, docs/benchmarks.md): at r = 16 small tiles keep the pass at the copy
    bandwidth; at r = 384 wide ones halve the reloads of ``h``. fp32: the terms product in
    the 16-bit small-rank tiles with ``BLOCK_R`` ≤ 32, at every rank, the fastest option of
    the same sweep with fp32 adapters (the IEEE product's FMAs grow with the rank).
    Independent of the token count, which is symbolic when Inductor traces the launcher
    under dynamic shapes.
    """
    block_r = min(64, max(16, triton.next_power_of_2(r)))
    if dtype == torch.float32:
        tiles = dict(BLOCK_T=64, BLOCK_N=128, BLOCK_R=min(32, block_r), GROUP_T=8, num_warps=4, num_stages=3)
        return tiles | dict(PRODUCT=FP32_TERMS)
    if r <= 64:
        tiles = dict(BLOCK_T=64, BLOCK_N=128, BLOCK_R=block_r, GROUP_T=8, num_warps=4, num_stages=4)
    else:
        tiles = dict(BLOCK_T=128, BLOCK_N=256, BLOCK_R=block_r, GROUP_T=8, num_warps=8, num_stages=3)
    return tiles | dict(PRODUCT=TENSOR_CORES)


def _launch(
    result: Tensor,
    hidden: Tensor,
    lora_B: Tensor,
    vectors: tuple[Tensor, Tensor, Tensor],
    bias: Tensor | None,
    scaling: float,
    out_dtype: torch.dtype,
    g_given: bool,
    config: dict[str, int] | None,
) -> Tensor:
    """One launch of ``_lora_up_compose_kernel`` (``vectors``: its ``MAG``, ``NORM``, ``BIAS``)."""
    res, h = as_rows(result), hidden.reshape(-1, hidden.shape[-1])
    (t, n), r = res.shape, h.shape[1]
    out = torch.empty(result.shape, dtype=out_dtype, device=result.device)
    cfg = lora_up_config(r, h.dtype) | (config or {})
    if h.dtype == torch.float32 and cfg["PRODUCT"] == TENSOR_CORES:
        raise ValueError("fp32 adapters need PRODUCT=IEEE_FP32 or FP32_TERMS (a plain tensor-core dot is TF32)")
    grid = (triton.cdiv(t, cfg["BLOCK_T"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    wrap_triton(_lora_up_compose_kernel)[grid](
        res,
        h,
        lora_B,
        *vectors,
        out,
        t,
        n,
        r,
        scaling,
        h.stride(0),
        h.stride(1),
        lora_B.stride(0),
        lora_B.stride(1),
        HAS_BIAS=bias is not None,
        G_GIVEN=g_given,
        **cfg,
    )
    return out


def lora_up_compose_triton(
    result: Tensor,
    hidden: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    weight_norm: Tensor,
    bias: Tensor | None,
    scaling: float,
    out_dtype: torch.dtype,
    config: dict[str, int] | None = None,
) -> Tensor:
    """The fused up-projection and compose as one Triton kernel; ``config`` overrides keys of ``lora_up_config``."""
    vectors = feature_vectors(magnitude, weight_norm, bias)
    return _launch(result, hidden, lora_B, vectors, bias, scaling, out_dtype, False, config)


def lora_up_scaled_sum_triton(
    result: Tensor,
    hidden: Tensor,
    lora_B: Tensor,
    g: Tensor,
    bias: Tensor | None,
    scaling: float,
    out_dtype: torch.dtype,
    config: dict[str, int] | None = None,
) -> Tensor:
    """The same kernel with ``g`` given (fp32 ``[d_out]``); ``config`` overrides keys of ``lora_up_config``."""
    g = g.contiguous()
    vectors = (g, g, bias.contiguous() if bias is not None else g)  # NORM is not read
    return _launch(result, hidden, lora_B, vectors, bias, scaling, out_dtype, True, config)


# ----------------------------------------------------------------------------
# Ops: Triton on CUDA, the reference elsewhere (Inductor traces into both branches)


def _check_shapes(result: Tensor, hidden: Tensor, lora_B: Tensor, vector: Tensor) -> None:
    torch._check(lora_B.dim() == 2 and hidden.shape[-1] == lora_B.shape[1], lambda: "lora_up_compose: h·Bᵀ shapes")
    torch._check(result.shape[-1] == lora_B.shape[0] and result.shape[:-1] == hidden.shape[:-1])
    torch._check(vector.dim() == 1 and vector.shape[0] == result.shape[-1])


@triton_op("dora_fused::lora_up_compose", mutates_args=())
def _lora_up_compose_op(
    result: Tensor,
    hidden: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    weight_norm: Tensor,
    bias: Tensor | None,
    scaling: float,
    out_dtype: torch.dtype,
) -> Tensor:
    _check_shapes(result, hidden, lora_B, magnitude)
    torch._check(weight_norm.dim() == 1)
    if result.is_cuda and triton_supports_lora_up_compose(result, hidden, lora_B):
        return lora_up_compose_triton(result, hidden, lora_B, magnitude, weight_norm, bias, scaling, out_dtype)
    return lora_up_compose_reference(result, hidden, lora_B, magnitude, weight_norm, bias, scaling, out_dtype)


@triton_op("dora_fused::lora_up_scaled_sum", mutates_args=())
def _lora_up_scaled_sum_op(
    result: Tensor,
    hidden: Tensor,
    lora_B: Tensor,
    g: Tensor,
    bias: Tensor | None,
    scaling: float,
    out_dtype: torch.dtype,
) -> Tensor:
    _check_shapes(result, hidden, lora_B, g)
    if result.is_cuda and g.dtype == torch.float32 and triton_supports_lora_up_compose(result, hidden, lora_B):
        return lora_up_scaled_sum_triton(result, hidden, lora_B, g, bias, scaling, out_dtype)
    return lora_up_scaled_sum_reference(result, hidden, lora_B, g, bias, scaling, out_dtype)


def lora_up_compose(
    result: Tensor,
    hidden: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    weight_norm: Tensor,
    bias: Tensor | None,
    scaling: float,
    out_dtype: torch.dtype,
) -> Tensor:
    """``g ⊙ (result - b + s·hidden·Bᵀ) + b`` with ``g = m / n`` (no gradient): see the module docstring.

    ``result`` is ``[..., d_out]``, ``hidden`` ``[..., r]`` (``A·x``), ``lora_B``
    ``[d_out, r]``; ``magnitude``, ``weight_norm`` and ``bias`` are ``[d_out]``.
    """
    return torch.ops.dora_fused.lora_up_compose(
        result, hidden, lora_B, magnitude, weight_norm, bias, float(scaling), out_dtype
    )


def lora_up_scaled_sum(
    result: Tensor,
    hidden: Tensor,
    lora_B: Tensor,
    g: Tensor,
    bias: Tensor | None,
    scaling: float,
    out_dtype: torch.dtype,
) -> Tensor:
    """``g ⊙ (result - b + s·hidden·Bᵀ) + b`` for a given ``g`` (``[d_out]``, no gradient), computed in ``g``'s dtype.

    Shapes as in ``lora_up_compose``. The forward of the training compose (``folded_compose``).
    """
    return torch.ops.dora_fused.lora_up_scaled_sum(result, hidden, lora_B, g, bias, float(scaling), out_dtype)
