"""'Should' decisions, kept apart from the 'can' decisions of the matchers.

A match says a rewrite is *safe*. This module says which implementation of
the two ops to insert. Both compute the same math:

- ``"op"``: the ``torch.ops.dora_fused.*`` custom ops. They are opaque to
  Inductor and the compose has its own backward. This is the slot where
  device kernels plug in.
- ``"torch"``: ``dora_fused.kernels.factored_row_norm_torch`` and
  ``compose_reference``, plain torch ops compiled by Inductor with the rest of
  the graph. The compose becomes one fused pointwise kernel forward, and a fused
  kernel plus a token reduction backward. Nothing runs in Python per call.

``"auto"`` picks ``"torch"`` for now. Measured on an H100 (docs/benchmarks.md),
the custom ops' per-call Python dispatch and the unfused pure-torch compose
inside them cost more than they save. That holds until device kernels sit
behind them.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["OpsImpl", "choose_ops"]

OpsImpl = Literal["auto", "op", "torch"]


def choose_ops(preference: OpsImpl) -> tuple[Literal["op", "torch"], str]:
    """The implementation to insert, and why (one line, for the record)."""
    if preference in ("op", "torch"):
        return preference, f"requested: ops={preference!r}"
    return "torch", "auto: no device kernels behind the custom ops yet; Inductor compiles the plain-torch ops"
