"""DoRA output compose: one elementwise pass instead of PEFT's four kernels.

PEFT composes, with ``g = m / n`` broadcast over the last (output-feature) dim::

    out = result + (g - 1)·(result - b) + g·s·lora

which is algebraically ``out = g·(result - b + s·lora) + b``. This op computes
that form in fp32 registers (fp64 for fp64 inputs) and rounds once to
``out_dtype``. In the near-unity regime ``g ≈ 1`` it keeps the bits that
PEFT's ``g - 1`` and ``result - b`` lose in bf16/fp16 arithmetic.

Gradients (``T`` = all leading token dims, ``v = Σ_T dy ⊙ (result - b + s·lora)``):

    d_result = g ⊙ dy            d_lora = g·s ⊙ dy
    d_m      = v / n             d_n    = -v·m / n²      d_b = (1 - g) ⊙ Σ_T dy

``n`` is detached in DoRA (paper §4.3), so ``d_n`` is only formed when the
caller passes an ``n`` that requires grad.

Layout: pure-torch reference → Triton kernels → launchers → ``torch.library``
ops (a device branch: the Triton kernels on CUDA, the reference elsewhere) →
autograd → public function.

Forward: one read of ``result`` and ``lora``, one write of ``out``. Backward:
one read of ``dy``, ``result`` and ``lora``, one write of each of ``d_result``
and ``d_lora``; the token sums ``v`` and ``Σ dy`` come out of the same pass as
per-program partial sums (summed afterwards in a fixed order: deterministic).
Saved for backward: ``result`` and ``lora`` (which exist anyway) and the
``[d_out]`` vectors; PEFT's autograd saves ``result - b``, ``lora`` and
``g - 1`` products besides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .common import accumulation_dtype, as_rows, feature_vectors, scale_and_bias

__all__ = [
    "compose",
    "compose_backward_reference",
    "compose_backward_torch",
    "compose_backward_triton",
    "compose_forward_triton",
    "compose_reference",
    "compose_torch",
    "compose_with_base_reference",
    "compose_with_base_torch",
    "scaled_sum",
    "scaled_sum_with_base",
    "triton_supports_compose",
]

# ----------------------------------------------------------------------------
# Reference


def compose_reference(
    result: Tensor,
    lora: Tensor,
    magnitude: Tensor,
    weight_norm: Tensor,
    bias: Tensor | None,
    scaling: float,
    out_dtype: torch.dtype,
) -> Tensor:
    """``g·(result - b + s·lora) + b`` with ``g = m / n``, computed in fp32 (fp64), rounded once."""
    acc = accumulation_dtype(result, lora, magnitude, weight_norm, bias)
    return scaled_sum(result, lora, magnitude.to(acc) / weight_norm.to(acc), bias, scaling, out_dtype)


def scaled_sum(
    result: Tensor, lora: Tensor, g: Tensor, bias: Tensor | None, scaling: float, out_dtype: torch.dtype
) -> Tensor:
    """``g·(result - b + s·lora) + b`` for a given ``g``, computed in ``g``'s dtype, rounded once."""
    acc = g.dtype
    base = result.to(acc)
    if bias is not None:
        b = bias.to(acc)
        return (g * (base - b + scaling * lora.to(acc)) + b).to(out_dtype)
    return (g * (base + scaling * lora.to(acc))).to(out_dtype)


def compose_with_base_reference(
    result: Tensor,
    base: Tensor,
    lora: Tensor,
    magnitude: Tensor,
    weight_norm: Tensor,
    scaling: float,
    out_dtype: torch.dtype,
) -> Tensor:
    """PEFT's compose with a separate base output (dropout active), in fp32 (fp64), rounded once.

    ``out = result + (g - 1)·base + g·s·lora``: ``base`` is the base layer on the
    dropped input, so ``result - b`` cannot stand in for it. Plain torch:
    Inductor fuses it into one pointwise kernel and derives the backward.
    """
    acc = accumulation_dtype(result, base, lora, magnitude, weight_norm)
    return scaled_sum_with_base(result, base, lora, magnitude.to(acc) / weight_norm.to(acc), scaling, out_dtype)


def scaled_sum_with_base(
    result: Tensor, base: Tensor, lora: Tensor, g: Tensor, scaling: float, out_dtype: torch.dtype
) -> Tensor:
    """``result + (g - 1)·base + g·s·lora`` for a given ``g``, computed in ``g``'s dtype, rounded once."""
    acc = g.dtype
    return (result.to(acc) + (g - 1.0) * base.to(acc) + (g * scaling) * lora.to(acc)).to(out_dtype)


