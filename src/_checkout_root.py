"""The checkout-root guard: a folder of this checkout imported under its bare name yields that name.

The top-level folders ``kernels/``, ``passes/`` and ``src/`` are the packages
``dora_fused.kernels``, ``dora_fused.passes`` and ``dora_fused``. With the
checkout root on ``sys.path`` (``python -m``/``-c`` run from the root) each is
also found as a top-level package of its folder's name, and those names belong
to other packages: ``kernels`` is Hugging Face's, which transformers imports.
Each folder's ``__init__.py``, imported under its bare name, calls
``yield_to_installed`` before any import of this project. It loads this file by
its path in the checkout (this guard runs only there, where the layout is
fixed), since no import name of this project can be trusted at that point.
"""

import importlib
import importlib.machinery
import importlib.util
import os
import sys

__all__ = ["yield_to_installed"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def yield_to_installed(name: str) -> None:
    """Put in ``sys.modules[name]`` the package ``name`` as found without the checkout root on ``sys.path``.

    Where none is installed: an empty namespace package, as a folder without
    ``__init__.py`` gives (no ``__file__``, no ``__version__``: transformers'
    availability check reads that as absent). The import system then hands out
    that module in place of the checkout's folder.
    """
    path = sys.path[:]
    sys.path[:] = [p for p in path if os.path.abspath(p or os.curdir) != ROOT]
    del sys.modules[name]
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name != name:
            raise
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = []
        sys.modules[name] = importlib.util.module_from_spec(spec)
    finally:
        sys.path[:] = path
