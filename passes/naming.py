"""Qualified module names from Dynamo's node metadata.

Dynamo records module paths as source strings such as
``L['self'].__dict__['_modules']['base_model']._modules['q']`` (spelling varies
across torch versions). :func:`dotted` turns them into the dotted name that
``named_modules()`` gives (``base_model.q``), relative to the frame Dynamo
compiled.

That frame is not always the model's root: after a graph break Dynamo resumes
inside a submodule's ``forward``, and a model whose layers are compiled one by
one (FSDP2's usual recipe) hands each layer's frame to the backend. The frame's
own place in the model follows from the parameters it lifts as graph inputs:
the same tensor object is ``rel`` in the frame and ``prefix + rel`` in the root
module's ``named_parameters()``. :class:`FrameNames` finds that prefix, so each
record can carry the model's fully qualified name.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

__all__ = ["ROOT", "FrameNames", "calling_modules", "dotted", "lifted_values", "module_path", "unwrapped_name"]

ROOT = "(root)"  # the record name of the compiled module itself

_TOKEN = re.compile(r"""\.(\w+)|\[\s*(?:'([^']*)'|"([^"]*)"|(-?\d+))\s*\]""")
_CONTAINERS = {"__dict__", "_modules", "_parameters", "_buffers"}
_ROOT = re.compile(r"^\s*(?:L|G)\[\s*['\"]([^'\"]+)['\"]\s*\]")
# transparent wrappers whose attribute shows in named_modules() but not in the model the user built:
# torch.compile's OptimizedModule and torch.distributed's checkpoint_wrapper
_WRAPPERS = {"_orig_mod", "_checkpoint_wrapped_module"}


def dotted(source: str) -> str:
    """``L['self']._modules['layers']._modules['0'].q`` → ``layers.0.q``."""
    root = _ROOT.match(source)
    if root is None:
        return source
    # the root is the compiled module itself: "self" in its forward, "fn" when Dynamo enters through a wrapper
    parts: list[str] = [] if root.group(1) in ("self", "fn") else [root.group(1)]
    rest = source[root.end() :]
    pos = 0
    for token in _TOKEN.finditer(rest):
        if token.start() != pos:  # something we do not parse (a call, an expression)
            return source
        pos = token.end()
        name = next(g for g in token.groups() if g is not None)
        if name not in _CONTAINERS:
            parts.append(name)
    if pos != len(rest):
        return source
    return ".".join(parts)


def module_path(node: Node, depth: int = -1) -> str:
    """Dotted path of the module on ``node``'s module stack at ``depth`` (-1: innermost); '' if none."""
    stack = node.meta.get("nn_module_stack") or {}
    entries = list(stack.values())
    if not entries:
        return ""
    path = entries[depth][0]
    return dotted(path) if isinstance(path, str) else str(path)


def unwrapped_name(name: str) -> str:
    """``layers.0._orig_mod.q`` → ``layers.0.q``: the name without transparent wrappers' attributes."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPERS)


def _frame_attribute(node: Node) -> str | None:
    """Dotted path of a placeholder that Dynamo read as an attribute path of the frame's module, else None."""
    source = getattr(node, "_dynamo_source", None)
    name = getattr(source, "name", None)
    name = name() if callable(name) else name
    root = _ROOT.match(name) if isinstance(name, str) else None
    if root is None or root.group(1) not in ("self", "fn"):
        return None  # an argument or a global: not a path from the frame's module
    path = dotted(name)
    return path if path and path != name else None


def lifted_values(gm: GraphModule) -> list[object]:
    """The real values of ``gm``'s placeholders as Dynamo keeps them (``meta["grapharg"].example``), None where gone.

    For a caller that gets the graph without its example inputs (an Inductor graph
    pass). Dynamo holds parameters weakly: a value no longer alive is None.
    """
    values: list[object] = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            try:
                values.append(node.meta["grapharg"].example)
            except Exception:  # no grapharg (not a Dynamo graph), or its value is gone
                values.append(None)
    return values


