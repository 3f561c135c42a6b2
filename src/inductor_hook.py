"""The DoRA rewrite as an Inductor graph pass: ``backend="inductor"`` rewrites DoRA layers too.

``dora_fused.enable_inductor_hook()`` (or ``DORA_FUSED_INDUCTOR=1`` in the
environment of an installed package) registers :class:`DoraInductorPass` in
``torch._inductor.config.pre_grad_custom_pass``. Inductor runs that hook on the
torch-level FX graph Dynamo hands it, after Inductor's own pre-grad passes and
before AOTAutograd, which is the graph the ``dora_fused`` backend rewrites.
Whatever compiles with Inductor (``torch.compile(model)``, the HF Trainer's
``torch_compile=True``, accelerate's ``dynamo_backend="inductor"``, Lightning,
Axolotl's ``torch_compile: true``) then rewrites DoRA layers, and each graph's
record lands in ``dora_fused.last_report()`` as the backend's does.

Behaviour:

- The same pass with the same ops choice as the backend's default
  (``ops="auto"``), through the same step (``dora_fused.graph_rewrite``): the
  two paths give the same graphs and the same records.
- Transactional: an error inside the pass leaves the graph as it was and is
  recorded in the report's ``error``. What the hook cannot do, unlike the
  backend: if Inductor itself later fails on the rewritten graph, the error is
  Inductor's (the hook has returned by then); the backend path compiles the
  original graph instead.
- Graphs the ``dora_fused`` backend compiles are left alone (it rewrote them
  already), so enabling the hook never rewrites twice.
- Only Dynamo's top-level graphs are rewritten, each with its higher-order-op
  bodies (activation checkpoints), once, as the backend does; Inductor's calls
  for those bodies on their own do nothing.
- Composes with a ``pre_grad_custom_pass`` set before it: the DoRA pass runs
  first, then the others in their order (as with the backend, whose rewritten
  graph reaches the user's passes). Enabling twice changes nothing;
  :func:`disable_inductor_hook` puts the setting back.
- Runs on every compile, cache hits included: the hook sets Inductor's
  ``pre_grad_pass_timing`` to ``"early"`` (when it is at its ``"default"``), so
  Inductor's caches are keyed on the rewritten graph, exactly as for the
  backend, and every compiled graph gets a report. :meth:`DoraInductorPass.uuid`
  (a hash of the pass's and the ops' source) keeps the caches valid if the
  timing is set to ``"late"`` instead; then a cache hit skips the pass and
  records no report.

Enable it before the model is first compiled: a graph compiled before is not
compiled again.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
from pathlib import Path

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.fx import Graph, GraphModule

import dora_fused.kernels
from dora_fused.passes import DoraRewritePass
from dora_fused.passes.heuristics import OpsImpl

from .graph_rewrite import in_backend, publish, rewrite_graph
from .peft_tracing import enable_peft_tracing

__all__ = [
    "DEFAULT_OPS",
    "ENV_VAR",
    "DoraInductorPass",
    "disable_inductor_hook",
    "enable_inductor_hook",
    "inductor_hook_enabled",
]

ENV_VAR = "DORA_FUSED_INDUCTOR"  # "1": the installed package's .pth file enables the hook at interpreter start
DEFAULT_OPS: OpsImpl = "auto"  # the backend's default (``dora_fused.backend()``)


@functools.cache
def _source_key() -> str:
    """The package version and a sha256 of what decides the rewritten graph: the passes, the ops, this step."""
    try:
        version = importlib.metadata.version("dora_fused")
    except importlib.metadata.PackageNotFoundError:  # a checkout on sys.path
        version = "unknown"
    digest = hashlib.sha256(DoraRewritePass.uuid().encode())
    kernels = sorted(Path(dora_fused.kernels.__file__).parent.glob("*.py"))
    for path in [*kernels, Path(__file__).parent / "graph_rewrite.py"]:
        digest.update(path.read_bytes())
    return f"{version}-{digest.hexdigest()}"


def _is_dynamo_graph(gm: GraphModule) -> bool:
    """A top-level graph Dynamo compiled; not the body of a higher-order op, which Inductor passes alone first."""
    return "dynamo_compile_id" in gm.meta


class DoraInductorPass(CustomGraphPass):
    """The DoRA rewrite as an Inductor pre-grad pass (``torch._inductor.config.pre_grad_custom_pass``).

    Called with the graph of each FX module Inductor compiles. Rewrites Dynamo's
    top-level graphs (and their higher-order-op bodies) as the backend does and
    records one report per graph; leaves graphs the backend compiles, and any
    other graph, as they are.
    """

    def __init__(self, ops: OpsImpl = DEFAULT_OPS) -> None:
        self.ops = ops
        self.rewrite_pass = DoraRewritePass(ops=ops)

    def __call__(self, graph: Graph) -> None:
        gm = graph.owning_module
        if not isinstance(gm, GraphModule) or in_backend() or not _is_dynamo_graph(gm):
            return
        publish(rewrite_graph(gm, self.rewrite_pass).report)

    def uuid(self) -> str:
        """Stable cache key: the package version, the source of the passes and ops, and the ops choice."""
        return f"dora_fused-{self.ops}-{_source_key()}"

    def __repr__(self) -> str:
        return f"DoraInductorPass(ops={self.ops!r})"


class _Chain(CustomGraphPass):
    """Several pre-grad passes as one, in order: the setting takes a single callable before torch 2.13."""

    def __init__(self, passes: tuple[object, ...]) -> None:
        self.passes = passes

    def __call__(self, graph: Graph) -> None:
        for graph_pass in self.passes:
            graph_pass(graph)

    def uuid(self) -> str | None:
        keys = [p.uuid() if isinstance(p, CustomGraphPass) else None for p in self.passes]
        return None if any(k is None for k in keys) else "+".join(str(k) for k in keys)


# torch 2.13 and later take a list of passes in the setting (and say so with this helper)
_SETTING_TAKES_A_LIST = hasattr(torch._inductor.custom_graph_pass, "get_custom_graph_passes")


def get_custom_graph_passes(setting: object) -> tuple[object, ...]:
    """The passes a ``pre_grad_custom_pass`` setting holds: None, one callable, a list or tuple, or our chain."""
    if setting is None:
        return ()
    if isinstance(setting, _Chain):
        return setting.passes
    if isinstance(setting, (list, tuple)):
        return tuple(setting)
    return (setting,)


def _setting(passes: tuple[object, ...]) -> object:
    """The ``pre_grad_custom_pass`` value that runs ``passes`` in order, in this torch's form."""
    if not passes:
        return None
    if _SETTING_TAKES_A_LIST:
        return list(passes)
    return passes[0] if len(passes) == 1 else _Chain(passes)


