"""``G = A·Aᵀ`` at fp32 accuracy from the 16-bit terms of ``A``, on tensor cores.

``A [r, d_in]`` enters as ``T`` stacked terms ``X = [A_0; A_1; …] [T·r, d_in]``
with ``A = Σ_t A_t / scale`` (``common.adapter_terms``; one term for 16-bit
adapters). The stack's product with itself holds every term product::

    P = X·Xᵀ,   block P_ij = A_i·A_jᵀ,   G = Σ_{i + j ≤ 2} P_ij / scale²

(the dropped orders are ``2^-24`` of ``G`` and below, under fp32's rounding).
``P`` is symmetric, so only its tiles on and above the diagonal are computed.
Each tensor-core accumulation covers one chunk of ``d_in`` and is added in fp32;
split-K shares of ``d_in`` are added in a fixed order (deterministic). ``G``
leaves as three bf16 terms ``[3, r, r]`` (``G = Σ_t terms[t]``), which the
norm's epilogue multiplies on tensor cores.

Layout: pure-torch reference → Triton kernels → plan → launcher.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from .common import adapter_terms, bf16_terms

__all__ = ["GramPlan", "gram_fp32", "gram_plan", "gram_terms", "gram_triton"]

# ----------------------------------------------------------------------------
# Reference


def gram_fp32(lora_A: Tensor) -> Tensor:
    """``G = A·Aᵀ`` as an fp32 product (the reference for ``gram_triton``)."""
    a = lora_A.float()
    return a @ a.T


# ----------------------------------------------------------------------------
# Triton kernels (CUDA; also run on CPU tensors under TRITON_INTERPRET=1)


@triton.jit
def _pair_products_kernel(
    X, P, AFTER, n, d_in, r, k_per_split, stride_xn, stride_xk, MAX_ORDER: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``P[split] = X[:, K_split]·X[:, K_split]ᵀ`` (fp32) for a stack ``X = [A_0; A_1; …]`` of ``[r, d_in]`` terms.

    Tensor cores multiply; each ``BLOCK_K`` chunk is one accumulation started
    from zero (two half-chunk dots, so the compiler cannot fold the add into the
    dot) added to the running sum in fp32: one long tensor-core accumulation
    over ``d_in`` loses bits: with ``G`` from one cuBLAS product of the terms, the
    norm was 1.2e-6 to 1.3e-5 off fp64 on the H100 (2e-7 with this kernel).
    Tiles lying wholly in blocks ``A_i·A_jᵀ`` with ``i + j > MAX_ORDER`` are skipped.
    ``P`` is symmetric: only the tiles on and above the diagonal are computed, and
    each one above it is also stored transposed, below it.
    ``AFTER`` is never read (``after`` of ``factored_norm.factored_row_norm_triton``).
    """
    HALF: tl.constexpr = BLOCK_K // 2
    ti = tl.program_id(0)
    tj = tl.program_id(1)
    split = tl.program_id(2)
    if ti <= tj and (ti * BLOCK) // r + (tj * BLOCK) // r <= MAX_ORDER:
        rows = ti * BLOCK + tl.arange(0, BLOCK)
        cols = tj * BLOCK + tl.arange(0, BLOCK)
        k_lo = split * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, d_in)
        acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            ks0 = k0 + tl.arange(0, HALF)
            ks1 = ks0 + HALF
            x_rows = X + rows[:, None] * stride_xn
            y_cols = X + cols[None, :] * stride_xn
            x_mask = rows[:, None] < n
            y_mask = cols[None, :] < n
            x0 = tl.load(x_rows + ks0[None, :] * stride_xk, mask=x_mask & (ks0 < k_hi)[None, :], other=0.0)
            x1 = tl.load(x_rows + ks1[None, :] * stride_xk, mask=x_mask & (ks1 < k_hi)[None, :], other=0.0)
            y0 = tl.load(y_cols + ks0[:, None] * stride_xk, mask=y_mask & (ks0 < k_hi)[:, None], other=0.0)
            y1 = tl.load(y_cols + ks1[:, None] * stride_xk, mask=y_mask & (ks1 < k_hi)[:, None], other=0.0)
            acc += tl.dot(x1, y1, tl.dot(x0, y0))
        mask = (rows < n)[:, None] & (cols < n)[None, :]
        tl.store(P + split * n * n + rows[:, None] * n + cols[None, :], acc, mask=mask)
        if ti < tj:
            tl.store(P + split * n * n + cols[None, :] * n + rows[:, None], acc, mask=mask)


