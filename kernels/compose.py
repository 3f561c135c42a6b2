"""DoRA output compose: one elementwise pass instead of PEFT's four kernels.

PEFT composes, with ``g = m / n`` broadcast over the last (output-feature) dim::

    out = result + (g - 1)·(result - b) + g·s·lora

which is algebraically ``out = g·(result - b + s·lora) + b``. This op computes
that form in fp32 registers (fp64 for fp64 inputs) and rounds once to
``out_dtype``. In the near-unity regime ``g ≈ 1`` it keeps the bits that
PEFT's ``g - 1`` and ``result - b`` lose in bf16/fp16 arithmetic.

Gradients (``T`` = all leading token dims, ``v = Σ_T dy ⊙ (result - b + s·lora)``):

    d_result = g ⊙ dy            d_lora = g·s ⊙ dy
    d_m      = v / n             d_n    = -v·m / n²      d_b = Σ_T dy ⊙ (1 - g)

``n`` is detached in DoRA (paper §4.3), so ``d_n`` is only formed when the
caller passes an ``n`` that requires grad.

Layout: pure-torch reference → ``torch.library`` op with fake impl →
autograd → public function. The backward is plain torch, so AOTAutograd traces
it and Inductor fuses it.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["compose", "compose_backward_reference", "compose_reference", "compute_dtype"]


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """fp64 if any input is fp64, else fp32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


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
    acc = compute_dtype(result, lora, magnitude, weight_norm, bias)
    g = magnitude.to(acc) / weight_norm.to(acc)
    base = result.to(acc)
    if bias is not None:
        b = bias.to(acc)
        return (g * (base - b + scaling * lora.to(acc)) + b).to(out_dtype)
    return (g * (base + scaling * lora.to(acc))).to(out_dtype)


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
    acc = compute_dtype(grad_out, result, lora, magnitude, weight_norm, bias)
    dy = grad_out.to(acc)
    m, n = magnitude.to(acc), weight_norm.to(acc)
    g = m / n
    token_dims = tuple(range(dy.dim() - 1))
    d_result = (g * dy).to(result.dtype) if needs_grad[0] else None
    d_lora = ((g * scaling) * dy).to(lora.dtype) if needs_grad[1] else None
    d_magnitude = d_norm = None
    if needs_grad[2] or needs_grad[3]:
        base = result.to(acc)
        if bias is not None:
            base = base - bias.to(acc)
        v = (dy * (base + scaling * lora.to(acc))).sum(token_dims)
        if needs_grad[2]:
            d_magnitude = (v / n).to(magnitude.dtype)
        if needs_grad[3]:
            d_norm = (-v * m / (n * n)).to(weight_norm.dtype)
    d_bias = None
    if needs_grad[4] and bias is not None:
        d_bias = (dy * (1.0 - g)).sum(token_dims).to(bias.dtype)
    return d_result, d_lora, d_magnitude, d_norm, d_bias


@torch.library.custom_op("dora_fused::compose", mutates_args=())
def _compose_op(
    result: Tensor,
    lora: Tensor,
    magnitude: Tensor,
    weight_norm: Tensor,
    bias: Tensor | None,
    scaling: float,
    out_dtype: torch.dtype,
) -> Tensor:
    return compose_reference(result, lora, magnitude, weight_norm, bias, scaling, out_dtype)


@_compose_op.register_fake
def _(
    result: Tensor,
    lora: Tensor,
    magnitude: Tensor,
    weight_norm: Tensor,
    bias: Tensor | None,
    scaling: float,
    out_dtype: torch.dtype,
) -> Tensor:
    torch._check(result.shape == lora.shape, lambda: "compose: result and lora shapes differ")
    torch._check(magnitude.dim() == 1 and weight_norm.dim() == 1)
    torch._check(magnitude.shape[0] == result.shape[-1] and weight_norm.shape[0] == result.shape[-1])
    return torch.empty_like(result, dtype=out_dtype)


def _setup_context(ctx, inputs, output) -> None:
    result, lora, magnitude, weight_norm, bias, scaling, _ = inputs
    ctx.scaling = scaling
    ctx.has_bias = bias is not None
    saved = (result, lora, magnitude, weight_norm) + ((bias,) if bias is not None else ())
    ctx.save_for_backward(*saved)


def _backward(ctx, grad_out: Tensor):
    result, lora, magnitude, weight_norm, *rest = ctx.saved_tensors
    bias = rest[0] if ctx.has_bias else None
    needs = tuple(ctx.needs_input_grad[:5])
    grads = compose_backward_reference(grad_out, result, lora, magnitude, weight_norm, bias, ctx.scaling, needs)
    return (*grads, None, None)


_compose_op.register_autograd(_backward, setup_context=_setup_context)


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
