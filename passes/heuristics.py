"""'Should' decisions, kept apart from the 'can' decisions of the matchers.

A match says a rewrite is *safe*. This module says which implementation of
the two ops to insert for one module. Both compute the same math:

- ``"triton"``: ``torch.ops.dora_fused.factored_row_norm`` / ``compose``.
  They are ``torch.library.triton_op``s: Inductor traces into them and
  launches their Triton kernels directly from the compiled code (no Python per
  call, CUDA-graph safe); the compose has a one-pass Triton backward. Off CUDA
  their bodies are plain torch.
- ``"torch"``: ``dora_fused.kernels.factored_row_norm_torch`` and
  ``compose_reference``, plain torch ops that Inductor fuses with the rest of
  the graph (cuBLAS for the products, Inductor kernels for the rest).

``"auto"`` takes ``"triton"`` on CUDA for 16/32-bit layers of at least
``MIN_TRITON_WEIGHT`` elements, and ``"torch"`` otherwise: off CUDA there are
no device kernels, fp64 has no tensor-core path, and in the smallest layers
each extra launch costs more than the fused kernels save (the threshold comes
from ``benchmarks/ops.py``, docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["MIN_TRITON_WEIGHT", "LayerFacts", "OpsImpl", "choose_ops"]

OpsImpl = Literal["auto", "triton", "torch"]

# d_out·d_in below which "auto" keeps the plain-torch ops (see the module docstring).
MIN_TRITON_WEIGHT = 1 << 20

_TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class LayerFacts:
    """What the heuristic reads about one matched layer (from node meta)."""

    device: torch.device
    d_out: int
    d_in: int
    dtypes: tuple[torch.dtype, ...]  # weight, adapters, magnitude, compose inputs


def choose_ops(preference: OpsImpl, layer: LayerFacts) -> tuple[Literal["triton", "torch"], str]:
    """The implementation to insert for ``layer``, and why (one line, for the record)."""
    if preference in ("triton", "torch"):
        return preference, f"requested: ops={preference!r}"
    if layer.device.type != "cuda":
        return "torch", f"auto: {layer.device.type} device, Triton kernels run on CUDA"
    unsupported = sorted({str(d).removeprefix("torch.") for d in layer.dtypes if d not in _TRITON_DTYPES})
    if unsupported:
        return "torch", f"auto: {', '.join(unsupported)} has no Triton path"
    size = layer.d_out * layer.d_in
    if size < MIN_TRITON_WEIGHT:
        return "torch", f"auto: small layer ({layer.d_out}x{layer.d_in} < {MIN_TRITON_WEIGHT} weights), launch-bound"
    return "triton", "auto: CUDA layer, Triton kernels (factored norm on tensor cores, one-pass compose)"
