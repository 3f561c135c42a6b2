"""The record of one DoRA module the pass looked at: what the backend, the audit and the logs report."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ModuleRecord"]


@dataclass(frozen=True)
class ModuleRecord:
    """One DoRA subgraph (one module, one adapter) the pass looked at, or a DoRA module no graph held."""

    name: str  # qualified module name, as ``named_modules()`` of the user's model gives it (``passes.naming``)
    adapter: str | None  # PEFT adapter name, when known
    form: str  # which supported form matched (see ``dora_fused.passes.patterns``); "" if none did
    status: str  # "rewritten" or "skipped"
    reason: str = ""  # one line: why it was skipped
    d_out: int | None = None
    d_in: int | None = None
    rank: int | None = None
    weight_dtype: str | None = None
    adapter_dtype: str | None = None
    magnitude_dtype: str | None = None
    ops: tuple[str, ...] = ()  # ops inserted by the rewrite
    ops_reason: str = ""  # why these implementations were chosen
    kind: str = ""  # the form's label: "PEFT Linear", "PEFT Embedding", "PEFT Conv", "torchtune-style", ...
    active_adapters: tuple[str, ...] = ()  # the module's active adapters, when known
    dense_bytes: int | None = None  # transient memory of PEFT's dense norm per call (estimate)
    rewritten_bytes: int | None = None  # the same for the rewritten norm (estimate)
    frozen: str = ""  # frozen inference: "norm" (the norm computed once) or "merged" (the whole weight); "" live
    # the base's quantization ("bnb-nf4", "bnb-fp4", "-dq" with double quantization, "bnb-int8", "torchao-int8",
    # "torchao-intx"); None for an unquantized base. weight_dtype is then the dequantized weight's dtype
    quantization: str | None = None
