"""What a matcher raises when it does not match (re-exported by ``matching``)."""

from __future__ import annotations

__all__ = ["NotDora", "Unsupported"]


class NotDora(Exception):
    """The anchor is not a DoRA norm: record nothing."""


class Unsupported(Exception):
    """DoRA-like, but a part is not fully recognized: leave the graph, record the reason."""
