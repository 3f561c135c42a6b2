"""Replace a matched DoRA subgraph with the factored norm and the fused compose.

``rewrite_with_compose`` is the replacement of every ``form.ComposeMatch`` (the
PEFT forms and torchtune-style modules); the other helpers insert nodes for it
and for forms with a replacement of their own (``hand_written``).

Invariants (see passes/README.md): the replacement computes the same value as
the root it replaces (to equal or better precision); it introduces no aliasing
and no mutation; every inserted node gets ``example_value`` meta computed by
running its target on fake tensors; only nodes of the match left without users are
erased.

In training, a compose's output is recomputed for the backward rather than saved
(``recompute_in_backward``): the compose keeps the base output ``result`` for the
magnitude's gradient, and recomputes ``out`` from it, ``h``, ``B`` and ``g`` (a
``[tokens, r] x [r, d_out]`` product and one pointwise pass) where a later op's
backward needs ``out`` (the MLP's ``silu(gate)·up`` needs both), so such a layer
keeps one ``[tokens, d_out]`` tensor, as LoRA does, instead of two. The recomputed
values are the forward's, op for op. Above rank ``RECOMPUTE_MAX_RANK`` a compose that
forms the up-projection itself saves its output instead: the product grows with the
rank, the memory it saves does not.
"""

from __future__ import annotations

import itertools
import operator
from dataclasses import replace

import torch
from torch.fx import Graph, Node
from torch.utils.checkpoint import CheckpointPolicy

from dora_fused import kernels  # registers torch.ops.dora_fused.*

from .form import ComposeMatch, DoraMatch
from .graph_view import arg, example_value, op_of
from .peft_compose import output_dtype

__all__ = [
    "RECOMPUTE_MAX_RANK",
    "TARGETS",
    "OpsChoice",
    "erase_dead",
    "foldable_lora_up",
    "fusable_lora_up",
    "insert_compose",
    "insert_node",
    "insert_norm",
    "norm_order_args",
    "norm_position",
    "packed_norm_format",
    "recompute_in_backward",
    "replace_root",
    "rewrite_with_compose",
    "store_norm",
]

# (target, name for the record) of each op, per implementation
TARGETS = {
    "norm": {
        "triton": (torch.ops.dora_fused.factored_row_norm.default, "dora_fused.factored_row_norm"),
        "torch": (kernels.factored_row_norm_torch, "torch:factored_row_norm_torch"),
        # (packed, scales, quant_type, blocksize, d_out, d_in, dtype, A, B, s, after): see insert_norm
        "quantized": (torch.ops.dora_fused.quantized_row_norm.default, "dora_fused.quantized_row_norm"),
    },
    "compose": {
        "triton": (torch.ops.dora_fused.compose.default, "dora_fused.compose"),
        "torch": (kernels.compose_torch, "torch:compose_torch"),
        # (result, h, B, ...) in place of (result, lora, ...): see insert_compose
        "lora_up": (torch.ops.dora_fused.lora_up_compose.default, "dora_fused.lora_up_compose"),
        "folded": (kernels.lora_up_folded_compose_torch, "torch:lora_up_folded_compose_torch"),
        # (result, base, h, B, ...): the folded compose of the dropout form
        "folded_with_base": (
            kernels.lora_up_folded_compose_with_base_torch,
            "torch:lora_up_folded_compose_with_base_torch",
        ),
    },
}
_LORA_UP_DTYPES = (torch.bfloat16, torch.float16)
# The composes that take h and B and form the LoRA up-projection h·Bᵀ themselves
_UP_PROJECTING_COMPOSES = {TARGETS["compose"][impl][0] for impl in ("lora_up", "folded", "folded_with_base")}

OpsChoice = tuple[str, str]  # (norm implementation, compose implementation)


