"""Logging under the ``dora_fused`` logger: one INFO line per compiled graph, details at DEBUG.

A server can turn it on without code: ``DORA_FUSED_LOG=info`` (or ``debug``,
``warning``) attaches a stderr handler to the ``dora_fused`` logger when the
package is imported. Without it the logger only propagates, as any library's.
"""

from __future__ import annotations

import logging
import os
import re

from torch.fx import GraphModule

from .report import RewriteReport

__all__ = ["ENV_VAR", "configure_from_env", "graph_break_reasons", "log", "log_report", "short_reason"]

ENV_VAR = "DORA_FUSED_LOG"
log = logging.getLogger("dora_fused")


def configure_from_env() -> None:
    """Attach a stderr handler at the level ``$DORA_FUSED_LOG`` names (idempotent)."""
    level = os.environ.get(ENV_VAR, "").strip().upper()
    if not level:
        return
    if not isinstance(logging.getLevelName(level), int):
        log.warning("dora_fused: ignoring %s=%r (not a logging level)", ENV_VAR, level)
        return
    log.setLevel(level)
    if not any(getattr(h, "_dora_fused_env", False) for h in log.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        handler._dora_fused_env = True
        log.addHandler(handler)


def graph_break_reasons(gm: GraphModule) -> list[str]:
    """Why Dynamo ended this graph, when a graph break did (one line), else nothing."""
    reason = getattr(gm, "compile_subgraph_reason", None)
    if reason is None or not getattr(reason, "graph_break", False):
        return []
    stack = getattr(reason, "user_stack", None) or []
    where = f" ({stack[-1].filename}:{stack[-1].lineno})" if stack else ""
    return [short_reason(str(reason.reason)) + where]


_DYNAMIC_SHAPE_SETTING = "torch._dynamo.config.capture_dynamic_output_shape_ops = True"


def short_reason(text: str) -> str:
    """Dynamo's graph-break message on one line, without its explanation and hints.

    An operator whose output shape depends on the data (bitsandbytes LLM.int8()'s
    outlier columns) keeps its name and the setting that traces it.
    """
    short = " ".join(text.split(" Explanation:")[0].split())
    operator = re.search(r"Operator `([^`]+)`'s output shape depends on input", text)
    if operator is not None and _DYNAMIC_SHAPE_SETTING.split(" =")[0] in text:
        short += f": {operator.group(1)} (set {_DYNAMIC_SHAPE_SETTING} to trace it)"
    return short


def log_report(report: RewriteReport) -> None:
    """INFO: the report's summary line; WARNING: a pass error; DEBUG: one line per module."""
    if report.error:
        log.warning("dora_fused: %s", report.error)
    log.info("%s (graph %d)", report.summary(), report.graph_index)
    for m in report.modules:
        detail = m.reason if m.status == "skipped" else f"{', '.join(m.ops)} ({m.ops_reason})"
        log.debug("dora_fused %s %s [%s]: %s", m.status, m.name, m.adapter, detail)
