"""FX passes of dora_fused: find DoRA subgraphs in Dynamo graphs and rewrite them.

See README.md in this folder for the invariants every pass keeps.
"""

from .dora_pass import DoraRewritePass, PassOutcome
from .patterns import FORMS, Form

__all__ = ["FORMS", "DoraRewritePass", "Form", "PassOutcome"]
