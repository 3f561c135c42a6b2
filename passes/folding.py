"""Frozen inference, the graph side: values that depend only on parameters, read from a graph attribute.

In a graph that needs no gradient, a DoRA module's row norm ``n = ‖W + s·B·A‖_row``
depends on parameters alone. With folding on (``FoldOptions``), the pass puts a
graph attribute in its place, per module one of:

- ``"norm"``: ``n`` (fp32 ``[d_out]``, fp64 for fp64 layers); the compose then
  computes ``g = m / n`` in its epilogue as in the live rewrite. The layer costs
  what LoRA costs: the base matmul, the LoRA matmuls, one pass over the output.
  No extra weight memory.
- ``"merged"``: the whole DoRA weight ``W' = g·(W + s·B·A)`` in ``W``'s dtype; the
  module becomes ``linear(x, W', b)``, the merged model's cost. It holds one more
  copy of ``W`` unless the originals are dropped after compiling (Inductor's
  ``freezing_discard_parameters``), so it is taken only within ``MergeBudget``.

The pass only edits the graph. Each folded value is described by a
:class:`FoldedValue`: the module state it is computed from (``roots``: graph
inputs or attributes), a small graph module (``recipe``) that reproduces the
operands ``W, A, B[, m, W_base]`` from those roots as the traced graph computed
them, ``s``, and where the value lives (``storage``). The pass registers the
storage as a meta tensor; the backend (``dora_fused.frozen``) computes the
values from the real parameters, and checks on every call that the roots are
unchanged (recomputing, or recompiling, where they are not).

The same description serves PEFT's cached norm (``ENABLE_DORA_CACHING``) in live
graphs (``"peft_norm"``): its storage is PEFT's cache tensor, a graph input, which
the backend refreshes in place when ``W``, ``A`` or ``B`` change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch.fx import Graph, GraphModule, Node

from .form import ComposeMatch, DoraMatch
from .graph_view import arg, example_value, op_of, strip
from .matching import CASTS
from .naming import dotted
from .outcomes import Unsupported
from .quantized_base import match_quantized_base
from .rewrite import erase_dead, insert_node, rewrite_with_compose

__all__ = [
    "FROZEN_PREFIX",
    "FoldKind",
    "FoldOptions",
    "FoldedValue",
    "MergeBudget",
    "StateRef",
    "Unfoldable",
    "drop_attributes",
    "fold_match",
    "merged_inputs",
    "peft_norm_value",
    "plan_fold",
]

FoldKind = Literal["norm", "merged", "peft_norm"]
FROZEN_PREFIX = "_dora_frozen_"  # graph attributes holding folded values

# ops a recipe may replay: they only cast, detach or re-view module state
_RECIPE_OPS = frozenset({"to", "float", "detach", "t", "transpose", "view"})


class Unfoldable(Exception):
    """A module's operands cannot be recomputed from module state alone."""


@dataclass(frozen=True)
class StateRef:
    """A tensor of module state in the graph: ``("input", i)`` is the i-th placeholder, ``("attr", t)`` an attribute."""

    kind: Literal["input", "attr"]
    key: int | str


class MergeBudget:
    """Bytes of merged weights a backend may hold beside the originals; taken per module, given back when freed."""

    def __init__(self, total: int) -> None:
        if total < 0:
            raise ValueError(f"merge budget must be >= 0 bytes, got {total}")
        self.total = total
        self.used = 0

    def take(self, nbytes: int) -> bool:
        if self.used + nbytes > self.total:
            return False
        self.used += nbytes
        return True

    def give_back(self, nbytes: int) -> None:
        self.used = max(0, self.used - nbytes)


@dataclass
class FoldOptions:
    """How a graph is folded: the merge budget, and whether the originals go after compiling (merging is free)."""

    budget: MergeBudget
    discard: bool = False


@dataclass
class FoldedValue:
    """One value computed from parameters at compile time (see the module docstring)."""

    kind: FoldKind
    module: str
    adapter: str | None
    roots: tuple[StateRef, ...]
    recipe: GraphModule  # roots -> operands: (W, A, B) for norms, (W, A, B, m, W_base) for "merged"
    scaling: float
    storage: StateRef
    shape: tuple[int, ...]
    dtype: torch.dtype
    owned: bool = True  # the storage is a graph attribute the pass added (else PEFT's cache tensor)
    merged_bytes: int = 0  # budget taken by a merged weight
    notes: list[str] = field(default_factory=list)


