"""Rows where the factored norm cancels, recomputed densely.

The factored row norm adds three terms, ``n² = T0 + T1 + T2`` with
``T0 = ‖W_i‖²``, ``T1 = 2s·⟨W_i, (B·A)_i⟩`` and ``T2 = s²·‖(B·A)_i‖²``. Where the
adapter nearly cancels the base row (``W_i ≈ -s·(B·A)_i``), ``T1 ≈ -(T0 + T2)``
and the sum loses the bits that the dense path keeps. With ``ε`` the
accumulation's relative rounding error (the same for both paths: fp32 or fp64
sums over ``d_in``), to first order:

- factored: ``|Δn²| ≤ ε·(T0 + |T1| + T2)``: each term is accurate relative to
  its own size, and the sum is as accurate as the sum of the sizes;
- dense (``e_i = W_i + s·B_i·A`` formed elementwise, then ``‖e_i‖²``):
  ``|Δn²| ≤ ε·(n² + 2n·(‖W_i‖ + |s|·‖(B·A)_i‖)) = ε·(n² + 2n·(√T0 + √T2))``:
  each element is accurate relative to the larger of its two summands.

So a row is recomputed exactly where the first bound exceeds the second::

    T0 + |T1| + T2 > n² + 2n·(√T0 + √T2)        with  T0 + |T1| + T2 = max(n², 2(T0 + T2) - n²)

Rows with ``T1 ≥ 0`` (nothing cancels) are never flagged, nor are rows of
random adapters (``W_i`` and ``(B·A)_i`` nearly orthogonal); a row is flagged
once its cancellation is larger than about a cosine of ``√3 - 1`` between
``W_i`` and ``-s·(B·A)_i`` of equal sizes. A flagged row is computed as the dense
path does, ``‖W_i + s·B_i·A‖`` in the accumulation dtype, for that row only:
never less precise than the dense norm, and no dense work where nothing is
flagged. Every input is read in its own dtype.

Layout: pure-torch rule and reference → Triton kernel (CUDA; no host sync, so
it runs under CUDA graphs) → ``torch.library`` op (the torch implementation
syncs once to gather the flagged rows: CPU, and CUDA without Triton's dtypes).
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import accumulation_dtype

__all__ = [
    "dense_rows_reference",
    "ill_conditioned",
    "refine_ill_conditioned_rows",
    "refine_ill_conditioned_rows_torch",
    "refine_ill_conditioned_rows_triton",
]

logger = logging.getLogger("dora_fused")


def ill_conditioned(norm: Tensor, w_squared: Tensor, lora_squared: Tensor) -> Tensor:
    """The rows whose factored sum is less accurate than the dense path's (bool ``[d_out]``).

    ``norm`` is the factored ``n``, ``w_squared`` is ``T0 = ‖W_i‖²`` and
    ``lora_squared`` is ``T2 = s²·‖(B·A)_i‖²``, all in the accumulation dtype.
    """
    n2 = norm * norm
    terms = torch.maximum(n2, 2.0 * (w_squared + lora_squared) - n2)
    return terms > n2 + 2.0 * norm * (w_squared.sqrt() + lora_squared.sqrt())


def dense_rows_reference(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, rows: Tensor) -> Tensor:
    """``‖W_i + s·B_i·A‖`` for the given row indices, in the accumulation dtype (as the dense path computes it)."""
    acc = accumulation_dtype(weight, lora_A, lora_B)
    w = weight.reshape(weight.shape[0], -1)[rows].to(acc)
    return torch.linalg.vector_norm(w + scaling * (lora_B[rows].to(acc) @ lora_A.to(acc)), dim=1)


def refine_ill_conditioned_rows_torch(
    norm: Tensor,
    w_squared: Tensor,
    lora_squared: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
) -> Tensor:
    """``norm`` with its ill-conditioned rows recomputed densely (a new tensor); plain torch, one host sync."""
    rows = ill_conditioned(norm, w_squared, lora_squared).nonzero().squeeze(1)
    if rows.numel() == 0:
        return norm.clone()
    logger.debug("factored norm: %d of %d rows recomputed densely (cancellation)", rows.numel(), norm.numel())
    refined = norm.clone()
    refined[rows] = dense_rows_reference(weight, lora_A, lora_B, scaling, rows).to(norm.dtype)
    return refined


# ----------------------------------------------------------------------------
# Triton kernel (CUDA; also runs on CPU tensors under TRITON_INTERPRET=1)


@triton.jit
def _refine_rows_kernel(
    NORM,
    WSQ,
    LSQ,
    W,
    A,
    B,
    d_out,
    d_in,
    r,
    scaling,
    stride_wo,
    stride_wi,
    stride_ar,
    stride_ak,
    stride_bo,
    stride_br,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """For ``BLOCK_M`` rows: flag them by the rule above; if any is flagged, ``NORM_i = ‖W_i + s·B_i·A‖``.

    A block with no flagged row reads ``3·BLOCK_M`` values and stops. A flagged
    block forms ``W_i + s·Σ_k B_ik·A_k`` in ``BLOCK_K`` columns at a time with
    FMAs in ``ACC`` (no tensor cores: the products are exact as the dense path's
    fp32 ones), and writes the flagged rows only.
    """
    s = tl.cast(scaling, ACC)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < d_out
    n = tl.load(NORM + rows, mask=rmask, other=0.0).to(ACC)
    t0 = tl.load(WSQ + rows, mask=rmask, other=0.0).to(ACC)
    t2 = tl.load(LSQ + rows, mask=rmask, other=0.0).to(ACC)
    n2 = n * n
    terms = tl.maximum(n2, 2.0 * (t0 + t2) - n2)
    flag = rmask & (terms > n2 + 2.0 * n * (tl.sqrt(t0) + tl.sqrt(t2)))
    if tl.sum(flag.to(tl.int32), axis=0) > 0:
        total = tl.zeros([BLOCK_M], dtype=ACC)
        for k0 in range(0, d_in, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < d_in
            product = tl.zeros([BLOCK_M, BLOCK_K], dtype=ACC)
            for j in range(0, r):
                b = tl.load(B + rows * stride_bo + j * stride_br, mask=flag, other=0.0).to(ACC)
                a = tl.load(A + j * stride_ar + ks * stride_ak, mask=kmask, other=0.0).to(ACC)
                product += b[:, None] * a[None, :]
            w = tl.load(
                W + rows[:, None] * stride_wo + ks[None, :] * stride_wi,
                mask=flag[:, None] & kmask[None, :],
                other=0.0,
            ).to(ACC)
            e = w + s * product
            total += tl.sum(e * e, axis=1)
        tl.store(NORM + rows, tl.sqrt(total).to(NORM.dtype.element_ty), mask=flag)


def refine_ill_conditioned_rows_triton(
    norm: Tensor,
    w_squared: Tensor,
    lora_squared: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    launch=None,
) -> None:
    """Recompute ``norm``'s ill-conditioned rows in place (one kernel, no host sync).

    ``weight`` is ``[d_out, d_in]`` (a Conv weight flattened past dim 0 by the
    caller). ``launch`` wraps the kernel (``torch.library.wrap_triton`` inside a
    ``triton_op``); by default it is launched directly.
    """
    d_out, d_in = weight.shape
    kernel = _refine_rows_kernel if launch is None else launch(_refine_rows_kernel)
    acc = tl.float64 if norm.dtype == torch.float64 else tl.float32
    kernel[(triton.cdiv(d_out, 16),)](
        norm,
        w_squared,
        lora_squared,
        weight,
        lora_A,
        lora_B,
        d_out,
        d_in,
        lora_A.shape[0],
        scaling,
        weight.stride(0),
        weight.stride(1),
        lora_A.stride(0),
        lora_A.stride(1),
        lora_B.stride(0),
        lora_B.stride(1),
        ACC=acc,
        BLOCK_M=16,
        BLOCK_K=128,
    )


# ----------------------------------------------------------------------------
# Op: opaque to Inductor (the torch implementation's row count is data-dependent)


@torch.library.custom_op("dora_fused::refine_ill_conditioned_rows", mutates_args=())
def _refine_op(
    norm: Tensor,
    w_squared: Tensor,
    lora_squared: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
) -> Tensor:
    weight = weight.reshape(weight.shape[0], -1)
    if norm.is_cuda:
        refined = norm.clone()
        refine_ill_conditioned_rows_triton(refined, w_squared, lora_squared, weight, lora_A, lora_B, scaling)
        return refined
    return refine_ill_conditioned_rows_torch(norm, w_squared, lora_squared, weight, lora_A, lora_B, scaling)


@_refine_op.register_fake
def _(norm, w_squared, lora_squared, weight, lora_A, lora_B, scaling):
    return torch.empty_like(norm)


def refine_ill_conditioned_rows(
    norm: Tensor,
    w_squared: Tensor,
    lora_squared: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
) -> Tensor:
    """``norm`` (the factored ``‖W + s·B·A‖_row``) with its ill-conditioned rows recomputed densely.

    ``w_squared`` and ``lora_squared`` are the factored sum's ``T0`` and ``T2``
    (module docstring). ``weight`` may be N-D (a Conv weight: its rows are
    flattened past dim 0). Returns a new tensor; not differentiable.
    """
    if isinstance(scaling, torch.SymFloat):  # a traced s (dynamic=True): the op's float would specialize it
        lora_B, scaling = lora_B.to(norm.dtype) * scaling, 1.0
    return torch.ops.dora_fused.refine_ill_conditioned_rows(
        norm, w_squared, lora_squared, weight, lora_A, lora_B, float(scaling)
    )
