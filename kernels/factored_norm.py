"""Row norm of ``W + s·B·A`` without the dense ``[d_out, d_in]`` product.

For each output row ``i``::

    ||W_i + s·(B·A)_i||² = ||W_i||² + 2s·Σ_k B_ik·U_ik + s²·Σ_k (B·G)_ik·B_ik
    with  U = W·Aᵀ  [d_out, r]   and   G = A·Aᵀ  [r, r]

so the only intermediates are ``O(d_out·r + r²)``, plus a bounded chunk of rows
of ``W`` promoted to the accumulation dtype. The sum is clamped at zero before
the square root (it is a norm; rounding may push a tiny value below zero).

Accumulation is in fp32, or fp64 when any input is fp64: never below the
precision of the dense path it replaces (PEFT computes the dense product in the
adapter dtype, adds in the input dtype and takes the norm there).

Layout: pure-torch reference → chunked implementation → ``torch.library`` op
with a fake implementation. The op has no autograd: DoRA detaches the norm
(paper §4.3), and the rewrite detaches its inputs exactly where PEFT does.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "accumulation_dtype",
    "dense_row_norm_reference",
    "factored_row_norm",
    "factored_row_norm_reference",
]

# Rows of W promoted at a time by the chunked implementation: bounds the
# transient memory to CHUNK_BYTES whatever the layer size.
CHUNK_BYTES = 64 * 2**20


def accumulation_dtype(*tensors: Tensor) -> torch.dtype:
    """fp64 if any input is fp64, else fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def dense_row_norm_reference(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """The dense definition, ``||W + s·B·A||_row``, in the accumulation dtype (tests only)."""
    acc = accumulation_dtype(weight, lora_A, lora_B)
    dense = weight.to(acc) + scaling * (lora_B.to(acc) @ lora_A.to(acc))
    return torch.linalg.vector_norm(dense, dim=1)


def factored_row_norm_reference(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """The factored identity written plainly (promotes all of ``W`` at once)."""
    acc = accumulation_dtype(weight, lora_A, lora_B)
    w, a, b = weight.to(acc), lora_A.to(acc), lora_B.to(acc)
    u = w @ a.T
    gram = a @ a.T
    squared = (w * w).sum(1) + 2.0 * scaling * (b * u).sum(1) + scaling * scaling * ((b @ gram) * b).sum(1)
    return squared.clamp_min(0.0).sqrt()


def _factored_row_norm_chunked(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """Same math as the reference, promoting at most ``CHUNK_BYTES`` of ``W`` at a time."""
    acc = accumulation_dtype(weight, lora_A, lora_B)
    d_out, d_in = weight.shape
    a = lora_A.to(acc)
    a_t = a.T
    gram = a @ a_t
    out = torch.empty(d_out, dtype=acc, device=weight.device)
    itemsize = torch.finfo(acc).bits // 8
    rows = max(1, CHUNK_BYTES // max(1, d_in * itemsize))
    for start in range(0, d_out, rows):
        stop = min(start + rows, d_out)
        w = weight[start:stop].to(acc)
        b = lora_B[start:stop].to(acc)
        squared = (
            (w * w).sum(1) + (2.0 * scaling) * (b * (w @ a_t)).sum(1) + (scaling * scaling) * ((b @ gram) * b).sum(1)
        )
        out[start:stop] = squared.clamp_min(0.0).sqrt()
    return out


@torch.library.custom_op("dora_fused::factored_row_norm", mutates_args=())
def _factored_row_norm_op(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    return _factored_row_norm_chunked(weight, lora_A, lora_B, scaling)


@_factored_row_norm_op.register_fake
def _(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    torch._check(weight.dim() == 2 and lora_A.dim() == 2 and lora_B.dim() == 2)
    torch._check(lora_A.shape[1] == weight.shape[1] and lora_B.shape[0] == weight.shape[0])
    torch._check(lora_A.shape[0] == lora_B.shape[1])
    acc = accumulation_dtype(weight, lora_A, lora_B)
    return weight.new_empty(weight.shape[0], dtype=acc)


def factored_row_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """``||W + s·B·A||_row`` for ``W [d_out, d_in]``, ``A [r, d_in]``, ``B [d_out, r]``.

    Returns ``[d_out]`` in the accumulation dtype (fp32, or fp64 for fp64
    inputs). Not differentiable: callers detach, as DoRA does.
    """
    return torch.ops.dora_fused.factored_row_norm(weight, lora_A, lora_B, float(scaling))
