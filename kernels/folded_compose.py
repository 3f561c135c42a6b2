"""The DoRA compose for training, with the per-feature scale folded into the LoRA up-projection.

PEFT's DoRA Linear computes ``lora = h·Bᵀ`` (``h = A·x``, ``[tokens, r]``), then
``out = g ⊙ (result - b + s·lora) + b`` with ``g = m / n``. Since ``g`` and ``s``
scale the output features, they scale the rows of ``B`` just as well::

    out = g ⊙ (result - b) + b + h·B'ᵀ,      B' = (s·g) ⊙_rows B      [d_out, r]

The forward costs the same (``B'`` is an ``[d_out, r]`` product). The backward
is where it pays: the gradient reaching the up-projection is ``dy`` itself, so
autograd forms ``dh = dy·B'`` and ``dB' = dyᵀ·h`` straight from ``dy``, and then

    d_result = g ⊙ dy            dB  = (s·g) ⊙_rows dB'
    d_g      = Σ_T dy ⊙ (result - b)  +  s·Σ_r dB' ⊙ B        d_b = (1 - g) ⊙ Σ_T dy

The last sum over ``r`` is an ``[d_out, r]`` product: the ``Σ_T dy ⊙ lora`` part
of ``d_g`` comes from the ``dB'`` that the up-projection's backward computes
anyway. So, against the unfolded compose, the ``[tokens, d_out]`` LoRA output is
neither saved for backward nor read there, and its gradient ``g·s ⊙ dy`` is never
written: two passes over ``[tokens, d_out]`` and one saved activation fewer.

The backward is written by hand (``_FoldedLoraUpCompose``) in plain torch ops,
for Inductor to compile: ``dy`` is read in its own dtype (as ``compose_torch``
explains), and ``dB'`` is kept in fp32 (``P = dyᵀ·h`` with an fp32 result),
so that ``dB`` is rounded once and the LoRA part of ``d_g`` not at all.

Precision: ``B'`` is rounded once to ``B``'s dtype (from an fp32 product), the
up-projection output once (as PEFT rounds ``lora``), and the sum is computed in
fp32 (fp64 for fp64 inputs) and rounded once. PEFT's bf16 expression rounds
``lora·s``, ``g·(…)`` and each addition besides.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .compose import broadcast_dims, compute_dtype

__all__ = ["folded_compose_reference", "lora_up_folded_compose_torch"]


def folded_compose_reference(
    result: Tensor,
    hidden: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    weight_norm: Tensor,
    bias: Tensor | None,
    scaling: float,
    out_dtype: torch.dtype,
) -> Tensor:
    """``g ⊙ (result - b) + b + h·B'ᵀ`` with ``B' = (s·g) ⊙_rows B``, the sum in fp32 (fp64), rounded once."""
    acc = compute_dtype(result, hidden, lora_B, magnitude, weight_norm, bias)
    g = magnitude.to(acc) / weight_norm.to(acc)
    folded_B = ((scaling * g)[:, None] * lora_B.to(acc)).to(lora_B.dtype)
    lora = torch.nn.functional.linear(hidden, folded_B)
    base = result.to(acc) if bias is None else result.to(acc) - bias.to(acc)
    out = g * base + lora.to(acc)
    return (out if bias is None else out + bias.to(acc)).to(out_dtype)


def _product(x: Tensor, y: Tensor, acc: torch.dtype) -> Tensor:
    """``x·y`` in ``acc``: 16-bit operands multiplied exactly on tensor cores with an ``acc`` (fp32) result on
    CUDA (one cuBLAS call); elsewhere, or for 32/64-bit operands, promoted."""
    if x.dtype == y.dtype and x.dtype in (torch.bfloat16, torch.float16) and acc == torch.float32 and x.is_cuda:
        if hasattr(torch.ops.aten.mm, "dtype"):
            return torch.mm(x, y, out_dtype=acc)
    return x.to(acc) @ y.to(acc)


class _FoldedLoraUpCompose(torch.autograd.Function):
    """``g ⊙ (result - b) + b + h·B'ᵀ``, ``B' = (s·g) ⊙_rows B``, with the backward of the module docstring.

    ``dB'ᵀ``'s product ``P = dyᵀ·h`` is kept in fp32 (fp64): ``dB = (s·g) ⊙ P`` is
    rounded once, and the LoRA part of ``d_g``, ``s·Σ_r P ⊙ B``, is not rounded
    to the adapter dtype on the way. ``g`` enters as a tensor (``m / n``, formed
    outside, so autograd carries ``d_g`` to ``m`` and ``n``).
    """

    @staticmethod
    def forward(result, hidden, lora_B, g, bias, scaling, out_dtype):
        acc = g.dtype
        folded_B = ((scaling * g)[:, None] * lora_B.to(acc)).to(lora_B.dtype)
        lora = torch.nn.functional.linear(hidden, folded_B)
        base = result.to(acc) if bias is None else result.to(acc) - bias.to(acc)
        out = g * base + lora.to(acc)
        return (out if bias is None else out + bias.to(acc)).to(out_dtype)

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
        token_dims = broadcast_dims(grad_out, g)
        dy = grad_out.reshape(-1, grad_out.shape[-1])  # [tokens, d_out]
        d_result = (g * grad_out).to(result.dtype) if needs[0] else None
        d_hidden = d_lora_B = d_g = d_bias = None
        if needs[1]:
            folded_B = ((s * g)[:, None] * lora_B.to(acc)).to(lora_B.dtype)
            d_hidden = (dy.to(hidden.dtype) @ folded_B).reshape(hidden.shape)
        if needs[2] or needs[3]:
            products = _product(dy.to(hidden.dtype).T, hidden.reshape(-1, hidden.shape[-1]), acc)  # P = dyᵀ·h
            if needs[2]:
                d_lora_B = ((s * g)[:, None] * products).to(lora_B.dtype)
            if needs[3]:
                base = result.to(acc) if bias is None else result.to(acc) - bias.to(acc)
                d_g = (grad_out * base).sum(token_dims) + s * (products * lora_B.to(acc)).sum(1)
        if bias is not None and needs[4]:
            d_bias = ((1.0 - g) * grad_out.sum(token_dims, dtype=acc)).to(bias.dtype)
        return d_result, d_hidden, d_lora_B, d_g, d_bias, None, None


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
    """``folded_compose_reference`` for training; ``hidden`` is ``[..., r]``, ``B`` ``[d_out, r]``, vectors ``[d_out]``.

    The same value as ``compose_torch(result, linear(hidden, B), ...)`` up to where
    ``B'`` and the up-projection's output are rounded; its backward writes no
    ``[tokens, d_out]`` LoRA gradient and saves no LoRA output (module docstring).
    Plain torch ops, for Inductor to compile with the rest of the graph.
    """
    acc = compute_dtype(result, hidden, lora_B, magnitude, weight_norm, bias)
    g = magnitude.to(acc) / weight_norm.to(acc)
    return _FoldedLoraUpCompose.apply(result, hidden, lora_B, g, bias, scaling, out_dtype)
