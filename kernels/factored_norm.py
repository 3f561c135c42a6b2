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

Two pure-torch implementations behind one op:

- tensor cores (CUDA, bf16/fp16 ``W``): ``U = W·Aᵀ`` as low-precision products
  with fp32 accumulation and fp32 output (``torch.mm(..., out_dtype=float32)``),
  reading ``W`` in its own dtype, never an fp32 copy of it. An fp32 ``A`` is split
  exactly into three bf16 terms ``A_hi + A_mid + A_lo`` (8 significand bits
  each, bf16 has fp32's exponent range), so ``U`` is as precise as an fp32 product;
- chunked (everything else): rows of ``W`` promoted to the accumulation dtype,
  at most ``CHUNK_BYTES`` at a time.

Layout: pure-torch reference → implementations → ``torch.library`` op with a
fake implementation. The op has no autograd: DoRA detaches the norm
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
    "factored_row_norm_torch",
    "split_terms",
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
    itemsize = torch.finfo(acc).bits // 8
    rows = max(1, CHUNK_BYTES // max(1, d_in * itemsize))
    chunks = []
    for start in range(0, d_out, rows):
        w = weight[start : start + rows].to(acc)
        b = lora_B[start : start + rows].to(acc)
        squared = (
            (w * w).sum(1) + (2.0 * scaling) * (b * (w @ a_t)).sum(1) + (scaling * scaling) * ((b @ gram) * b).sum(1)
        )
        chunks.append(squared.clamp_min(0.0).sqrt())
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


def split_terms(t: Tensor, dtype: torch.dtype, terms: int) -> list[Tensor]:
    """``t = Σ parts`` (up to the last part's rounding), each part exactly representable in ``dtype``.

    Each part is the ``dtype`` rounding of what the previous parts left over,
    computed in fp32: three bf16 parts carry all 24 significand bits of an fp32 ``t``.
    """
    parts, rest = [], t.float()
    for _ in range(terms):
        part = rest.to(dtype)
        parts.append(part)
        rest = rest - part.float()
    return parts


def _tensor_core_terms(weight: Tensor, lora_A: Tensor) -> int:
    """How many ``weight.dtype`` terms carry ``lora_A`` exactly; 0 if the tensor-core path does not apply."""
    if weight.device.type != "cuda" or weight.dtype not in (torch.bfloat16, torch.float16):
        return 0
    if lora_A.dtype == weight.dtype:
        return 1
    if weight.dtype == torch.bfloat16 and lora_A.dtype == torch.float32:
        return 3
    return 0  # fp16 splits of fp32 can underflow: use the chunked path


def _factored_row_norm_tensor_cores(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """``U = W·Aᵀ`` on tensor cores with fp32 accumulation; ``W`` read in its own dtype."""
    terms = split_terms(lora_A, weight.dtype, _tensor_core_terms(weight, lora_A))
    u = torch.mm(weight, terms[0].T, out_dtype=torch.float32)
    for term in terms[1:]:
        u = u + torch.mm(weight, term.T, out_dtype=torch.float32)
    a, b = lora_A.float(), lora_B.float()
    gram = a @ a.T
    base = torch.linalg.vector_norm(weight, dim=1, dtype=torch.float32).square()
    squared = base + (2.0 * scaling) * (b * u).sum(1) + (scaling * scaling) * ((b @ gram) * b).sum(1)
    return squared.clamp_min(0.0).sqrt()


def _has_mm_out_dtype() -> bool:
    return hasattr(torch.ops.aten.mm, "dtype")


def factored_row_norm_torch(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """The factored norm in plain torch ops: the tensor-core path where it applies, else chunked.

    Traceable: the rewrite inserts it directly (Inductor then compiles it with the
    rest of the graph, with no per-call Python cost); the op below wraps it.
    """
    if _tensor_core_terms(weight, lora_A) and _has_mm_out_dtype():
        return _factored_row_norm_tensor_cores(weight, lora_A, lora_B, scaling)
    return _factored_row_norm_chunked(weight, lora_A, lora_B, scaling)


@torch.library.custom_op("dora_fused::factored_row_norm", mutates_args=())
def _factored_row_norm_op(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    return factored_row_norm_torch(weight, lora_A, lora_B, scaling)


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
