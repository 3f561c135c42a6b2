"""Matrix products with an fp32 (or fp64) result, on tensor cores where the operands are 16-bit.

A bf16/fp16 product is exact in fp32, so accumulating it in fp32 keeps what a
16-bit result would round away. On CUDA that is one cuBLAS call
(``torch.mm(..., out_dtype=torch.float32)``); elsewhere the operands are
promoted and multiplied in the accumulation dtype (the same exact products).

A bf16 ``x`` times an fp32 ``y`` (a bf16 gradient against PEFT's default fp32
adapters) needs no fp32 copy of ``x`` either: ``y`` is the sum of its three bf16
terms (``common.split_terms``: ``y = y_0 + y_1 + y_2``, all 24 significand
bits), so ``x·y = x·y_0 + x·y_1 + x·y_2``, each term product exact in fp32::

    x [M, K] (bf16) · [y_0 | y_1 | y_2] [K, 3N] (bf16)  →  [M, 3N] fp32  →  sum of the three [M, N] blocks

One tensor-core product, fp32 accumulation of the same exact products an fp32
product of the promoted ``x`` forms (in another order), and no ``[M, K]`` fp32
buffer: where ``x`` is a ``[tokens, d_out]`` gradient, that buffer is the
largest transient of the layer's backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import split_terms

__all__ = ["has_mm_out_dtype", "product", "terms_product"]


def has_mm_out_dtype() -> bool:
    """Whether this torch has ``torch.mm(..., out_dtype=)`` (CUDA only)."""
    return hasattr(torch.ops.aten.mm, "dtype")


def product(x: Tensor, y: Tensor, acc: torch.dtype = torch.float32) -> Tensor:
    """``x·y`` in ``acc``: on CUDA tensor cores with an fp32 result for 16-bit ``x`` and a ``y`` of its dtype,
    or bf16 ``x`` and fp32 ``y`` (``terms_product``); else promoted."""
    if acc == torch.float32 and x.is_cuda and has_mm_out_dtype():
        if x.dtype == y.dtype and x.dtype in (torch.bfloat16, torch.float16):
            return torch.mm(x, y, out_dtype=acc)
        if x.dtype == torch.bfloat16 and y.dtype == torch.float32:
            return terms_product(x, y)
    return x.to(acc) @ y.to(acc)


def terms_product(x: Tensor, y: Tensor) -> Tensor:
    """``x·y`` in fp32 for bf16 ``x`` and fp32 ``y``: ``x`` times ``y``'s three bf16 terms side by side, summed.

    On CUDA one tensor-core product with an fp32 result; elsewhere the same term products
    promoted to fp32 (what the CPU tests check).
    """
    n = y.shape[1]
    terms = torch.cat(split_terms(y, torch.bfloat16, 3), dim=1)  # [K, 3N]
    if x.is_cuda and has_mm_out_dtype():
        blocks = torch.mm(x, terms, out_dtype=torch.float32)
    else:
        blocks = x.float() @ terms.float()
    return blocks[:, :n] + blocks[:, n : 2 * n] + blocks[:, 2 * n :]
