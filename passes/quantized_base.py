"""Quantized bases: the dequantize subgraphs the forms accept as the base weight ``W``.

PEFT's DoRA layers read ``W`` through ``dequantize_module_weight``. With the
tracing polyfill (``dora_fused.peft_tracing``) the graph then holds, as ``W``:

- a parameter (an unquantized base): ``W`` is a graph input, maybe transposed or detached;
- bitsandbytes 4-bit (``"bnb-nf4"``, ``"bnb-fp4"``; ``-dq`` with double quantization)::

      W = bitsandbytes.dequantize_4bit(packed, absmax, blocksize, quant_type, shape, dtype)
      absmax = input  |  bitsandbytes.dequantize_blockwise(absmax8, absmax2, code2, 256, fp32) + offset

- bitsandbytes 8-bit (``"bnb-int8"``): ``W = bitsandbytes.int8_vectorwise_dequant(CB, SCB)``;
- torchao (``"torchao-int8"``: ``Int8Tensor``; ``"torchao-intx"``: ``IntxUnpackedToInt8Tensor``):
  ``W = input.dequantize()`` of the tensor subclass, which AOTAutograd later traces into torchao's own ops.

Each of these is recognized exactly (targets, the inputs' dtypes, the
constant arguments) and described by a :class:`QuantizedBase`. Any other way
of computing ``W`` (another quantizer's dequantize, a torchao tensor class not
listed, a tensor subclass used as the weight) raises ``Unsupported``: the
module keeps its graph as traced, PEFT's own path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import Node

from .graph_view import arg, example_value, op_of, strip
from .outcomes import Unsupported

__all__ = ["TORCHAO_SCHEMES", "QuantizedBase", "match_quantized_base"]

# torchao tensor classes whose dequantize() the tests prove against fp64 (CPU), and the scheme each is recorded as
TORCHAO_SCHEMES = {"Int8Tensor": "torchao-int8", "IntxUnpackedToInt8Tensor": "torchao-intx"}
_VIEWS = ("detach", "t", "transpose", "view", "to", "float")  # views, and casts of the dtype alone (``strip``)


@dataclass(frozen=True)
class QuantizedBase:
    """A base weight the graph dequantizes with a recognized op: ``W = dequantize(packed, scales)``."""

    scheme: str  # "bnb-nf4", "bnb-fp4", "bnb-nf4-dq", "bnb-fp4-dq", "bnb-int8", "torchao-int8", "torchao-intx"
    dequantize: Node  # the node whose value is W
    packed: Node  # the quantized weight: uint8 4-bit codes, int8 rows, or torchao's tensor subclass
    scales: Node | None = None  # bnb: fp32 block absmax (after double dequantization) or row SCB; torchao: None
    blocksize: int = 0  # bnb 4-bit: values per absmax
    quant_type: str = ""  # bnb 4-bit: "nf4" or "fp4"
    nodes: tuple[Node, ...] = field(default_factory=tuple)  # the dequantize, erased where the rewrite leaves it unused

    @property
    def dtype(self) -> torch.dtype:
        """The dequantized weight's dtype."""
        return example_value(self.dequantize).dtype

    @property
    def packed_bytes(self) -> int:
        """Bytes of the quantized weight with its scales, as stored (for the records' memory estimates)."""
        total = 0
        for node in (self.packed, self.scales):
            value = example_value(node)
            if value is not None and type(value) in (torch.Tensor, torch._subclasses.FakeTensor, torch.nn.Parameter):
                total += value.numel() * value.element_size()
        return total


def _target_name(node: Node) -> str:
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    if node.op != "call_function" or packet is None:
        return ""
    return f"{packet.__module__.removeprefix('torch._ops.')}.{packet.__name__}.{target._overloadname}"


def _input(node: object, dtype: torch.dtype, what: str) -> Node:
    """``node`` as a graph input of ``dtype`` (a parameter, buffer or attribute the graph lifted), else Unsupported."""
    value = example_value(node)
    if op_of(node) != "input" or value is None or value.dtype != dtype:
        raise Unsupported(f"bitsandbytes dequantize with {what} that is not a {dtype} input")
    return node


