"""Frozen inference, the runtime side: compute the folded values, and never serve a stale one.

The pass (``dora_fused.passes.folding``) leaves, per folded module, a graph
attribute and a :class:`~dora_fused.passes.folding.FoldedValue` describing how to
compute it from module state. Here :func:`materialize` computes those values from
the real parameters before the inner compiler runs, and :class:`FoldedGraph`
wraps the compiled graph:

- **The check, per call.** The parameters every folded value came from (its
  ``roots``) are remembered with their version counters: for graph inputs, the
  tensor objects themselves (a graph compiled once per layer is called with each
  layer's parameters); for graph attributes (Inductor's freezing makes parameters
  attributes), the tensors. Each call compares identities and ``_version``s, in C
  loops (``map``): about 25 ns per tensor on a CPU core.
- **On a mismatch.** Where the folded values are inputs of the compiled code (our
  graph attributes, lifted by AOTAutograd; PEFT's cached norm), the values whose
  parameters changed are recomputed *in place*: same tensors, same addresses, so
  CUDA graphs stay valid, and the call sees them at once. Where Inductor's freezing
  baked the parameters into the compiled code as constants, the graph is compiled
  again from the original graph with the current parameters (``rebuild``). Counted
  in ``torch._dynamo.utils.counters["dora_fused"]``: ``refresh``,
  ``recompile``.

Not seen: writes that bypass the version counter (``p.data.copy_(...)``,
``p.data[...] = ...``; ``p.data`` is a tensor with a counter of its own). Call
:func:`refresh_frozen` after such writes, or write through the parameter
(``with torch.no_grad(): p.copy_(...)``; ``load_state_dict`` and PEFT's
``set_peft_model_state_dict`` do).
"""

from __future__ import annotations

import logging
import operator
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.fx import GraphModule
from torch.utils._python_dispatch import _disable_current_modes

from dora_fused.passes.folding import FoldedValue, StateRef

from .folded_values import value_of

__all__ = ["FoldedGraph", "materialize", "refresh_frozen"]

log = logging.getLogger("dora_fused")
_version = operator.attrgetter("_version")
_live: weakref.WeakSet[FoldedGraph] = weakref.WeakSet()


def _count(what: str) -> None:
    torch._dynamo.utils.counters["dora_fused"][what] += 1


def _versions(tensors: Sequence[torch.Tensor | None]) -> list[int]:
    """Version counters (-1 for a freed tensor, 0 for an inference tensor, which has none)."""
    return [-1 if t is None else (0 if t.is_inference() else t._version) for t in tensors]


def _resolve(ref: StateRef, gm: GraphModule, args: Sequence[Any]) -> torch.Tensor:
    return args[ref.key] if ref.kind == "input" else _attr(gm, str(ref.key))


def _attr(gm: GraphModule, target: str) -> torch.Tensor:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _compute(value: FoldedValue, gm: GraphModule, args: Sequence[Any]) -> torch.Tensor:
    roots = [_resolve(ref, gm, args) for ref in value.roots]
    with _disable_current_modes(), torch.no_grad():
        operands = value.recipe(*roots)
        return value_of(value.kind, tuple(operands), value.scaling, value.shape, value.dtype)


def materialize(gm: GraphModule, values: Sequence[FoldedValue], args: Sequence[Any]) -> None:
    """Compute every folded value from the parameters in ``args`` / ``gm``: our attributes set, PEFT's cache written."""
    for value in values:
        computed = _compute(value, gm, args)
        if value.owned:
            gm.register_buffer(str(value.storage.key), computed)
        else:
            with _disable_current_modes(), torch.no_grad():
                _resolve(value.storage, gm, args).copy_(computed)


