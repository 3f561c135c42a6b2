"""dora_fused: a torch.compile backend for DoRA fine-tuning and serving.

``torch.compile(model, backend="dora_fused")`` finds each DoRA layer's
dense-``B·A``-then-row-norm subgraph and replaces it with a factored norm and a
fused compose op. ``last_report()`` says which modules were rewritten.

Importing this package registers the backend name and, when PEFT is installed,
the Dynamo polyfill that lets PEFT's DoRA layers trace as one graph; it has no
other side effects.
"""

from .peft_tracing import enable_peft_tracing
from .report import ModuleRecord, RewriteReport, clear_reports, last_report, reports

enable_peft_tracing()

from .backend import DoraFusedBackend, backend, dora_fused  # noqa: E402

__all__ = [
    "DoraFusedBackend",
    "ModuleRecord",
    "RewriteReport",
    "backend",
    "clear_reports",
    "dora_fused",
    "last_report",
    "reports",
]
__version__ = "0.1.0"
