"""The DoRA rewrite pass: find every supported form in a Dynamo graph and rewrite it.

The pass is transactional: if anything inside it raises, the graph is restored
to the copy taken before it ran, and the error is returned, never raised.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from torch.fx import Graph, GraphModule, Node

from .folding import FoldedValue, FoldOptions, Unfoldable, drop_attributes, fold_match, peft_norm_value, plan_fold
from .form import ComposeMatch, DoraMatch, Form
from .graph_view import example_value, mutated_tensor, op_of, strip
from .heuristics import LayerFacts, OpsImpl, choose_ops
from .matching import NotDora, Unsupported
from .memory import dense_norm_bytes, rewritten_norm_bytes
from .naming import ROOT, module_path
from .patterns import FORMS
from .records import ModuleRecord
from .rewrite import foldable_lora_up, fusable_lora_up, norm_position, packed_norm_format
from .snapshot import ModuleSnapshot, graph_modules

__all__ = ["DoraRewritePass", "PassOutcome"]

_MAGNITUDE = ".lora_magnitude_vector."


@dataclass
class PassOutcome:
    original: ModuleSnapshot  # the graphs before the pass: what to compile if the rewritten ones fail
    records: list[ModuleRecord] = field(default_factory=list)
    error: str | None = None  # the pass raised; the graphs are the originals
    folded: list[FoldedValue] = field(default_factory=list)  # values for the backend to compute (``folding``)
    fold_options: FoldOptions | None = None

    def restore(self, gm: GraphModule) -> None:
        """Put back the graphs as they were before the pass (``gm``'s and its subgraphs'), without folded values."""
        self.original.restore(gm)
        drop_attributes(gm)
        if self.fold_options is not None:
            for value in self.folded:
                self.fold_options.budget.give_back(value.merged_bytes)
        self.folded = []

    @property
    def changed(self) -> bool:
        return self.error is None and any(r.status == "rewritten" for r in self.records)


def _layer_and_adapter(anchor: Node) -> tuple[str, str | None]:
    """PEFT puts the norm inside ``<layer>.lora_magnitude_vector.<adapter>``."""
    path = module_path(anchor)
    if _MAGNITUDE in "." + path:  # "lora_magnitude_vector.<adapter>" alone: the compiled module is the PEFT layer
        layer, adapter = ("." + path).rsplit(_MAGNITUDE, 1)
        return layer.removeprefix(".") or ROOT, adapter
    return path or ROOT, None  # the compiled module itself


def _dtype(node: object) -> str | None:
    value = example_value(node)
    return str(value.dtype).removeprefix("torch.") if value is not None else None


def _mutated_in_span(graph: Graph, anchor: Node, match: DoraMatch) -> str | None:
    """Name of an input the graph writes in place where the replacement reads it, if any.

    The replacement reads its inputs at the root, and the inserted norm reads W,
    A and B right after ``rewrite.norm_position`` (the base output), which may come
    before the match's first node; a write from there to the root (to the input,
    or to the tensor it views) would make it read another value.
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    inputs = match.inputs
    roots = {strip(n, ("view", "t", "detach", "to")) for n in inputs} | inputs
    # a write before the first matched node reaches the original and the replacement alike
    first = min(order[n] for n in [*match.nodes, anchor] if n in order)
    if match.norm is not None and match.base_output is not None:
        first = min(first, order[norm_position(match)])  # where insert_norm puts the norm
    for node in graph.nodes:
        if first < order[node] < order[match.root]:
            target = mutated_tensor(node)
            if isinstance(target, Node) and ({target, strip(target, ("view", "t", "detach", "to"))} & roots):
                return target.name
    return None


