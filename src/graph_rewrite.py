"""One DoRA rewrite of one Dynamo graph: run the pass, build its report, record and log it.

The ``dora_fused`` backend and the Inductor hook (``dora_fused.inductor_hook``)
both rewrite through :func:`rewrite_graph` and record through :func:`publish`,
so a graph gets the same rewrite and the same :class:`~dora_fused.RewriteReport`
whichever of the two ran the pass.

While the backend handles a graph (:func:`backend_owns_graph`), the Inductor
hook leaves that graph alone: the backend has already rewritten it (or was told
not to), and hands it to Inductor itself.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace

from torch.fx import GraphModule

from dora_fused.passes import DoraRewritePass, PassOutcome
from dora_fused.passes.folding import FoldOptions
from dora_fused.passes.naming import FrameNames, calling_modules, lifted_values

from .logs import graph_break_reasons, log_report
from .report import RewriteReport, _record

__all__ = ["GraphRewrite", "backend_owns_graph", "in_backend", "publish", "rewrite_graph"]

_in_backend: ContextVar[bool] = ContextVar("dora_fused_in_backend", default=False)


@dataclass
class GraphRewrite:
    """What :func:`rewrite_graph` did: the pass's outcome (None when it did not run) and the graph's report."""

    outcome: PassOutcome | None
    report: RewriteReport


def rewrite_graph(
    gm: GraphModule,
    rewrite_pass: DoraRewritePass | None,
    example_inputs: Sequence[object] | None = None,
    fold: FoldOptions | None = None,
) -> GraphRewrite:
    """Rewrite ``gm`` in place with ``rewrite_pass`` (None: leave it as it is) and report on it.

    The pass is transactional: if it raises, ``gm`` keeps its original graph and
    the report's ``error`` says why. Records carry the model's qualified names
    (``passes.naming.FrameNames``), found from the graph's real inputs:
    ``example_inputs`` (a backend's), else the values Dynamo keeps for its
    placeholders. ``fold``: frozen inference (``passes.folding``). Nothing is
    recorded yet: see :func:`publish`.
    """
    report = RewriteReport(graph_breaks=graph_break_reasons(gm))
    outcome = rewrite_pass(gm, fold) if rewrite_pass is not None else None
    if outcome is not None:
        values = example_inputs if example_inputs is not None else lifted_values(gm)
        names = FrameNames.of(gm, values, calling_modules())
        report.modules = [replace(m, name=names.qualify(m.name)) for m in outcome.records]
        report.error = outcome.error
    return GraphRewrite(outcome, report)


def publish(report: RewriteReport) -> RewriteReport:
    """Record ``report`` for ``last_report()``/``reports()`` (numbering it) and log it."""
    recorded = _record(report)
    log_report(recorded)
    return recorded


@contextmanager
def backend_owns_graph() -> Iterator[None]:
    """Within this block the backend compiles the graph, and the Inductor hook does not touch it."""
    token = _in_backend.set(True)
    try:
        yield
    finally:
        _in_backend.reset(token)


def in_backend() -> bool:
    """True while the ``dora_fused`` backend is compiling a graph (in this thread or task)."""
    return _in_backend.get()
