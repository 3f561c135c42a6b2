"""The ``dora_fused`` torch.compile backend.

``torch.compile(model, backend="dora_fused")`` (found through the
``torch_dynamo_backends`` entry point) or ``backend=dora_fused.backend(...)``:
Dynamo hands each graph to the backend, the DoRA pass rewrites it, and the
result goes to Inductor with the ``mode``/``options`` torch.compile forwarded.

Never broken: if the pass raises, or the inner compiler fails on the rewritten
graph, the original graph is compiled instead and the error is recorded in the
report (and logged), never raised.

Frozen inference (``frozen=True``, or Inductor's ``freezing`` on for a graph that
needs no gradient): the pass folds what depends only on parameters into graph
attributes, this module computes them from the real parameters
(``frozen.materialize``) and returns the compiled graph behind a per-call check
that those parameters are unchanged (``frozen.FoldedGraph``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch._dynamo.exc import RestartAnalysis
from torch.fx import GraphModule

from dora_fused.passes import DoraRewritePass
from dora_fused.passes.dora_pass import PassOutcome
from dora_fused.passes.folding import FoldOptions, MergeBudget
from dora_fused.passes.heuristics import OpsImpl
from dora_fused.passes.snapshot import snapshot

from .auditing import audit_model
from .cudagraph_outputs import copy_out, state_outputs
from .frozen import FoldedGraph, Variant, materialize
from .graph_rewrite import backend_owns_graph, publish, rewrite_graph
from .report import RewriteReport

__all__ = ["DoraFusedBackend", "backend", "dora_fused"]


INNER_COMPILERS = ("inductor", "aot_eager", "eager")


class DoraFusedBackend:
    """A configured backend: ``torch.compile(model, backend=DoraFusedBackend(...))``.

    Args:
        inner: what compiles the rewritten graph: ``"inductor"`` (default),
            ``"aot_eager"`` (AOTAutograd without Inductor, for debugging
            numerics) or ``"eager"``.
        rewrite: set False to compile without the DoRA pass (for A/B runs).
        ops: which implementation of the norm and compose the rewrite inserts:
            ``"auto"`` (default: chosen per module), ``"triton"`` (the
            ``torch.ops.dora_fused`` Triton ops; plain torch off CUDA) or
            ``"torch"`` (plain torch ops that Inductor compiles); see
            ``dora_fused.passes.heuristics``.
        frozen: frozen inference. ``True``: in graphs that need no gradient, each
            DoRA module's norm (or, within ``merge_budget_bytes``, its whole weight)
            is computed once at compile time from the parameters; a per-call check
            recomputes it when a parameter changed. ``None`` (default): on where
            Inductor's freezing applies (``torch._inductor.config.freezing`` or
            ``options={"freezing": True}``, without grad). ``False``: never.
        merge_budget_bytes: extra memory frozen graphs of this backend may hold in
            merged weights (one more copy of each merged ``W``). Modules are merged
            in graph order while it lasts; the others get their norm folded. 0 by
            default: nothing is merged, except under Inductor's
            ``freezing_discard_parameters``, which drops the original weights.
    """

    def __init__(
        self,
        *,
        inner: str = "inductor",
        rewrite: bool = True,
        ops: OpsImpl = "auto",
        frozen: bool | None = None,
        merge_budget_bytes: int = 0,
    ) -> None:
        if inner not in INNER_COMPILERS:
            raise ValueError(f"inner must be one of {INNER_COMPILERS}, got {inner!r}")
        if ops not in ("auto", "triton", "torch"):
            raise ValueError(f"ops must be 'auto', 'triton' or 'torch', got {ops!r}")
        if frozen not in (None, True, False):
            raise ValueError(f"frozen must be None, True or False, got {frozen!r}")
        self.inner = inner
        self.rewrite = rewrite
        self.ops = ops
        self.frozen = frozen
        self.merge_budget = MergeBudget(int(merge_budget_bytes))
        self.rewrite_pass = DoraRewritePass(ops=ops)

    def _key(self) -> tuple[object, ...]:
        return self.inner, self.rewrite, self.ops, self.frozen, self.merge_budget.total

    def __repr__(self) -> str:
        frozen = f", frozen={self.frozen}, merge_budget_bytes={self.merge_budget.total}"
        return f"DoraFusedBackend(inner={self.inner!r}, rewrite={self.rewrite}, ops={self.ops!r}{frozen})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DoraFusedBackend) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __deepcopy__(self, memo: dict[int, object]) -> DoraFusedBackend:
        # generate() deep-copies its CompileConfig: the copy shares this backend's merge budget
        return self

    def __call__(
        self,
        gm: GraphModule,
        example_inputs: Sequence[Any],
        *,
        mode: str | None = None,
        options: dict[str, Any] | None = None,
    ) -> Callable[..., Any]:
        return self._compile(gm, example_inputs, mode, options)

    def _compile(
        self,
        gm: GraphModule,
        example_inputs: Sequence[Any],
        mode: str | None,
        options: dict[str, Any] | None,
        rebuilding: bool = False,
    ) -> Callable[..., Any]:
        freezing = self._inductor_freezing(options)
        baked = freezing and self.inner == "inductor"  # parameters become constants of the compiled code
        discard = baked and bool(_option(options, "freezing_discard_parameters"))
        fold = self.frozen if self.frozen is not None else freezing
        # to compile again for changed (baked) or other (a shared graph) parameters
        original = snapshot(gm.graph) if (fold or baked) and not discard else None
        watched = [str(n.target) for n in gm.graph.nodes if n.op == "get_attr"] if baked else []
        with backend_owns_graph():  # an enabled Inductor hook leaves this graph to the backend
            fold_options = FoldOptions(self.merge_budget, discard) if fold else None
            step = rewrite_graph(gm, self.rewrite_pass if self.rewrite else None, example_inputs, fold_options)
            outcome, report = step.outcome, step.report
            try:
                if outcome is not None and outcome.folded:
                    materialize(gm, outcome.folded, example_inputs)
                compiled = self._compile_inner(gm, example_inputs, mode, options)
            except RestartAnalysis:
                raise  # Dynamo's control flow (e.g. tensorify-scalars restarts), not a failure: it retraces
            except Exception as error:
                if outcome is None or not (outcome.changed or outcome.folded):
                    raise
                report.error = f"inner compiler failed on the rewritten graph: {type(error).__name__}: {error}"
                report.modules = [
                    replace(m, status="skipped", reason="inner compile failed; original kept", ops=(), frozen="")
                    if m.status == "rewritten"
                    else m
                    for m in report.modules
                ]
                outcome.restore(gm)
                compiled = self._compile_inner(gm, example_inputs, mode, options)
        publish(report)
        if outcome is None or not (outcome.folded or (baked and outcome.changed) or rebuilding):
            return compiled
        return self._folded(compiled, gm, example_inputs, outcome, baked, watched, original, mode, options).call()

    def _folded(
        self,
        compiled: Callable[..., Any],
        gm: GraphModule,
        example_inputs: Sequence[Any],
        outcome: PassOutcome,
        baked: bool,
        watched: list[str],
        original: Any,
        mode: str | None,
        options: dict[str, Any] | None,
    ) -> FoldedGraph:
        """``compiled`` behind the per-call check of the parameters its folded (or baked) values came from."""
        rebuild = None
        if original is not None:

            def rebuild(args: list[Any]) -> Variant:
                fresh = GraphModule(gm, snapshot(original))
                fresh.meta.update(gm.meta)
                return self._compile(fresh, args, mode, options, rebuilding=True).folded.current

        variant = Variant(compiled, gm, outcome.folded, example_inputs, watched, weak=baked and original is None)
        merged = sum(v.merged_bytes for v in outcome.folded)
        if merged:
            weakref.finalize(variant, self.merge_budget.give_back, merged)
        return FoldedGraph(variant, example_inputs, baked=baked, rebuild=rebuild)

    @staticmethod
    def _inductor_freezing(options: dict[str, Any] | None) -> bool:
        """Whether Inductor's freezing applies to this graph: asked for, and no gradient."""
        return bool(_option(options, "freezing")) and not torch.is_grad_enabled()

    def audit(self, model: torch.nn.Module, *args: Any, **kwargs: Any) -> RewriteReport:
        """What this backend would rewrite in ``model(*args, **kwargs)``; compiles nothing (``dora_fused.audit``)."""
        return audit_model(self.rewrite_pass, model, *args, **kwargs)

    def _compile_inner(
        self,
        gm: GraphModule,
        example_inputs: Sequence[Any],
        mode: str | None,
        options: dict[str, Any] | None,
    ) -> Callable[..., Any]:
        if self.inner == "inductor":
            # The same wrapper torch.compile builds for backend="inductor": it turns
            # mode/options into Inductor config patches (and validates them). Under CUDA
            # graphs, values of parameters alone that the graph returns are copied out of the
            # pool: the caller may keep them (PEFT's norm cache; cudagraph_outputs.py).
            inductor = torch._TorchCompileInductorWrapper(mode, options, None)
            cudagraphs = inductor.config.get("triton.cudagraphs", torch._inductor.config.triton.cudagraphs)
            outputs = state_outputs(gm, example_inputs) if cudagraphs else []
            return copy_out(inductor(gm, example_inputs), outputs)
        if mode not in (None, "default") or options:
            raise ValueError(f"mode/options apply to Inductor only, not inner={self.inner!r}")
        if self.inner == "aot_eager":
            from torch._dynamo.backends.registry import lookup_backend

            return lookup_backend("aot_eager")(gm, example_inputs)
        return gm.forward


