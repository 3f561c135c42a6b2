"""The DoRA compose for training, its backward folding the per-feature scale into the LoRA up-projection.

PEFT's DoRA Linear computes ``lora = h·Bᵀ`` (``h = A·x``, ``[tokens, r]``), then
``out = g ⊙ (result - b + s·lora) + b`` with ``g = m / n``. This op takes ``h``
and ``B`` in place of ``lora`` and computes that forward as one op,
``lora_up_compose.lora_up_scaled_sum``: on CUDA one Triton kernel with the
up-projection in fp32 registers (no ``[tokens, d_out]`` ``lora`` in memory),
elsewhere the up-projection then ``compose_reference``'s fp32 sum, rounded once.
Where the backward recomputes the output (``passes/rewrite.py``), it calls the
same op again. The backward uses that ``g`` and ``s`` scale the output features,
so they scale the rows of ``B`` just as well (``lora·s·g = h·B'ᵀ``,
``B' = (s·g) ⊙_rows B``)::

    d_result = g ⊙ dy                     dh = dy·B'             P  = dyᵀ·h   [d_out, r]
    dB       = (s·g) ⊙_rows P             d_b = (1 - g) ⊙ Σ_T dy
    d_g      = Σ_T dy ⊙ (result - b)  +  s·Σ_r P ⊙ B

``P`` is the product the up-projection's backward forms anyway; the
``Σ_T dy ⊙ lora`` part of ``d_g`` comes from it as an ``[d_out, r]`` sum. So,
against the compose that takes ``lora`` (``compose_torch``), the ``[tokens,
d_out]`` LoRA output is not saved for backward nor read there, and its gradient
``g·s ⊙ dy`` is never written: one saved activation and two passes over
``[tokens, d_out]`` fewer, for a small ``[d_out, r]`` kernel or two more.

With dropout active PEFT runs the base layer again on the dropped input and composes
``out = result + (g - 1)·base + g·s·lora`` around that second output;
``lora_up_folded_compose_with_base_torch`` is the same fold for that form (``d_result = dy``,
``d_base = (g - 1) ⊙ dy``, ``d_g = Σ_T dy ⊙ base + s·Σ_r P ⊙ B``).

The backward is written by hand (``_FoldedLoraUpCompose``) in plain torch ops,
for Inductor to compile: ``dy`` is read in its own dtype (as ``compose_torch``
explains), and ``P`` has an fp32 result (tensor cores, ``torch.mm(...,
out_dtype=)``), so ``dB`` is rounded once, and the LoRA part of ``d_g`` not at
all. PEFT rounds ``g·s ⊙ dy`` to the adapter dtype, then ``dB``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import accumulation_dtype
from .compose import scaled_sum_with_base
from .lora_up_compose import lora_up_scaled_sum
from .products import product

__all__ = ["lora_up_folded_compose_torch", "lora_up_folded_compose_with_base_torch"]


class _FoldedLoraUpCompose(torch.autograd.Function):
    """``compose_reference(result, h·Bᵀ, ...)`` forward, the folded backward of the module docstring.

    ``g`` enters as a tensor (``m / n``, formed outside, so that autograd carries
    ``d_g`` on to ``m``, and to ``n`` where it needs a gradient).
    """

    @staticmethod
    def forward(result, hidden, lora_B, g, bias, scaling, out_dtype):
        return lora_up_scaled_sum(result, hidden, lora_B, g, bias, scaling, out_dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        result, hidden, lora_B, g, bias, scaling, _ = inputs
        ctx.scaling = scaling
        ctx.has_bias = bias is not None
        ctx.save_for_backward(result, hidden, lora_B, g, *((bias,) if bias is not None else ()))

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        result, hidden, lora_B, g, *rest = ctx.saved_tensors
        bias = rest[0] if ctx.has_bias else None
        needs = ctx.needs_input_grad
        acc, s = g.dtype, ctx.scaling
        # [tokens, d_out] views. The 2-D view of result also keeps Inductor saving result in its own dtype:
        # converted as it is, the conversion is one node with the forward's, and the partitioner saved that
        # fp32 [tokens, d_out] tensor instead (seen on an H100, bf16, torch 2.11)
        dy_rows = grad_out.reshape(-1, grad_out.shape[-1])
        dy = dy_rows.to(hidden.dtype)  # no copy where the dtypes agree
        d_result = (g * grad_out).to(result.dtype) if needs[0] else None
        d_hidden, d_lora_B, d_g_lora = _up_projection_grads(dy, hidden, lora_B, g, s, needs[1:4])
        d_g = d_bias = None
        if needs[3]:
            base = result.reshape(dy_rows.shape).to(acc)
            base = base if bias is None else base - bias.to(acc)
            d_g = (dy_rows * base).sum(0) + d_g_lora
        if bias is not None and needs[4]:
            d_bias = ((1.0 - g) * dy_rows.sum(0, dtype=acc)).to(bias.dtype)
        return d_result, d_hidden, d_lora_B, d_g, d_bias, None, None


def _up_projection_grads(
    dy: Tensor, hidden: Tensor, lora_B: Tensor, g: Tensor, s: float, needs: tuple[bool, bool, bool]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dh, dB, s·Σ_r P ⊙ B)`` of the term ``g·s ⊙ h·Bᵀ`` for ``dy [tokens, d_out]`` in ``h``'s dtype.

    ``needs``: whether ``h``, ``B`` and ``g`` need gradients; ``None`` where not.
    """
    acc = g.dtype
    d_hidden = d_lora_B = d_g = None
    if needs[0]:
        folded_B = ((s * g)[:, None] * lora_B.to(acc)).to(lora_B.dtype)
        d_hidden = (dy @ folded_B).reshape(hidden.shape)
    if needs[1] or needs[2]:
        products = product(dy.T, hidden.reshape(-1, hidden.shape[-1]), acc)  # P = dyᵀ·h, [d_out, r]
        if needs[1]:
            d_lora_B = ((s * g)[:, None] * products).to(lora_B.dtype)
        if needs[2]:
            d_g = s * (products * lora_B.to(acc)).sum(1)
    return d_hidden, d_lora_B, d_g