def _is_module_state(node: Node) -> bool:
    """A graph attribute, or an input Dynamo read as an attribute of some object (a module's parameter, buffer...).

    An input passed to the call itself (an activation) is not: its value is another tensor on every call.
    """
    if node.op == "get_attr":
        return True
    source = getattr(node, "_dynamo_source", None)
    name = getattr(source, "name", None)
    name = name() if callable(name) else name
    return node.op == "placeholder" and isinstance(name, str) and "." in dotted(name) and dotted(name) != name


def _state_ref(node: Node) -> StateRef:
    if node.op == "get_attr":
        return StateRef("attr", str(node.target))
    placeholders = [n for n in node.graph.nodes if n.op == "placeholder"]
    return StateRef("input", placeholders.index(node))


def _dequantize_nodes(node: Node) -> frozenset[Node]:
    """The nodes of a bitsandbytes base's dequantize that ends in ``node``, as ``quantized_base`` recognizes it.

    Pure functions of module state (the packed weight, its scales, its code table; with double
    quantization the absmax's own dequantize and offset): a recipe replays them. Empty for
    anything else.
    """
    try:
        base = match_quantized_base(node)
    except Unsupported:
        return frozenset()
    if base is None or base.dequantize is not node or not base.scheme.startswith("bnb-"):
        return frozenset()
    if base.scheme.endswith("-dq"):  # absmax = dequantize_blockwise(...) + offset
        return frozenset({node, base.scales, base.scales.args[0]})
    return frozenset({node})


def _recipe(outputs: Sequence[Node]) -> tuple[GraphModule, tuple[Node, ...]]:
    """A graph module computing ``outputs`` from the module state they derive from, and those roots (its inputs)."""
    order: list[Node] = []
    roots: list[Node] = []
    seen: set[Node] = set()
    dequantize: set[Node] = set()  # nodes of recognized dequantizes met so far

    def visit(node: Node) -> None:
        if node in seen:
            return
        seen.add(node)
        if node.op in ("placeholder", "get_attr"):
            if not _is_module_state(node):
                raise Unfoldable(f"{node.name} is an input of the call, not module state")
            roots.append(node)
            return
        if op_of(node) not in _RECIPE_OPS and node not in dequantize:
            dequantize.update(_dequantize_nodes(node))
            if node not in dequantize:
                raise Unfoldable(f"{node.name} ({op_of(node) or node.target}) is not a cast or view of module state")
        for value in node.all_input_nodes:
            visit(value)
        order.append(node)

    for node in outputs:
        visit(node)
    graph = Graph()
    env = {root: graph.placeholder(f"root_{i}") for i, root in enumerate(roots)}
    for node in order:
        env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(tuple(env[node] for node in outputs))
    return GraphModule(torch.nn.Module(), graph), tuple(roots)


def _norm_operands(match: ComposeMatch) -> tuple[Node, Node, Node, float | Node]:
    """``(W, A, B, s)`` of the row norm: the norm's own, or (cached norm) the base weight and the LoRA path's."""
    if match.norm is not None:
        if match.norm.row_blocks != 1:
            raise Unfoldable("a grouped Conv's norm is taken per block")
        low_rank = match.norm
        return low_rank.weight, low_rank.lora_A, low_rank.lora_B, low_rank.scaling
    weight = match.base_weight
    if weight is None:
        raise Unfoldable("the base weight is not a Linear's or Conv's weight argument")
    lora_A, lora_B = match.adapter_factors
    return weight, lora_A, lora_B, match.scaling


def _rows(node: Node) -> tuple[int, int]:
    value = example_value(node)
    return int(value.shape[0]), value.numel() // max(int(value.shape[0]), 1)


def _check_row_shapes(weight: Node, lora_A: Node, lora_B: Node) -> None:
    (d_out, d_in), (r, a_cols), (b_rows, b_cols) = _rows(weight), _rows(lora_A), _rows(lora_B)
    if (b_rows, b_cols, a_cols) != (d_out, r, d_in):
        raise Unfoldable(f"W {d_out}x{d_in}, A {r}x{a_cols} and B {b_rows}x{b_cols} do not form W + s·B·A by rows")


