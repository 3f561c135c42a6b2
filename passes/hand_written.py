"""Hand-written DoRA in weight space: the DoRA weight is built, then used in ``F.linear``.

Search form (``w`` shared by the norm and the scaled weight; casts allowed)::

    w   = W + s·(B @ A)                   B @ A | mm | matmul | PEFT's identity trick
    n   = norm(w, dim=1[, keepdim])       linalg.norm | linalg.vector_norm | Tensor.norm (p = 2)
          [detach(n)]                     detached (paper §4.3) or not
    w'  = m·(w / n)  |  (m / n)·w  |  (m·w) / n        m: [d_out, 1], or [d_out] viewed to it
    out = linear(x, w'[, b])

or the DoRA paper's column convention, ``W`` stored ``[d_in, d_out]``::

    w   = W + s·(B @ A)                   B [d_in, r], A [r, d_out]
    n   = norm(w, dim=0[, keepdim])       the same spellings, over dim 0
    w'  = as above, m and n [d_out] or [1, d_out]
    out = x @ w'

Replacement, in activation space (no ``[d_out, d_in]`` tensor at all)::

    n   = factored row norm of (W, A, B, s)                        [d_out] fp32
    out = g ⊙ (linear(x, W) + s·linear(linear(x, A), B)) [+ b],    g = m / n
    (columns: the norm of (Wᵀ, Bᵀ, Aᵀ); out = g ⊙ (x @ W + s·(x @ B) @ A))

The value is the same function of ``x, W, A, B, m, b``. A detached norm gets
detached inputs; a norm that is not detached gets the differentiable plain-torch
factored norm, so its gradient is the exact gradient of the same norm. Only
same-dtype layers are matched (``x``, ``W``, ``A``, ``B``, ``m``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.fx import Graph, Node

from dora_fused import kernels

from .form import DoraMatch
from .graph_view import arg, example_value, op_of, single_user, strip
from .matching import CASTS, LowRankSum, NotDora, Unsupported, commuted, match_low_rank_sum, norm_input
from .rewrite import TARGETS, erase_dead, insert_node, norm_order_args, recompute_in_backward

__all__ = ["HandWrittenMatch", "match_hand_written", "rewrite_hand_written"]

_VIEWS = ("view", "detach")


@dataclass(kw_only=True)
class HandWrittenMatch(DoraMatch):
    """``magnitude`` as written (``[d_out, 1]`` or ``[d_out]``); ``root``: ``linear(x, w', b)`` or ``x @ w'``."""

    norm: LowRankSum
    x: Node
    bias: Node | None
    detached: bool
    columns: bool = False  # the paper's convention: W is [d_in, d_out], the norm runs over dim 0

    READS: ClassVar[tuple[str, ...]] = ("magnitude", "x", "bias")

    @property
    def layer_shape(self) -> tuple[int, int]:
        """``(d_out, d_in)`` of the layer, whatever the storage orientation."""
        rows, cols = example_value(self.norm.weight).shape
        return (int(cols), int(rows)) if self.columns else (int(rows), int(cols))


def _only_user(node: Node) -> Node:
    if not single_user(node):
        raise Unsupported(f"{node.name} has {len(node.users)} users where hand-written DoRA has one")
    return next(iter(node.users))


def _is_magnitude(node: object, d_out: int) -> bool:
    value = example_value(strip(node, ("view",)))
    return value is not None and value.numel() == d_out and value.dim() in (1, 2)


def match_hand_written(anchor: Node) -> HandWrittenMatch:
    """Match the hand-written weight-space form around a row-norm ``anchor``; raises NotDora / Unsupported."""
    w_in, axis, _ = norm_input(anchor)
    columns = axis == 0
    w = strip(w_in, CASTS)
    if not isinstance(w, Node) or op_of(w) != "add":
        raise NotDora("norm input is not a sum")
    if len(w.users) != 2:
        raise NotDora("W + s·B·A is not used by exactly a norm and a scaled weight")
    low_rank = match_low_rank_sum(w_in, shared=(w,))
    d_out = int(example_value(low_rank.weight).shape[1 if columns else 0])
    nodes: list[Node] = [*low_rank.nodes, anchor]

    # n, possibly detached and reshaped to [d_out, 1]
    n, detached = anchor, False
    while op_of(next(iter(n.users), None)) in _VIEWS and single_user(n):
        n = next(iter(n.users))
        detached |= op_of(n) == "detach"
        nodes.append(n)

    def column(node: object) -> bool:  # a per-output factor of W: [d_out, 1] (rows) or [d_out] / [1, d_out]
        value = example_value(node)
        shapes = {(d_out,), (1, d_out)} if columns else {(d_out, 1)}
        return value is not None and tuple(value.shape) in shapes

    # w' = m·(w / n) | (m / n)·w | (m·w) / n
    user = _only_user(n)
    if op_of(user) != "div" or len(user.args) != 2 or user.args[1] is not n:
        raise Unsupported("the row norm does not divide the weight or the magnitude")
    top = user.args[0]
    nodes.append(user)
    if top is w:  # m·(w / n)
        scaled = _only_user(user)
        pair = commuted(scaled, lambda a: a is user) if op_of(scaled) == "mul" else None
        magnitude = pair[1] if pair else None
        per_row = column(n) and magnitude is not None and column(magnitude)
    elif op_of(top) == "mul" and w in top.args:  # (m·w) / n
        pair = commuted(top, lambda a: a is w)
        magnitude, scaled = (pair[1] if pair else None), user
        nodes.append(top)
        per_row = column(n) and magnitude is not None and column(magnitude)
    else:  # (m / n)·w
        magnitude, g = top, user
        while op_of(next(iter(g.users), None)) == "view" and single_user(g):
            g = next(iter(g.users))
            nodes.append(g)
        scaled = _only_user(g)
        pair = commuted(scaled, lambda a: a is w) if op_of(scaled) == "mul" else None
        if pair is None or pair[1] is not g:
            raise Unsupported("m / n does not scale W + s·B·A")
        m_val, n_val = example_value(magnitude), example_value(n)
        per_row = column(g) and m_val is not None and n_val is not None and m_val.shape == n_val.shape
    if magnitude is None or not _is_magnitude(magnitude, d_out):
        raise Unsupported("the weight is not scaled by a [d_out] magnitude")
    if not per_row:
        raise Unsupported("the magnitude and the norm do not scale W row by row")
    nodes.append(scaled)
    if w not in nodes:
        nodes.append(w)

    root = _only_user(scaled)
    if columns:
        if op_of(root) != "matmul" or len(root.args) != 2 or root.args[1] is not scaled:
            raise Unsupported("the DoRA weight (column convention) is not used as x @ w'")
        x, bias = root.args[0], None
    else:
        if op_of(root) != "linear" or arg(root, 1, "weight") is not scaled:
            raise Unsupported("the DoRA weight is not used by F.linear")
        x, bias = arg(root, 0, "input"), arg(root, 2, "bias")
    values = [example_value(v) for v in (x, low_rank.weight, low_rank.lora_A, low_rank.lora_B, magnitude)]
    if any(v is None for v in values) or len({v.dtype for v in values}) != 1:
        raise Unsupported("hand-written DoRA with mixed dtypes is not a supported form yet")
    if isinstance(low_rank.scaling, Node):
        raise Unsupported("symbolic scaling in the hand-written form is not supported yet")
    return HandWrittenMatch(
        norm=low_rank,
        magnitude=magnitude,
        x=x,
        bias=bias,
        detached=detached,
        root=root,
        nodes=nodes,
        columns=columns,
    )


def rewrite_hand_written(graph: Graph, match: HandWrittenMatch, impl: tuple[str, str]) -> tuple[str, ...]:
    """Insert the activation-space DoRA before the root and retarget its users; returns what was inserted."""
    low_rank, root = match.norm, match.root
    s = low_rank.scaling
    dtype = example_value(root).dtype
    with graph.inserting_before(root):
        # the norm's operands in row form: (W [d_out, d_in], A [r, d_in], B [d_out, r])
        operands = (low_rank.weight, low_rank.lora_A, low_rank.lora_B)
        if match.columns:  # Wᵀ + s·(B·A)ᵀ = Wᵀ + s·Aᵀ·Bᵀ: row form of (Wᵀ, Bᵀ, Aᵀ), as views
            operands = tuple(
                insert_node(graph, "call_method", "t", (n,), root)
                for n in (low_rank.weight, low_rank.lora_B, low_rank.lora_A)
            )
        if match.columns:  # x @ W and (x @ B) @ A
            project, down_weight, up_weight = torch.matmul, low_rank.lora_B, low_rank.lora_A
        else:
            project, down_weight, up_weight = torch.nn.functional.linear, low_rank.lora_A, low_rank.lora_B
        base = insert_node(graph, "call_function", project, (match.x, low_rank.weight), root)
        if match.detached:
            norm_target, norm_name = TARGETS["norm"][impl[0]]
            inputs = [insert_node(graph, "call_method", "detach", (n,), root) for n in operands]
            after = norm_order_args(graph, norm_target, base, root)  # launched after the base matmul
            norm = insert_node(graph, "call_function", norm_target, (*inputs, s, *after), root)
        else:  # the norm carries gradient: the differentiable plain-torch factored norm
            norm_target, norm_name = kernels.factored_row_norm_differentiable, "torch:factored_row_norm_differentiable"
            norm = insert_node(graph, "call_function", norm_target, (*operands, s), root)
        m = insert_node(graph, "call_method", "reshape", (match.magnitude, -1), root)
        down = insert_node(graph, "call_function", project, (match.x, down_weight), root)
        lora = insert_node(graph, "call_function", project, (down, up_weight), root)
        out = insert_node(graph, "call_function", kernels.compose_torch, (base, lora, m, norm, None, s, dtype), root)
        recompute_in_backward(out, root)
        if match.bias is not None:
            out = insert_node(graph, "call_function", torch.add, (out, match.bias), root)
    root.replace_all_uses_with(out)
    erase_dead(graph, [*match.nodes, root])
    return norm_name, "torch:compose_torch"
