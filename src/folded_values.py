"""The values frozen inference computes once: a DoRA module's row norm, or its whole merged weight.

Both are computed in fp64, a slice of rows at a time, and rounded once to their
dtype, so each is as exact as its dtype allows (PEFT's eager norm rounds ``B·A``,
``W + s·B·A`` and the norm in the adapter dtype; ``merge_and_unload`` rounds the
merged weight once, from fp32):

    V = W + s·B·A           (rows of W [d_out, d_in], B [d_out, r], A [r, d_in])
    n = ‖V‖_row             "norm" / "peft_norm"
    W' = (m / n)·V          "merged"

Conv weights and adapters are taken by rows: ``W.reshape(d_out, -1)``, and so on.
Runs once per compile (and again only when a parameter changed), not per call.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["merged_weight", "row_norm", "value_of"]

_CHUNK_BYTES = 64 * 2**20  # fp64 rows of V held at once


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _chunks(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, s: float) -> Iterator[torch.Tensor]:
    """``V`` in fp64, a slice of rows at a time."""
    W, A, B = _rows(weight), _rows(lora_A).double(), _rows(lora_B)
    step = max(1, _CHUNK_BYTES // (8 * max(W.shape[1], 1)))
    for start in range(0, W.shape[0], step):
        rows = slice(start, start + step)
        yield W[rows].double() + s * (B[rows].double() @ A)


def row_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, s: float) -> torch.Tensor:
    """``‖W + s·B·A‖`` per row, fp64 ``[d_out]``."""
    return torch.cat([torch.linalg.vector_norm(v, dim=1) for v in _chunks(weight, lora_A, lora_B, s)])


def merged_weight(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    s: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``(m / ‖V‖_row)·V`` with ``V = W + s·B·A``, rounded once to ``dtype``, in ``weight``'s shape."""
    m = magnitude.reshape(-1).double()
    out = torch.empty(_rows(weight).shape, dtype=dtype, device=weight.device)
    start = 0
    for v in _chunks(weight, lora_A, lora_B, s):
        rows = slice(start, start + v.shape[0])
        out[rows] = (v * (m[rows] / torch.linalg.vector_norm(v, dim=1)).unsqueeze(1)).to(dtype)
        start += v.shape[0]
    return out.reshape(weight.shape)


def value_of(kind: str, operands: tuple[torch.Tensor, ...], s: float, shape: tuple[int, ...], dtype: torch.dtype):
    """The folded value of ``kind`` from its operands (``folding.FoldedValue.recipe``'s outputs)."""
    if kind == "merged":
        weight, lora_A, lora_B, magnitude, base_weight = operands
        return merged_weight(weight, lora_A, lora_B, magnitude, s, dtype).reshape(base_weight.shape)
    weight, lora_A, lora_B = operands
    return row_norm(weight, lora_A, lora_B, s).to(dtype).reshape(shape)
