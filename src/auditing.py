"""``audit(model, *args, **kwargs)``: what the backend would rewrite, without compiling anything.

Like ``torch._dynamo.explain``: Dynamo traces ``model(*args, **kwargs)``, the
rewrite pass runs on every graph exactly as in the backend (same forms, same
ops choice), its records are kept, and each graph then runs as it was traced
(no Inductor, nothing of dora_fused executes). The result merges every graph's
records with Dynamo's graph-break reasons and with the model's own DoRA
modules, so a module that no graph contained shows up too, with a reason.

Like ``explain``, it resets Dynamo's caches before and after tracing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from dora_fused.passes import DoraRewritePass
from dora_fused.passes.memory import dense_norm_bytes
from dora_fused.passes.naming import ROOT, FrameNames, module_path

from .logs import graph_break_reasons, short_reason
from .quantized_bases import base_quantization
from .report import ModuleRecord, RewriteReport

__all__ = ["audit_model", "dora_modules"]


class _Recorder:
    """A Dynamo backend that runs the rewrite pass for its records, then runs the graph as traced."""

    def __init__(self, rewrite_pass: DoraRewritePass, model: nn.Module) -> None:
        self.rewrite_pass = rewrite_pass
        self.model = model
        self.reports: list[RewriteReport] = []
        self.traced_modules: set[str] = set()  # qualified names of modules with nodes in some graph

    def __call__(self, gm: GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        names = FrameNames.of(gm, example_inputs, [self.model])  # a graph break resumes inside a submodule
        self.traced_modules.update(names.qualify(module_path(node)) for node in gm.graph.nodes)
        report = RewriteReport(graph_breaks=graph_break_reasons(gm))
        outcome = self.rewrite_pass(gm)
        report.modules = [replace(m, name=names.qualify(m.name)) for m in outcome.records]
        report.error = outcome.error
        if outcome.error is None:
            outcome.restore(gm)
        self.reports.append(report)
        return gm.forward


_PEFT_KINDS = {"Linear": "PEFT Linear", "Embedding": "PEFT Embedding"}


def dora_modules(model: nn.Module) -> list[ModuleRecord]:
    """Every (module, active DoRA adapter) of a PEFT model, as records with status "" (not yet seen)."""
    found = []
    for name, module in model.named_modules():
        magnitudes = getattr(module, "lora_magnitude_vector", None)
        if not isinstance(magnitudes, nn.ModuleDict) or len(magnitudes) == 0:
            continue
        active = tuple(a for a in getattr(module, "active_adapters", ()) if a in magnitudes)
        kind = _PEFT_KINDS.get(type(module).__name__, "PEFT Conv" if "Conv" in type(module).__name__ else "PEFT")
        base = getattr(module, "base_layer", module)
        weight = getattr(base, "weight", None)
        scheme, dequantized = base_quantization(base)
        w_dtype = dequantized or (weight.dtype if weight is not None else None)
        for adapter in active:
            lora_a = module.lora_A[adapter].weight if adapter in getattr(module, "lora_A", {}) else None
            d_out = d_in = rank = None
            if weight is not None and weight.dim() == 2 and lora_a is not None:
                d_out, d_in = magnitudes[adapter].weight.shape[-1], lora_a.shape[-1]
                rank = lora_a.shape[0]
            found.append(
                ModuleRecord(
                    name,
                    adapter,
                    "",
                    "",
                    d_out=d_out,
                    d_in=d_in,
                    rank=rank,
                    weight_dtype=_dtype_name(w_dtype),
                    adapter_dtype=str(lora_a.dtype).removeprefix("torch.") if lora_a is not None else None,
                    kind=kind,
                    active_adapters=active,
                    dense_bytes=(
                        dense_norm_bytes(d_out, d_in, rank, w_dtype, lora_a.dtype, quantized=dequantized is not None)
                        if d_out is not None
                        else None
                    ),
                    quantization=scheme,
                )
            )
    return found


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return str(dtype).removeprefix("torch.") if dtype is not None else None


CHECKPOINT_SIDE_EFFECT = (
    "in an activation-checkpointed layer that Dynamo could not trace as one graph: its forward has a side effect "
    "(PEFT clears its DoRA cache on every call); set torch._dynamo.config."
    "skip_fwd_side_effects_in_bwd_under_checkpoint = True to have it traced and rewritten"
)


def _merge(
    seen: list[ModuleRecord], model_modules: list[ModuleRecord], traced: set[str], breaks: list[str] = ()
) -> list[ModuleRecord]:
    """The pass's records, completed from the model; the model's DoRA modules the pass did not report, appended."""
    by_key = {(m.name or ROOT, m.adapter): replace(m, name=m.name or ROOT) for m in model_modules}
    merged = []
    for record in seen:
        known = by_key.pop((record.name, record.adapter), None)
        if known is not None:
            record = ModuleRecord(
                **{
                    **record.__dict__,
                    "kind": known.kind or record.kind,  # the module's class is known for sure
                    "active_adapters": known.active_adapters,
                    "dense_bytes": record.dense_bytes if record.dense_bytes is not None else known.dense_bytes,
                    "quantization": record.quantization or known.quantization,
                }
            )
        merged.append(record)
    for missing in by_key.values():
        if any(path == missing.name or path.startswith(missing.name + ".") for path in traced):
            reason = f"traced, but no supported DoRA form matched its norm ({missing.kind} is not supported yet)"
        elif any(b.startswith("HOP: Unsafe side effect") for b in breaks):
            reason = CHECKPOINT_SIDE_EFFECT
        else:
            reason = "in no traced graph: it ran outside the compiled graphs (graph break or not called)"
        merged.append(ModuleRecord(**{**missing.__dict__, "status": "skipped", "reason": reason}))
    return merged


def audit_model(rewrite_pass: DoraRewritePass, model: nn.Module, *args: Any, **kwargs: Any) -> RewriteReport:
    """Trace ``model(*args, **kwargs)`` and report what ``rewrite_pass`` would do (see the module docstring)."""
    recorder = _Recorder(rewrite_pass, model)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        torch.compile(model, backend=recorder)(*args, **kwargs)
        counted_breaks = [short_reason(str(r)) for r in torch._dynamo.utils.counters["graph_break"]]
    finally:
        torch._dynamo.reset()
    breaks = [reason for report in recorder.reports for reason in report.graph_breaks]
    breaks += [r for r in counted_breaks if not any(b.startswith(r) for b in breaks)]
    errors = [report.error for report in recorder.reports if report.error]
    return RewriteReport(
        modules=_merge(
            [m for report in recorder.reports for m in report.modules],
            dora_modules(model),
            recorder.traced_modules,
            breaks,
        ),
        error="; ".join(errors) or None,
        graph_count=len(recorder.reports),
        graph_breaks=breaks,
    )
