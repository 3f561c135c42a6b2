"""What the backend did: the rewrite record, as a table, JSON and log lines.

One type, :class:`RewriteReport`, serves both uses:

- ``last_report()`` / ``reports()``: one report per graph the backend compiled
  (a backend sees graphs, not ``torch.compile`` calls; a graph break splits a
  compile into several graphs, and each graph's report says why it ended);
- ``dora_fused.audit(model, ...)``: one report for a whole traced call, every
  graph merged, with Dynamo's graph-break reasons and every DoRA-carrying module
  of the model, including those no graph contained.

``rewritten`` and ``skipped`` are stable API; ``to_json()`` follows the
versioned schema in docs/audit.md (``SCHEMA``).
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass, field, fields

from dora_fused.passes.records import ModuleRecord

__all__ = ["SCHEMA", "ModuleRecord", "RewriteReport", "clear_reports", "last_report", "reports"]

SCHEMA = "dora_fused.report/1"


@dataclass
class RewriteReport:
    """The record of one compiled graph, or of a whole audited call."""

    graph_index: int = 0  # 0-based count of graphs this process compiled with the backend
    modules: list[ModuleRecord] = field(default_factory=list)
    error: str | None = None  # set when the pass failed and the original graph was compiled
    graph_count: int = 1
    graph_breaks: list[str] = field(default_factory=list)  # one line each: why Dynamo ended a graph

    @property
    def rewritten(self) -> list[str]:
        """Qualified names of the modules whose DoRA subgraph was rewritten (each once, in graph order)."""
        return list(dict.fromkeys(m.name for m in self.modules if m.status == "rewritten"))

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """``(name, one-line reason)`` for each DoRA-like subgraph or module left as it was."""
        return [(m.name, m.reason) for m in self.modules if m.status == "skipped"]

    @property
    def found(self) -> list[str]:
        """Qualified names of every DoRA module seen (each once)."""
        return list(dict.fromkeys(m.name for m in self.modules))

    def summary(self) -> str:
        """One line: graphs, breaks, modules found / rewritten / left alone."""
        breaks = len(self.graph_breaks)
        left = len({name for name, _ in self.skipped})
        return (
            f"dora_fused: {self.graph_count} graph{'s' * (self.graph_count != 1)}, "
            f"{breaks} graph break{'s' * (breaks != 1)}, {len(self.found)} DoRA modules found, "
            f"{len(self.rewritten)} rewritten, {left} left alone"
        )

    def __str__(self) -> str:
        lines = [self.summary()]
        if self.error:
            lines.append(f"pass failed, original graph compiled: {self.error}")
        if self.modules:
            lines += _table(self.modules)
        for i, reason in enumerate(self.graph_breaks, 1):
            lines.append(f"graph break {i}: {reason}")
        reasons: dict[str, int] = {}
        for m in self.modules:
            if m.status == "rewritten" and m.ops_reason:
                reasons[m.ops_reason] = reasons.get(m.ops_reason, 0) + 1
        for reason, count in reasons.items():
            lines.append(f"ops ({count} module{'s' * (count != 1)}): {reason}")
        for m in self.modules:
            if m.status == "skipped":
                lines.append(f"left alone: {m.name}{f' [{m.adapter}]' if m.adapter else ''}: {m.reason}")
        return "\n".join(lines)

    def to_json(self, **dump_kwargs: object) -> str:
        """JSON text following ``SCHEMA`` (docs/audit.md)."""
        body = {
            "schema": SCHEMA,
            "graph_count": self.graph_count,
            "graph_breaks": list(self.graph_breaks),
            "error": self.error,
            "summary": {
                "found": len(self.found),
                "rewritten": len(self.rewritten),
                "left_alone": len({name for name, _ in self.skipped}),
            },
            "modules": [
                {**asdict(m), "ops": list(m.ops), "active_adapters": list(m.active_adapters)} for m in self.modules
            ],
        }
        return json.dumps(body, **dump_kwargs)

    @classmethod
    def from_json(cls, text: str) -> RewriteReport:
        """Read what ``to_json`` wrote (same schema major version only)."""
        body = json.loads(text)
        if body.get("schema") != SCHEMA:
            raise ValueError(f"not a {SCHEMA} report: schema {body.get('schema')!r}")
        known = {f.name for f in fields(ModuleRecord)}
        modules = [
            ModuleRecord(
                **{
                    **{k: v for k, v in m.items() if k in known},
                    "ops": tuple(m.get("ops", ())),
                    "active_adapters": tuple(m.get("active_adapters", ())),
                }
            )
            for m in body["modules"]
        ]
        return cls(
            modules=modules,
            error=body.get("error"),
            graph_count=body["graph_count"],
            graph_breaks=list(body["graph_breaks"]),
        )


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}
_OP_LABELS = {
    "dora_fused.factored_row_norm": "norm: triton",
    "dora_fused.quantized_row_norm": "norm: triton (packed weight)",
    "torch:factored_row_norm_torch": "norm: torch",
    "dora_fused.compose": "compose: triton",
    "dora_fused.lora_up_compose": "compose: triton + LoRA up-projection",
    "torch:compose_torch": "compose: torch",
    "torch:lora_up_folded_compose_torch": "compose: torch (scale folded into B)",
    "torch:lora_up_folded_compose_with_base_torch": "compose: torch (dropout base, scale folded into B)",
    "torch:compose_with_base_torch": "compose: torch (dropout base)",
    "frozen:row_norm": "norm: folded at compile time",
    "frozen:merged_weight": "merged weight (one matmul)",
}


def _table(modules: list[ModuleRecord]) -> list[str]:
    header = ("module", "kind", "d_out x d_in", "r", "base/adapter", "adapter", "status", "ops", "norm memory")
    rows = [header]
    for m in modules:
        dtypes = f"{_SHORT.get(m.weight_dtype, m.weight_dtype)}/{_SHORT.get(m.adapter_dtype, m.adapter_dtype)}"
        if m.quantization:  # the base is stored quantized: its scheme, then the dequantized weight's dtype
            dtypes = f"{m.quantization}:{dtypes}"
        memory = _bytes(m.dense_bytes) + (f" -> {_bytes(m.rewritten_bytes)}" if m.rewritten_bytes is not None else "")
        rows.append(
            (
                m.name,
                m.kind or m.form or "-",
                f"{m.d_out}x{m.d_in}" if m.d_out is not None else "-",
                str(m.rank) if m.rank is not None else "-",
                dtypes if m.weight_dtype else "-",
                m.adapter or "-",
                m.status,
                ", ".join(_OP_LABELS.get(op, op) for op in m.ops) or "-",
                memory,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


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