def _option(options: dict[str, Any] | None, name: str) -> object:
    """An Inductor config value as this compile sees it: ``options`` first, then the global config."""
    if options and name in options:
        return options[name]
    return getattr(torch._inductor.config, name)


_default = DoraFusedBackend()


def backend(
    *,
    inner: str = "inductor",
    rewrite: bool = True,
    ops: OpsImpl = "auto",
    frozen: bool | None = None,
    merge_budget_bytes: int = 0,
) -> DoraFusedBackend:
    """A configured backend: ``torch.compile(model, backend=dora_fused.backend(inner="aot_eager"))``.

    ``frozen=True`` turns on frozen inference; ``merge_budget_bytes`` bounds the extra
    memory of merged weights (see :class:`DoraFusedBackend`).
    """
    return DoraFusedBackend(inner=inner, rewrite=rewrite, ops=ops, frozen=frozen, merge_budget_bytes=merge_budget_bytes)


def dora_fused(
    gm: GraphModule,
    example_inputs: Sequence[Any],
    *,
    mode: str | None = None,
    options: dict[str, Any] | None = None,
) -> Callable[..., Any]:
    """The backend registered as ``"dora_fused"`` (default configuration)."""
    return _default(gm, example_inputs, mode=mode, options=options)


def register_name() -> None:
    """Register ``"dora_fused"`` with Dynamo when no installed entry point provides it (e.g. on PYTHONPATH).

    With the package installed, Dynamo loads the name from the entry point on
    first use; registering it here as well would make that load a duplicate.
    """
    from importlib.metadata import entry_points

    from torch._dynamo.backends.registry import register_backend

    if any(ep.name == "dora_fused" for ep in entry_points(group="torch_dynamo_backends")):
        return
    try:
        register_backend(dora_fused, name="dora_fused")
    except AssertionError:  # already registered
        pass


def audit(model: torch.nn.Module, *args: Any, **kwargs: Any) -> RewriteReport:
    """Trace ``model(*args, **kwargs)`` as ``torch.compile(model, backend="dora_fused")`` would and report.

    Returns the same :class:`~dora_fused.RewriteReport` type as ``last_report()``,
    for the whole call: graphs, graph breaks with reasons, every DoRA module
    (rewritten, or left alone with a one-line reason), the ops chosen and why,
    and the norm's transient memory per call, dense vs rewritten. Nothing is
    compiled; each traced graph runs as it was traced. Resets Dynamo's caches,
    like ``torch._dynamo.explain``. ``dora_fused.backend(ops=...).audit(...)``
    audits another configuration.
    """
    return _default.audit(model, *args, **kwargs)
