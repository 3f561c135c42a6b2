"""PEFT's DoRA Conv1d/2d/3d (``peft.tuners.lora.dora._DoraConvNdLayer`` via ``lora.Conv*d``).

Search form, as Dynamo traces peft 0.21 (``W`` is ``[C_out, C_in/groups, *k]``,
``K = W[0].numel()``, ``m`` is ``[1, C_out, 1, ...]``)::

    ΔW   = reshape(mm(view(B, [-1, r]), view(A, [r, -1])), W.shape)
    n    = detach(transpose(norm(W + s·detach(ΔW), dim=(1, ..., N-1), keepdim=True), 1, 0))   [1, C_out, 1, ...]
    g    = m / n
    out  = result + ((g - 1)·base + (g·lora)·s)     base = result - view(b, 1, -1, 1, ...) | result | a second conv
    lora = conv(conv(x, A), B)                        (A, B: the parameters the norm's views read)

The norm over every dim but the first is the row norm of ``W.reshape(C_out, K)``,
and ``view(B, [C_out, r]) · view(A, [r, K])`` is the low-rank update of those
rows, so the factored norm applies unchanged.

Replacement::

    n   = factored_row_norm(detach(W).reshape(C_out, -1), detach(view(A)), detach(view(B)), s)   # fp32 [C_out]
    out = compose_reference(result, lora, m, n.view(m.shape), view(b) | None, s, dtype(out))
    out = compose_with_base_torch(result, base, lora, m, n.view(m.shape), s, dtype(out))   # dropout active

The compose broadcasts ``g`` over dim 1 (channels first), so it is the
plain-torch compose that Inductor fuses into one pointwise kernel; the Triton
compose kernels take output features on the last dim.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.fx import Node

from .form import ComposeMatch
from .graph_view import arg, example_value, op_of, strip
from .matching import LowRankSum, Unsupported, match_low_rank_sum, trailing_norm_input
from .peft_compose import match_compose, only_user, scale_from_norm

__all__ = ["PeftConvMatch", "match_peft_conv"]

CHANNEL_DIM = 1


@dataclass(kw_only=True)
class PeftConvMatch(ComposeMatch):
    """``magnitude`` and ``bias`` (the view PEFT subtracts) are ``[1, C_out, 1, ...]``; the rows are ``(C_out, K)``."""

    norm: LowRankSum
    channel_dim: int = CHANNEL_DIM


def _transposed_norm(anchor: Node, nodes: list[Node]) -> Node:
    """``transpose(norm, 1, 0)`` (or ``0, 1``): PEFT turns the ``[C_out, 1, ...]`` norm into ``[1, C_out, ...]``."""
    user = only_user(anchor)
    if op_of(user) != "transpose" or sorted(user.args[1:]) != [0, 1] or user.kwargs:
        raise Unsupported("the Conv norm is not transposed to [1, C_out, ...]")
    nodes.append(user)
    return user


def _check_lora(lora: Node, low_rank: LowRankSum) -> None:
    """The LoRA output must be ``conv(conv(x, A), B)`` with the parameters behind the norm's views of A and B."""
    lora_A, lora_B = strip(low_rank.lora_A, ("view",)), strip(low_rank.lora_B, ("view",))
    inner = lora.args[0] if op_of(lora) == "conv" and lora.args else None
    if (
        op_of(lora) != "conv"
        or arg(lora, 1, "weight") is not lora_B
        or arg(lora, 2, "bias") is not None
        or op_of(inner) != "conv"
        or arg(inner, 1, "weight") is not lora_A
        or arg(inner, 2, "bias") is not None
    ):
        raise Unsupported("the LoRA output is not conv(conv(x, A), B) with the norm's A and B")


def match_peft_conv(anchor: Node) -> PeftConvMatch:
    """Match PEFT's Conv DoRA around a norm ``anchor`` over all but the first dim; raises NotDora / Unsupported."""
    x, keepdim = trailing_norm_input(anchor)
    low_rank = match_low_rank_sum(x)
    if not keepdim:
        raise Unsupported("Conv norm without keepdim")
    nodes: list[Node] = [*low_rank.nodes, anchor]
    stored: list[Node] = []
    g, magnitude = scale_from_norm(_transposed_norm(anchor, nodes), nodes, stored)
    d_out = low_rank.layer_shape[0]
    m_val, g_val = example_value(magnitude), example_value(g)
    if m_val is None or g_val is None or m_val.shape != g_val.shape or not m_val.dtype.is_floating_point:
        raise Unsupported("magnitude is not a [1, C_out, 1, ...] vector")
    compose = match_compose(g, d_out, nodes, channel_dim=CHANNEL_DIM)
    if compose.bias is not None and example_value(compose.bias).shape != g_val.shape:
        raise Unsupported("bias is not viewed as [1, C_out, 1, ...]")
    _check_lora(compose.lora, low_rank)
    compose.check_one_device(magnitude, low_rank.weight)
    return PeftConvMatch(norm=low_rank, magnitude=magnitude, nodes=nodes, stored=stored, **compose.fields())
