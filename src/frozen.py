"""Frozen inference, the runtime side: compute the folded values, and never serve a stale one.

The pass (``dora_fused.passes.folding``) leaves, per folded module, a graph
attribute and a :class:`~dora_fused.passes.folding.FoldedValue` describing how to
compute it from module state. Here :func:`materialize` computes those values from
the real parameters before the inner compiler runs, and :class:`FoldedGraph`
wraps the compiled graph:

- **The check, per call.** The parameters every folded value came from (its
  ``roots``) are remembered with their version counters and data pointers: for
  graph inputs, the tensor objects themselves; for graph attributes (Inductor's
  freezing makes parameters attributes), the tensors. Each call compares
  identities, ``_version``s (in-place writes) and ``data_ptr()``s (``p.data = new``
  keeps the version) in C loops (``map``).
- **Other parameters.** One Dynamo graph can serve several modules (identical
  layers compiled one by one): called with other parameter tensors, the graph is
  compiled again for them, once (a *variant*, up to ``MAX_VARIANTS``; Inductor's
  cache makes it cheap), and each call picks its variant by the parameters' identity.
- **A changed parameter.** Where the folded values are inputs of the compiled code
  (our graph attributes, lifted by AOTAutograd; PEFT's cached norm), the values
  whose parameters changed are recomputed *in place*: same tensors, same
  addresses, so CUDA graphs stay valid, and the call sees them at once. Where
  Inductor's freezing baked the parameters into the compiled code, the graph is
  compiled again with the current parameters.
- **PEFT's cache tensors** are checked for identity (PEFT refilling its cache puts
  new tensors there) and not for writes: the graphs of one model (the prefill's
  shape and the decode step's) read the same cache tensors, and each one's
  refresh writes them, with the value of the current parameters. Checking their
  versions would have each graph recompute them after the other's refresh.

Counted in ``torch._dynamo.utils.counters["dora_fused"]``: ``refresh``,
``recompile``, ``variant``.

Not seen: in-place writes that bypass the version counter (``p.data.copy_(...)``,
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

__all__ = ["MAX_VARIANTS", "FoldedGraph", "Variant", "materialize", "refresh_frozen"]

log = logging.getLogger("dora_fused")
MAX_VARIANTS = 64  # compiled variants of one graph for other parameters; beyond, values are recomputed per switch
_version = operator.attrgetter("_version")
_data_ptr = torch._C.TensorBase.data_ptr  # unbound: no method lookup on Parameter, a subclass
_live: weakref.WeakSet[FoldedGraph] = weakref.WeakSet()


def _count(what: str) -> None:
    torch._dynamo.utils.counters["dora_fused"][what] += 1


def _versions(tensors: Sequence[torch.Tensor | None]) -> list[int]:
    """Version counters (-1 for a freed tensor, 0 for an inference tensor, which has none)."""
    return [-1 if t is None else (0 if t.is_inference() else t._version) for t in tensors]


def _pointers(tensors: Sequence[torch.Tensor | None]) -> list[int]:
    return [-1 if t is None else t.data_ptr() for t in tensors]


def _tuple_getter(positions: Sequence[int]) -> Callable[[Sequence[Any]], tuple[Any, ...]]:
    """``seq -> tuple(seq[i] for i in positions)``, by ``itemgetter`` (a C call) wherever it returns a tuple."""
    if len(positions) > 1:
        return operator.itemgetter(*positions)
    return lambda seq: tuple(seq[i] for i in positions)


def _attr(gm: GraphModule, target: str) -> torch.Tensor:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _resolve(ref: StateRef, gm: GraphModule, args: Sequence[Any]) -> torch.Tensor:
    return args[ref.key] if ref.kind == "input" else _attr(gm, str(ref.key))


def _compute(value: FoldedValue, gm: GraphModule, args: Sequence[Any]) -> torch.Tensor:
    roots = [_resolve(ref, gm, args) for ref in value.roots]
    with _disable_current_modes(), torch.no_grad():
        operands = value.recipe(*roots)
        return value_of(value.kind, tuple(operands), value.scaling, value.shape, value.dtype)


def _depends_on(value: FoldedValue) -> tuple[StateRef, ...]:
    """What a value is checked against: its roots, and PEFT's cache tensor where it lives there."""
    return (*value.roots, *(() if value.owned else (value.storage,)))


def materialize(gm: GraphModule, values: Sequence[FoldedValue], args: Sequence[Any]) -> None:
    """Compute every folded value from the parameters in ``args`` / ``gm``: our attributes set, PEFT's cache written.

    Our attributes are normal tensors even when compiled under ``torch.inference_mode()``,
    so that a later refresh may write them in or out of it.
    """
    for value in values:
        if value.owned:
            with torch.inference_mode(False):
                computed = _compute(value, gm, args)
            gm.register_buffer(str(value.storage.key), computed)
            continue
        _write(_resolve(value.storage, gm, args), _compute(value, gm, args))


