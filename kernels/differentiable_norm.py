"""The factored row norm with a gradient, for forms whose norm is not detached.

Value: ``factored_row_norm_torch`` (ill-conditioned rows recomputed densely).
Gradient of ``n_i = ‖e_i‖``, ``e_i = W_i + s·(B·A)_i``, with ``c_i = ∂L/∂n_i / n_i``::

    ∂L/∂W = c ⊙ e                               (e formed elementwise, as the dense path does)
    ∂L/∂B = s·c ⊙ (e·Aᵀ) = s·c ⊙ (U + s·B·G)     U = W·Aᵀ, G = A·Aᵀ
    ∂L/∂A = s·(c ⊙ B)ᵀ·e = s·(c ⊙ B)ᵀ·W + s²·((c ⊙ B)ᵀ·B)·A

The factored right-hand sides cancel exactly where the norm's sum does, so the
rows ``ill_conditioned_rows`` flags take ``e_i`` densely (those rows only).
``c_i = 0`` where ``n_i = 0`` (the norm's subgradient there). Both directions
are ``torch.library`` ops: opaque to Inductor, whose graphs never see the
data-dependent row count.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import accumulation_dtype
from .factored_norm import factored_row_norm_torch
from .ill_conditioned_rows import ill_conditioned

__all__ = ["factored_row_norm_differentiable", "row_norm_gradients_reference"]


def row_norm_gradients_reference(
    grad: Tensor, norm: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``(∂L/∂W, ∂L/∂A, ∂L/∂B)`` with ``e`` dense for every row (tests)."""
    acc = accumulation_dtype(weight, lora_A, lora_B)
    w, a, b = weight.to(acc), lora_A.to(acc), lora_B.to(acc)
    c = torch.where(norm > 0, grad.to(acc) / norm.to(acc), torch.zeros_like(norm, dtype=acc))[:, None]
    e = w + scaling * (b @ a)
    return c * e, scaling * (c * b).T @ e, scaling * c * (e @ a.T)


@torch.library.custom_op("dora_fused::factored_row_norm_with_grad", mutates_args=())
def _norm_op(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    return factored_row_norm_torch(weight, lora_A, lora_B, scaling)


@_norm_op.register_fake
def _(weight, lora_A, lora_B, scaling):
    return weight.new_empty(weight.shape[0], dtype=accumulation_dtype(weight, lora_A, lora_B))


@torch.library.custom_op("dora_fused::factored_row_norm_gradients", mutates_args=())
def _gradients_op(
    grad: Tensor, norm: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float
) -> tuple[Tensor, Tensor, Tensor]:
    acc = norm.dtype
    w, a, b = weight.to(acc), lora_A.to(acc), lora_B.to(acc)
    c = torch.where(norm > 0, grad.to(acc) / norm, torch.zeros_like(norm))[:, None]
    cb = c * b
    gram = a @ a.T
    w_squared = (w * w).sum(1)
    lora_squared = (scaling * scaling) * ((b @ gram) * b).sum(1)
    flagged = ill_conditioned(norm, w_squared, lora_squared).nonzero().squeeze(1)
    grad_w = c * (w + scaling * (b @ a))  # e formed elementwise, as the dense path does
    grad_b = scaling * c * (w @ a.T + scaling * (b @ gram))
    factored_cb = cb.index_fill(0, flagged, 0.0)
    grad_a = scaling * (factored_cb.T @ w) + scaling * scaling * ((factored_cb.T @ b) @ a)
    if flagged.numel():
        dense = w[flagged] + scaling * (b[flagged] @ a)  # e_i of the flagged rows, as the dense path forms it
        grad_b[flagged] = scaling * c[flagged] * (dense @ a.T)
        grad_a = grad_a + scaling * (cb[flagged].T @ dense)
    # each gradient laid out as its input (a transposed W's gradient transposed too), as the fake says
    return tuple(torch.empty_like(t).copy_(g) for g, t in ((grad_w, weight), (grad_a, lora_A), (grad_b, lora_B)))


@_gradients_op.register_fake
def _(grad, norm, weight, lora_A, lora_B, scaling):
    return torch.empty_like(weight), torch.empty_like(lora_A), torch.empty_like(lora_B)


def _setup_context(ctx, inputs, output) -> None:
    weight, lora_A, lora_B, scaling = inputs
    ctx.save_for_backward(output, weight, lora_A, lora_B)
    ctx.scaling = scaling


def _backward(ctx, grad: Tensor):
    norm, weight, lora_A, lora_B = ctx.saved_tensors
    grad_w, grad_a, grad_b = torch.ops.dora_fused.factored_row_norm_gradients(
        grad, norm, weight, lora_A, lora_B, ctx.scaling
    )
    needs = ctx.needs_input_grad
    return grad_w if needs[0] else None, grad_a if needs[1] else None, grad_b if needs[2] else None, None


_norm_op.register_autograd(_backward, setup_context=_setup_context)


def factored_row_norm_differentiable(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """``‖W + s·B·A‖_row`` (``[d_out]``, accumulation dtype) with its exact gradient to ``W``, ``A`` and ``B``."""
    if isinstance(scaling, torch.SymFloat):  # a traced s (dynamic=True): the op's float would specialize it
        lora_B, scaling = lora_B * scaling, 1.0  # autograd carries the gradient on through the product
    return torch.ops.dora_fused.factored_row_norm_with_grad(weight, lora_A, lora_B, float(scaling))
