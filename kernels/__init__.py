"""dora_fused ops: factored row norm and fused compose.

Each op is a ``torch.library`` custom op (``torch.ops.dora_fused.*``) with a
fake implementation for tracing and a pure-torch implementation that runs on
any device; each module also exports its reference math.
"""

from .compose import (
    compose,
    compose_backward_reference,
    compose_reference,
    compose_torch,
    compose_with_base_reference,
    compose_with_base_torch,
)
from .factored_norm import (
    dense_row_norm_reference,
    factored_row_norm,
    factored_row_norm_differentiable,
    factored_row_norm_reference,
    factored_row_norm_torch,
)

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
]
