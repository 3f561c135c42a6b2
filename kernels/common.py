"""What several kernel modules share: the accumulation dtype, exact 16-bit terms, launch helpers.

Accumulation is in fp32, or fp64 when any input is fp64: never below the
precision of the path a kernel replaces.

Tensor-core products at fp32 accuracy: an fp32 value ``v`` is the sum of its
16-bit terms ``v = v_0 + v_1 + v_2``, each the rounding of what the previous
left (``v_0 = bf16(v)``, ``v_1 = bf16(v - v_0)``, …). bf16 has fp32's exponent
range and 8 significand bits, so three bf16 terms carry all 24 bits of an fp32
value (fp16 terms need a power-of-two scale to stay above fp16's underflow).
A product of two such sums keeps the term products whose orders add up to at
most 2; the dropped ones are below fp32's rounding::

    x·y ≈ Σ_{i + j ≤ 2} x_i·y_j        (each x_i·y_j exact in fp32 on tensor cores)

Every long product is a sum of short tensor-core accumulations, each started
from zero and added in fp32.

The compose kernels read the per-feature vectors ``m``, ``n``, ``b`` and form
``g = m / n`` correctly rounded in fp32 (``scale_and_bias``).

Layout: pure-torch rules and terms → ``@triton.jit`` helpers and the bf16 terms
kernel → launch helpers.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

__all__ = [
    "accumulation_dtype",
    "adapter_terms",
    "as_rows",
    "bf16_terms",
    "bf16_terms_triton",
    "dot_terms",
    "feature_vectors",
    "multiprocessors",
    "scale_and_bias",
    "split_terms",
]

# ----------------------------------------------------------------------------
# Pure torch


def accumulation_dtype(*tensors: Tensor | None) -> torch.dtype:
    """fp64 if any input is fp64, else fp32 (``None`` inputs are skipped)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


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


# ----------------------------------------------------------------------------
# Triton helpers (CUDA; also run on CPU tensors under TRITON_INTERPRET=1)


@triton.jit
def bf16_terms(v, TERMS: tl.constexpr):
    """``v`` as up to three bf16 terms ``v0 + v1 + v2`` (each the rounding of what the previous left)."""
    vf = v.to(tl.float32)
    v0 = vf.to(tl.bfloat16)
    if TERMS == 1:
        return v0, v0, v0
    rest = vf - v0.to(tl.float32)
    v1 = rest.to(tl.bfloat16)
    v2 = (rest - v1.to(tl.float32)).to(tl.bfloat16)
    return v0, v1, v2


@triton.jit
def dot_terms(x0, x1, x2, y0, y1, y2, acc, X_TERMS: tl.constexpr, Y_TERMS: tl.constexpr):
    """``acc + (Σ x_i) @ (Σ y_j)`` over the term products with ``i + j <= 2``, smallest first."""
    if X_TERMS > 1 and Y_TERMS > 1:
        acc = tl.dot(x1, y1, acc)
    if X_TERMS > 2:
        acc = tl.dot(x2, y0, acc)
    if Y_TERMS > 2:
        acc = tl.dot(x0, y2, acc)
    if X_TERMS > 1:
        acc = tl.dot(x1, y0, acc)
    if Y_TERMS > 1:
        acc = tl.dot(x0, y1, acc)
    return tl.dot(x0, y0, acc)


@triton.jit
def scale_and_bias(MAG, NORM, BIAS, cols, cmask, HAS_BIAS: tl.constexpr, G_GIVEN: tl.constexpr = False):
    """``(g, b)`` for the features ``cols``: ``g = m / n`` correctly rounded in fp32, ``b`` (zeros without bias).

    ``G_GIVEN``: ``MAG`` holds ``g`` itself (fp32) and ``NORM`` is not read.
    """
    if G_GIVEN:
        g = tl.load(MAG + cols, mask=cmask, other=1.0).to(tl.float32)
    else:
        m = tl.load(MAG + cols, mask=cmask, other=1.0).to(tl.float32)
        n = tl.load(NORM + cols, mask=cmask, other=1.0).to(tl.float32)
        g = tl.math.div_rn(m, n)
    if HAS_BIAS:
        b = tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)
    else:
        b = tl.zeros_like(g)
    return g, b