@triton.jit
def _gram_combine_kernel(
    P,
    SCALE,
    G_TERMS,
    r,
    splits,
    TERMS: tl.constexpr,
    MAX_ORDER: tl.constexpr,
    SCALED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``G = Σ_split Σ_{i+j <= MAX_ORDER} P[split]_ij / SCALE²`` as three bf16 terms ``[3, r, r]``.

    ``P[split]`` is ``[TERMS·r, TERMS·r]``: block ``P_ij`` is ``A_i·A_jᵀ``. Splits
    are added in a fixed order, then the blocks smallest order first (the
    dropped orders, ``2^-24`` of ``G`` and below, are under fp32's rounding).
    ``SCALE`` (read only when ``SCALED``) is a power of two, so dividing by its
    square is exact.
    """
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < r * r
    i = offsets // r
    j = offsets % r
    width = TERMS * r
    g = tl.zeros([BLOCK], dtype=tl.float32)
    for order in tl.static_range(MAX_ORDER, -1, -1):
        for ti in tl.static_range(TERMS):
            tj = order - ti
            if tj >= 0 and tj < TERMS:
                block = tl.zeros([BLOCK], dtype=tl.float32)
                for split in range(0, splits):
                    block += tl.load(
                        P + split * width * width + (ti * r + i) * width + tj * r + j, mask=mask, other=0.0
                    )
                g += block
    if SCALED:
        s = tl.load(SCALE)
        g = g / (s * s)
    g0, g1, g2 = bf16_terms(g, 3)
    size = r * r
    tl.store(G_TERMS + offsets, g0, mask=mask)
    tl.store(G_TERMS + size + offsets, g1, mask=mask)
    tl.store(G_TERMS + 2 * size + offsets, g2, mask=mask)


# ----------------------------------------------------------------------------
# Plan


_GRAM_PROGRAMS = 264  # about two programs per H100 SM: tiles x splits aims at this many
_GRAM_MIN_SPLIT = 512  # columns of d_in per split at least


@dataclasses.dataclass(frozen=True)
class GramPlan:
    """How ``_pair_products_kernel`` runs: output tiles, columns per accumulation, split-K shares."""

    block: int  # rows and columns of an output tile
    block_k: int  # columns per tensor-core accumulation; splits are whole multiples of it
    num_warps: int
    splits: int
    k_per_split: int


def gram_plan(r: int, d_in: int, a_count: int, tiles: tuple[int, int, int] | None = None) -> GramPlan:
    """The plan for ``a_count`` stacked ``[r, d_in]`` terms; ``tiles``, ``(block, block_k, num_warps)``,
    overrides the choice below (benchmarks).

    The tiles by rows of terms, the fastest measured on an H200 (docs/design.md,
    docs/benchmarks.md):
    - over 512 rows (fp32 adapters at r = 384: 1152), tiles of 128 with
      128-column accumulations and 8 warps (``G`` also closer to fp64 than with
      tiles of 64);
    - 97 to 512 rows (16-bit adapters at r = 384), tiles of 64 with 128-column
      accumulations;
    - up to 96 rows, tiles of 32.
    Split-K fills about ``_GRAM_PROGRAMS`` programs, each split at least
    ``_GRAM_MIN_SPLIT`` columns of ``d_in``.
    """
    n = a_count * r
    if tiles is not None:
        block, block_k, num_warps = tiles
    elif n > 512:
        block, block_k, num_warps = 128, 128, 8
    elif n > 96:
        block, block_k, num_warps = 64, 128, 4
    else:
        block, block_k, num_warps = 32, 64, 4
    tiles = triton.cdiv(n, block) ** 2
    splits = max(1, min(triton.cdiv(_GRAM_PROGRAMS, tiles), triton.cdiv(d_in, _GRAM_MIN_SPLIT)))
    k_per_split = triton.cdiv(triton.cdiv(d_in, splits), block_k) * block_k
    return GramPlan(block, block_k, num_warps, triton.cdiv(d_in, k_per_split), k_per_split)


def gram_terms(
    a_terms: Tensor,
    scale: Tensor | None,
    r: int,
    after: Tensor | None = None,
    tiles: tuple[int, int, int] | None = None,
) -> Tensor:
    """``G = A·Aᵀ`` at fp32 accuracy as three bf16 terms ``[3, r, r]`` (``G = Σ_t terms[t]``).

    ``a_terms`` and ``scale`` are ``adapter_terms``'s (``A = Σ_t A_t / scale``, or
    ``Σ_t A_t`` for no scale).
    Two kernels: split-K products of the stacked terms with themselves on tensor
    cores (every ``A_i·A_jᵀ`` with ``i + j <= 2``, short accumulations added in
    fp32), then their fixed-order sum, with the power-of-two ``scale²`` divided
    out, split into bf16 terms. ``after``: see ``factored_norm.factored_row_norm_triton``;
    ``tiles``: see ``gram_plan`` (benchmarks).
    """
    n, d_in = a_terms.shape
    count = n // r
    max_order = min(2, 2 * count - 2)
    plan = gram_plan(r, d_in, count, tiles)
    pairs = torch.empty(plan.splits, n, n, dtype=torch.float32, device=a_terms.device)
    tiles = triton.cdiv(n, plan.block)
    wrap_triton(_pair_products_kernel)[(tiles, tiles, plan.splits)](
        a_terms,
        pairs,
        a_terms if after is None else after,
        n,
        d_in,
        r,
        plan.k_per_split,
        a_terms.stride(0),
        a_terms.stride(1),
        MAX_ORDER=max_order,
        BLOCK=plan.block,
        BLOCK_K=plan.block_k,
        num_warps=plan.num_warps,
    )
    terms = torch.empty(3, r, r, dtype=torch.bfloat16, device=a_terms.device)
    wrap_triton(_gram_combine_kernel)[(triton.cdiv(r * r, 1024),)](
        pairs,
        pairs if scale is None else scale,  # (never read without a scale)
        terms,
        r,
        plan.splits,
        TERMS=count,
        MAX_ORDER=max_order,
        SCALED=scale is not None,
        BLOCK=1024,
    )
    return terms


def gram_triton(lora_A: Tensor) -> Tensor:
    """``G = A·Aᵀ`` in fp32 from ``gram_terms`` (tests and diagnostics)."""
    a_terms, scale = adapter_terms(lora_A, torch.bfloat16 if lora_A.dtype == torch.float32 else lora_A.dtype)
    terms = gram_terms(a_terms, scale, lora_A.shape[0]).float()
    return (terms[2] + terms[1]) + terms[0]