def compose_backward_torch(
    grad_out: Tensor,
    result: Tensor,
    lora: Tensor,
    magnitude: Tensor,
    weight_norm: Tensor,
    bias: Tensor | None,
    scaling: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The backward pass in plain torch: ``(d_result, d_lora, v, Σ_T dy)``, as ``compose_backward_triton``.

    ``T`` is every dim the ``[d_out]`` (or PEFT Conv's ``[1, C, 1, ...]``) vectors broadcast
    along; ``v`` and ``Σ_T dy`` have their shape, in the compute dtype; ``Σ dy`` is empty
    without bias. ``dy`` is
    never converted on its own: each product with an fp32 (fp64) factor promotes it exactly, in
    the same op. Under Inductor this keeps the one ``[tokens, d_out]`` tensor that several
    kernels read in ``dy``'s own dtype; an explicit ``dy.float()`` gets materialized in fp32
    instead (seen in the MLP of an 8B-shaped Llama: 224 MB instead of 112 at 4096 tokens).
    """
    acc = accumulation_dtype(grad_out, result, lora, magnitude, weight_norm, bias)
    g = magnitude.to(acc) / weight_norm.to(acc)
    token_dims = broadcast_dims(grad_out, magnitude)
    base = result.to(acc) if bias is None else result.to(acc) - bias.to(acc)
    v = (grad_out * (base + scaling * lora.to(acc))).sum(token_dims).reshape(magnitude.shape)
    if bias is None:
        dy_sum = grad_out.new_empty(0, dtype=acc)
    else:
        dy_sum = grad_out.sum(token_dims, dtype=acc).reshape(magnitude.shape)
    return (g * grad_out).to(result.dtype), ((g * scaling) * grad_out).to(lora.dtype), v, dy_sum


def broadcast_dims(t: Tensor, vector: Tensor) -> tuple[int, ...]:
    """The dims of ``t`` that ``vector``, broadcast against it, lacks or has size 1 in: the token dims.

    ``[d_out]`` vectors (Linear) give every dim but the last; PEFT's ``[1, C, 1, ...]`` vectors
    (Conv, channels first) every dim but dim 1.
    """
    lead = t.dim() - vector.dim()
    return tuple(i for i in range(t.dim()) if i < lead or vector.shape[i - lead] == 1)


def vector_grads(
    v: Tensor,
    dy_sum: Tensor,
    magnitude: Tensor,
    weight_norm: Tensor,
    bias: Tensor | None,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(d_m, d_n, d_b)`` from the token sums: ``v / n``, ``-v·m / n²``, ``(1 - g)·Σ dy``; None where not needed."""
    n, m = weight_norm.to(v.dtype), magnitude.to(v.dtype)
    d_magnitude = (v / n).to(magnitude.dtype) if needs[0] else None
    d_norm = (-v * m / (n * n)).to(weight_norm.dtype) if needs[1] else None
    d_bias = ((1.0 - m / n) * dy_sum).to(bias.dtype) if needs[2] and bias is not None else None
    return d_magnitude, d_norm, d_bias


def compose_backward_reference(
    grad_out: Tensor,
    result: Tensor,
    lora: Tensor,
    magnitude: Tensor,
    weight_norm: Tensor,
    bias: Tensor | None,
    scaling: float,
    needs_grad: tuple[bool, bool, bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients to (result, lora, magnitude, weight_norm, bias); ``None`` where not needed."""
    d_result, d_lora, v, dy_sum = compose_backward_torch(grad_out, result, lora, magnitude, weight_norm, bias, scaling)
    d_vectors = vector_grads(v, dy_sum, magnitude, weight_norm, bias, needs_grad[2:])
    return (d_result if needs_grad[0] else None, d_lora if needs_grad[1] else None, *d_vectors)


# ----------------------------------------------------------------------------
# Triton kernels. Inputs are row-major [T, N] (T = all token dims); per-feature
# vectors are [N]. All math in fp32 registers; g = m / n correctly rounded.


@triton.jit
def _compose_fwd_kernel(
    RESULT,
    LORA,
    MAG,
    NORM,
    BIAS,
    OUT,
    T,
    N,
    scaling,
    HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """out[t, j] = g_j·(result[t, j] - b_j + s·lora[t, j]) + b_j."""
    s = tl.cast(scaling, tl.float32)  # Inductor passes Python floats as fp64
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    g, b = scale_and_bias(MAG, NORM, BIAS, cols, cmask, HAS_BIAS)
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    mask = (rows < T)[:, None] & cmask[None, :]
    res = tl.load(RESULT + offs, mask=mask, other=0.0).to(tl.float32)
    lora = tl.load(LORA + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        out = g[None, :] * (res - b[None, :] + s * lora) + b[None, :]
    else:
        out = g[None, :] * (res + s * lora)
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _compose_bwd_kernel(
    DY,
    RESULT,
    LORA,
    MAG,
    NORM,
    BIAS,
    D_RESULT,
    D_LORA,
    V_PARTIAL,
    DY_PARTIAL,
    T,
    N,
    scaling,
    HAS_BIAS: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """d_result = g·dy, d_lora = g·s·dy, and this program's rows of Σ dy·(result - b + s·lora) and Σ dy."""
    s = tl.cast(scaling, tl.float32)  # Inductor passes Python floats as fp64
    chunk = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    g, b = scale_and_bias(MAG, NORM, BIAS, cols, cmask, HAS_BIAS)
    gs = g * s
    v = tl.zeros([BLOCK_N], dtype=tl.float32)
    dy_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, ROWS_PER_PROGRAM, BLOCK_T):
        rows = chunk * ROWS_PER_PROGRAM + start + tl.arange(0, BLOCK_T)
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        mask = (rows < T)[:, None] & cmask[None, :]
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        res = tl.load(RESULT + offs, mask=mask, other=0.0).to(tl.float32)
        lora = tl.load(LORA + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(D_RESULT + offs, (g[None, :] * dy).to(D_RESULT.dtype.element_ty), mask=mask)
        tl.store(D_LORA + offs, (gs[None, :] * dy).to(D_LORA.dtype.element_ty), mask=mask)
        if HAS_BIAS:
            res = res - b[None, :]
        v += tl.sum(dy * (res + s * lora), axis=0)
        dy_sum += tl.sum(dy, axis=0)
    tl.store(V_PARTIAL + chunk * N + cols, v, mask=cmask)
    if HAS_BIAS:
        tl.store(DY_PARTIAL + chunk * N + cols, dy_sum, mask=cmask)


# ----------------------------------------------------------------------------
# Launchers (also run eagerly on CPU tensors under TRITON_INTERPRET=1)

_BLOCK_T, _BLOCK_N = 32, 128
_ROWS_PER_PROGRAM = 128  # backward: rows each program reduces; partial sums are [cdiv(T, this), N]
_TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def triton_supports_compose(result: Tensor, lora: Tensor, magnitude: Tensor, weight_norm: Tensor) -> bool:
    """Whether the Triton kernels apply: 16/32-bit floats (fp64 stays on the reference)."""
    return all(t.dtype in _TRITON_DTYPES for t in (result, lora, magnitude, weight_norm))


def compose_forward_triton(
    result: Tensor,
    lora: Tensor,
    magnitude: Tensor,
    weight_norm: Tensor,
    bias: Tensor | None,
    scaling: float,
    out_dtype: torch.dtype,
) -> Tensor:
    """The compose forward as one Triton kernel."""
    res, lo = as_rows(result), as_rows(lora)
    t, n = res.shape
    out = torch.empty(result.shape, dtype=out_dtype, device=result.device)
    grid = (triton.cdiv(t, _BLOCK_T), triton.cdiv(n, _BLOCK_N))
    wrap_triton(_compose_fwd_kernel)[grid](
        res,
        lo,
        *feature_vectors(magnitude, weight_norm, bias),
        out,
        t,
        n,
        scaling,
        HAS_BIAS=bias is not None,
        BLOCK_T=_BLOCK_T,
        BLOCK_N=_BLOCK_N,
        num_warps=4,
    )
    return out


def compose_backward_triton(
    grad_out: Tensor,
    result: Tensor,
    lora: Tensor,
    magnitude: Tensor,
    weight_norm: Tensor,
    bias: Tensor | None,
    scaling: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One pass: ``(d_result, d_lora, v, Σ_T dy)``; the last two fp32 ``[N]`` (``Σ dy`` empty without bias)."""
    dy, res, lo = as_rows(grad_out), as_rows(result), as_rows(lora)
    t, n = res.shape
    d_result = torch.empty(result.shape, dtype=result.dtype, device=result.device)
    d_lora = torch.empty(lora.shape, dtype=lora.dtype, device=lora.device)
    chunks = triton.cdiv(t, _ROWS_PER_PROGRAM)
    v_partial = torch.empty(chunks, n, dtype=torch.float32, device=result.device)
    dy_partial = torch.empty(chunks if bias is not None else 0, n, dtype=torch.float32, device=result.device)
    grid = (chunks, triton.cdiv(n, _BLOCK_N))
    wrap_triton(_compose_bwd_kernel)[grid](
        dy,
        res,
        lo,
        *feature_vectors(magnitude, weight_norm, bias),
        d_result,
        d_lora,
        v_partial,
        dy_partial,
        t,
        n,
        scaling,
        HAS_BIAS=bias is not None,
        ROWS_PER_PROGRAM=_ROWS_PER_PROGRAM,
        BLOCK_T=_BLOCK_T,
        BLOCK_N=_BLOCK_N,
        num_warps=4,
    )
    dy_sum = dy_partial.sum(0) if bias is not None else dy_partial.new_empty(0)
    return d_result, d_lora, v_partial.sum(0), dy_sum


# ----------------------------------------------------------------------------
# Ops: Triton on CUDA, the reference elsewhere (Inductor traces into both branches)


def _use_triton(result: Tensor, lora: Tensor, magnitude: Tensor, weight_norm: Tensor) -> bool:
    return result.is_cuda and triton_supports_compose(result, lora, magnitude, weight_norm)


@triton_op("dora_fused::compose", mutates_args=())
def _compose_op(
    result: Tensor,
    lora: Tensor,
    magnitude: Tensor,
    weight_norm: Tensor,
    bias: Tensor | None,
    scaling: float,
    out_dtype: torch.dtype,
) -> Tensor:
    torch._check(result.shape == lora.shape, lambda: "compose: result and lora shapes differ")
    torch._check(magnitude.dim() == 1 and weight_norm.dim() == 1, lambda: "compose: m and n must be 1-d")
    torch._check(magnitude.shape[0] == result.shape[-1] and weight_norm.shape[0] == result.shape[-1])
    if _use_triton(result, lora, magnitude, weight_norm):
        return compose_forward_triton(result, lora, magnitude, weight_norm, bias, scaling, out_dtype)
    return compose_reference(result, lora, magnitude, weight_norm, bias, scaling, out_dtype)


@triton_op("dora_fused::compose_backward", mutates_args=())
def _compose_backward_op(
    grad_out: Tensor,
    result: Tensor,
    lora: Tensor,
    magnitude: Tensor,
    weight_norm: Tensor,
    bias: Tensor | None,
    scaling: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(d_result, d_lora, v, Σ_T dy)`` as in the module docstring; ``Σ dy`` is empty without bias."""
    if _use_triton(result, lora, magnitude, weight_norm):
        return compose_backward_triton(grad_out, result, lora, magnitude, weight_norm, bias, scaling)
    return compose_backward_torch(grad_out, result, lora, magnitude, weight_norm, bias, scaling)


def _setup_context(ctx, inputs, output) -> None:
    result, lora, magnitude, weight_norm, bias, scaling, _ = inputs
    ctx.scaling = scaling
    ctx.has_bias = bias is not None
    saved = (result, lora, magnitude, weight_norm) + ((bias,) if bias is not None else ())
    ctx.save_for_backward(*saved)


def _saved(ctx) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """``(result, lora, magnitude, weight_norm, bias)`` as ``_setup_context`` saved them."""
    result, lora, magnitude, weight_norm, *rest = ctx.saved_tensors
    return result, lora, magnitude, weight_norm, rest[0] if ctx.has_bias else None


def _backward(ctx, grad_out: Tensor):
    result, lora, magnitude, weight_norm, bias = _saved(ctx)
    needs = ctx.needs_input_grad
    d_result, d_lora, v, dy_sum = torch.ops.dora_fused.compose_backward(
        grad_out, result, lora, magnitude, weight_norm, bias, ctx.scaling
    )
    d_magnitude, d_norm, d_bias = vector_grads(v, dy_sum, magnitude, weight_norm, bias, needs[2:5])
    return (
        d_result if needs[0] else None,
        d_lora if needs[1] else None,
        d_magnitude,
        d_norm,
        d_bias,
        None,
        None,
    )


_compose_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------
# Plain torch with a hand-written backward (what the rewrite inserts for Inductor to fuse)


class _TorchCompose(torch.autograd.Function):
    """``compose_reference`` forward, ``compose_backward_reference`` backward."""

    @staticmethod
    def forward(result, lora, magnitude, weight_norm, bias, scaling, out_dtype):
        return compose_reference(result, lora, magnitude, weight_norm, bias, scaling, out_dtype)

    setup_context = staticmethod(_setup_context)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grads = compose_backward_reference(grad_out, *_saved(ctx), ctx.scaling, ctx.needs_input_grad[:5])
        return (*grads, None, None)


def compose_torch(
    result: Tensor,
    lora: Tensor,
    magnitude: Tensor,
    weight_norm: Tensor,
    bias: Tensor | None,
    scaling: float,
    out_dtype: torch.dtype,
) -> Tensor:
    """``compose_reference`` (``g·(result - b + s·lora) + b`` in fp32, rounded once), differentiated by hand.

    Plain torch ops both ways, which Inductor fuses with their neighbours. Autograd's own
    backward of the reference would start with ``dy.to(fp32)``, a node several kernels read,
    which Inductor then stores in fp32; ``compose_backward_torch`` reads ``dy`` in its own
    dtype (same values, half the memory in bf16).
    """
    return _TorchCompose.apply(result, lora, magnitude, weight_norm, bias, scaling, out_dtype)


class _TorchComposeWithBase(torch.autograd.Function):
    """``compose_with_base_reference`` forward; its backward reads ``dy`` in its own dtype too."""

    @staticmethod
    def forward(result, base, lora, magnitude, weight_norm, scaling, out_dtype):
        return compose_with_base_reference(result, base, lora, magnitude, weight_norm, scaling, out_dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        result, base, lora, magnitude, weight_norm, scaling, _ = inputs
        ctx.scaling = scaling
        ctx.save_for_backward(result, base, lora, magnitude, weight_norm)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        """``d_result = dy``, ``d_base = (g - 1)·dy``, ``d_lora = g·s·dy``, ``v = Σ_T dy ⊙ (base + s·lora)``."""
        result, base, lora, magnitude, weight_norm = ctx.saved_tensors
        needs = ctx.needs_input_grad
        acc = accumulation_dtype(grad_out, result, base, lora, magnitude, weight_norm)
        g = magnitude.to(acc) / weight_norm.to(acc)
        token_dims = broadcast_dims(grad_out, magnitude)
        v = (grad_out * (base.to(acc) + ctx.scaling * lora.to(acc))).sum(token_dims).reshape(magnitude.shape)
        d_magnitude, d_norm, _ = vector_grads(v, v.new_empty(0), magnitude, weight_norm, None, (*needs[3:5], False))
        return (
            grad_out.to(result.dtype) if needs[0] else None,
            ((g - 1.0) * grad_out).to(base.dtype) if needs[1] else None,
            ((g * ctx.scaling) * grad_out).to(lora.dtype) if needs[2] else None,
            d_magnitude,
            d_norm,
            None,
            None,
        )


def compose_with_base_torch(
    result: Tensor,
    base: Tensor,
    lora: Tensor,
    magnitude: Tensor,
    weight_norm: Tensor,
    scaling: float,
    out_dtype: torch.dtype,
) -> Tensor:
    """``compose_with_base_reference`` (dropout active), differentiated by hand as ``compose_torch`` is."""
    return _TorchComposeWithBase.apply(result, base, lora, magnitude, weight_norm, scaling, out_dtype)


# ----------------------------------------------------------------------------
# Public function


def compose(
    result: Tensor,
    lora: Tensor,
    magnitude: Tensor,
    weight_norm: Tensor,
    bias: Tensor | None,
    scaling: float,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """DoRA output ``result + (g-1)·(result - b) + g·s·lora``, ``g = m / n``, in one pass.

    ``result``/``lora`` are ``[..., d_out]``; ``magnitude``/``weight_norm``/``bias``
    are ``[d_out]``. ``out_dtype`` defaults to the promotion of the inputs, as
    the eager expression would give.
    """
    if out_dtype is None:
        out_dtype = torch.result_type(result, lora)
        out_dtype = torch.promote_types(out_dtype, torch.promote_types(magnitude.dtype, weight_norm.dtype))
    return torch.ops.dora_fused.compose(result, lora, magnitude, weight_norm, bias, float(scaling), out_dtype)
