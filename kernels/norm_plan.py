"""How the factored row norm runs one layer: its plain-torch chunks, its Triton grid and its working memory.

The plain-torch path promotes rows of ``W`` to the accumulation dtype at most
``CHUNK_BYTES`` at a time.

The Triton path's main kernel (``factored_norm._fused_norm_kernel``) takes a
``[BLOCK_M rows, BLOCK_N of r]`` tile per program, and ``splits`` programs per
tile where the tiles alone leave SMs idle for part of a wave. A program's time
is its share of ``d_in``, so with ``tiles`` output tiles on ``SMs``
multiprocessors, ``splits`` programs per tile take::

    waves(splits) = ceil(tiles·splits / SMs) / splits      full-tile wave times

and ``norm_splits`` takes the fewest splits that minimize it, a split having to
save ``1 - _SPLIT_GAIN`` of the waves (each adds an epilogue and a partial sum).
``NormPlan.workspace_bytes`` counts the buffers the plan allocates,
``O(d_out·r + r·d_in + r²)``; the audit's memory estimate reads it too.

Layout: the plain-torch chunk size → tile options → split-K → the plan.
"""

from __future__ import annotations

import dataclasses

import triton

from .gram import gram_plan
from .products import has_mm_out_dtype

__all__ = ["CHUNK_BYTES", "NormPlan", "norm_config", "norm_plan", "norm_splits"]

# Rows of W promoted at a time by the chunked implementation: bounds the
# transient memory to CHUNK_BYTES whatever the layer size.
CHUNK_BYTES = 64 * 2**20


def norm_config(r: int, a_terms: int) -> dict[str, object]:
    """Options of ``_fused_norm_kernel`` (H100 sweep, ``benchmarks/ops.py --parts sweep``).

    ``SPLIT_K`` is left to ``norm_splits``. With fp32 adapters and ``r > 64`` the
    three products of ``U`` run on cuBLAS (one call over the stacked terms):
    faster on the H100 than the kernel's own three-accumulator loop, at a
    slightly larger error against fp64 (docs/design.md).
    """
    if r <= 64:  # streaming W dominates: one column tile, long K steps
        n = max(16, triton.next_power_of_2(r))
        if a_terms == 3 and n == 64:
            # three A tiles of 64 columns: the long steps' pipeline needs 352 KB of shared
            # memory (an H100/H200 has 227 KB). Measured on the H200, 4096² / 8192²: 48-49 /
            # 149-158 µs; K steps of 128 with Triton's default three stages were 61 / 186-189 µs.
            return dict(BLOCK_M=64, BLOCK_N=n, BLOCK_K=128, SUB_K=64, BLOCK_R=16, num_warps=4, num_stages=2)
        return dict(BLOCK_M=64, BLOCK_N=n, BLOCK_K=256, SUB_K=128, BLOCK_R=16, num_warps=4)
    if a_terms == 3 and has_mm_out_dtype():
        # the kernel is the epilogue only; on an H200 (r = 384, four layer shapes, before the epilogue
        # took half of B·G) G in 64-row chunks with three stages took 141-352 µs for the whole norm,
        # 32-row chunks with two stages 143-382 µs
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, BLOCK_R=64, U_FROM="cublas", num_warps=4, num_stages=3)
    if a_terms == 3:  # three accumulators
        return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, SUB_K=32, BLOCK_R=32, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, SUB_K=64, BLOCK_R=32, num_warps=8, num_stages=3)


_MIN_SPLIT_K = 1024  # columns of d_in per split at least: each split pays the epilogue and a partial sum
_SPLIT_GAIN = 0.85  # more splits only for 15% fewer waves (336 tiles: 3 → 2.67 waves measured 6% slower)


