"""Quantized base weights PEFT's DoRA dequantizes: how to trace bitsandbytes' dequantize, and the schemes' names.

``bnb_dequantize`` is what the tracing polyfill (``peft_tracing``) runs in place
of PEFT's ``dequantize_module_weight`` for bitsandbytes weights. It computes the
same value as PEFT's function (which calls ``bnb.functional.dequantize_4bit`` /
``int8_vectorwise_dequant``) from bitsandbytes' own ops, which Dynamo traces
through their fake kernels:

- ``Params4bit`` (NF4 / FP4)::

      absmax = quant_state.absmax                                   # fp32 [blocks]
      absmax = dequantize_blockwise(absmax, state2.absmax, state2.code, state2.blocksize, fp32)
               + quant_state.offset                                 # double quantization (``nested``)
      W      = dequantize_4bit(packed, absmax, blocksize, quant_type, shape, quant_state.dtype)

- ``Int8Params`` (LLM.int8(), row-wise absmax ``SCB``)::

      W = int8_vectorwise_dequant(CB, SCB)                          # CB · SCB / 127, fp32

It returns None (the caller keeps PEFT's path) for anything else: bitsandbytes
not imported, weights of other types, a 4-bit weight in bitsandbytes' CPU
inference layout (``packing_format_for_cpu``), a 4-bit weight packed in another
storage dtype than uint8 or in the transposed legacy layout, nested
quantization with a second-level blocksize other than 256, an 8-bit weight
without its scales. It never reassigns ``module.weight``.

``base_quantization`` names a layer's scheme as the records report it.
"""

from __future__ import annotations

import sys

import torch

__all__ = ["BNB_SCHEMES", "base_quantization", "bnb_dequantize", "bnb_scheme"]

BNB_SCHEMES = ("bnb-nf4", "bnb-nf4-dq", "bnb-fp4", "bnb-fp4-dq", "bnb-int8")


def _bnb_modules():
    """bitsandbytes' ``nn`` where bitsandbytes is already imported (never imports it: a bnb weight implies it)."""
    bnb = sys.modules.get("bitsandbytes")
    return getattr(bnb, "nn", None) if bnb is not None else None


def _quant_state_ok(weight: torch.Tensor, state: object) -> bool:
    """A 4-bit state this module dequantizes exactly as bitsandbytes does."""
    if state is None or getattr(state, "packing_format_for_cpu", False):
        return False
    if weight.dtype != torch.uint8 or weight.dim() != 2 or weight.shape[1] != 1 or len(state.shape) != 2:
        return False  # another quant_storage, or the transposed [1, n] legacy layout
    if state.quant_type not in ("nf4", "fp4") or state.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    return not state.nested or state.state2.blocksize == 256


def bnb_scheme(module: torch.nn.Module) -> str | None:
    """``"bnb-nf4"``, ``"bnb-fp4"`` (``-dq`` with double quantization), ``"bnb-int8"``, or None: not a bnb weight."""
    nn = _bnb_modules()
    if nn is None:
        return None
    weight = getattr(module, "weight", None)
    if isinstance(weight, nn.Params4bit):
        state = weight.quant_state
        if not _quant_state_ok(weight, state):
            return None
        return f"bnb-{state.quant_type}" + ("-dq" if state.nested else "")
    if isinstance(weight, nn.Int8Params) and weight.dtype == torch.int8:
        return "bnb-int8" if _int8_scales(module, weight) is not None else None
    return None


def _int8_scales(module: torch.nn.Module, weight: torch.Tensor) -> torch.Tensor | None:
    """``SCB`` of an 8-bit weight: the layer's matmul state holds it after the first forward, the weight before."""
    state = getattr(module, "state", None)
    scales = getattr(state, "SCB", None) if state is not None else None
    return scales if scales is not None else getattr(weight, "SCB", None)


def bnb_dequantize(module: torch.nn.Module) -> torch.Tensor | None:
    """The dequantized weight of a bitsandbytes layer, from bitsandbytes' ops; None where it is not one (see above)."""
    nn = _bnb_modules()
    if nn is None:
        return None
    weight = module.weight
    if isinstance(weight, nn.Params4bit):
        state = weight.quant_state
        if not _quant_state_ok(weight, state):
            return None
        absmax = state.absmax
        if state.nested:
            second = state.state2
            absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(
                absmax, second.absmax, second.code, second.blocksize, torch.float32
            )
            absmax = absmax + state.offset
        return torch.ops.bitsandbytes.dequantize_4bit.default(
            weight, absmax, state.blocksize, state.quant_type, list(state.shape), state.dtype
        )
    if isinstance(weight, nn.Int8Params) and weight.dtype == torch.int8:
        scales = _int8_scales(module, weight)
        if scales is None:
            return None
        return torch.ops.bitsandbytes.int8_vectorwise_dequant.default(weight, scales)
    return None


def base_quantization(layer: torch.nn.Module) -> tuple[str | None, torch.dtype | None]:
    """``(scheme, dequantized dtype)`` of a PEFT layer's base (the audit's records); ``(None, None)`` if unquantized.

    bitsandbytes and torchao as the records name them; HQQ ``"hqq"``; any other
    tensor subclass its class name.
    """
    weight = getattr(layer, "weight", None)
    scheme = bnb_scheme(layer)
    if scheme is not None:
        return scheme, torch.float32 if scheme == "bnb-int8" else weight.quant_state.dtype
    if hasattr(layer, "W_q"):
        return "hqq", None
    if weight is None or type(weight) in (torch.nn.Parameter, torch.Tensor):
        return None, None
    cls = type(weight)
    if cls.__module__.startswith("torchao."):
        from dora_fused.passes.quantized_base import TORCHAO_SCHEMES

        return TORCHAO_SCHEMES.get(cls.__name__, f"torchao:{cls.__name__}"), weight.dtype
    return cls.__name__, None
