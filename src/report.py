"""What the backend did to a graph: the rewrite record.

``last_report()`` returns the :class:`RewriteReport` of the most recent graph
the backend compiled in this process; ``reports()`` lists every one (a graph
break splits a compile into several graphs). The fields ``rewritten`` and
``skipped`` are stable API.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

__all__ = ["ModuleRecord", "RewriteReport", "clear_reports", "last_report", "reports"]


@dataclass(frozen=True)
class ModuleRecord:
    """One DoRA subgraph (one module, one adapter) the pass looked at."""

    name: str  # qualified module name, as ``named_modules()`` of the compiled model gives it
    adapter: str | None  # PEFT adapter name, when known
    form: str  # which supported form matched (see ``dora_fused.passes.patterns``)
    status: str  # "rewritten" or "skipped"
    reason: str = ""  # one line: why it was skipped
    d_out: int | None = None
    d_in: int | None = None
    rank: int | None = None
    weight_dtype: str | None = None
    adapter_dtype: str | None = None
    magnitude_dtype: str | None = None
    ops: tuple[str, ...] = ()  # ops inserted by the rewrite
    ops_reason: str = ""  # why these implementations were chosen


@dataclass
class RewriteReport:
    """The record of one compiled graph."""

    graph_index: int = 0  # 0-based count of graphs this process compiled with the backend
    modules: list[ModuleRecord] = field(default_factory=list)
    error: str | None = None  # set when the pass failed and the original graph was compiled

    @property
    def rewritten(self) -> list[str]:
        """Qualified names of the modules whose DoRA subgraph was rewritten (each once, in graph order)."""
        return list(dict.fromkeys(m.name for m in self.modules if m.status == "rewritten"))

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """``(name, one-line reason)`` for each DoRA-like subgraph left as it was."""
        return [(m.name, m.reason) for m in self.modules if m.status == "skipped"]

    def __str__(self) -> str:
        lines = [f"dora_fused graph {self.graph_index}: {len(self.rewritten)} rewritten, {len(self.skipped)} skipped"]
        if self.error:
            lines.append(f"  pass failed, original graph compiled: {self.error}")
        for m in self.modules:
            shape = f"{m.d_out}x{m.d_in} r={m.rank}" if m.d_out is not None else ""
            detail = m.reason if m.status == "skipped" else ", ".join(m.ops)
            adapter = f"[{m.adapter}]" if m.adapter else ""
            lines.append(f"  {m.status:9s} {m.name}{adapter} {shape} {detail}".rstrip())
        return "\n".join(lines)


_lock = threading.Lock()
_reports: list[RewriteReport] = []


def _record(report: RewriteReport) -> RewriteReport:
    with _lock:
        report.graph_index = len(_reports)
        _reports.append(report)
    return report


def last_report() -> RewriteReport | None:
    """The record of the most recent graph compiled with the backend, or None."""
    with _lock:
        return _reports[-1] if _reports else None


def reports() -> list[RewriteReport]:
    """Every graph's record in this process, oldest first."""
    with _lock:
        return list(_reports)


def clear_reports() -> None:
    with _lock:
        _reports.clear()
