"""'Should' decisions, kept apart from the 'can' decisions of the matchers.

A match says a rewrite is *safe*. This module says which implementation of
each of the two ops to insert for one module. Both compute the same math:

- ``"triton"``: ``torch.ops.dora_fused.factored_row_norm`` / ``compose``.
  They are ``torch.library.triton_op``s: Inductor traces into them and
  launches their Triton kernels directly from the compiled code (no Python per
  call, CUDA-graph safe); the compose has a one-pass Triton backward. Off CUDA
  their bodies are plain torch.
- ``"lora_up"`` (compose only): ``torch.ops.dora_fused.lora_up_compose``, the
  LoRA up-projection ``h·Bᵀ`` with the compose in its epilogue (one Triton
  kernel, no ``[tokens, d_out]`` LoRA output in memory). Inference only, where
  ``LayerFacts.lora_up`` says it applies; it replaces the ``"triton"`` compose
  there, and ``"auto"``'s Inductor compose on layers that take the Triton norm.
- ``"folded"`` (compose only): ``dora_fused.kernels.lora_up_folded_compose_torch``
  (with dropout active, ``lora_up_folded_compose_with_base_torch``),
  plain torch with ``g·s`` folded into the rows of ``B``, so that the backward
  neither reads the ``[tokens, d_out]`` LoRA output nor writes its gradient.
  Training only, where ``LayerFacts.folded_lora_up`` says it applies; it replaces
  the ``"torch"`` compose there.
- ``"quantized"`` (norm only): ``torch.ops.dora_fused.quantized_row_norm``, the
  Triton norm that reads a bitsandbytes base's packed weight and dequantizes its
  tiles in registers (``kernels/quantized_norm.py``). It replaces ``"triton"``
  on LLM.int8() bases (``LayerFacts.packed_norm == "int8"``): there it took
  0.11-0.41× the time of bitsandbytes' dequantize plus the dense norm (H200,
  Llama-8B shapes, r = 16 and 64). A 4-bit base's norm reads the dequantized
  weight the graph computes, as every other quantized base's: the packed 4-bit
  norm took 1.7-2.3× that dense path's time (H100, the same shapes).
- ``"torch"``: ``dora_fused.kernels.factored_row_norm_torch`` and
  ``compose_torch`` (``compose_reference`` with a hand-written backward), plain
  torch ops that Inductor fuses with the rest of the graph (cuBLAS for the
  products, Inductor kernels for the rest).

``"auto"``, measured on an H100 and an H200 (docs/benchmarks.md):

- norm: ``"triton"`` on CUDA for 16/32-bit layers of every size, else
  ``"torch"`` (off CUDA there are no device kernels; fp64 has no tensor-core
  path). There is no small-layer fallback: compiled with Inductor's compose, the
  Triton norm took less GPU time than the plain-torch one at every size measured
  (64² at r = 8 up to 2048² at r = 64, H200: 8.6 against 15.1 µs at 64²), and
  fewer launches, so less host time where calls are launch-bound (83-124 against
  138-188 µs per call back to back);
- compose: ``"torch"``. Inductor fuses ``compose_torch`` into one pointwise
  kernel forward and one backward at the same bandwidth as the Triton kernels
  (both at the copy bandwidth), and, unlike an op with its own output, it writes
  the output over the dead base output's buffer: one ``[tokens, d_out]`` buffer
  less at the peak. ``ops="triton"`` inserts the Triton compose. Where no
  gradient is needed (``LayerFacts.lora_up``), ``"lora_up"``: it writes a new
  output in place of the LoRA output it no longer writes (the same peak), and
  saves that output's write and read. Where a gradient is needed
  (``LayerFacts.folded_lora_up``), ``"folded"``: the same forward, and a backward
  with two passes over ``[tokens, d_out]`` and one saved activation fewer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["LayerFacts", "OpsImpl", "choose_ops"]

OpsImpl = Literal["auto", "triton", "torch"]

_TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class LayerFacts:
    """What the heuristic reads about one matched layer (from node meta)."""

    device: torch.device
    d_out: int
    d_in: int
    dtypes: tuple[torch.dtype, ...]  # weight, adapters, magnitude, compose inputs
    symbolic_scaling: bool = False  # s is a traced SymFloat (torch.compile(dynamic=True))
    channel_dim: int = -1  # where the output features are: -1 (Linear), 1 (Conv: channels first)
    lora_up: bool = False  # the "lora_up" compose applies (rewrite.fusable_lora_up): inference, 16-bit B(A·x)
    folded_lora_up: bool = False  # the "folded" compose applies (rewrite.foldable_lora_up): training, B(A·x)
    packed_norm: str | None = None  # a bitsandbytes base the quantized norm can read packed, its format
    # ("int8", "nf4", "fp4"; rewrite.packed_norm_format)


Impl = Literal["triton", "torch", "quantized"]
ComposeImpl = Literal["triton", "torch", "lora_up", "folded"]


def choose_ops(preference: OpsImpl, layer: LayerFacts) -> tuple[tuple[Impl, ComposeImpl], str]:
    """(norm, compose) implementations for ``layer``, and why (one line, for the record)."""
    (norm, compose), why = _choose(preference, layer)
    if layer.packed_norm == "int8" and norm == "triton":
        norm, why = "quantized", f"{why}; int8 base: the norm reads the packed rows (no dequantized copy)"
    elif layer.packed_norm and norm == "triton":
        why = f"{why}; 4-bit base: the norm reads bitsandbytes' dequantized weight (faster than the packed codes)"
    if layer.channel_dim != -1 and compose == "triton":
        # the Triton compose takes output features on the last dim
        return (norm, "torch"), f"{why}; channels-first output: Inductor-fused compose"
    if layer.lora_up and norm == "triton":
        return (norm, "lora_up"), f"{why}; no gradient: LoRA up-projection fused with the compose"
    if layer.folded_lora_up and compose == "torch":
        return (norm, "folded"), f"{why}; training: the scale s*m/n folded into the LoRA up-projection's weight"
    return (norm, compose), why


def _choose(preference: OpsImpl, layer: LayerFacts) -> tuple[tuple[Impl, Impl], str]:
    if layer.symbolic_scaling:
        # the ops take s as a float argument; the plain-torch functions take the traced SymFloat
        return ("torch", "torch"), "symbolic scaling (dynamic=True): plain-torch ops take the traced s"
    if preference in ("triton", "torch"):
        return (preference, preference), f"requested: ops={preference!r}"
    if layer.device.type != "cuda":
        return ("torch", "torch"), f"auto: {layer.device.type} device, Triton kernels run on CUDA"
    unsupported = sorted({str(d).removeprefix("torch.") for d in layer.dtypes if d not in _TRITON_DTYPES})
    if unsupported:
        return ("torch", "torch"), f"auto: {', '.join(unsupported)} has no Triton path"
    return ("triton", "torch"), (
        "auto: Triton factored norm (tensor-core products); Inductor-fused compose (same bandwidth, reuses a buffer)"
    )
