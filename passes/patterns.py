"""Every DoRA form the pass rewrites, in one table.

Each form is a matcher (its search form, documented in its module) that starts
from an anchor node (a row norm; ``m / n`` for the cached-norm form), its
replacement, the label its records carry and where its norm runs (``form.Form``).
Add a form by adding its module and one ``Form`` here; ``docs/patterns.md``
lists them for users.
"""

from __future__ import annotations

from .form import Form
from .hand_written import match_hand_written, rewrite_hand_written
from .peft_cached_norm import ANCHORS as CACHED_NORM_ANCHORS
from .peft_cached_norm import match_cached_norm
from .peft_conv import match_peft_conv
from .peft_embedding import match_peft_embedding
from .peft_linear import match_peft_linear
from .rewrite import rewrite_with_compose

__all__ = ["FORMS", "Form"]

FORMS: tuple[Form, ...] = (
    Form(
        "peft_linear",
        "PEFT Linear",
        "peft 0.21 lora.Linear with DoRA: identity-trick B·A, detached linalg.norm(dim=1), "
        "result + (g-1)·base + g·lora·s",
        match_peft_linear,
        rewrite_with_compose,
        scope="peft",
    ),
    Form(
        "torchtune_linear",
        "torchtune-style",
        "torchtune-style DoRALinear outside PEFT: PEFT Linear's search form, the bias inside the base output",
        match_peft_linear,
        rewrite_with_compose,
        scope="outside_peft",
    ),
    Form(
        "peft_embedding",
        "PEFT Embedding",
        "peft 0.21 lora.Embedding with DoRA: norm of W.T + s·(A_t @ B_t).T, g·result + g·(embed(x, A_t) @ B_t)·s",
        match_peft_embedding,
        rewrite_with_compose,
        scope="peft",
    ),
    Form(
        "peft_conv",
        "PEFT Conv",
        "peft 0.21 lora.Conv1d/2d/3d with DoRA: reshaped mm(B, A), norm over all but dim 0, transposed; "
        "result + (g-1)·base + g·lora·s over channels",
        match_peft_conv,
        rewrite_with_compose,
        scope="peft",
    ),
    Form(
        "hand_written",
        "hand-written",
        "hand-written weight-space DoRA: m·(W + s·B@A)/‖·‖_row then F.linear; rewritten in activation space",
        match_hand_written,
        rewrite_hand_written,
    ),
    Form(
        "peft_cached_norm",
        "PEFT Linear",  # or "PEFT Conv": the match says which
        "peft 0.21 Linear/Conv with ENABLE_DORA_CACHING in eval, after the first call: m / detach(cached n), "
        "then the compose",
        match_cached_norm,
        rewrite_with_compose,
        CACHED_NORM_ANCHORS,
        scope="peft",
    ),
)