def norm_splits(tiles: int, d_in: int, multiprocessors: int) -> int:
    """Split-K count for ``tiles`` output tiles: the fewest splits that minimize waves per unit of work.

    A program's time is its share of ``d_in``, so ``splits`` programs per tile take
    ``ceil(tiles·splits / SMs) / splits`` full-tile wave times: 192 tiles on 132
    SMs are two waves at ``splits = 1`` (the second 45% full) and 1.5 at 2.
    Each split adds an epilogue and a partial sum, so a split must save 15%.
    """
    best, best_waves = 1, float(-(-tiles // multiprocessors))
    for splits in range(2, 9):
        if d_in < splits * _MIN_SPLIT_K:
            break
        waves = -(-tiles * splits // multiprocessors) / splits
        if waves < _SPLIT_GAIN * best_waves:
            best, best_waves = splits, waves
    return best if multiprocessors > 1 else 1


@dataclasses.dataclass(frozen=True)
class NormPlan:
    """How ``factored_row_norm_triton`` runs one layer: ``_fused_norm_kernel``'s grid, options and buffers."""

    kernel: dict[str, int]  # tile sizes and launch options of _fused_norm_kernel
    u_from_cublas: bool  # U from one cuBLAS product, read by the kernel's epilogue
    fused_squares: bool  # ‖W‖² from the kernel's own W tiles (else _row_squares_kernel)
    parts: int  # column tiles of r
    row_tiles: int
    splits: int  # shares of d_in (and of B·G's r chunks)
    k_per_split: int

    @property
    def finish_in_kernel(self) -> bool:
        return self.parts == 1 and self.splits == 1 and self.fused_squares

    def workspace_bytes(self, d_out: int, d_in: int, r: int, a_count: int) -> int:
        """Bytes the norm allocates besides its ``[d_out]`` result."""
        total = (a_count > 1) * a_count * r * d_in * 2  # A's 16-bit terms
        total += 2 * d_out * 4  # the sum's terms, for the ill-conditioned rows
        total += gram_plan(r, d_in, a_count).splits * (a_count * r) ** 2 * 4 + 3 * r * r * 2  # Gram partials, G's terms
        total += self.u_from_cublas * d_out * a_count * r * 4
        if not self.finish_in_kernel:
            total += (2 * self.splits * self.parts + (self.splits if self.fused_squares else 1)) * d_out * 4
        return total


def norm_plan(
    d_out: int, d_in: int, r: int, a_count: int, multiprocessors: int, config: dict[str, object] | None = None
) -> NormPlan:
    """The plan for a ``[d_out, d_in]`` layer of rank ``r`` whose A enters as ``a_count`` terms.

    ``config`` overrides ``norm_config`` (benchmarks, tests): its ``SPLIT_K``
    overrides ``norm_splits``, ``W_SQUARES=False`` takes ``‖W‖²`` in a pass of its
    own and ``U_FROM="cublas"`` takes ``U`` from a cuBLAS product.
    """
    cfg = dict(config) if config is not None else norm_config(r, a_count)
    cfg.setdefault("SUB_K", cfg["BLOCK_K"] // 2)
    if cfg["BLOCK_K"] < 2 * cfg["SUB_K"]:
        raise ValueError("BLOCK_K must hold two SUB_K dots (one would fold the fp32 add into the dot)")
    if cfg["BLOCK_N"] % cfg["BLOCK_R"]:
        raise ValueError("BLOCK_R must divide BLOCK_N (the epilogue's chunks of G lie before or inside a tile)")
    u_from_cublas = cfg.pop("U_FROM", "kernel") == "cublas"
    fused_squares = bool(cfg.pop("W_SQUARES", True)) and not u_from_cublas
    parts = triton.cdiv(r, cfg["BLOCK_N"])
    row_tiles = triton.cdiv(d_out, cfg["BLOCK_M"])
    splits = cfg.pop("SPLIT_K", None) or (1 if u_from_cublas else norm_splits(parts * row_tiles, d_in, multiprocessors))
    k_per_split = triton.cdiv(triton.cdiv(d_in, splits), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    splits = triton.cdiv(d_in, k_per_split)  # rounding the share up may leave fewer
    return NormPlan(cfg, u_from_cublas, fused_squares, parts, row_tiles, splits, k_per_split)