def _fake_value(node: Node) -> None:
    """Fill ``example_value`` by running the node's target on its inputs' fake values."""

    def fake(a: object) -> object:
        if isinstance(a, (list, tuple)):
            return type(a)(fake(v) for v in a)
        return a.meta.get("example_value", a.meta.get("val")) if isinstance(a, Node) else a  # tensors and SymFloats

    args = tuple(fake(a) for a in node.args)
    kwargs = {k: fake(v) for k, v in node.kwargs.items()}
    flat = [v for a in (*args, *kwargs.values()) for v in (a if isinstance(a, (list, tuple)) else (a,))]
    tensors = [a for a in flat if isinstance(a, torch.Tensor)]
    mode = getattr(tensors[0], "fake_mode", None) if tensors else None
    if mode is None:
        return
    with mode:
        if node.op == "call_method":
            value = getattr(args[0], str(node.target))(*args[1:], **kwargs)
        else:
            value = node.target(*args, **kwargs)
    node.meta["example_value"] = value


def insert_node(graph: Graph, op: str, target: object, args: tuple, like: Node) -> Node:
    """A new node before the current insertion point, with ``like``'s source meta and fresh ``example_value``."""
    node = graph.create_node(op, target, args, {})
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in like.meta:
            node.meta[key] = like.meta[key]
    _fake_value(node)
    return node


def store_norm(graph: Graph, stored: list[Node], norm: Node, like: Node) -> None:
    """Where the graph returns a norm value (PEFT's DoRA cache stores it), return ``norm`` in its dtype and shape."""
    for node in stored:
        value = example_value(node)
        cast = insert_node(graph, "call_method", "to", (norm, value.dtype), like)
        shaped = insert_node(graph, "call_method", "view", (cast, *value.shape), like)
        node.replace_all_uses_with(shaped, delete_user_cb=lambda user: user.op == "output")


def erase_dead(graph: Graph, nodes: list[Node]) -> None:
    """Erase matched nodes left without users, consumers first."""
    for node in sorted(set(nodes), key=_positions(graph).__getitem__, reverse=True):
        if not node.users and node.op not in ("placeholder", "output"):
            graph.erase_node(node)


def norm_position(match: DoraMatch) -> Node:
    """The node the norm goes right after: the base layer's output, or the last of the norm's inputs if later.

    The norm reads parameters only, so any position after its inputs computes the
    same value. Launched first, its small kernels run on an idle GPU, each waiting
    for the host (8192² bf16 on the H100: 76-108 µs of idle GPU per forward);
    right after the base matmul they are launched while that matmul runs (15 µs
    idle on the H200). Graphs
    run in this order under ``inner="eager"``/``"aot_eager"``. Inductor reorders
    graphs on its own (in inference graphs it moved a free-standing norm back to
    the start), so the Triton norm also takes the base output as an argument it
    never reads (``norm_order_args``), an order Inductor must keep.
    """
    low_rank = match.norm
    candidates = [match.base_output, low_rank.weight, low_rank.lora_A, low_rank.lora_B, low_rank.scaling]
    nodes = {n for n in candidates if isinstance(n, Node)}
    return max(nodes, key=_positions(next(iter(nodes)).graph).__getitem__)


def packed_norm_format(match: DoraMatch) -> str | None:
    """The format (``"int8"``, ``"nf4"``, ``"fp4"``) where the quantized norm can read ``match``'s base weight packed.

    None unless a bitsandbytes Linear the kernel supports: the dequantized weight
    must be ``[d_out, d_in]`` as the norm's rows (no grouped Conv blocks), and the
    kernel must take its format, its dtype and the adapters'.
    """
    low_rank = match.norm
    quantized = low_rank.quantized if low_rank is not None else None
    if quantized is None or quantized.scales is None or low_rank.row_blocks != 1 or match.channel_dim != -1:
        return None
    quant_type = "int8" if quantized.scheme == "bnb-int8" else quantized.quant_type
    lora_A, lora_B = (example_value(n) for n in (low_rank.lora_A, low_rank.lora_B))
    return quant_type if kernels.triton_supports_quantized_norm(quant_type, quantized.dtype, lora_A, lora_B) else None