def _write(target: torch.Tensor, value: torch.Tensor) -> None:
    """``target.copy_(value)``, in inference mode where ``target`` is an inference tensor (PEFT's cache made in one)."""
    with _disable_current_modes(), torch.no_grad(), torch.inference_mode(target.is_inference()):
        target.copy_(value)


class Variant:
    """One compiled graph, the folded values it reads, and the parameters (identity, version) they came from."""

    def __init__(
        self,
        compiled: Callable[..., Any],
        gm: GraphModule,
        values: Sequence[FoldedValue],
        args: Sequence[Any],
        watched: Sequence[str] = (),
        weak: bool = False,
    ) -> None:
        self.compiled = compiled
        self.gm = gm
        self.values = list(values)
        self.weak = weak  # attribute tensors by weak reference: Inductor may discard them
        refs = {ref for v in self.values for ref in _depends_on(v)} | {StateRef("attr", t) for t in watched}
        self.input_refs = sorted(int(r.key) for r in refs if r.kind == "input")
        roots = {int(r.key) for v in self.values for r in v.roots if r.kind == "input"}
        cache_only = {int(v.storage.key) for v in self.values if not v.owned and v.storage.kind == "input"} - roots
        # the positions in ``input_refs`` whose writes are checked: all but PEFT's cache tensors
        versioned = [i for i, key in enumerate(self.input_refs) if key not in cache_only]
        self._written = tuple if len(versioned) == len(self.input_refs) else _tuple_getter(versioned)
        self._versioned_keys = [self.input_refs[i] for i in versioned]
        self.attr_refs = sorted(str(r.key) for r in refs if r.kind == "attr")
        self._pick = operator.itemgetter(*self.input_refs) if self.input_refs else None
        # the parameters of the values this variant holds itself (not PEFT's cache, which each module has its own)
        owned = sorted({int(r.key) for v in self.values if v.owned for r in v.roots if r.kind == "input"})
        self._pick_key = operator.itemgetter(*owned) if owned else None
        self._one_key = len(owned) == 1
        self.remember(args)

    def inputs_of(self, args: Sequence[Any]) -> tuple[torch.Tensor, ...]:
        if self._pick is None:
            return ()
        picked = self._pick(args)
        return picked if len(self.input_refs) > 1 else (picked,)

    def key(self, args: Sequence[Any]) -> tuple[int, ...]:
        """The identity of the parameters ``args`` pass for the values the variant holds, which picks the variant."""
        if self._pick_key is None:
            return ()
        picked = self._pick_key(args)
        return (id(picked),) if self._one_key else tuple(map(id, picked))

    def _attrs(self) -> list[torch.Tensor | None]:
        return [ref() for ref in self._attr_tensors] if self.weak else self._attr_tensors

    def remember(self, args: Sequence[Any]) -> None:
        self.inputs: tuple[torch.Tensor, ...] | None = self.inputs_of(args)
        self.input_versions = _versions(self._written(self.inputs))
        self.input_pointers = _pointers(self.inputs)
        self._inference = any(t.is_inference() for t in self.inputs)  # no version counter: read one by one
        attrs = [_attr(self.gm, target) for target in self.attr_refs]
        self._attr_tensors = [weakref.ref(t) for t in attrs] if self.weak else attrs
        self.attr_versions = _versions(attrs)
        self.attr_pointers = _pointers(attrs)
        self._weak_inputs: list[weakref.ref] = []

    def demote(self) -> None:
        """No longer the graph's current variant: hold its parameters weakly, so that replaced ones can go."""
        if self.inputs is not None:
            self._weak_inputs = [weakref.ref(t) for t in self.inputs]
            self.inputs = None

    def promote(self) -> bool:
        """The current variant again: False if one of its parameters is gone (the variant is of no more use)."""
        if self.inputs is None:
            inputs = tuple(ref() for ref in self._weak_inputs)
            if any(t is None for t in inputs):
                return False
            self.inputs = inputs
        return True

    @property
    def alive(self) -> bool:
        return self.inputs is not None or all(ref() is not None for ref in self._weak_inputs)

    def stale(self, args: Sequence[Any]) -> bool:
        """Whether a parameter a folded value came from is another tensor, or was written, since it was computed."""
        if self._pick is not None:
            current = self.inputs_of(args)
            if self.inputs is None or not all(map(operator.is_, current, self.inputs)):
                return True
            written = self._written(current)
            versions = _versions(written) if self._inference else list(map(_version, written))
            if versions != self.input_versions:
                return True
            if list(map(_data_ptr, current)) != self.input_pointers:
                return True
        if self.attr_refs:
            attrs = self._attrs()
            if self.weak:  # a freed tensor (Inductor discarded it) cannot be written any more: not a change
                now = zip(attrs, _versions(attrs), _pointers(attrs), strict=True)
                saved = zip(now, self.attr_versions, self.attr_pointers, strict=True)
                return any(t is not None and (v != w or p != q) for (t, v, p), w, q in saved)
            if list(map(_version, attrs)) != self.attr_versions or list(map(_data_ptr, attrs)) != self.attr_pointers:
                return True
        return False

    def changed(self, args: Sequence[Any]) -> set[object]:
        """The keys of the input and attribute references whose tensor, version or data pointer differs."""
        current = self.inputs_of(args)
        then = self.inputs if self.inputs is not None else (None,) * len(current)
        versions = dict(zip(self._versioned_keys, self.input_versions, strict=True))
        saved = zip(self.input_refs, current, then, self.input_pointers, strict=True)
        changed: set[object] = {
            key
            for key, now, old, p in saved
            if now is not old or now.data_ptr() != p or (key in versions and _versions([now])[0] != versions[key])
        }
        attrs = zip(self.attr_refs, self._attrs(), self.attr_versions, self.attr_pointers, strict=True)
        changed |= {
            target for target, t, v, p in attrs if t is not None and (_versions([t])[0] != v or t.data_ptr() != p)
        }
        return changed

    def refresh(self, args: Sequence[Any]) -> None:
        """Recompute, in place, the folded values whose parameters changed."""
        changed = self.changed(args)
        for value in self.values:
            if any(ref.key in changed for ref in _depends_on(value)):
                _write(_resolve(value.storage, self.gm, args), _compute(value, self.gm, args))
        _count("refresh")
        self.remember(args)

    def invalidate(self) -> None:
        self.input_versions = [-2] * len(self.input_versions)
        self.attr_versions = [-2] * len(self.attr_versions)


