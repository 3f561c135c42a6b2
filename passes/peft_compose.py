"""What PEFT's DoRA layers share around the norm: ``g = m / detach(n)`` and the compose around ``g``.

PEFT 0.21 traces, for Linear and Conv (``g`` broadcast over the output features)::

    g    = [view](m / detach([to](n)))
    out  = result + ((g - 1)·base + (g·lora)·s)     base = result - b | result | a second base output (dropout)

With ``peft.tuners.lora.dora.ENABLE_DORA_CACHING`` in eval, the norm is also
a graph output on the call that fills PEFT's cache: those norm-valued nodes are
returned as ``stored``, and the rewrite stores its own norm in their place
(``rewrite.store_norm``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Node

from .graph_view import example_value, is_scalar, is_symbolic_scalar, op_of, single_user
from .matching import CASTS, Unsupported, commuted

__all__ = ["PeftCompose", "match_compose", "only_user", "output_dtype", "scale_from_norm"]


def only_user(node: Node) -> Node:
    if not single_user(node):
        raise Unsupported(f"{node.name} has {len(node.users)} users where DoRA has one")
    return next(iter(node.users))


def _norm_user(node: Node, stored: list[Node]) -> Node:
    """The one user of a norm-valued node; a graph output beside it is PEFT's cache storing the norm."""
    users = [u for u in node.users if u.op != "output"]
    if len(users) != 1:
        raise Unsupported(f"{node.name} has {len(users)} users where DoRA has one")
    if len(users) < len(node.users):
        stored.append(node)
    return users[0]


def scale_from_norm(norm: Node, nodes: list[Node], stored: list[Node]) -> tuple[Node, Node]:
    """``g = view(m / detach(to(n)), 1, -1)``: returns (g, m); norm-valued graph outputs go to ``stored``."""
    user = _norm_user(norm, stored)
    detached = False
    while op_of(user) in (*CASTS, "detach"):
        detached |= op_of(user) == "detach"
        nodes.append(user)
        user = _norm_user(user, stored)
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


@dataclass
class PeftCompose:
    """PEFT's compose around ``g`` as found: ``root = result + ((g - 1)·base + (g·lora)·s)``."""

    result: Node
    lora: Node
    bias: Node | None  # b as PEFT subtracts it (Linear: the [d_out] bias; Conv: its [1, C, 1, ...] view)
    base: Node | None  # a separate base output (dropout active), else None
    scaling: float | Node
    root: Node

    def fields(self) -> dict[str, object]:
        """The ``form.ComposeMatch`` fields this gives (same names)."""
        return dict(
            result=self.result, lora=self.lora, bias=self.bias, base=self.base, scaling=self.scaling, root=self.root
        )

    def check_one_device(self, *others: Node) -> None:
        """The compose's inputs and ``others`` (magnitude, weight, ...) must share one device."""
        tensors = (self.result, self.lora, self.bias, self.base, *others)
        if len({example_value(n).device for n in tensors if n is not None}) != 1:
            raise Unsupported("compose inputs on different devices")


def match_compose(g: Node, d_out: int, nodes: list[Node], channel_dim: int = -1) -> PeftCompose:
    """Match PEFT's DoRA compose from ``g = m / n`` on (shared by the Linear and Conv forms).

    ``channel_dim`` is where the output features are: -1 for Linear, 1 for Conv.
    Appends the compose's nodes to ``nodes``; raises Unsupported.
    """
    g_val = example_value(g)
    if g_val is None or g_val.numel() != d_out or g_val.shape[channel_dim] != d_out:
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
    base_term = only_user(shifted)
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
    lora_term = only_user(scaled)
    pair = commuted(lora_term, lambda a: is_scalar(a) or is_symbolic_scalar(a)) if op_of(lora_term) == "mul" else None
    if pair is None:
        raise Unsupported("g·lora is not multiplied by the scaling")
    scaling = float(pair[0]) if is_scalar(pair[0]) else pair[0]
    nodes += [scaled, lora_term]

    # dora = (g-1)·base + g·lora·s ;  root = result + dora
    dora = only_user(base_term)
    if op_of(dora) != "add" or set(dora.args) != {base_term, lora_term} or dora.kwargs:
        raise Unsupported("the two DoRA terms are not summed")
    root = only_user(dora)
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
        if b_val is None or b_val.numel() != d_out or b_val.shape[channel_dim] != d_out:
            raise Unsupported("bias is not a vector over the output features")
        nodes.append(base)

    r_val, l_val, root_val = example_value(result), example_value(lora), example_value(root)
    if r_val is None or l_val is None or r_val.shape != l_val.shape or r_val.dim() < g_val.dim():
        raise Unsupported("base and LoRA outputs do not have the layer's output shape")
    if r_val.shape[channel_dim] != d_out:
        raise Unsupported("base and LoRA outputs do not have the layer's output shape")
    if root_val is None or root_val.shape != r_val.shape:
        raise Unsupported("the DoRA scale broadcasts the output to another shape")
    values = [r_val, l_val] + [example_value(n) for n in (bias, separate_base) if n is not None]
    if any(not v.dtype.is_floating_point for v in values):
        raise Unsupported("non-floating compose inputs")
    return PeftCompose(result, lora, bias, separate_base, scaling, root)


def output_dtype(node: Node) -> torch.dtype:
    value = example_value(node)
    if value is None:
        raise Unsupported(f"no example value on {node.name}")
    return value.dtype
