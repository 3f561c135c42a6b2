"""Every DoRA form the pass rewrites, in one place.

Each form is a matcher (search form, documented in its module) that starts
from an anchor node (a row norm; ``m / n`` for the cached-norm form) and a
rewrite (its replacement). Add a form by adding a ``Form`` here;
``docs/patterns.md`` lists them for users.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch.fx import Graph, Node

from .hand_written import FORM as HAND_WRITTEN
from .hand_written import match_hand_written, rewrite_hand_written
from .matching import NORMS
from .peft_cached_norm import ANCHORS as CACHED_NORM_ANCHORS
from .peft_cached_norm import FORM as PEFT_CACHED_NORM
from .peft_cached_norm import match_cached_norm, rewrite_cached_norm
from .peft_conv import FORM as PEFT_CONV
from .peft_conv import match_peft_conv, rewrite_peft_conv
from .peft_embedding import FORM as PEFT_EMBEDDING
from .peft_embedding import match_peft_embedding, rewrite_peft_embedding
from .peft_linear import FORM as PEFT_LINEAR
from .peft_linear import match_peft_linear
from .rewrite import rewrite_peft_linear

__all__ = ["FORMS", "Form"]


@dataclass(frozen=True)
class Form:
    name: str
    description: str
    match: Callable[[Node], object]  # anchor -> match object; raises NotDora / Unsupported
    rewrite: Callable[[Graph, object, tuple[str, str]], tuple[str, ...]]  # (graph, match, (norm, compose) impls)
    anchors: tuple[str, ...] = NORMS  # the ops (graph_view.op_of names) a match starts from


FORMS: tuple[Form, ...] = (
    Form(
        PEFT_LINEAR,
        "peft 0.21 lora.Linear with DoRA: identity-trick B·A, detached linalg.norm(dim=1), "
        "result + (g-1)·base + g·lora·s",
        match_peft_linear,
        rewrite_peft_linear,
    ),
    Form(
        PEFT_EMBEDDING,
        "peft 0.21 lora.Embedding with DoRA: norm of W.T + s·(A_t @ B_t).T, g·result + g·(embed(x, A_t) @ B_t)·s",
        match_peft_embedding,
        rewrite_peft_embedding,
    ),
    Form(
        PEFT_CONV,
        "peft 0.21 lora.Conv1d/2d/3d with DoRA: reshaped mm(B, A), norm over all but dim 0, transposed; "
        "result + (g-1)·base + g·lora·s over channels",
        match_peft_conv,
        rewrite_peft_conv,
    ),
    Form(
        HAND_WRITTEN,
        "hand-written weight-space DoRA: m·(W + s·B@A)/‖·‖_row then F.linear; rewritten in activation space",
        match_hand_written,
        rewrite_hand_written,
    ),
    Form(
        PEFT_CACHED_NORM,
        "peft 0.21 Linear/Conv with ENABLE_DORA_CACHING in eval, after the first call: m / detach(cached n), "
        "then the compose",
        match_cached_norm,
        rewrite_cached_norm,
        CACHED_NORM_ANCHORS,
    ),
)
