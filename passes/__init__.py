"""FX passes of dora_fused: find DoRA subgraphs in Dynamo graphs and rewrite them.

See README.md in this folder for the invariants every pass keeps.
"""

if __name__ != "dora_fused.passes":
    # Found as the top-level package "passes" because the checkout root is on sys.path
    # (``python -m``/``-c`` run from the root). That name belongs to any installed package of
    # that name: import it instead.
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
    from .dora_pass import DoraRewritePass, PassOutcome
    from .form import ComposeMatch, DoraMatch, Form
    from .patterns import FORMS
    from .records import ModuleRecord

    __all__ = ["FORMS", "ComposeMatch", "DoraMatch", "DoraRewritePass", "Form", "ModuleRecord", "PassOutcome"]
