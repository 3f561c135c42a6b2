"""Values of parameters alone that leave a graph compiled under CUDA graphs: copied out of the pool.

Under CUDA graphs (``mode="reduce-overhead"``, ``triton.cudagraphs``) a compiled
graph's outputs live in the CUDA graph's memory pool, and the next replay writes
over them. That is fine for activations, which the caller consumes at once, and
wrong for a value the caller keeps as module state. PEFT's norm cache
(``ENABLE_DORA_CACHING``) is such a caller: the first call in eval computes the
row norm ``‖W + s·B·A‖_row`` and the dense ``B·A`` in the graph, and Dynamo stores
the graph's outputs into PEFT's cache, where later graphs read them. Kept in the
pool, those tensors are overwritten by the next replay of any graph of the tree
(PyTorch raises "accessing tensor output of CUDAGraphs that has been overwritten").

A graph output computed from parameters alone (every input it depends on is an
``nn.Parameter`` or a graph attribute; an op's ``after`` argument, which this
package's ops take only to keep an order and never read, does not count) is
such module state, not an activation.
:func:`state_outputs` finds them; :func:`copy_out` returns the compiled callable
with those outputs cloned after each call (outside the CUDA graph, into ordinary
memory). Outputs that share storage with an input (a parameter, or a view of
one) are left as they are: a copy would break their aliasing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.multiprocessing.reductions import StorageWeakRef

__all__ = ["copy_out", "state_outputs"]


def state_outputs(gm: GraphModule, example_inputs: Sequence[Any]) -> list[int]:
    """Indices of ``gm``'s (flat) outputs computed from parameters (and constants) alone, aliasing no input."""
    inputs = iter(example_inputs)
    constant: set[Node] = set()  # depends on no activation
    derived: set[Node] = set()  # and on at least one parameter or attribute
    computed: set[Node] = set()  # derived, and not an input itself
    input_storages: set[int | None] = {None}  # and None: a non-tensor output is never copied
    outputs: list[Any] = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            example = next(inputs, None) if node.op == "placeholder" else None
            if node.op == "get_attr" or isinstance(example, torch.nn.Parameter):
                constant.add(node)
                derived.add(node)
            input_storages.add(_storage(node))
        elif node.op == "output":
            outputs = _flatten(node.args[0])
        else:
            used = _value_inputs(node)
            if all(n in constant for n in used):
                constant.add(node)
                if any(n in derived for n in used):
                    derived.add(node)
                    computed.add(node)
    return [i for i, out in enumerate(outputs) if out in computed and _storage(out) not in input_storages]


def copy_out(compiled: Callable[..., Any], indices: list[int]) -> Callable[..., Any]:
    """``compiled`` with the outputs at ``indices`` cloned after every call; ``compiled`` itself without any."""
    if not indices:
        return compiled

    def call(*args: Any) -> Any:
        outputs = compiled(*args)
        copied = list(outputs)
        for i in indices:
            if isinstance(copied[i], torch.Tensor):
                copied[i] = copied[i].clone()
        return type(outputs)(copied) if isinstance(outputs, tuple) else copied

    call._boxed_call = getattr(compiled, "_boxed_call", False)  # type: ignore[attr-defined]
    return call


def _value_inputs(node: Node) -> list[Node]:
    """The inputs ``node``'s value depends on: all but a ``dora_fused`` op's ``after`` (kept in order, never read)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.name.startswith("dora_fused::"):
        return node.all_input_nodes
    order_only = [
        value
        for argument, value in zip(schema.arguments, node.args, strict=False)
        if argument.name == "after" and isinstance(value, Node)
    ]
    order_only += [node.kwargs["after"]] if isinstance(node.kwargs.get("after"), Node) else []
    return [n for n in node.all_input_nodes if n not in order_only]


def _flatten(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return [leaf for item in value for leaf in _flatten(item)]
    return [value]


def _storage(node: Node) -> int | None:
    """The identity of the storage of ``node``'s traced (fake) value; None for a non-tensor."""
    value = node.meta.get("example_value", node.meta.get("val"))
    if not isinstance(value, torch.Tensor):
        return None
    return StorageWeakRef(value.untyped_storage()).cdata