def _bnb_absmax(node: object) -> tuple[Node, bool]:
    """``(absmax, nested)``: a 4-bit weight's fp32 block scales as the graph computes them."""
    if op_of(node) == "input":
        return _input(node, torch.float32, "an absmax"), False
    if op_of(node) != "add" or len(node.args) != 2:
        raise Unsupported("bitsandbytes 4-bit absmax computed by unrecognized ops")
    inner, offset = node.args
    if _target_name(inner) != "bitsandbytes.dequantize_blockwise.default" or len(inner.args) < 5:
        raise Unsupported("bitsandbytes 4-bit absmax computed by unrecognized ops")
    quantized, absmax2, code2, blocksize2, dtype = inner.args[:5]
    _input(quantized, torch.uint8, "an 8-bit absmax")
    _input(absmax2, torch.float32, "a second-level absmax")
    _input(code2, torch.float32, "a second-level code")
    _input(offset, torch.float32, "an absmax offset")
    if blocksize2 != 256 or dtype != torch.float32:
        raise Unsupported("bitsandbytes double quantization other than fp32 blocks of 256")
    return node, True


def _bnb_4bit(node: Node) -> QuantizedBase:
    packed, absmax, blocksize, quant_type, shape, dtype = (arg(node, i, n) for i, n in enumerate(
        ("A", "absmax", "blocksize", "quant_type", "shape", "dtype")))  # fmt: skip
    packed = _input(packed, torch.uint8, "packed codes")
    scales, nested = _bnb_absmax(absmax)
    value = example_value(node)
    if quant_type not in ("nf4", "fp4") or not isinstance(blocksize, int) or value is None or value.dim() != 2:
        raise Unsupported("bitsandbytes 4-bit dequantize with unrecognized arguments")
    if list(shape) != list(value.shape) or dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise Unsupported("bitsandbytes 4-bit dequantize with unrecognized arguments")
    scheme = f"bnb-{quant_type}" + ("-dq" if nested else "")
    return QuantizedBase(scheme, node, packed, scales, blocksize, quant_type, (node,))


def _bnb_int8(node: Node) -> QuantizedBase:
    rows = _input(arg(node, 0, "A"), torch.int8, "int8 rows")
    scales = _input(arg(node, 1, "stats"), torch.float32, "row scales")
    return QuantizedBase("bnb-int8", node, rows, scales, nodes=(node,))


def _torchao(node: Node) -> QuantizedBase:
    source = node.args[0] if node.args else None
    value = example_value(source)
    cls = type(value)
    if op_of(source) != "input" or value is None or not cls.__module__.startswith("torchao."):
        raise Unsupported("dequantize() of something other than a torchao weight")
    scheme = TORCHAO_SCHEMES.get(cls.__name__)
    if scheme is None or len(node.args) != 1 or node.kwargs:
        raise Unsupported(f"torchao {cls.__name__} weights are not a recognized quantized base")
    return QuantizedBase(scheme, node, source, nodes=(node,))


def _is_plain(value: torch.Tensor) -> bool:
    """A dense tensor (Dynamo's fake of a parameter or buffer), not a tensor subclass of some quantizer."""
    return isinstance(value, torch._subclasses.FakeTensor) or type(value) in (torch.Tensor, torch.nn.Parameter)


def match_quantized_base(weight: object) -> QuantizedBase | None:
    """The quantized base ``weight`` (W, its casts stripped) is dequantized from; None for a plain parameter.

    Raises ``Unsupported`` where ``W`` is computed in the graph by anything this
    module does not recognize (module docstring).
    """
    root = strip(weight, _VIEWS)
    if op_of(root) == "input":
        value = example_value(root)
        if value is not None and not _is_plain(value):
            raise Unsupported(f"the base weight is a {type(value).__name__}, not a dense tensor")
        return None
    if root is not weight:
        raise Unsupported("the base weight is a view of a computed value, not a parameter or a dequantize")
    name = _target_name(weight) if isinstance(weight, Node) else ""
    if name == "bitsandbytes.dequantize_4bit.default":
        return _bnb_4bit(weight)
    if name == "bitsandbytes.int8_vectorwise_dequant.default":
        return _bnb_int8(weight)
    if isinstance(weight, Node) and weight.op == "call_method" and weight.target == "dequantize":
        return _torchao(weight)
    what = name or (str(weight.target) if isinstance(weight, Node) else type(weight).__name__)
    raise Unsupported(f"the base weight is computed by {what}, not a parameter or a recognized dequantize")