class _FoldedLoraUpComposeWithBase(torch.autograd.Function):
    """``compose_with_base_reference(result, base, h·Bᵀ, ...)`` forward, the same fold backward."""

    @staticmethod
    def forward(result, base, hidden, lora_B, g, scaling, out_dtype):
        lora = torch.nn.functional.linear(hidden, lora_B)
        return scaled_sum_with_base(result, base, lora, g, scaling, out_dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        result, base, hidden, lora_B, g, scaling, _ = inputs
        ctx.scaling = scaling
        ctx.result_dtype = result.dtype
        ctx.save_for_backward(base, hidden, lora_B, g)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        base, hidden, lora_B, g = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dy_rows = grad_out.reshape(-1, grad_out.shape[-1])  # 2-D views: see _FoldedLoraUpCompose.backward
        d_result = grad_out.to(ctx.result_dtype) if needs[0] else None
        d_base = ((g - 1.0) * grad_out).to(base.dtype) if needs[1] else None
        d_hidden, d_lora_B, d_g_lora = _up_projection_grads(
            dy_rows.to(hidden.dtype), hidden, lora_B, g, ctx.scaling, needs[2:5]
        )
        d_g = (dy_rows * base.reshape(dy_rows.shape).to(g.dtype)).sum(0) + d_g_lora if needs[4] else None
        return d_result, d_base, d_hidden, d_lora_B, d_g, None, None


def lora_up_folded_compose_torch(
    result: Tensor,
    hidden: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    weight_norm: Tensor,
    bias: Tensor | None,
    scaling: float,
    out_dtype: torch.dtype,
) -> Tensor:
    """``compose_reference(result, linear(hidden, B), m, n, b, s)`` with the folded backward; for training.

    ``hidden`` is ``[..., r]``, ``B`` ``[d_out, r]``, the vectors ``[d_out]`` (a
    Linear's output features last). Its backward writes no ``[tokens, d_out]``
    LoRA gradient and saves no LoRA output (module docstring). Plain torch ops,
    for Inductor to compile with the rest of the graph.
    """
    acc = accumulation_dtype(result, hidden, lora_B, magnitude, weight_norm, bias)
    g = magnitude.to(acc) / weight_norm.to(acc)
    return _FoldedLoraUpCompose.apply(result, hidden, lora_B, g, bias, scaling, out_dtype)


def lora_up_folded_compose_with_base_torch(
    result: Tensor,
    base: Tensor,
    hidden: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    weight_norm: Tensor,
    scaling: float,
    out_dtype: torch.dtype,
) -> Tensor:
    """``compose_with_base_reference(result, base, linear(hidden, B), m, n, s)`` with the folded backward.

    PEFT's compose with dropout active (``base`` the base layer on the dropped input), for training;
    shapes as in ``lora_up_folded_compose_torch``.
    """
    acc = accumulation_dtype(result, base, hidden, lora_B, magnitude, weight_norm)
    g = magnitude.to(acc) / weight_norm.to(acc)
    return _FoldedLoraUpComposeWithBase.apply(result, base, hidden, lora_B, g, scaling, out_dtype)
