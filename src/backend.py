"""The ``dora_fused`` torch.compile backend.

``torch.compile(model, backend="dora_fused")`` (found through the
``torch_dynamo_backends`` entry point) or ``backend=dora_fused.backend(...)``:
Dynamo hands each graph to the backend, the DoRA pass rewrites it, and the
result goes to Inductor with the ``mode``/``options`` torch.compile forwarded.

Never broken: if the pass raises, or the inner compiler fails on the rewritten
graph, the original graph is compiled instead and the error is recorded in the
report (and logged), never raised.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch._dynamo.exc import RestartAnalysis
from torch.fx import GraphModule

from dora_fused.passes import DoraRewritePass
from dora_fused.passes.heuristics import OpsImpl

from .auditing import audit_model
from .graph_rewrite import backend_owns_graph, publish, rewrite_graph
from .report import RewriteReport

__all__ = ["DoraFusedBackend", "backend", "dora_fused"]


INNER_COMPILERS = ("inductor", "aot_eager", "eager")


class DoraFusedBackend:
    """A configured backend: ``torch.compile(model, backend=DoraFusedBackend(...))``.

    Args:
        inner: what compiles the rewritten graph: ``"inductor"`` (default),
            ``"aot_eager"`` (AOTAutograd without Inductor, for debugging
            numerics) or ``"eager"``.
        rewrite: set False to compile without the DoRA pass (for A/B runs).
        ops: which implementation of the norm and compose the rewrite inserts:
            ``"auto"`` (default: chosen per module), ``"triton"`` (the
            ``torch.ops.dora_fused`` Triton ops; plain torch off CUDA) or
            ``"torch"`` (plain torch ops that Inductor compiles); see
            ``dora_fused.passes.heuristics``.
    """

    def __init__(self, *, inner: str = "inductor", rewrite: bool = True, ops: OpsImpl = "auto") -> None:
        if inner not in INNER_COMPILERS:
            raise ValueError(f"inner must be one of {INNER_COMPILERS}, got {inner!r}")
        if ops not in ("auto", "triton", "torch"):
            raise ValueError(f"ops must be 'auto', 'triton' or 'torch', got {ops!r}")
        self.inner = inner
        self.rewrite = rewrite
        self.ops = ops
        self.rewrite_pass = DoraRewritePass(ops=ops)

    def _key(self) -> tuple[str, bool, str]:
        return self.inner, self.rewrite, self.ops

    def __repr__(self) -> str:
        return f"DoraFusedBackend(inner={self.inner!r}, rewrite={self.rewrite}, ops={self.ops!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DoraFusedBackend) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __call__(
        self,
        gm: GraphModule,
        example_inputs: Sequence[Any],
        *,
        mode: str | None = None,
        options: dict[str, Any] | None = None,
    ) -> Callable[..., Any]:
        with backend_owns_graph():  # an enabled Inductor hook leaves this graph to the backend
            step = rewrite_graph(gm, self.rewrite_pass if self.rewrite else None)
            outcome, report = step.outcome, step.report
            try:
                compiled = self._compile_inner(gm, example_inputs, mode, options)
            except RestartAnalysis:
                raise  # Dynamo's control flow (e.g. tensorify-scalars restarts), not a failure: it retraces
            except Exception as error:
                if outcome is None or not outcome.changed:
                    raise
                report.error = f"inner compiler failed on the rewritten graph: {type(error).__name__}: {error}"
                report.modules = [
                    replace(m, status="skipped", reason="inner compile failed; original kept", ops=())
                    if m.status == "rewritten"
                    else m
                    for m in report.modules
                ]
                outcome.restore(gm)
                compiled = self._compile_inner(gm, example_inputs, mode, options)
        publish(report)
        return compiled

    def audit(self, model: torch.nn.Module, *args: Any, **kwargs: Any) -> RewriteReport:
        """What this backend would rewrite in ``model(*args, **kwargs)``; compiles nothing (``dora_fused.audit``)."""
        return audit_model(self.rewrite_pass, model, *args, **kwargs)

    def _compile_inner(
        self,
        gm: GraphModule,
        example_inputs: Sequence[Any],
        mode: str | None,
        options: dict[str, Any] | None,
    ) -> Callable[..., Any]:
        if self.inner == "inductor":
            # The same wrapper torch.compile builds for backend="inductor": it turns
            # mode/options into Inductor config patches (and validates them).
            return torch._TorchCompileInductorWrapper(mode, options, None)(gm, example_inputs)
        if mode not in (None, "default") or options:
            raise ValueError(f"mode/options apply to Inductor only, not inner={self.inner!r}")
        if self.inner == "aot_eager":
            from torch._dynamo.backends.registry import lookup_backend

            return lookup_backend("aot_eager")(gm, example_inputs)
        return gm.forward


_default = DoraFusedBackend()


def backend(*, inner: str = "inductor", rewrite: bool = True, ops: OpsImpl = "auto") -> DoraFusedBackend:
    """A configured backend: ``torch.compile(model, backend=dora_fused.backend(inner="aot_eager"))``."""
    return DoraFusedBackend(inner=inner, rewrite=rewrite, ops=ops)


def dora_fused(
    gm: GraphModule,
    example_inputs: Sequence[Any],
    *,
    mode: str | None = None,
    options: dict[str, Any] | None = None,
) -> Callable[..., Any]:
    """The backend registered as ``"dora_fused"`` (default configuration)."""
    return _default(gm, example_inputs, mode=mode, options=options)


def register_name() -> None:
    """Register ``"dora_fused"`` with Dynamo when no installed entry point provides it (e.g. on PYTHONPATH).

    With the package installed, Dynamo loads the name from the entry point on
    first use; registering it here as well would make that load a duplicate.
    """
    from importlib.metadata import entry_points

    from torch._dynamo.backends.registry import register_backend

    if any(ep.name == "dora_fused" for ep in entry_points(group="torch_dynamo_backends")):
        return
    try:
        register_backend(dora_fused, name="dora_fused")
    except AssertionError:  # already registered
        pass


def audit(model: torch.nn.Module, *args: Any, **kwargs: Any) -> RewriteReport:
    """Trace ``model(*args, **kwargs)`` as ``torch.compile(model, backend="dora_fused")`` would and report.

    Returns the same :class:`~dora_fused.RewriteReport` type as ``last_report()``,
    for the whole call: graphs, graph breaks with reasons, every DoRA module
    (rewritten, or left alone with a one-line reason), the ops chosen and why,
    and the norm's transient memory per call, dense vs rewritten. Nothing is
    compiled; each traced graph runs as it was traced. Resets Dynamo's caches,
    like ``torch._dynamo.explain``. ``dora_fused.backend(ops=...).audit(...)``
    audits another configuration.
    """
    return _default.audit(model, *args, **kwargs)