class FoldedGraph:
    """A compiled graph whose folded values are checked against their parameters on every call.

    ``call()`` is what the backend returns to Dynamo. ``baked``: the inner compiler
    made the parameters constants (Inductor's freezing), so a change needs
    ``rebuild(args)``, which compiles the original graph again for ``args``'
    parameters and returns its :class:`Variant`. ``rebuild`` also compiles the
    variants for other parameters; it is None where the originals were discarded.
    """

    def __init__(
        self,
        first: Variant,
        args: Sequence[Any],
        *,
        baked: bool,
        rebuild: Callable[[list[Any]], Variant] | None = None,
    ) -> None:
        self.baked = baked
        self.rebuild = rebuild
        self.current = first
        self.current_key = first.key(args)
        self.variants: dict[tuple[int, ...], Variant] = {self.current_key: first}
        self._warned = False
        _live.add(self)

    def dispatch(self, args: list[Any]) -> Variant:
        """The variant for ``args``' parameters, its folded values current (compiling or recomputing as needed)."""
        key = self.current.key(args)
        if key != self.current_key:
            self.current.demote()
            self.variants = {k: v for k, v in self.variants.items() if v.alive}  # parameters replaced: gone
            variant = self.variants.get(key)
            if variant is not None and not variant.promote():
                variant = self.variants.pop(key)  # an id reused by a new tensor: not its parameters
                variant = None
            if variant is None and self.rebuild is not None and len(self.variants) < MAX_VARIANTS:
                log.info("dora_fused: compiling a frozen graph for another set of parameters (%d)", len(self.variants))
                variant = self.variants[key] = self.rebuild(args)
                _count("variant")
            elif variant is None:  # no more variants: the current one's values are recomputed for these parameters
                self._warn_shared()
                variant = self.current
                variant.promote()
            self.current, self.current_key = variant, key
        variant = self.current
        if variant.stale(args):
            if self.baked:
                variant = self._recompile(args, key)
            else:
                variant.refresh(args)
        return variant

    def _recompile(self, args: list[Any], key: tuple[int, ...]) -> Variant:
        if self.rebuild is None:
            raise RuntimeError(
                "dora_fused: parameters of a graph compiled under Inductor's freezing changed, and the originals were "
                "discarded (freezing_discard_parameters), so it cannot be compiled again"
            )
        log.warning("dora_fused: parameters changed since a graph was compiled under Inductor's freezing; recompiling")
        variant = self.variants[key] = self.current = self.rebuild(args)
        _count("recompile")
        return variant

    def _warn_shared(self) -> None:
        if not self._warned:
            self._warned = True
            log.warning(
                "dora_fused: a frozen graph is called with more parameter sets than MAX_VARIANTS (%d): its folded "
                "values are recomputed on every switch. Compile the whole model for frozen inference.",
                MAX_VARIANTS,
            )

    def invalidate(self) -> None:
        """Make the next call of every variant recompute its folded values (``refresh_frozen``)."""
        for variant in self.variants.values():
            variant.invalidate()

    def call(self) -> Callable[..., Any]:
        """The function the backend returns (Dynamo calls it with the graph's inputs): the check, then the graph."""
        me = self

        def run(*args: Any) -> Any:
            variant = me.current
            if variant.stale(args):
                variant = me.dispatch(list(args))
            return variant.compiled(*args)

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
