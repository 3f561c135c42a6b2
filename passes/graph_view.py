"""A canonical view of Dynamo's torch-level FX nodes.

Dynamo records the same operation in several spellings: ``operator.mul``,
``torch.mul`` and ``Tensor.mul``; ``F.linear`` and ``torch._C._nn.linear``;
``x.T`` as ``getattr(x, "T")`` (torch 2.11-2.14) or as the aten op
``numpy_T`` (torch 2.15). Matchers ask :func:`op_of` for a canonical name and
never look at targets directly, so adding a spelling is one line here.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch.fx import Node

__all__ = [
    "arg",
    "example_value",
    "is_dtype_cast",
    "is_scalar",
    "is_symbolic_scalar",
    "mutated_tensor",
    "op_of",
    "single_user",
    "strip",
]

_FUNCTIONS: dict[object, str] = {
    operator.add: "add",
    torch.add: "add",
    operator.sub: "sub",
    torch.sub: "sub",
    operator.mul: "mul",
    torch.mul: "mul",
    operator.truediv: "div",
    torch.div: "div",
    torch.true_divide: "div",
    torch._C._nn.linear: "linear",
    F.linear: "linear",
    F.embedding: "embedding",
    torch.embedding: "embedding",
    torch.eye: "eye",
    torch.detach: "detach",
    torch._C._linalg.linalg_norm: "linalg_norm",
    torch.linalg.norm: "linalg_norm",
    torch._C._linalg.linalg_vector_norm: "linalg_vector_norm",
    torch.linalg.vector_norm: "linalg_vector_norm",
    torch.norm: "norm",
    operator.matmul: "matmul",
    torch.matmul: "matmul",
    torch.mm: "matmul",
    torch.conv1d: "conv",
    torch.conv2d: "conv",
    torch.conv3d: "conv",
    torch.transpose: "transpose",
}

# aten ops Dynamo records as call_function targets (an OpOverloadPacket, or one of its overloads), by op name
_ATEN: dict[str, str] = {
    "numpy_T": "t",
    "mT": "t",
    "t": "t",
}

_METHODS: dict[str, str] = {
    "add": "add",
    "sub": "sub",
    "mul": "mul",
    "div": "div",
    "truediv": "div",
    "to": "to",
    "detach": "detach",
    "view": "view",
    "reshape": "view",
    "float": "float",
    "t": "t",
    "norm": "norm",
    "matmul": "matmul",
    "mm": "matmul",
    "unsqueeze": "view",
    "transpose": "transpose",
}


def op_of(node: object) -> str | None:
    """Canonical name of what ``node`` computes, or None for anything unknown."""
    if not isinstance(node, Node):
        return None
    if node.op == "call_function":
        if node.target is getattr and len(node.args) == 2 and node.args[1] in ("T", "mT"):
            return "t"
        if isinstance(node.target, (torch._ops.OpOverloadPacket, torch._ops.OpOverload)):
            packet = getattr(node.target, "overloadpacket", node.target)
            return _ATEN.get(packet.__name__) if packet.__module__ == "torch._ops.aten" else None
        return _FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return _METHODS.get(str(node.target))
    if node.op in ("placeholder", "get_attr"):
        return "input"
    return None


_IN_PLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem}


def mutated_tensor(node: Node) -> object:
    """The tensor ``node`` writes in place (its first argument), or None if it writes nothing.

    In-place methods (``x.mul_(...)``, ``x.copy_(...)``), in-place functions
    (``torch.add_``-style names, aten overloads ending in ``_``), augmented
    assignment and item assignment.
    """
    if node.op == "call_method":
        name = str(node.target)
        mutates = name.endswith("_") and not name.startswith("_") and name != "requires_grad_"
    elif node.op == "call_function":
        name = getattr(node.target, "__name__", "") or str(node.target)
        overload = getattr(node.target, "_schema", None)
        mutates = (
            node.target in _IN_PLACE_FUNCTIONS
            or (name.endswith("_") and not name.startswith("_"))
            or (overload is not None and overload.is_mutable)
        )
    else:
        return None
    return node.args[0] if mutates and node.args else None


def arg(node: Node, index: int, name: str, default: object = None) -> object:
    """Argument ``index`` (positional) or ``name`` (keyword) of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def example_value(node: object) -> torch.Tensor | None:
    """The fake tensor Dynamo recorded for ``node``, if it is a tensor."""
    if not isinstance(node, Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


def is_scalar(value: object) -> bool:
    """A Python number baked into the graph (DoRA's scaling, the 1 in ``g - 1``)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_symbolic_scalar(value: object) -> bool:
    """A node producing a Python/symbolic number (e.g. ``.item()`` of a float Dynamo lifted under dynamic=True)."""
    if not isinstance(value, Node):
        return False
    meta = value.meta.get("example_value", value.meta.get("val"))
    return isinstance(meta, (int, float, torch.SymInt, torch.SymFloat)) and not isinstance(meta, bool)


def strip(node: object, kinds: Iterable[str], seen: list[Node] | None = None) -> object:
    """Follow single-input ``kinds`` (e.g. casts, detach) up to the first other node.

    Every node passed through is appended to ``seen``.
    """
    kinds = frozenset(kinds)
    while isinstance(node, Node) and op_of(node) in kinds and node.args:
        if op_of(node) in ("to", "float") and not is_dtype_cast(node):
            break
        if seen is not None:
            seen.append(node)
        node = node.args[0]
    return node


def is_dtype_cast(node: Node) -> bool:
    """A ``.to``/``.float`` that changes at most the dtype (same device, same shape)."""
    before, after = example_value(node.args[0]), example_value(node)
    return (
        before is not None
        and after is not None
        and before.device == after.device
        and before.shape == after.shape
        and after.dtype.is_floating_point
    )


def single_user(node: Node) -> bool:
    return len(node.users) == 1