def _fake_empty(like: Node, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    value = example_value(like)
    mode = getattr(value, "fake_mode", None)
    if mode is None:
        return None
    with mode:
        return torch.empty(shape, dtype=dtype, device=value.device)


def _new_attribute(graph: Graph, shape: tuple[int, ...], dtype: torch.dtype, like: Node) -> Node:
    """A get_attr node of a new meta buffer of ``graph``'s module (the backend fills it), before the insertion point."""
    gm = graph.owning_module
    index = sum(name.startswith(FROZEN_PREFIX) for name, _ in gm.named_buffers(recurse=False))
    name = f"{FROZEN_PREFIX}{index}"
    gm.register_buffer(name, torch.empty(shape, dtype=dtype, device="meta"))
    sources = getattr(gm, "_param_name_to_source", None)
    if isinstance(sources, dict):  # AOTAutograd lifts a Dynamo graph's attributes by their Dynamo sources
        from torch._dynamo.source import ConstantSource

        gm._param_name_to_source = {**sources, name: ConstantSource(f"dora_fused.{name}.{id(gm)}")}
    node = graph.get_attr(name)
    fake = _fake_empty(like, shape, dtype)
    if fake is not None:
        node.meta["example_value"] = fake
    for key in ("nn_module_stack", "stack_trace"):
        if key in like.meta:
            node.meta[key] = like.meta[key]
    return node


def _input_of_lora(lora: Node) -> Node | None:
    """``x`` of the LoRA output ``linear(linear(x', A), B)``, through casts and dropout in eval (``training=False``)."""
    if op_of(lora) != "linear" or op_of(lora.args[0]) != "linear":
        return None
    node = lora.args[0].args[0]
    while isinstance(node, Node):
        stripped = strip(node, CASTS)
        if stripped is not node:
            node = stripped
            continue
        if node.op == "call_function" and node.target is torch.nn.functional.dropout and not arg(node, 2, "training"):
            node = node.args[0]
            continue
        break
    return node


def merged_inputs(match: DoraMatch) -> tuple[Node, Node, Node | None] | None:
    """``(x, W, b)`` where the module's output equals ``linear(x, g·(W + s·B·A), b)``, else None.

    That is a Linear (``result = linear(x, W, b)``) whose DoRA term reads the same
    ``x`` (casts and eval dropout aside) and subtracts the same ``b``, with no second
    base output (dropout active), no extra scale and a float ``s``.
    """
    if not isinstance(match, ComposeMatch) or match.channel_dim != -1 or match.base is not None:
        return None
    if match.lora_factor is not None or not isinstance(match.scaling, float) or op_of(match.result) != "linear":
        return None
    x, weight, bias = match.result.args[0], arg(match.result, 1, "weight"), arg(match.result, 2, "bias")
    if match.bias is not bias or _input_of_lora(match.lora) is not x:
        return None
    if match.norm is not None and strip(match.norm.weight, (*CASTS, "detach")) is not weight:
        return None
    return x, weight, bias


def plan_fold(match: DoraMatch, options: FoldOptions) -> tuple[FoldKind, int, str]:
    """``(kind, merged bytes taken, why)`` for a module of a graph being folded; raises Unfoldable."""
    if not isinstance(match, ComposeMatch):
        raise Unfoldable("only forms with PEFT's compose are folded")
    if example_value(match.root).requires_grad:
        raise Unfoldable("the output needs a gradient")
    weight, lora_A, lora_B, scaling = _norm_operands(match)
    if not isinstance(scaling, float):
        raise Unfoldable("the scaling is traced (dynamic=True)")
    _check_row_shapes(weight, lora_A, lora_B)
    if merged_inputs(match) is None:
        return "norm", 0, "norm folded: not a plain Linear (no merged form)"
    w = example_value(merged_inputs(match)[1])
    nbytes = w.numel() * w.element_size()
    if options.discard:
        return "merged", 0, "merged: Inductor's freezing_discard_parameters drops the original weights"
    if options.budget.take(nbytes):
        return "merged", nbytes, f"merged: {_mib(nbytes)} of the {_mib(options.budget.total)} merge budget"
    return "norm", 0, f"norm folded: merging needs {_mib(nbytes)} more, over the {_mib(options.budget.total)} budget"


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.3g} MiB"


