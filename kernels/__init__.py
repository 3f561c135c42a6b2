"""dora_fused ops: factored row norm, fused compose, and the LoRA up-projection fused with the compose.

The factored norm recomputes the rows where its sum cancels densely (``ill_conditioned_rows``).

``folded_compose`` is plain torch: the training compose whose backward folds ``g·s`` into ``B``.

Each op is a ``torch.library`` custom op (``torch.ops.dora_fused.*``) with a
fake implementation for tracing and a pure-torch implementation that runs on
any device; each module also exports its reference math.
"""

if __name__ != "dora_fused.kernels":
    # Found as the top-level package "kernels" because the checkout root is on sys.path
    # (``python -m``/``-c`` run from the root). That name is Hugging Face's kernels package, which
    # transformers imports: import the installed one instead (or stand in for none, below).
    # (The same guard opens passes/ and src/: it must run before any import of this project.)
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
    from .compose import (
        compose,
        compose_backward_reference,
        compose_reference,
        compose_torch,
        compose_with_base_reference,
        compose_with_base_torch,
    )
    from .differentiable_norm import factored_row_norm_differentiable
    from .factored_norm import (
        dense_row_norm_reference,
        factored_row_norm,
        factored_row_norm_reference,
        factored_row_norm_torch,
    )
    from .folded_compose import lora_up_folded_compose_torch, lora_up_folded_compose_with_base_torch
    from .lora_up_compose import lora_up_compose, lora_up_compose_reference
    from .quantized_norm import quantized_row_norm, quantized_row_norm_reference, triton_supports_quantized_norm

    __all__ = [
        "compose",
        "compose_backward_reference",
        "compose_reference",
        "compose_torch",
        "compose_with_base_reference",
        "compose_with_base_torch",
        "dense_row_norm_reference",
        "factored_row_norm",
        "factored_row_norm_differentiable",
        "factored_row_norm_reference",
        "factored_row_norm_torch",
        "lora_up_compose",
        "lora_up_compose_reference",
        "lora_up_folded_compose_torch",
        "lora_up_folded_compose_with_base_torch",
        "quantized_row_norm",
        "quantized_row_norm_reference",
        "triton_supports_quantized_norm",
    ]