class FoldedGraph:
    """A compiled graph whose folded values are checked against their parameters on every call.

    ``call()`` is what the backend returns to Dynamo. ``baked``: the inner compiler made the parameters
    constants (Inductor's freezing), so a change needs ``rebuild(args)``, which
    compiles the graph again and returns the new ``FoldedGraph``; None where the
    originals were discarded (nothing can change them then).
    """

    def __init__(
        self,
        compiled: Callable[..., Any],
        gm: GraphModule,
        values: Sequence[FoldedValue],
        args: Sequence[Any],
        *,
        baked: bool,
        watched: Sequence[str] = (),
        rebuild: Callable[[list[Any]], FoldedGraph] | None = None,
        weak: bool = False,
    ) -> None:
        self.compiled = compiled
        self.gm = gm
        self.values = list(values)
        self.baked = baked
        self.rebuild = rebuild
        self.weak = weak  # hold attribute tensors by weak reference (Inductor may discard them)
        self.refreshes = 0
        self._shared_warned = False
        refs = {ref for v in self.values for ref in (*v.roots, *(() if v.owned else (v.storage,)))}
        refs |= {StateRef("attr", target) for target in watched}
        self.input_refs = sorted(r.key for r in refs if r.kind == "input")
        self.attr_refs = sorted(str(r.key) for r in refs if r.kind == "attr")
        self._pick = operator.itemgetter(*self.input_refs) if self.input_refs else None
        self._remember(args)
        _live.add(self)

    def _inputs_of(self, args: Sequence[Any]) -> tuple[torch.Tensor, ...]:
        if self._pick is None:
            return ()
        picked = self._pick(args)
        return picked if len(self.input_refs) > 1 else (picked,)

    def _attrs(self) -> list[torch.Tensor | None]:
        if self.weak:
            return [ref() for ref in self._attr_tensors]
        return self._attr_tensors

    def _remember(self, args: Sequence[Any]) -> None:
        self._inputs = self._inputs_of(args)
        self._input_versions = _versions(self._inputs)
        attrs = [_attr(self.gm, target) for target in self.attr_refs]
        self._attr_tensors = [weakref.ref(t) for t in attrs] if self.weak else attrs
        self._attr_versions = _versions(attrs)

    def stale(self, args: Sequence[Any]) -> bool:
        """Whether a parameter some folded value came from is another tensor, or was written, since it was computed."""
        if self._pick is not None:
            current = self._inputs_of(args)
            if not all(map(operator.is_, current, self._inputs)):
                return True
            try:
                if list(map(_version, current)) != self._input_versions:
                    return True
            except RuntimeError:  # an inference tensor has no version counter: compare per tensor
                if _versions(current) != self._input_versions:
                    return True
        if self.attr_refs:
            attrs = self._attrs()
            if self.weak:  # a freed tensor (Inductor discarded it) cannot be written any more: not a change
                now = _versions(attrs)
                return any(t is not None and v != w for t, v, w in zip(attrs, now, self._attr_versions, strict=True))
            if list(map(_version, attrs)) != self._attr_versions:
                return True
        return False

    def refresh(self, args: list[Any]) -> None:
        """Recompute the folded values whose parameters changed (in place), or recompile where they are baked."""
        current = self._inputs_of(args)
        saved = zip(self.input_refs, current, self._inputs, self._input_versions, strict=True)
        changed_inputs = {key for key, now, then, version in saved if now is not then or _versions([now])[0] != version}
        if changed_inputs and any(now is not then for now, then in zip(current, self._inputs, strict=True)):
            self._warn_shared()
        attrs = self._attrs()
        changed_attrs = {
            target
            for target, tensor, version in zip(self.attr_refs, attrs, self._attr_versions, strict=True)
            if tensor is not None and _versions([tensor])[0] != version
        }
        if self.baked:
            self._recompile(args, changed_inputs | changed_attrs)
            return
        for value in self.values:
            refs = (*value.roots, *(() if value.owned else (value.storage,)))
            if any(r.key in (changed_inputs if r.kind == "input" else changed_attrs) for r in refs):
                computed = _compute(value, self.gm, args)
                with _disable_current_modes(), torch.no_grad():
                    _resolve(value.storage, self.gm, args).copy_(computed)
        self.refreshes += 1
        _count("refresh")
        self._remember(args)

    def _recompile(self, args: list[Any], changed: set[object]) -> None:
        if self.rebuild is None:
            raise RuntimeError(
                "dora_fused: parameters of a graph compiled under Inductor's freezing changed "
                f"({len(changed)} tensors), and the originals were discarded, so it cannot be compiled again"
            )
        log.warning("dora_fused: %d frozen parameters changed since compile; compiling the graph again", len(changed))
        new = self.rebuild(args)
        _count("recompile")
        self.compiled, self.gm, self.values = new.compiled, new.gm, new.values
        self.rebuild = new.rebuild
        self.input_refs, self.attr_refs, self._pick = new.input_refs, new.attr_refs, new._pick
        self._remember(args)

    def _warn_shared(self) -> None:
        if not self._shared_warned:
            self._shared_warned = True
            log.warning(
                "dora_fused: a frozen graph is called with other parameters than it was compiled with (one graph "
                "shared by several modules, e.g. compiled per layer): its folded values are recomputed on every "
                "such call. Compile the whole model for frozen inference."
            )

    def invalidate(self) -> None:
        """Make the next call recompute every folded value (``refresh_frozen``)."""
        self._input_versions = [-2] * len(self._input_versions)
        self._attr_versions = [-2] * len(self._attr_versions)

    def call(self) -> Callable[..., Any]:
        """The function the backend returns (Dynamo calls it with the graph's inputs): the check, then the graph."""
        me = self

        def run(*args: Any) -> Any:
            if me.stale(args):
                me.refresh(list(args))
            return me.compiled(*args)

        run.folded = me  # type: ignore[attr-defined]
        return run


def refresh_frozen() -> int:
    """Make every live frozen graph recompute its folded values on its next call; returns how many there are.

    For writes the per-call check cannot see: through ``p.data`` (a tensor with a
    version counter of its own), or to storage shared by other means.
    """
    graphs = list(_live)
    for graph in graphs:
        graph.invalidate()
    return len(graphs)
