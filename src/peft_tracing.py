"""Let Dynamo trace PEFT's DoRA layers as one graph, for unquantized and bitsandbytes-quantized weights.

peft 0.21's ``dequantize_module_weight`` evaluates
``type(module.weight).__module__.startswith("torchao.")``, which Dynamo cannot
trace: every DoRA layer then splits into three graphs and the dense ``B·A``
never meets its norm in one graph (docs/design.md, "Why PEFT needs polyfills"). We register a Dynamo polyfill
(``torch._dynamo.substitute_in_graph``) that Dynamo inlines instead of the
original. Eager calls still run PEFT's own function; nothing in PEFT is edited.

The polyfill returns ``module.weight`` when it is a plain ``Parameter`` or
``Tensor`` and the module is not HQQ-quantized. For bitsandbytes weights
(``Params4bit``, ``Int8Params``) it calls bitsandbytes' own dequantize ops
(``bnb_dequantize``: ``torch.ops.bitsandbytes.*``, which have fake kernels),
recognized by ``isinstance`` and never reassigning ``module.weight`` (PEFT's
function reads ``weight.__class__.__name__``, a graph break, and on CPU puts a
new 8-bit Parameter in place of the module's, which loses its ``SCB``). For
anything else (HQQ, torchao, a bnb layout it does not know) it runs a copy of
PEFT's own function, so those bases keep PEFT's path exactly (torchao's tensor
subclasses trace through it: their ``dequantize()`` is in the graph).

A second polyfill covers ``peft.utils.other.transpose``, which DoRA calls on
``fan_in_fan_out`` weights (GPT-2's ``Conv1D``): PEFT wraps ``W.T`` of a
Parameter in a new ``nn.Parameter``, a constructor Dynamo cannot trace (a graph
break per layer). That new Parameter is a leaf: no gradient reaches ``W``
through it. The polyfill returns ``W.T.detach()`` for a Parameter, the same
value with the same gradient flow (none to ``W``), and ``W.T`` otherwise, as PEFT.
"""

from __future__ import annotations

import importlib.util
import types

import torch

from .quantized_bases import bnb_dequantize

__all__ = ["enable_peft_tracing", "peft_tracing_enabled"]

_enabled = False


def _copy_function(fn: types.FunctionType) -> types.FunctionType:
    """A distinct function object with ``fn``'s code: Dynamo traces it as the original."""
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


def peft_tracing_enabled() -> bool:
    return _enabled


def enable_peft_tracing() -> bool:
    """Register the polyfill once per process; True if PEFT is installed and it is active."""
    global _enabled
    if _enabled:
        return True
    if importlib.util.find_spec("peft") is None:
        return False
    from peft.utils import integrations, other
    from torch._dynamo.trace_rules import _polyfilled_function_ids

    original = integrations.dequantize_module_weight
    if id(original) not in _polyfilled_function_ids:  # else registered by an earlier import of this module
        peft_path = _copy_function(original)

        @torch._dynamo.substitute_in_graph(original)
        def dequantize_module_weight(module: torch.nn.Module) -> torch.Tensor:
            if hasattr(module, "W_q"):  # HQQ: PEFT calls its dequantize()
                return peft_path(module)
            weight = module.weight
            if type(weight) in (torch.nn.Parameter, torch.Tensor):
                return weight
            dequantized = bnb_dequantize(module)
            if dequantized is not None:
                return dequantized
            return peft_path(module)

    if id(other.transpose) not in _polyfilled_function_ids:

        @torch._dynamo.substitute_in_graph(other.transpose)
        def transpose(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
            if not fan_in_fan_out:
                return weight
            if isinstance(weight, torch.nn.Parameter):
                return weight.T.detach()  # PEFT: nn.Parameter(weight.T), a leaf cut off from W
            return weight.T

    _enabled = True
    return True
