"""'Should' decisions, kept apart from the 'can' decisions of the matchers.

A match says a rewrite is *safe*; this module says which implementation of the
compose to insert. Two implementations compute the same math:

- ``"op"``: the ``torch.ops.dora_fused.compose`` custom op, opaque to Inductor,
  with its own backward. This is the slot where device kernels plug in.
- ``"torch"``: ``dora_fused.kernels.compose_reference``, plain torch ops that
  AOTAutograd differentiates and Inductor fuses into one pointwise kernel forward
  (and a fused kernel plus token reduction backward).

``"auto"`` picks ``"torch"`` everywhere for now: with no device kernel behind the
op yet, Inductor's fusion of the plain ops is the faster and leaner choice
(measured on H100, see docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Literal

__all__ = ["ComposeImpl", "choose_compose"]

ComposeImpl = Literal["auto", "op", "torch"]


def choose_compose(preference: ComposeImpl) -> tuple[Literal["op", "torch"], str]:
    """The compose implementation to insert, and why (one line, for the record)."""
    if preference == "op":
        return "op", "requested: compose='op'"
    if preference == "torch":
        return "torch", "requested: compose='torch'"
    return "torch", "auto: no fused compose kernel on this device yet; Inductor fuses the plain-torch compose"