def norm_order_args(graph: Graph, target: object, result: object, like: Node) -> tuple[Node, ...]:
    """``(detach(result),)`` for the Triton norm op, else ``()``: the op's ``after`` argument.

    The op never reads ``after``; its first kernels take it as an argument, so
    Inductor launches them after the kernel that writes ``result`` (the base
    matmul) and their launches overlap it (``factored_row_norm_triton``). The
    detach keeps the norm without gradient. Plain-torch norms are left to
    Inductor's order.
    """
    if target not in (TARGETS["norm"]["triton"][0], TARGETS["norm"]["quantized"][0]) or not isinstance(result, Node):
        return ()
    return (insert_node(graph, "call_method", "detach", (result,), like),)


def _positions(graph: Graph) -> dict[Node, int]:
    return {n: i for i, n in enumerate(graph.nodes)}


def insert_norm(graph: Graph, match: DoraMatch, target: object, like: Node) -> Node:
    """``target(detach(W) as rows, detach(A), detach(B), s[, after])`` for ``match.norm``, after ``norm_position``.

    An N-D ``W`` (Conv) is reshaped to its ``[d_out, K]`` rows. Norms PEFT's DoRA
    cache stores (graph outputs) take its value.
    """
    with graph.inserting_before(norm_position(match).next):
        return _insert_norm_here(graph, match, target, like)


def _insert_packed_norm(graph: Graph, match: DoraMatch, target: object, like: Node) -> Node:
    """``quantized_row_norm(packed, scales, …, detach(A), detach(B), s[, after])``: W never dequantized for the norm."""
    low_rank = match.norm
    quantized = low_rank.quantized
    quant_type = "int8" if quantized.scheme == "bnb-int8" else quantized.quant_type
    d_out, d_in = low_rank.layer_shape
    scales = insert_node(graph, "call_method", "detach", (quantized.scales,), like)
    lora_A = insert_node(graph, "call_method", "detach", (low_rank.lora_A,), like)
    lora_B = insert_node(graph, "call_method", "detach", (low_rank.lora_B,), like)
    after = norm_order_args(graph, target, match.base_output, like)
    args = (quantized.packed, scales, quant_type, quantized.blocksize, d_out, d_in, quantized.dtype, lora_A, lora_B)
    return insert_node(graph, "call_function", target, (*args, low_rank.scaling, *after), like)


