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
    # that name (PyPI has one): import it instead.
    import importlib
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = sys.path[:]
    sys.path[:] = [p for p in _path if os.path.abspath(p or os.curdir) != _root]
    del sys.modules[__name__]
    try:
        importlib.import_module(__name__)
    except ModuleNotFoundError as error:
        if error.name != __name__:
            raise
        # None is installed: an empty namespace package, as a folder without __init__.py gives
        # (no __file__, no __version__: transformers' availability check reads that as absent).
        _spec = importlib.machinery.ModuleSpec(__name__, None, is_package=True)
        _spec.submodule_search_locations = []
        sys.modules[__name__] = importlib.util.module_from_spec(_spec)
    finally:
        sys.path[:] = _path
else:
    from .logs import configure_from_env
    from .peft_tracing import enable_peft_tracing
    from .report import SCHEMA, ModuleRecord, RewriteReport, clear_reports, last_report, reports

    enable_peft_tracing()
    configure_from_env()

    from .backend import DoraFusedBackend, audit, backend, dora_fused, register_name
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
        "reports",
    ]
    __version__ = "0.1.0"
