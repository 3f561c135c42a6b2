"""The interface every DoRA form implements: what a matcher returns, and the form's table entry.

A form is a search form (a matcher from an anchor node) and its replacement.
Its matcher returns a :class:`DoraMatch` subclass (or raises ``NotDora`` /
``Unsupported``, see ``matching``), which tells the pass everything it needs
without knowing the form:

- ``norm``: the ``W + s·B·A`` under the row norm (None where the graph computes
  no norm: PEFT's cached norm);
- ``magnitude`` (``m``), ``root`` (the node whose value the replacement gives)
  and ``nodes`` (the matched subgraph, erased where left without users);
- ``inputs``: every graph value the replacement reads (the in-place-write guard
  checks them);
- ``layer_shape`` ``(d_out, d_in)`` of the rows the norm runs over, and
  ``channel_dim``, where the output features are (-1: Linear, 1: Conv);
- ``kind``: the label of the module in records, when it is not the form's own.

Forms whose replacement is the factored norm plus PEFT's compose
``g·(result - b + s·lora) + b`` (PEFT Linear, Embedding, Conv, the cached norm,
torchtune-style modules) return a :class:`ComposeMatch` and share one rewrite
(``rewrite.rewrite_with_compose``); they differ only in what they match.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from torch.fx import Graph, Node

from .matching import NORMS, LowRankSum

__all__ = ["ComposeMatch", "DoraMatch", "Form", "Scope"]


@dataclass(kw_only=True)
class DoraMatch:
    """What every form's matcher finds (see the module docstring)."""

    norm: LowRankSum | None
    magnitude: Node
    root: Node
    nodes: list[Node] = field(default_factory=list)
    channel_dim: int = -1

    # fields (of subclasses too) holding graph values the replacement reads, besides the norm's W, A, B, s
    READS: ClassVar[tuple[str, ...]] = ("magnitude",)

    @property
    def kind(self) -> str | None:
        """The record's label of the module, where a match knows better than its form (else None)."""
        return None

    @property
    def layer_shape(self) -> tuple[int, int]:
        """``(d_out, d_in)`` of the rows the norm runs over."""
        assert self.norm is not None, "a match without a norm gives its layer shape itself"
        return self.norm.layer_shape

    @property
    def base_weight(self) -> Node | None:
        """``W`` of the layer."""
        return self.norm.weight if self.norm is not None else None

    @property
    def adapter_factors(self) -> tuple[Node, Node]:
        """``(A, B)``: the low-rank factors, as the norm reads them."""
        assert self.norm is not None, "a match without a norm gives its factors itself"
        return self.norm.lora_A, self.norm.lora_B

    @property
    def base_output(self) -> Node | None:
        """The base layer's output already in the graph (the norm goes right after it), if the form has one."""
        return None

    @property
    def scalings(self) -> tuple[float | Node, ...]:
        """Every ``s`` the replacement takes: a Python float, or a traced SymFloat's node."""
        return (self.norm.scaling,) if self.norm is not None else ()

    @property
    def operands(self) -> tuple[Node, ...]:
        """The tensors whose dtypes decide the implementation: W, A, B, m (and the compose's inputs)."""
        return tuple(n for n in (self.base_weight, *self.adapter_factors, self.magnitude) if n is not None)

    @property
    def inputs(self) -> set[Node]:
        """Every graph value the replacement reads."""
        values: list[object] = [getattr(self, name) for name in self.READS]
        if self.norm is not None:
            values += [self.norm.weight, self.norm.lora_A, self.norm.lora_B, self.norm.scaling]
        return {v for v in values if isinstance(v, Node)}


@dataclass(kw_only=True)
class ComposeMatch(DoraMatch):
    """A form replaced by the factored norm and PEFT's compose: ``root = result + (g-1)·base + g·s·lora``."""

    result: Node  # the base layer's output
    lora: Node  # the LoRA output B(A(x)), before the scaling
    scaling: float | Node  # the compose's s (PEFT reads the same value again for the norm)
    bias: Node | None = None  # b as PEFT subtracts it (``base = result - b``)
    base: Node | None = None  # a separate base output (dropout active: the base layer on the dropped input)
    stored: list[Node] = field(default_factory=list)  # norm values PEFT's DoRA cache keeps (graph outputs)
    lora_factor: Node | None = None  # one scale the DoRA term is multiplied by (Gemma's embed_scale)
    weight_norm: Node | None = None  # the norm as a graph input (PEFT's cache), where ``norm`` is None

    READS: ClassVar[tuple[str, ...]] = (
        "magnitude",
        "result",
        "lora",
        "scaling",
        "bias",
        "base",
        "lora_factor",
        "weight_norm",
    )

    @property
    def base_output(self) -> Node | None:
        return self.result

    @property
    def scalings(self) -> tuple[float | Node, ...]:
        return (*super().scalings, self.scaling)

    @property
    def operands(self) -> tuple[Node, ...]:
        return (*super().operands, self.result, self.lora)


Scope = Literal["peft", "outside_peft", "any"]  # where a form's norm runs: inside a PEFT DoRA layer or not


@dataclass(frozen=True)
class Form:
    """One row of the forms table (``patterns.FORMS``)."""

    name: str  # the record's ``form``
    kind: str  # the record's ``kind`` of a matched module, unless the match says otherwise
    description: str
    match: Callable[[Node], DoraMatch]  # anchor -> match; raises NotDora / Unsupported
    rewrite: Callable[[Graph, DoraMatch, tuple[str, str]], tuple[str, ...]]  # (graph, match, impls) -> ops inserted
    anchors: tuple[str, ...] = NORMS  # the ops (graph_view.op_of names) a match starts from
    scope: Scope = "any"  # PEFT's layers carry their norm in ``lora_magnitude_vector.<adapter>``

    def applies_to(self, in_peft_layer: bool) -> bool:
        return self.scope == "any" or (self.scope == "peft") == in_peft_layer