def fold_match(
    graph: Graph, match: ComposeMatch, kind: FoldKind, impl: tuple[str, str], module: str, adapter: str | None
) -> tuple[tuple[str, ...], FoldedValue]:
    """Rewrite ``match`` with its norm (``"norm"``) or whole weight (``"merged"``) read from a new graph attribute.

    Returns the ops inserted (for the record) and the value's description. ``impl``
    is the compose implementation the heuristic chose (its norm choice is unused).
    """
    weight, lora_A, lora_B, scaling = _norm_operands(match)
    if kind == "norm":
        outputs: list[Node] = [weight, lora_A, lora_B]
        d_out = _rows(weight)[0]
        wide = any(example_value(n).dtype == torch.float64 for n in outputs)
        shape, dtype = (d_out,), torch.float64 if wide else torch.float32
    else:
        x, base_weight, bias = merged_inputs(match)
        outputs = [weight, lora_A, lora_B, match.magnitude, base_weight]
        w = example_value(base_weight)
        shape, dtype = tuple(w.shape), w.dtype
    recipe, roots = _recipe(outputs)
    with graph.inserting_before(match.root):
        attribute = _new_attribute(graph, shape, dtype, match.root)
    value = FoldedValue(
        kind=kind,
        module=module,
        adapter=adapter,
        roots=tuple(_state_ref(n) for n in roots),
        recipe=recipe,
        scaling=float(scaling),
        storage=StateRef("attr", str(attribute.target)),
        shape=shape,
        dtype=dtype,
    )
    if kind == "norm":
        ops = rewrite_with_compose(graph, match, impl, norm=attribute)
        return ("frozen:row_norm", *ops), value
    with graph.inserting_before(match.root):
        merged = insert_node(graph, "call_function", torch._C._nn.linear, (x, attribute, bias), match.root)
        out = merged
        if example_value(merged).dtype != example_value(match.root).dtype:
            out = insert_node(graph, "call_method", "to", (merged, example_value(match.root).dtype), match.root)
    match.root.replace_all_uses_with(out)
    lora = match.lora
    erase_dead(graph, [*match.nodes, lora, lora.args[0], *_casts_between(lora.args[0].args[0], x), match.result])
    return ("frozen:merged_weight",), value


def _casts_between(node: object, stop: Node) -> list[Node]:
    chain: list[Node] = []
    while isinstance(node, Node) and node is not stop and node.args:
        chain.append(node)
        node = node.args[0]
    return chain


def peft_norm_value(match: ComposeMatch, module: str, adapter: str | None) -> FoldedValue:
    """The description of PEFT's cached norm (a graph input) of a cached-norm match, for the backend to refresh."""
    weight, lora_A, lora_B, scaling = _norm_operands(match)
    if match.weight_norm is None or not _is_module_state(match.weight_norm):
        raise Unfoldable("the cached norm is not module state")
    if not isinstance(scaling, float):
        raise Unfoldable("the scaling is traced (dynamic=True)")
    _check_row_shapes(weight, lora_A, lora_B)
    recipe, roots = _recipe([weight, lora_A, lora_B])
    cached = example_value(match.weight_norm)
    return FoldedValue(
        kind="peft_norm",
        module=module,
        adapter=adapter,
        roots=tuple(_state_ref(n) for n in roots),
        recipe=recipe,
        scaling=float(scaling),
        storage=_state_ref(match.weight_norm),
        shape=tuple(cached.shape),
        dtype=cached.dtype,
        owned=False,
    )


def drop_attributes(gm: GraphModule) -> None:
    """Remove the folded-value attributes the pass registered on ``gm`` (when its graph is restored)."""
    for name in [n for n, _ in gm.named_buffers(recurse=False) if n.startswith(FROZEN_PREFIX)]:
        delattr(gm, name)
    sources = getattr(gm, "_param_name_to_source", None)
    if isinstance(sources, dict) and any(name.startswith(FROZEN_PREFIX) for name in sources):
        gm._param_name_to_source = {k: v for k, v in sources.items() if not k.startswith(FROZEN_PREFIX)}
