"""PEFT's DoRA Linear (``peft.tuners.lora.dora.DoraLinearLayer`` via ``lora.Linear``).

Search form, as Dynamo traces peft 0.21 (GUIDE §4), ``s`` a Python float::

    n    = detach(to(linalg_norm(to(W) + s·detach(to(linear(linear(eye(d_in), A), B).T)), dim=1)))
    g    = view(m / n, 1, -1)
    out  = result + ((g - 1)·base + (g·lora)·s)        base = result - b  |  result  |  linear(drop(x), to(W))
    lora = linear(linear(x, A), B)                       (same A, B as the norm)

The last ``base`` is PEFT's form while dropout is active: the base layer runs a
second time on the dropped input (``to(W)`` then feeds both the norm and it).

Replacement::

    n   = dora_fused.factored_row_norm(detach(W), detach(A), detach(B), s)    # fp32 [d_out]
    out = dora_fused.compose(result, lora, m, n, b | None, s, dtype(out))
    out = compose_with_base_reference(result, base, lora, m, n, s, dtype(out))   # dropout active

``compose`` computes ``g·(result - b + s·lora) + b`` with ``g = m / n`` in fp32
and rounds once, so the intermediate roundings of ``n``, ``g`` and the four
elementwise products (in the input dtype) are gone: never less precise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import Node

from .graph_view import arg, example_value, is_scalar, is_symbolic_scalar, op_of, single_user, strip
from .matching import CASTS, LowRankSum, Unsupported, commuted, match_low_rank_sum, match_row_norm

__all__ = ["PeftLinearMatch", "match_peft_linear"]

FORM = "peft_linear"


@dataclass
class PeftLinearMatch:
    norm: LowRankSum
    magnitude: Node
    result: Node
    lora: Node
    bias: Node | None
    scaling: float | Node  # the compose's s (the norm has its own: PEFT reads the same value twice)
    root: Node  # add(result, dora): its value is replaced
    nodes: list[Node] = field(default_factory=list)  # everything from the norm to the root
    form: str = FORM
    base: Node | None = None  # a separate base output (dropout active: the base layer on the dropped input)


def _only_user(node: Node) -> Node:
    if not single_user(node):
        raise Unsupported(f"{node.name} has {len(node.users)} users where DoRA has one")
    return next(iter(node.users))


def _scale_from_norm(norm: Node, nodes: list[Node]) -> tuple[Node, Node]:
    """``g = view(m / detach(to(n)), 1, -1)``: returns (g, m)."""
    user = _only_user(norm)
    detached = False
    while op_of(user) in (*CASTS, "detach"):
        detached |= op_of(user) == "detach"
        nodes.append(user)
        user = _only_user(user)
    if not detached:
        raise Unsupported("row norm is not detached (only the detached DoRA norm is supported)")
    if op_of(user) != "div" or len(user.args) != 2 or user.args[1] is not nodes[-1]:
        raise Unsupported("row norm is not used as m / n")
    magnitude = user.args[0]
    nodes.append(user)
    g = user
    while op_of(next(iter(g.users), None)) == "view" and single_user(g):
        g = next(iter(g.users))
        nodes.append(g)
    return g, magnitude


def match_peft_linear(anchor: Node) -> PeftLinearMatch:
    """Match PEFT's DoRA Linear around a row-norm ``anchor``; raises NotDora / Unsupported."""
    low_rank = match_low_rank_sum(match_row_norm(anchor))
    nodes: list[Node] = [*low_rank.nodes, anchor]
    g, magnitude = _scale_from_norm(anchor, nodes)

    d_out = example_value(low_rank.weight).shape[0]
    m_val, g_val = example_value(magnitude), example_value(g)
    if m_val is None or tuple(m_val.shape) != (d_out,):
        raise Unsupported("magnitude is not a [d_out] vector")
    if g_val is None or g_val.shape[-1] != d_out or g_val.numel() != d_out:
        raise Unsupported("m / n is not broadcast over the output features")

    users = list(g.users)
    if len(users) != 2:
        raise Unsupported("m / n is not used as PEFT's compose uses it")
    by_op = {op_of(u): u for u in users}
    shifted, scaled = by_op.get("sub"), by_op.get("mul")
    if shifted is None or scaled is None:
        raise Unsupported("m / n is not used as (g - 1) and g·lora")
    if len(shifted.args) != 2 or shifted.args[0] is not g or shifted.args[1] != 1:
        raise Unsupported("m / n is not used as (g - 1)")

    # (g - 1)·base
    base_term = _only_user(shifted)
    pair = commuted(base_term, lambda n: n is shifted) if op_of(base_term) == "mul" else None
    if pair is None:
        raise Unsupported("(g - 1) is not multiplied by the base output")
    base = pair[1]
    nodes += [shifted, base_term]

    # (g·lora)·s
    pair = commuted(scaled, lambda n: n is g)
    if pair is None:
        raise Unsupported("g is not multiplied by the LoRA output")
    lora = pair[1]
    lora_term = _only_user(scaled)
    pair = commuted(lora_term, lambda a: is_scalar(a) or is_symbolic_scalar(a)) if op_of(lora_term) == "mul" else None
    if pair is None:
        raise Unsupported("g·lora is not multiplied by the scaling")
    scaling = float(pair[0]) if is_scalar(pair[0]) else pair[0]
    nodes += [scaled, lora_term]

    # dora = (g-1)·base + g·lora·s ;  root = result + dora
    dora = _only_user(base_term)
    if op_of(dora) != "add" or set(dora.args) != {base_term, lora_term} or dora.kwargs:
        raise Unsupported("the two DoRA terms are not summed")
    root = _only_user(dora)
    pair = commuted(root, lambda n: n is not dora) if op_of(root) == "add" else None
    if pair is None or pair[1] is not dora:
        raise Unsupported("the DoRA term is not added to the base result")
    result = pair[0]
    nodes += [dora, root]

    bias = None
    separate_base = None
    if base is not result and not (op_of(base) == "sub" and len(base.args) == 2 and base.args[0] is result):
        # dropout active: PEFT runs the base layer again on the dropped input; keep it, compose around it
        b_val, r_val = example_value(base), example_value(result)
        if b_val is None or r_val is None or b_val.shape != r_val.shape:
            raise Unsupported("base output is neither the base result, result - bias, nor a base output")
        separate_base = base
    elif base is not result:
        if base.kwargs:
            raise Unsupported("result - bias with keyword arguments")
        bias = base.args[1]
        if not single_user(base):
            raise Unsupported("result - bias is used elsewhere")
        b_val = example_value(bias)
        if b_val is None or tuple(b_val.shape) != (d_out,):
            raise Unsupported("bias is not a [d_out] vector")
        nodes.append(base)

    _check_lora(lora, low_rank)
    r_val, l_val = example_value(result), example_value(lora)
    if r_val is None or l_val is None or r_val.shape != l_val.shape or r_val.shape[-1] != d_out:
        raise Unsupported("base and LoRA outputs do not have the layer's output shape")
    root_val = example_value(root)
    if root_val is None or root_val.shape != r_val.shape:
        raise Unsupported("the DoRA scale broadcasts the output to another shape")
    values = [r_val, l_val, m_val] + [example_value(n) for n in (bias, separate_base) if n is not None]
    if any(not v.dtype.is_floating_point for v in values):
        raise Unsupported("non-floating compose inputs")
    if len({v.device for v in values} | {example_value(low_rank.weight).device}) != 1:
        raise Unsupported("compose inputs on different devices")
    return PeftLinearMatch(low_rank, magnitude, result, lora, bias, scaling, root, nodes, base=separate_base)


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


def output_dtype(node: Node) -> torch.dtype:
    value = example_value(node)
    if value is None:
        raise Unsupported(f"no example value on {node.name}")
    return value.dtype
