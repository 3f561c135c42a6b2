"""FX passes of dora_fused: find DoRA subgraphs in Dynamo graphs and rewrite them.

See README.md in this folder for the invariants every pass keeps.
"""

if __name__ != "dora_fused.passes":
    # Found as the top-level package "passes" because the checkout root is on sys.path
    # (``python -m``/``-c`` run from the root). That name belongs to any installed package of
    # that name: it is imported instead.
    # src/_checkout_root.py hands the name over, loaded by its path: no import of this project may run first.
    import importlib.util
    import os

    _guard_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src", "_checkout_root.py")
    _spec = importlib.util.spec_from_file_location("_dora_fused_checkout_root", _guard_path)
    _guard = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_guard)
    _guard.yield_to_installed(__name__)
else:
    from .dora_pass import DoraRewritePass, PassOutcome
    from .form import ComposeMatch, DoraMatch, Form
    from .patterns import FORMS
    from .records import ModuleRecord

    __all__ = ["FORMS", "ComposeMatch", "DoraMatch", "DoraRewritePass", "Form", "ModuleRecord", "PassOutcome"]
