"""PEFT's DoRA Linear/Conv with a norm that PEFT's cache returns (``ENABLE_DORA_CACHING`` in eval).

With ``peft.tuners.lora.dora.ENABLE_DORA_CACHING = True`` and the model in
eval, PEFT computes the norm on the first call and stores it (that graph is
matched by the norm forms, which store their own norm in its place); every
later call reads it back, and Dynamo traces it as a graph input ``n``.
Nothing is left to factor: only the compose remains. Search form::

    g    = [view](m / detach(n))                 n: a graph input, [d_out] (Linear) or [1, C_out, 1, ...] (Conv)
    out  = result + ((g - 1)·base + (g·lora)·s)  as in the Linear / Conv forms (``peft_compose``)
    lora = linear(linear(x, A), B) | conv(conv(x, A), B)

Replacement: the compose of the Linear / Conv form, with ``detach(n)`` as the norm.
The Embedding compose is not matched here (its cached graph is left as traced).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch.fx import Node

from .form import ComposeMatch
from .graph_view import arg, example_value, op_of, single_user, strip
from .matching import CASTS, NotDora, Unsupported
from .peft_compose import match_compose

__all__ = ["ANCHORS", "CachedNormMatch", "match_cached_norm"]

ANCHORS = ("div",)
_LORA_OPS = {-1: "linear", 1: "conv"}  # channel dim -> the op of the LoRA path


@dataclass(kw_only=True)
class CachedNormMatch(ComposeMatch):
    """No norm in the graph: ``weight_norm`` is the cached norm, a graph input; A and B are read off the LoRA path."""

    norm: None = None
    weight_norm: Node
    lora_A: Node
    lora_B: Node

    @property
    def layer_shape(self) -> tuple[int, int]:
        a, b = example_value(self.lora_A), example_value(self.lora_B)
        return int(b.shape[0]), math.prod(a.shape[1:])  # Conv: A is [r, C_in, *k]

    @property
    def adapter_factors(self) -> tuple[Node, Node]:
        return self.lora_A, self.lora_B

    @property
    def base_weight(self) -> Node | None:
        """W: the base output's weight argument."""
        return arg(self.result, 1, "weight") if op_of(self.result) in ("linear", "conv") else None

    @property
    def kind(self) -> str:
        return "PEFT Linear" if self.channel_dim == -1 else "PEFT Conv"


def _lora_factors(lora: Node, op: str) -> tuple[Node, Node]:
    """``(A, B)`` of ``op(op(x, A), B)`` without biases; raises Unsupported."""
    inner = lora.args[0] if op_of(lora) == op and lora.args else None
    if op_of(lora) != op or op_of(inner) != op or arg(lora, 2, "bias") is not None or arg(inner, 2, "bias") is not None:
        raise Unsupported(f"the LoRA output is not {op}({op}(x, A), B)")
    return arg(inner, 1, "weight"), arg(lora, 1, "weight")


def match_cached_norm(anchor: Node) -> CachedNormMatch:
    """Match ``m / detach(n)`` with a graph-input ``n`` and PEFT's compose around it; raises NotDora / Unsupported."""
    if op_of(anchor) != "div" or len(anchor.args) != 2 or anchor.kwargs:
        raise NotDora("not m / n")
    magnitude, denominator = anchor.args
    chain: list[Node] = []
    weight_norm = strip(denominator, (*CASTS, "detach"), chain)
    if op_of(weight_norm) != "input" or not any(op_of(n) == "detach" for n in chain):
        raise NotDora("the divisor is not a detached graph input")  # a computed norm is the norm forms' job
    m_val, n_val = example_value(magnitude), example_value(weight_norm)
    if m_val is None or n_val is None or m_val.numel() != n_val.numel() or m_val.dim() not in (1, n_val.dim()):
        raise NotDora("m and n are not vectors of one size")
    g, nodes = anchor, [anchor]
    while op_of(next(iter(g.users), None)) == "view" and single_user(g):
        g = next(iter(g.users))
        nodes.append(g)
    if {op_of(u) for u in g.users} != {"sub", "mul"} or len(g.users) != 2:
        raise NotDora("m / n is not used as (g - 1) and g·lora")
    g_val = example_value(g)
    d_out = m_val.numel()
    channel_dim = -1 if g_val.dim() == 2 and g_val.shape[0] == 1 else 1
    if channel_dim == 1 and (g_val.dim() < 3 or g_val.shape[1] != d_out):
        raise Unsupported("m / n is broadcast neither as PEFT's Linear nor as its Conv")
    compose = match_compose(g, d_out, nodes, channel_dim)
    lora_A, lora_B = _lora_factors(compose.lora, _LORA_OPS[channel_dim])
    if channel_dim == -1 and (m_val.dim() != 1 or n_val.dim() != 1):
        raise Unsupported("a cached Linear norm that is not a [d_out] vector")
    if channel_dim == -1 and compose.bias is not None and example_value(compose.bias).dim() != 1:
        raise Unsupported("bias is not a [d_out] vector")
    compose.check_one_device(magnitude, weight_norm)
    return CachedNormMatch(
        weight_norm=weight_norm,
        magnitude=magnitude,
        lora_A=lora_A,
        lora_B=lora_B,
        channel_dim=channel_dim,
        nodes=[*chain, *nodes],
        **compose.fields(),
    )