@dataclass(frozen=True)
class FrameNames:
    """Where the compiled frame sits in the model: ``prefix + rel`` is the qualified name of ``rel``."""

    prefix: str | None  # "" when the frame is the root itself; None when unknown (names stay frame-relative)

    def qualify(self, name: str) -> str:
        """The model's qualified name of a frame-relative module name (``ROOT`` for the frame itself).

        Known frames give names without transparent wrappers' attributes, as the root's are matched.
        """
        if self.prefix is None:
            return name
        rel = unwrapped_name(name)
        if not self.prefix:
            return rel or ROOT
        return self.prefix.removesuffix(".") if rel in ("", ROOT) else self.prefix + rel

    @classmethod
    def of(cls, gm: GraphModule, example_inputs: Sequence[object], roots: Iterable[torch.nn.Module]) -> FrameNames:
        """Find the frame's prefix in the first of ``roots`` (outermost first) that owns its lifted parameters.

        Each parameter or buffer the graph lifts as an input is matched, by
        identity, to its names in the root; the prefix is the one on which every
        matched tensor agrees (a module reachable under two names takes the first
        one ``named_parameters`` gives). No agreement: ``prefix`` is None.
        """
        lifted: list[tuple[int, str]] = []
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(example_inputs):
            return cls(None)
        for node, value in zip(placeholders, example_inputs, strict=False):
            path = _frame_attribute(node)
            if isinstance(value, torch.Tensor) and path is not None:
                lifted.append((id(value), unwrapped_name(path)))  # the frame may be a wrapper's (checkpoint_wrapper)
        if not lifted:
            return cls(None)
        for root in roots:
            names: dict[int, list[str]] = {}
            tensors = (*root.named_parameters(remove_duplicate=False), *root.named_buffers(remove_duplicate=False))
            for name, tensor in tensors:
                names.setdefault(id(tensor), []).append(unwrapped_name(name))
            prefix = _agreed_prefix(lifted, names)
            if prefix is not None:
                return cls(prefix)
        return cls(None)


def calling_modules() -> list[torch.nn.Module]:
    """The modules running on this thread's Python stack, as roots to name records from, in order of preference.

    A backend runs while Dynamo compiles a frame, inside the user's call of the
    model: the model's own ``__call__``/``forward`` frames (eager, or Dynamo's
    compiled code of an outer graph) are on the stack. PEFT models come first,
    outermost first (records then read as ``peft_model.named_modules()`` and
    the adapter's state_dict do, whatever wraps the model: DDP, Lightning), then
    every other module, outermost first.
    """
    found: dict[int, torch.nn.Module] = {}
    frame = sys._getframe(1)
    while frame is not None:
        if "self" in frame.f_code.co_varnames[: frame.f_code.co_argcount]:
            owner = frame.f_locals.get("self")
            if isinstance(owner, torch.nn.Module):
                found.setdefault(id(owner), owner)
        frame = frame.f_back
    outermost_first = list(reversed(found.values()))
    peft = sys.modules.get("peft")
    peft_model = getattr(peft, "PeftModel", None)
    if peft_model is None:
        return outermost_first
    return sorted(outermost_first, key=lambda m: not isinstance(m, peft_model))  # stable: keeps the order


def _agreed_prefix(lifted: list[tuple[int, str]], names: dict[int, list[str]]) -> str | None:
    """The one prefix (in first-seen order) that every lifted tensor found in ``names`` allows, else None."""
    agreed: list[str] | None = None
    for key, rel in lifted:
        if key not in names:
            continue
        allowed = [full[: len(full) - len(rel)] for full in names[key] if full == rel or full.endswith("." + rel)]
        if not allowed:
            return None  # the tensor sits elsewhere in this root: not the frame's root
        agreed = allowed if agreed is None else [p for p in agreed if p in allowed]
        if not agreed:
            return None
    return agreed[0] if agreed else None
