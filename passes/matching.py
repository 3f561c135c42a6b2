"""Shared pieces of the DoRA matchers: the row-norm anchor and the low-rank product.

A matcher raises :class:`NotDora` when the anchor is not DoRA at all (nothing
is recorded) and :class:`Unsupported` when it is DoRA-like but some part is not
fully recognized (the subgraph is left as it was and the reason recorded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch.fx import Node

from .graph_view import arg, example_value, is_scalar, is_symbolic_scalar, op_of, strip
from .outcomes import NotDora, Unsupported
from .quantized_base import QuantizedBase, match_quantized_base

__all__ = [
    "NORMS",
    "LowRankSum",
    "NotDora",
    "Unsupported",
    "commuted",
    "match_low_rank_sum",
    "match_row_norm",
    "norm_input",
    "row_norm_input",
    "trailing_norm_input",
]

CASTS = ("to", "float")


@dataclass
class LowRankSum:
    """``W + s·(B·A)`` feeding a row norm, as found in the graph."""

    weight: Node  # W before any cast
    lora_A: Node  # [r, d_in]
    lora_B: Node  # [d_out, r]
    scaling: float | Node  # a Python float, or the node of a symbolic float (dynamic=True)
    nodes: list[Node] = field(default_factory=list)  # the dense path, for removal
    identity_trick: bool = False  # B·A built as linear(linear(eye(d_in), A), B).T (memory estimate)
    # W rows per row of B·A: a grouped Conv's B·A is [d_out / c, c·K], its row j the c rows c·j … c·j + c - 1 of W
    row_blocks: int = 1
    quantized: QuantizedBase | None = None  # W dequantized from a recognized quantized base (else a parameter)

    @property
    def layer_shape(self) -> tuple[int, int]:
        """``(d_out, d_in)`` of the rows the norm runs over (``W`` flattened past dim 0, as Conv weights are)."""
        rows, cols = int(example_value(self.lora_B).shape[0]), int(example_value(self.lora_A).shape[1])
        return rows * self.row_blocks, cols // self.row_blocks


def commuted(node: Node, want_first) -> tuple[object, object] | None:
    """``(a, b)`` of a binary op with ``want_first(a)`` true, trying both orders."""
    if len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if want_first(a):
        return a, b
    if want_first(b):
        return b, a
    return None


NORMS = ("linalg_norm", "linalg_vector_norm", "norm")  # the row-norm spellings an anchor may have


def _norm_call(norm: Node) -> tuple[Node, object, object, bool]:
    """``(X, ord, dim, keepdim)`` of a norm node in any spelling; raises NotDora if it is not a norm.

    ``linalg.norm(X, ord, dim, keepdim)``, ``linalg.vector_norm(X, ord, dim, keepdim)``,
    ``X.norm(p, dim, keepdim)`` / ``torch.norm(X, p, dim, keepdim)``.
    """
    kind = op_of(norm)
    if kind not in NORMS:
        raise NotDora("not a norm")
    x = arg(norm, 0, "input" if kind != "norm" else "self")
    if kind == "norm" and not isinstance(x, Node):
        x = arg(norm, 0, "input")
    ord_ = arg(norm, 1, "p" if kind == "norm" else "ord", 2 if kind != "linalg_norm" else None)
    if ord_ not in (None, 2, 2.0):
        raise NotDora("not an L2 norm")
    if norm.kwargs.get("dtype") is not None:
        raise Unsupported("row norm with a dtype argument is not a supported form yet")
    return x, ord_, arg(norm, 2, "dim"), bool(arg(norm, 3, "keepdim", False))


def norm_input(norm: Node) -> tuple[Node, int, bool]:
    """``(X, dim, keepdim)`` of an L2 norm of a 2-D ``X`` over one dim, in any spelling; raises NotDora otherwise.

    ``dim`` is returned as 0 (columns: the DoRA paper's convention) or 1 (rows).
    """
    x, _, dim, keepdim = _norm_call(norm)
    value = example_value(x)
    if value is None or value.dim() != 2:
        raise NotDora("norm of a tensor that is not 2-D")
    axis = {1: 1, -1: 1, 0: 0, -2: 0}.get(dim[0] if isinstance(dim, (tuple, list)) and len(dim) == 1 else dim)
    if axis is None:
        raise NotDora("not an L2 norm over one dim")
    return x, axis, keepdim


def trailing_norm_input(norm: Node) -> tuple[Node, bool]:
    """``(X, keepdim)`` of an L2 norm of an N-D ``X`` (N >= 3) over every dim but the first; raises NotDora otherwise.

    That is the row norm of ``X.reshape(X.shape[0], -1)``: PEFT's Conv DoRA spelling.
    """
    x, _, dim, keepdim = _norm_call(norm)
    value = example_value(x)
    if value is None or value.dim() < 3:
        raise NotDora("norm of a tensor with fewer than 3 dims")
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    if sorted(d % value.dim() for d in dims if isinstance(d, int)) != list(range(1, value.dim())):
        raise NotDora("not a norm over every dim but the first")
    return x, keepdim


def row_norm_input(norm: Node) -> tuple[Node, bool]:
    """``(X, keepdim)`` of a row L2 norm (over dim 1) of a 2-D ``X``; raises NotDora otherwise."""
    x, axis, keepdim = norm_input(norm)
    if axis != 1:
        raise NotDora("not a row norm")
    return x, keepdim


def match_row_norm(norm: Node) -> Node:
    """The 2-D input of a row L2 norm without keepdim (PEFT's and torchtune's spelling)."""
    x, keepdim = row_norm_input(norm)
    if keepdim:
        raise Unsupported("row norm with keepdim where a [d_out] norm was expected")
    return x


def _direct_product(node: Node, nodes: list[Node]) -> tuple[Node, Node]:
    """``B·A`` spelled ``B @ A`` / ``torch.mm`` / ``torch.matmul`` of two 2-D tensors."""
    b_node, a_node = node.args[0], node.args[1]
    a, b = example_value(a_node), example_value(b_node)
    if len(node.args) != 2 or node.kwargs or a is None or b is None or a.dim() != 2 or b.dim() != 2:
        raise Unsupported("the low-rank update is not a recognized B·A product")
    if b.shape[1] != a.shape[0]:  # any r: the factored identity holds whether or not r < min(d_out, d_in)
        raise Unsupported("the product is not B [d_out, r] · A [r, d_in]")
    nodes.append(node)
    return a_node, b_node


def _transposed_product(node: Node, nodes: list[Node]) -> tuple[Node, Node]:
    """``B·A`` spelled ``(Aᵀ @ Bᵀ).T`` (PEFT's Embedding DoRA): A and B are the transposes' sources."""
    inner = node.args[0]
    x, y = inner.args[0], inner.args[1]
    if op_of(x) != "t" or op_of(y) != "t":
        raise Unsupported("the low-rank update is not a recognized B·A product")
    lora_A, lora_B = x.args[0], y.args[0]
    a, b = example_value(lora_A), example_value(lora_B)
    if a is None or b is None or a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
        raise Unsupported("the low-rank update is not a recognized B·A product")
    nodes += [node, inner]  # the inner transposes feed the LoRA path too: they stay
    return lora_A, lora_B


def _low_rank_product(node: object, nodes: list[Node]) -> tuple[Node, Node]:
    """``B·A`` as PEFT's identity trick ``linear(linear(eye(d_in), A), B).T``, ``(Aᵀ @ Bᵀ).T`` or ``B @ A``."""
    if op_of(node) == "matmul":
        return _direct_product(node, nodes)
    if op_of(node) == "t" and op_of(node.args[0]) == "matmul":
        return _transposed_product(node, nodes)
    if op_of(node) != "t":
        raise Unsupported("the low-rank update is not a recognized B·A product")
    nodes.append(node)
    outer = node.args[0]
    if op_of(outer) != "linear" or arg(outer, 2, "bias") is not None:
        raise Unsupported("the low-rank update is not a recognized B·A product")
    nodes.append(outer)
    inner = outer.args[0]
    if op_of(inner) != "linear" or arg(inner, 2, "bias") is not None:
        raise Unsupported("the low-rank update is not a recognized B·A product")
    nodes.append(inner)
    eye = inner.args[0]
    lora_A, lora_B = inner.args[1], outer.args[1]
    a, b = example_value(lora_A), example_value(lora_B)
    if op_of(eye) != "eye" or a is None or b is None or a.dim() != 2 or b.dim() != 2:
        raise Unsupported("the low-rank update is not a recognized B·A product")
    size = eye.args[0] if eye.args else eye.kwargs.get("n")
    cols = eye.args[1] if len(eye.args) > 1 else eye.kwargs.get("m", size)
    if len(eye.args) > 2 or size != cols or size != a.shape[1] or b.shape[1] != a.shape[0]:
        raise Unsupported("identity-trick product with an identity that is not eye(d_in)")
    nodes.append(eye)
    return lora_A, lora_B


def match_low_rank_sum(x: object, shared: tuple[Node, ...] = ()) -> LowRankSum:
    """``X = cast(W) + s·cast(detach(B·A))``, in either operand order.

    ``shared``: nodes of the dense path that the calling form knows to have other
    users (the hand-written form scales the same ``W + s·B·A`` it takes the norm of).
    """
    nodes: list[Node] = []
    x = strip(x, CASTS, nodes)
    if op_of(x) != "add":
        raise NotDora("norm input is not a sum")
    nodes.append(x)

    def is_factor(a: object) -> bool:
        return is_scalar(a) or is_symbolic_scalar(a)

    def is_scaled(n: object) -> bool:
        return op_of(n) == "mul" and any(is_factor(a) for a in n.args)

    pair = commuted(x, lambda n: not is_scaled(n))
    if pair is None or not is_scaled(pair[1]):
        raise NotDora("norm input is not W + s·ΔW")
    weight_side, scaled = pair
    nodes.append(scaled)
    scaling_pair = commuted(scaled, is_factor)
    if scaling_pair is None:
        raise NotDora("norm input is not W + s·ΔW")
    scaling, delta = scaling_pair
    product = strip(delta, (*CASTS, "detach"), nodes)
    reshaped = product if op_of(product) == "view" else None  # B·A reshaped to W's shape (PEFT's Conv DoRA)
    if reshaped is not None:
        nodes.append(reshaped)
        product = reshaped.args[0]
    identity_trick = op_of(product) == "t" and op_of(product.args[0]) == "linear"
    lora_A, lora_B = _low_rank_product(product, nodes)

    weight_nodes: list[Node] = []
    weight = strip(weight_side, CASTS, weight_nodes)
    nodes.extend(weight_nodes)
    w, a, b = example_value(weight), example_value(lora_A), example_value(lora_B)
    if w is None or w.dim() < 2:
        raise Unsupported("W + s·B·A with shapes that do not line up")
    row_blocks = w.shape[0] // b.shape[0] if b.shape[0] and w.shape[0] % b.shape[0] == 0 else 0
    if not row_blocks or (w.shape[0], math.prod(w.shape[1:]) * row_blocks) != (b.shape[0] * row_blocks, a.shape[1]):
        raise Unsupported("W + s·B·A with shapes that do not line up")
    if row_blocks > 1 and reshaped is None:
        raise Unsupported("W + s·B·A with shapes that do not line up")
    if w.shape != example_value(x).shape:
        raise Unsupported("W + s·B·A broadcasts W")
    if reshaped is not None and example_value(reshaped).shape != w.shape:
        # a row-major [d_out, K] -> W.shape reshape keeps each output row's K values together
        raise Unsupported("B·A is reshaped to another shape than W's")
    if w.dim() > 2 and reshaped is None:
        raise Unsupported("an N-D weight whose update is not a reshaped B·A")
    if not (w.dtype.is_floating_point and a.dtype.is_floating_point and b.dtype.is_floating_point):
        raise Unsupported("non-floating weight or adapter (quantized base?)")
    quantized = match_quantized_base(weight)
    if len({w.device, a.device, b.device}) != 1:
        raise Unsupported("weight and adapters on different devices")
    for n in nodes:
        # casts of W may feed other uses too (PEFT's second base matmul under dropout): they stay.
        # A graph output is PEFT's DoRA cache storing B·A: that node stays, computed as before.
        computed_users = [u for u in n.users if u.op != "output"]
        if len(computed_users) > 1 and n not in weight_nodes and n not in shared:
            raise Unsupported(f"intermediate {n.name} of the dense norm path is used elsewhere")
    scaling = float(scaling) if is_scalar(scaling) else scaling  # a node: symbolic under dynamic=True
    return LowRankSum(weight, lora_A, lora_B, scaling, nodes, identity_trick, row_blocks, quantized)
