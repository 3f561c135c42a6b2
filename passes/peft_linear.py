"""PEFT's DoRA Linear (``peft.tuners.lora.dora.DoraLinearLayer`` via ``lora.Linear``), and torchtune-style modules.

torchtune's ``DoRALinear`` traces to the same graph outside a PEFT layer (with
the bias inside ``result``, so ``base = result``): the same matcher serves both
forms (``patterns.FORMS`` tells them apart by where the norm runs).

Search form, as Dynamo traces peft 0.21, ``s`` a Python float::

    n    = detach(to(linalg_norm(to(W) + s·detach(to(linear(linear(eye(d_in), A), B).T)), dim=1)))
    g    = view(m / n, 1, -1)
    out  = result + ((g - 1)·base + (g·lora)·s)        base = result - b  |  result  |  linear(drop(x), to(W))
    lora = linear(linear(x, A), B)                       (same A, B as the norm)

The last ``base`` is PEFT's form while dropout is active: the base layer runs a
second time on the dropped input (``to(W)`` then feeds both the norm and it).

Replacement::

    n   = dora_fused.factored_row_norm(detach(W), detach(A), detach(B), s)    # fp32 [d_out]
    out = dora_fused.compose(result, lora, m, n, b | None, s, dtype(out))
    out = compose_with_base_torch(result, base, lora, m, n, s, dtype(out))   # dropout active

``compose`` computes ``g·(result - b + s·lora) + b`` with ``g = m / n`` in fp32
and rounds once, so the intermediate roundings of ``n``, ``g`` and the four
elementwise products (in the input dtype) are gone: never less precise.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.fx import Node

from .form import ComposeMatch
from .graph_view import arg, example_value, op_of, strip
from .matching import LowRankSum, Unsupported, match_low_rank_sum, match_row_norm
from .peft_compose import match_compose, scale_from_norm

__all__ = ["PeftLinearMatch", "match_peft_linear"]


@dataclass(kw_only=True)
class PeftLinearMatch(ComposeMatch):
    """``root = add(result, dora)``; ``nodes``: everything from the dense product to the root."""

    norm: LowRankSum


def match_peft_linear(anchor: Node) -> PeftLinearMatch:
    """Match PEFT's DoRA Linear around a row-norm ``anchor``; raises NotDora / Unsupported."""
    low_rank = match_low_rank_sum(match_row_norm(anchor))
    nodes: list[Node] = [*low_rank.nodes, anchor]
    stored: list[Node] = []
    g, magnitude = scale_from_norm(anchor, nodes, stored)

    d_out = example_value(low_rank.weight).shape[0]
    m_val = example_value(magnitude)
    if m_val is None or tuple(m_val.shape) != (d_out,) or not m_val.dtype.is_floating_point:
        raise Unsupported("magnitude is not a [d_out] vector")
    compose = match_compose(g, d_out, nodes)
    if compose.bias is not None and example_value(compose.bias).dim() != 1:
        raise Unsupported("bias is not a [d_out] vector")
    _check_lora(compose.lora, low_rank)
    compose.check_one_device(magnitude, low_rank.weight)
    return PeftLinearMatch(norm=low_rank, magnitude=magnitude, nodes=nodes, stored=stored, **compose.fields())


def _check_lora(lora: object, low_rank: LowRankSum) -> None:
    """The compose's LoRA output must be ``linear(linear(x, A), B)`` with the norm's A and B."""
    lora_b = strip(lora, ())
    inner = lora_b.args[0] if op_of(lora_b) == "linear" else None
    if (
        op_of(lora_b) != "linear"
        or arg(lora_b, 2, "bias") is not None
        or lora_b.args[1] is not low_rank.lora_B
        or op_of(inner) != "linear"
        or arg(inner, 2, "bias") is not None
        or inner.args[1] is not low_rank.lora_A
    ):
        raise Unsupported("the LoRA output is not B(A(x)) with the norm's A and B")
