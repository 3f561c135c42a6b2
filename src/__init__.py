"""dora_fused: a torch.compile backend for DoRA fine-tuning and serving.

``torch.compile(model, backend="dora_fused")`` finds each DoRA layer's
dense-``B·A``-then-row-norm subgraph and replaces it with a factored norm and a
fused compose op. ``last_report()`` says which modules were rewritten.

Importing this package registers the backend name and, when PEFT is installed,
the Dynamo polyfill that lets PEFT's DoRA layers trace as one graph; with
``DORA_FUSED_LOG`` set it also attaches a log handler to the ``dora_fused``
logger. It has no other side effects. ``audit(model, *args)`` reports what the
backend would rewrite without compiling. ``enable_inductor_hook()`` makes
``backend="inductor"`` (and so every trainer that compiles with Inductor)
rewrite DoRA layers as well.
"""

if __name__ != "dora_fused":
    # Found as the top-level package "src" because the checkout root is on sys.path
    # (``python -m``/``-c`` run from the root). That name belongs to any installed package of
    # that name (PyPI has one): it is imported instead.
    # src/_checkout_root.py hands the name over, loaded by its path: no import of this project may run first.
    import importlib.util
    import os

    _guard_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src", "_checkout_root.py")
    _spec = importlib.util.spec_from_file_location("_dora_fused_checkout_root", _guard_path)
    _guard = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_guard)
    _guard.yield_to_installed(__name__)
else:
    from .logs import configure_from_env
    from .peft_tracing import enable_peft_tracing
    from .report import SCHEMA, ModuleRecord, RewriteReport, clear_reports, last_report, reports

    enable_peft_tracing()
    configure_from_env()

    from .backend import DoraFusedBackend, audit, backend, dora_fused, register_name
    from .frozen import refresh_frozen
    from .inductor_hook import disable_inductor_hook, enable_inductor_hook, inductor_hook_enabled

    register_name()

    __all__ = [
        "SCHEMA",
        "DoraFusedBackend",
        "ModuleRecord",
        "RewriteReport",
        "audit",
        "backend",
        "clear_reports",
        "disable_inductor_hook",
        "dora_fused",
        "enable_inductor_hook",
        "inductor_hook_enabled",
        "last_report",
        "refresh_frozen",
        "reports",
    ]
    __version__ = "0.1.0"