_hook = DoraInductorPass()
_previous: object = None  # the pre_grad_custom_pass setting before enable_inductor_hook()
_installed: object = None  # what enable_inductor_hook() set it to
_set_timing = False  # enable_inductor_hook() changed pre_grad_pass_timing from "default" to "early"


def inductor_hook_enabled() -> bool:
    """True when Inductor's ``pre_grad_custom_pass`` setting includes the DoRA pass."""
    return _hook in get_custom_graph_passes(torch._inductor.config.pre_grad_custom_pass)


def enable_inductor_hook() -> DoraInductorPass:
    """Make every Inductor compile rewrite DoRA layers and record them in ``last_report()``; idempotent.

    Registers the PEFT tracing polyfill (as ``import dora_fused`` does) and puts
    the DoRA pass first in ``torch._inductor.config.pre_grad_custom_pass``,
    ahead of any pass already set there. Sets ``pre_grad_pass_timing`` to
    ``"early"`` when it is ``"default"`` (see the module docstring). Returns the
    registered pass.
    """
    global _previous, _installed, _set_timing
    enable_peft_tracing()
    config = torch._inductor.config
    if not inductor_hook_enabled():
        _previous = config.pre_grad_custom_pass
        _installed = _setting((_hook, *get_custom_graph_passes(_previous)))
        config.pre_grad_custom_pass = _installed
    if getattr(config, "pre_grad_pass_timing", None) == "default":  # older torch has no such setting
        config.pre_grad_pass_timing = "early"
        _set_timing = True
    return _hook


def disable_inductor_hook() -> None:
    """Take the DoRA pass out of Inductor's settings; restore what :func:`enable_inductor_hook` changed.

    The ``pre_grad_custom_pass`` setting goes back to its value before enabling,
    or, if it was changed since, loses only the DoRA pass. The timing goes back
    to ``"default"`` if enabling set it and it was not changed since.
    """
    global _previous, _installed, _set_timing
    config = torch._inductor.config
    current = config.pre_grad_custom_pass
    if current is _installed and _installed is not None:
        config.pre_grad_custom_pass = _previous
    elif inductor_hook_enabled():
        config.pre_grad_custom_pass = _setting(tuple(p for p in get_custom_graph_passes(current) if p is not _hook))
    if _set_timing and getattr(config, "pre_grad_pass_timing", None) == "early":
        config.pre_grad_pass_timing = "default"
    _previous = _installed = None
    _set_timing = False
