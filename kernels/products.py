"""Matrix products with an fp32 (or fp64) result, on tensor cores where the operands are 16-bit.

A bf16/fp16 product is exact in fp32, so accumulating it in fp32 keeps what a
16-bit result would round away. On CUDA that is one cuBLAS call
(``torch.mm(..., out_dtype=torch.float32)``); elsewhere the operands are
promoted and multiplied in the accumulation dtype (the same exact products).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["has_mm_out_dtype", "product"]


def has_mm_out_dtype() -> bool:
    """Whether this torch has ``torch.mm(..., out_dtype=)`` (CUDA only)."""
    return hasattr(torch.ops.aten.mm, "dtype")


def product(x: Tensor, y: Tensor, acc: torch.dtype = torch.float32) -> Tensor:
    """``x·y`` in ``acc``: tensor cores with an fp32 result for 16-bit CUDA operands of one dtype, else promoted."""
    sixteen_bit = x.dtype == y.dtype and x.dtype in (torch.bfloat16, torch.float16)
    if sixteen_bit and acc == torch.float32 and x.is_cuda and has_mm_out_dtype():
        return torch.mm(x, y, out_dtype=acc)
    return x.to(acc) @ y.to(acc)