def _insert_norm_here(graph: Graph, match: DoraMatch, target: object, like: Node) -> Node:
    low_rank = match.norm
    if target is TARGETS["norm"]["quantized"][0]:
        norm = _insert_packed_norm(graph, match, target, like)
        if isinstance(match, ComposeMatch):
            store_norm(graph, match.stored, norm, like)
        return norm
    blocks = low_rank.row_blocks
    weight = insert_node(graph, "call_method", "detach", (low_rank.weight,), like)
    if example_value(low_rank.weight).dim() > 2 or blocks > 1:
        weight = insert_node(graph, "call_method", "reshape", (weight, low_rank.layer_shape[0] // blocks, -1), like)
    lora_A = insert_node(graph, "call_method", "detach", (low_rank.lora_A,), like)
    lora_B = insert_node(graph, "call_method", "detach", (low_rank.lora_B,), like)
    after = norm_order_args(graph, target, match.base_output, like)
    if blocks == 1:
        norm = insert_node(graph, "call_function", target, (weight, lora_A, lora_B, low_rank.scaling, *after), like)
    else:  # a grouped Conv: block t of B·A's row j updates W row c·j + t; one norm per block, interleaved
        width = low_rank.layer_shape[1]
        norms = []
        for t in range(blocks):
            columns = (slice(None), slice(t * width, (t + 1) * width))
            w_t = insert_node(graph, "call_function", operator.getitem, (weight, columns), like)
            a_t = insert_node(graph, "call_function", operator.getitem, (lora_A, columns), like)
            args = (w_t, a_t, lora_B, low_rank.scaling, *after)
            norms.append(insert_node(graph, "call_function", target, args, like))
        stacked = insert_node(graph, "call_function", torch.stack, (norms, 1), like)
        norm = insert_node(graph, "call_method", "reshape", (stacked, -1), like)
    if isinstance(match, ComposeMatch):
        store_norm(graph, match.stored, norm, like)
    return norm


def _lora_up_values(match: DoraMatch, with_base: bool = False) -> tuple[torch.Tensor, ...] | None:
    """``(root, result, h, B)`` values where the compose may take the LoRA up-projection ``linear(h, B)`` in.

    That is: a Linear's output (features last), a float ``s``, and a LoRA output
    ``linear(h, B)`` with no bias that nothing but the compose reads; ``h`` and ``B``
    of one dtype; a separate base output (dropout) only ``with_base``. Else None.
    """
    if not isinstance(match, ComposeMatch) or match.channel_dim != -1:
        return None
    lora = match.lora
    if match.base is not None and not with_base:
        return None
    if op_of(lora) != "linear" or arg(lora, 2, "bias") is not None or not isinstance(match.scaling, float):
        return None
    if any(user not in match.nodes for user in lora.users):
        return None
    values = tuple(example_value(n) for n in (match.root, match.result, lora.args[0], lora.args[1]))
    if any(v is None for v in values) or values[2].dtype != values[3].dtype:
        return None
    return values


def fusable_lora_up(match: DoraMatch) -> bool:
    """Whether the ``"lora_up"`` compose can replace ``match``'s LoRA up-projection and compose.

    As ``_lora_up_values`` says, where the DoRA output needs no gradient (the op
    has no backward) and ``result``, ``h`` and ``B`` are 16-bit (tensor-core operands).
    """
    values = _lora_up_values(match)
    if values is None:
        return False
    root, result, hidden, _ = values
    return not root.requires_grad and result.dtype in _LORA_UP_DTYPES and hidden.dtype in _LORA_UP_DTYPES


def foldable_lora_up(match: DoraMatch) -> bool:
    """Whether the ``"folded"`` compose can replace ``match``'s LoRA up-projection and compose: in training.

    As ``_lora_up_values`` says, a separate base output (dropout) included, where the
    DoRA output needs a gradient (``kernels/folded_compose.py``: its backward writes
    no LoRA-output gradient).
    """
    values = _lora_up_values(match, with_base=True)
    return values is not None and values[0].requires_grad


def insert_compose(graph: Graph, match: ComposeMatch, norm: Node, impl: str, like: Node) -> tuple[Node, str]:
    """The compose of ``TARGETS["compose"][impl]`` for ``match`` with ``norm``, and its name for the record.

    With a separate base output (dropout active) the plain-torch
    ``compose_with_base_torch`` applies, or its folded form for ``"folded"``. ``"lora_up"`` (where ``fusable_lora_up``)
    and ``"folded"`` (where ``foldable_lora_up``) read ``h`` and ``B`` of the LoRA
    output ``linear(h, B)`` in its place.
    Call under ``graph.inserting_before``.
    """
    base, bias = match.base, match.bias
    if base is not None and impl == "folded":
        target, name = TARGETS["compose"]["folded_with_base"]
        hidden, lora_B = match.lora.args[:2]
        args = (match.result, base, hidden, lora_B, match.magnitude, norm, match.scaling)
    elif base is not None:
        target, name = kernels.compose_with_base_torch, "torch:compose_with_base_torch"
        args = (match.result, base, match.lora, match.magnitude, norm, match.scaling)
    elif impl in ("lora_up", "folded"):
        target, name = TARGETS["compose"][impl]
        hidden, lora_B = match.lora.args[:2]
        args = (match.result, hidden, lora_B, match.magnitude, norm, bias, match.scaling)
    else:
        target, name = TARGETS["compose"][impl]
        args = (match.result, match.lora, match.magnitude, norm, bias, match.scaling)
    return insert_node(graph, "call_function", target, (*args, output_dtype(match.root)), like), name


# Activation-checkpoint region ids of our composes: above any a user's checkpoint calls would number
_REGION_IDS = itertools.count(1 << 30)
# The highest rank at which a compose that forms h·Bᵀ is recomputed for the backward. Recomputing costs
# 2·tokens·r·d_out more flops (fp32 ones with PEFT's default fp32 adapters) and a pass over the
# [tokens, d_out] product; saving costs one [tokens, d_out] tensor (docs/design.md weighs the two).
RECOMPUTE_MAX_RANK = 64


def recompute_in_backward(node: Node, like: Node, rank: int | None = None) -> None:
    """Have AOTAutograd's partitioner recompute ``node``'s forward ops for the backward instead of saving them.

    The tag of ``torch.utils.checkpoint``'s selective checkpointing: the ops traced from
    ``node`` carry ``recompute = PREFER_RECOMPUTE`` (node meta travels into the joint graph),
    so no tensor they make is saved; what they read (``result``, ``h``, ``B``, the
    magnitude and the norm) is, as before. Only where the output needs a gradient, and
    ``rank`` (of an up-projection the compose forms itself) is at most ``RECOMPUTE_MAX_RANK``;
    a ``like`` (the root) inside a user's checkpoint region keeps that region's tags instead.
    """
    value = example_value(node)
    if not isinstance(value, torch.Tensor) or not value.requires_grad:
        return
    if "recompute" in like.meta:
        node.meta["recompute"] = like.meta["recompute"]
        if "ac_graph_id" in like.meta:
            node.meta["ac_graph_id"] = like.meta["ac_graph_id"]
        return
    if rank is not None and rank > RECOMPUTE_MAX_RANK:
        return
    node.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE
    node.meta["ac_graph_id"] = next(_REGION_IDS)


def replace_root(graph: Graph, match: ComposeMatch, composed: Node) -> None:
    """Move the root's users to ``composed`` and erase what the match left unused (and its LoRA output)."""
    match.root.replace_all_uses_with(composed)
    erase_dead(graph, [*match.nodes, match.lora])


def rewrite_with_compose(
    graph: Graph, match: ComposeMatch, impl: OpsChoice = ("triton", "triton"), *, norm: Node | None = None
) -> tuple[str, ...]:
    """Insert the factored norm (after the base output) and the compose (before the root); retarget the root's users.

    Where the graph has no norm to factor (PEFT's cached norm) the compose takes
    ``detach(weight_norm)`` as it is; the factored ``[d_out]`` norm is viewed as ``m``
    where ``m`` has another shape (a Conv's ``[1, C_out, 1, ...]``); a DoRA term scaled by one
    more factor (``lora_factor``) gives the compose ``lora·factor``. A given ``norm``
    (a ``[d_out]`` value already in the graph before the root: a folded norm) takes
    the place of both. Returns the names of what was inserted, for the record.
    """
    inserted: list[str] = []
    if norm is not None:
        with graph.inserting_before(match.root):
            store_norm(graph, match.stored, norm, match.root)
    elif match.norm is not None:
        norm_target, norm_name = TARGETS["norm"][impl[0]]
        norm = insert_norm(graph, match, norm_target, match.root)
        inserted.append(norm_name)
    with graph.inserting_before(match.root):
        if norm is None:  # the cached norm, as the graph has it
            norm = insert_node(graph, "call_method", "detach", (match.weight_norm,), match.root)
        elif tuple(example_value(match.magnitude).shape) != tuple(example_value(norm).shape):  # [d_out] as m
            norm = insert_node(graph, "call_method", "view", (norm, *example_value(match.magnitude).shape), match.root)
        composed_match = match
        if match.lora_factor is not None:  # the compose takes lora·e (e cast as PEFT casts it)
            lora = insert_node(graph, "call_function", operator.mul, (match.lora, match.lora_factor), match.lora)
            composed_match = replace(match, lora=lora)
        composed, compose_name = insert_compose(graph, composed_match, norm, impl[1], match.root)
        forms_up_projection = composed.target in _UP_PROJECTING_COMPOSES
        rank = example_value(composed_match.lora.args[0]).shape[-1] if forms_up_projection else None
        recompute_in_backward(composed, match.root, rank)
    replace_root(graph, composed_match, composed)
    if match.norm is not None and impl[0] == "quantized":  # the dequantize, where nothing else reads it now
        erase_dead(graph, list(match.norm.quantized.nodes))
    inserted.append(compose_name)
    return tuple(inserted)