class DoraRewritePass:
    """Rewrites every DoRA subgraph the listed forms recognize; leaves the rest as it was."""

    def __init__(self, forms: tuple[Form, ...] = FORMS, ops: OpsImpl = "auto") -> None:
        self.forms = forms
        self.ops = ops

    @staticmethod
    def uuid() -> str:
        """Stable cache key: a hash of the passes' source."""
        digest = hashlib.sha256()
        for path in sorted(Path(__file__).parent.glob("*.py")):
            digest.update(path.read_bytes())
        return digest.hexdigest()

    def __call__(self, gm: GraphModule, fold: FoldOptions | None = None) -> PassOutcome:
        """Rewrite ``gm``'s graph and its higher-order-op subgraphs (activation-checkpoint bodies).

        With ``fold``, modules of the top graph whose output needs no gradient get
        their norm or whole weight from a graph attribute (``folding``); the outcome
        lists those values for the backend to compute.
        """
        outcome = PassOutcome(original=ModuleSnapshot(gm), fold_options=fold)
        try:
            for _, sub in graph_modules(gm):
                top = sub is gm  # folded values refer to the top graph's inputs and attributes
                records = self._rewrite_all(sub.graph, fold if top else None, outcome.folded if top else None)
                if records:
                    sub.graph.lint()
                    sub.recompile()
                outcome.records += records
            gm.graph.lint()
            gm.recompile()
        except Exception as error:
            outcome.restore(gm)
            outcome.records = []
            outcome.error = f"{type(error).__name__}: {error}"
        return outcome

    def _rewrite_all(
        self, graph: Graph, fold: FoldOptions | None = None, folded: list[FoldedValue] | None = None
    ) -> list[ModuleRecord]:
        records = []
        anchor_ops = {op for form in self.forms for op in form.anchors}
        anchors = [n for n in graph.nodes if op_of(n) in anchor_ops]
        for anchor in anchors:
            if getattr(anchor, "_erased", False):  # part of an earlier rewrite (fx marks erased nodes)
                continue
            record = self._rewrite_one(graph, anchor, fold, folded)
            if record is not None:
                records.append(record)
        return records

    def _rewrite_one(
        self, graph: Graph, anchor: Node, fold: FoldOptions | None = None, folded: list[FoldedValue] | None = None
    ) -> ModuleRecord | None:
        name, adapter = _layer_and_adapter(anchor)
        unsupported: tuple[Form, Unsupported] | None = None  # the last form that got past NotDora, and why
        for form in self.forms:
            if op_of(anchor) not in form.anchors or not form.applies_to(adapter is not None):
                continue
            try:
                match = form.match(anchor)
            except NotDora:
                continue
            except Unsupported as why:
                unsupported = (form, why)
                continue
            mutated = _mutated_in_span(graph, anchor, match)
            if mutated is not None:
                unsupported = (form, Unsupported(f"{mutated} is modified in place between the norm and its use"))
                break
            return self._rewrite(graph, form, match, name, adapter, fold, folded)
        if unsupported is None:
            return None
        form, why = unsupported
        kind = form.kind if adapter is not None else "DoRA-like"  # outside PEFT, unknown until a form matches
        return ModuleRecord(name, adapter, form.name, "skipped", reason=str(why), kind=kind)

    def _rewrite(
        self,
        graph: Graph,
        form: Form,
        match: DoraMatch,
        name: str,
        adapter: str | None,
        fold: FoldOptions | None,
        folded: list[FoldedValue] | None,
    ) -> ModuleRecord:
        low_rank = match.norm  # None where the graph computes no norm (PEFT's cached norm)
        weight = match.base_weight
        lora_A, _ = match.adapter_factors
        w, a = example_value(weight), example_value(lora_A)
        d_out, d_in = match.layer_shape
        facts = LayerFacts(
            device=a.device,
            d_out=d_out,
            d_in=d_in,
            dtypes=tuple(example_value(n).dtype for n in match.operands),
            symbolic_scaling=any(isinstance(s, Node) for s in match.scalings),
            channel_dim=match.channel_dim,
            lora_up=fusable_lora_up(match),
            folded_lora_up=foldable_lora_up(match),
            packed_norm=packed_norm_format(match),
        )
        impl, why = choose_ops(self.ops, facts)
        ops, frozen, why = self._insert(graph, form, match, impl, why, name, adapter, fold, folded)
        rank = int(a.shape[0])
        quantized = low_rank.quantized if low_rank is not None else None
        if low_rank is not None:
            q = quantized is not None
            dense = dense_norm_bytes(d_out, d_in, rank, w.dtype, a.dtype, low_rank.identity_trick, quantized=q)
            rewritten = rewritten_norm_bytes(d_out, d_in, rank, w.dtype, a.dtype, impl[0], quantized=q)
        else:
            dense = rewritten = None  # PEFT's cache holds the norm: no norm is computed
        return ModuleRecord(
            name,
            adapter,
            form.name,
            "rewritten",
            d_out=facts.d_out,
            d_in=facts.d_in,
            rank=rank,
            weight_dtype=_dtype(weight),
            adapter_dtype=_dtype(lora_A),
            magnitude_dtype=_dtype(match.magnitude),
            ops=ops,
            ops_reason=why,
            kind=match.kind or form.kind,
            dense_bytes=dense,
            rewritten_bytes=None if frozen else rewritten,
            frozen=frozen,
            quantization=quantized.scheme if quantized is not None else None,
        )

    @staticmethod
    def _insert(
        graph: Graph,
        form: Form,
        match: DoraMatch,
        impl: tuple[str, str],
        why: str,
        name: str,
        adapter: str | None,
        fold: FoldOptions | None,
        folded: list[FoldedValue] | None,
    ) -> tuple[tuple[str, ...], str, str]:
        """Rewrite ``match`` (folded where ``fold`` allows); returns ``(ops, frozen kind or "", ops_reason)``.

        ``folded`` collects the values the backend computes or checks (None: a subgraph, nothing is folded).
        """
        if fold is not None and folded is not None:
            try:
                kind, merged_bytes, plan = plan_fold(match, fold)
                try:  # the graph is untouched until the operands' recipe is built
                    ops, value = fold_match(graph, match, kind, impl, name, adapter)
                except Unfoldable:
                    fold.budget.give_back(merged_bytes)
                    raise
            except Unfoldable as reason:
                why = f"frozen: not folded ({reason}); {why}"
            else:
                value.merged_bytes = merged_bytes
                folded.append(value)
                return ops, kind, f"frozen: {plan}" + ("" if kind == "merged" else f"; {why}")
        ops = form.rewrite(graph, match, impl)
        if folded is not None and isinstance(match, ComposeMatch) and match.norm is None:  # PEFT's cached norm
            try:
                folded.append(peft_norm_value(match, name, adapter))
            except Unfoldable as reason:
                why = f"{why}; PEFT's cached norm is not checked against its parameters ({reason})"
        return ops, "", why