@triton.jit
def _bf16_split_kernel(
    X, TERMS, AFTER, rows, cols, stride_xr, stride_xc, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr
):  # fmt: skip
    """``TERMS[t·rows + i, j]`` = the ``t``-th bf16 term of ``X[i, j]`` (three terms carry fp32 exactly).

    ``AFTER`` is never read (``after`` of ``factored_norm.factored_row_norm_triton``).
    """
    rs = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rs < rows)[:, None] & (cs < cols)[None, :]
    x = tl.load(X + rs[:, None] * stride_xr + cs[None, :] * stride_xc, mask=mask, other=0.0)
    t0, t1, t2 = bf16_terms(x, 3)
    out = TERMS + rs[:, None] * cols + cs[None, :]
    tl.store(out, t0, mask=mask)
    tl.store(out + rows * cols, t1, mask=mask)
    tl.store(out + 2 * rows * cols, t2, mask=mask)


# ----------------------------------------------------------------------------
# Launch helpers


@functools.cache
def multiprocessors(device: torch.device) -> int:
    """The GPU's SM count; 1 off CUDA (the interpreter: one split unless a config asks for more)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def bf16_terms_triton(x: Tensor, after: Tensor | None = None) -> Tensor:
    """An fp32 ``[rows, cols]`` matrix as its three bf16 terms stacked ``[3·rows, cols]`` (one kernel).

    ``after``: see ``factored_norm.factored_row_norm_triton``.
    """
    rows, cols = x.shape
    terms = torch.empty(3 * rows, cols, dtype=torch.bfloat16, device=x.device)
    grid = (triton.cdiv(rows, 32), triton.cdiv(cols, 128))
    wrap_triton(_bf16_split_kernel)[grid](
        x, terms, x if after is None else after, rows, cols, x.stride(0), x.stride(1), BLOCK_R=32, BLOCK_C=128
    )
    return terms


def adapter_terms(lora_A: Tensor, dtype: torch.dtype, after: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """``A`` as stacked ``dtype`` terms ``[T·r, d_in]`` and a scale: ``A = Σ_t terms_t / scale``.

    One term when ``A`` already has ``dtype``; otherwise three, each the rounding
    of what the previous left (exact to fp32's 24 bits). bf16 terms come from one
    Triton kernel. fp16 terms are taken of ``A·scale`` with a power-of-two scale
    that puts ``max|A|`` near 2^14, so the small terms stay above fp16's
    underflow (bf16 has fp32's range: no scale). The scale is ``None`` where there
    is none (the kernels then skip it: no tensor of ones, which costs a launch).
    ``after``: see ``factored_norm.factored_row_norm_triton`` (bf16 terms only).
    """
    if lora_A.dtype == dtype:
        return lora_A, None
    if dtype == torch.bfloat16 and lora_A.dtype == torch.float32:
        return bf16_terms_triton(lora_A, after), None
    a = lora_A.float()
    scale = None
    if dtype == torch.float16:
        peak = a.abs().amax().clamp_min(2.0**-100)
        scale = torch.exp2(14.0 - torch.ceil(torch.log2(peak))).reshape(1)
        a = a * scale
    return torch.cat(split_terms(a, dtype, 3)), scale


def feature_vectors(magnitude: Tensor, weight_norm: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """The compose kernels' ``MAG``, ``NORM``, ``BIAS`` pointers: contiguous ``[N]`` vectors (``m`` again for no
    bias, never read then)."""
    return magnitude.contiguous(), weight_norm.contiguous(), bias.contiguous() if bias is not None else magnitude


def as_rows(t: Tensor) -> Tensor:
    """``t`` as a contiguous ``[T, N]`` matrix (a view when it already is one)."""
    return t.contiguous().view(-1, t.shape[-1])
