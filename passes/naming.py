"""Qualified module names from Dynamo's node metadata.

Dynamo records module paths as source strings such as
``L['self'].__dict__['_modules']['base_model']._modules['q']`` (spelling varies
across torch versions). :func:`dotted` turns them into the dotted name that
``named_modules()`` gives (``base_model.q``).
"""

from __future__ import annotations

import re

from torch.fx import Node

__all__ = ["dotted", "module_path"]

_TOKEN = re.compile(r"""\.(\w+)|\[\s*(?:'([^']*)'|"([^"]*)"|(-?\d+))\s*\]""")
_CONTAINERS = {"__dict__", "_modules", "_parameters", "_buffers"}
_ROOT = re.compile(r"^\s*(?:L|G)\[\s*['\"]([^'\"]+)['\"]\s*\]")


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
