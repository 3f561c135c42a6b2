"""dora_fused ops: factored row norm, fused compose, and the LoRA up-projection fused with the compose.

The factored norm (``factored_norm``) takes ``G = A·Aᵀ`` from ``gram`` and its launch plan from
``norm_plan``, and recomputes the rows where its sum cancels densely (``ill_conditioned_rows``).
``common`` holds what several ops share: the accumulation dtype, exact 16-bit terms, launch helpers.

``folded_compose`` is plain torch: the training compose whose backward folds ``g·s`` into ``B``.

Each op is a ``torch.library`` custom op (``torch.ops.dora_fused.*``) with a
fake implementation for tracing and a pure-torch implementation that runs on
any device; each module also exports its reference math.
"""

if __name__ != "dora_fused.kernels":
    # Found as the top-level package "kernels" because the checkout root is on sys.path
    # (``python -m``/``-c`` run from the root). That name is Hugging Face's kernels package, which
    # transformers imports: the installed one is imported instead (or an empty namespace package).
    # src/_checkout_root.py hands the name over, loaded by its path: no import of this project may run first.
    import importlib.util
    import os

    _guard_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src", "_checkout_root.py")
    _spec = importlib.util.spec_from_file_location("_dora_fused_checkout_root", _guard_path)
    _guard = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_guard)
    _guard.yield_to_installed(__name__)
else:
    from . import access_analysis
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

    access_analysis.install()
