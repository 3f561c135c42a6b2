"""Transient memory per call of one DoRA norm: PEFT's dense path vs the rewritten one (estimates).

Counted: the intermediates each path allocates for the norm, from shapes and
dtypes alone (no activations, no allocator rounding). They are what
``audit()`` reports next to each module; benchmarks/ measure the real peaks.

Dense (PEFT), in the adapter dtype ``a``::

    B·A [d_out, d_in] + (W + s·BA) [d_out, d_in]
    + eye [d_in, d_in] + A(eye) [d_in, r] with PEFT Linear's identity trick
    + W cast to ``a`` [d_out, d_in] when W's dtype differs
    + W dequantized [d_out, d_in] in its dtype ``q`` for a quantized base (bnb 4-bit: the
      quant state's dtype; bnb 8-bit: fp32; torchao: the weight's dtype); the cast above
      then compares ``q`` with ``a``

The base layer's own matmul dequantizes too (bitsandbytes at 4096 tokens: one
``[d_out, d_in]`` copy in the compute dtype, forward and backward); that copy is
the base layer's, the same on both paths, and not counted here.

Rewritten, for a quantized base: ``norm="quantized"`` (CUDA, bitsandbytes int8;
the rewrite does not choose it for 4-bit bases) reads the packed weight itself, so
no dequantized copy exists on the norm's path:
``QuantizedNormPlan.workspace_bytes`` (``kernels/quantized_norm.py``: A's terms,
the Gram's workspace, ``U`` and ``‖W‖²`` per split in fp32, the sum's terms, the
flags, the norm). Where the norm
reads the dequantized weight (4-bit bitsandbytes, CPU, torchao), the formulas below plus that
``q`` copy ``d_out·d_in·q``.

Rewritten, ``norm="triton"`` (CUDA): what ``NormPlan.workspace_bytes`` counts
for the plan an H100 would run (A's 16-bit terms ``[T·r, d_in]`` when T = 3, a
16-bit W meeting fp32 adapters; the Gram's term products and G's bf16 terms;
``U`` as ``[d_out, T·r]`` fp32 where it comes from cuBLAS; the per-tile partial
sums), and the norm.
``norm="torch"``: rows of W promoted to fp32 at most ``CHUNK_BYTES`` at a time
with their ``U`` and ``B·G`` rows, ``G`` and the fp32 copy of A, the norm.
"""

from __future__ import annotations

import torch

from dora_fused.kernels.norm_plan import CHUNK_BYTES, norm_plan
from dora_fused.kernels.quantized_norm import quantized_norm_plan

__all__ = ["dense_norm_bytes", "rewritten_norm_bytes"]

H100_MULTIPROCESSORS = 132  # the split-K choice of the estimated plan


def _size(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def dense_norm_bytes(
    d_out: int,
    d_in: int,
    r: int,
    weight_dtype: torch.dtype,
    adapter_dtype: torch.dtype,
    identity_trick: bool = True,
    quantized: bool = False,
) -> int:
    """PEFT's dense norm; ``weight_dtype`` is the dequantized weight's dtype where ``quantized``."""
    a = _size(adapter_dtype)
    total = 2 * d_out * d_in * a
    if identity_trick:
        total += (d_in * d_in + d_in * r) * a
    if weight_dtype != adapter_dtype:
        total += d_out * d_in * a
    if quantized:
        total += d_out * d_in * _size(weight_dtype)
    return total


def rewritten_norm_bytes(
    d_out: int,
    d_in: int,
    r: int,
    weight_dtype: torch.dtype,
    adapter_dtype: torch.dtype,
    norm: str,
    quantized: bool = False,
) -> int:
    """The rewritten norm; ``norm`` is "triton", "torch" or "quantized" (the packed weight read in place)."""
    if norm == "quantized":  # bitsandbytes: an fp32 dequantized weight is int8's, a 16-bit one 4-bit's
        quant_type = "int8" if weight_dtype == torch.float32 else "nf4"
        plan = quantized_norm_plan(d_out, d_in, r, weight_dtype, adapter_dtype, H100_MULTIPROCESSORS, quant_type)
        return plan.workspace_bytes
    copy = d_out * d_in * _size(weight_dtype) if quantized else 0  # the dequantized weight the norm reads
    return copy + _rewritten_dense_norm_bytes(d_out, d_in, r, weight_dtype, adapter_dtype, norm)


def _rewritten_dense_norm_bytes(
    d_out: int, d_in: int, r: int, weight_dtype: torch.dtype, adapter_dtype: torch.dtype, norm: str
) -> int:
    fp32 = 4
    if norm == "triton":
        terms = 3 if weight_dtype != torch.float32 and adapter_dtype != weight_dtype else 1
        plan = norm_plan(d_out, d_in, r, terms, multiprocessors=H100_MULTIPROCESSORS)
        return plan.workspace_bytes(d_out, d_in, r, terms) + d_out * fp32
    shared = r * r * fp32 + r * d_in * fp32 + d_out * fp32  # G, fp32 copy of A, the norm
    rows = max(1, min(d_out, CHUNK_BYTES // max(1, d_in * fp32)))
    return rows * (d_in + 2 * r) * fp32 + shared
