"""``python -m dora_fused audit`` (console script ``dora-fused``): audit a model from the command line.

The model comes from one of:

- ``--model DIR``: a local transformers config or checkpoint directory (with
  ``config.json``; weights are loaded when present, else random init), plus
  ``--adapter DIR``, a local PEFT adapter directory (``adapter_config.json``);
- ``--factory module:function``: a Python function returning
  ``(model, example_inputs)``, where ``example_inputs`` is a tuple of positional
  arguments, a dict of keyword arguments, or ``(args, kwargs)``.

Prints the report's table (or ``--json``). Exit codes: 0 done; 1 ``--strict``
and some DoRA module was left alone; 2 bad input (missing path, not a PEFT
adapter, no DoRA in the model, a factory that fails), always as one line on
stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = ["main"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class CliError(Exception):
    """Bad input: reported as one line, exit code 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dora-fused", description="dora_fused tools")
    commands = parser.add_subparsers(dest="command", required=True)
    audit = commands.add_parser("audit", help="show which DoRA modules the backend rewrites, and why not the others")
    source = audit.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="transformers config or checkpoint directory")
    source.add_argument("--factory", help="module:function returning (model, example_inputs)")
    audit.add_argument("--adapter", type=Path, help="PEFT adapter directory (with --model)")
    audit.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32", help="base model dtype (with --model)")
    audit.add_argument("--batch", type=int, default=1, help="example batch size (with --model)")
    audit.add_argument("--seq-len", type=int, default=16, help="example sequence length (with --model)")
    audit.add_argument("--ops", choices=["auto", "triton", "torch"], default="auto")
    audit.add_argument("--json", action="store_true", help="print the report as JSON (docs/audit.md)")
    audit.add_argument("--strict", action="store_true", help="exit 1 if any DoRA module is left alone")
    return parser


def _from_factory(spec: str) -> tuple[torch.nn.Module, tuple, dict]:
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise CliError(f"--factory must be module:function, got {spec!r}")
    sys.path.insert(0, str(Path.cwd()))
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise CliError(f"cannot load factory {spec!r}: {error}") from None
    try:
        built = function()
    except Exception as error:
        raise CliError(f"factory {spec!r} failed: {type(error).__name__}: {error}") from None
    if not (isinstance(built, tuple) and len(built) == 2 and isinstance(built[0], torch.nn.Module)):
        raise CliError(f"factory {spec!r} must return (model, example_inputs)")
    model, inputs = built
    if isinstance(inputs, dict):
        return model, (), inputs
    if isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[1], dict):
        return model, tuple(inputs[0]), inputs[1]
    return model, tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,), {}


def _model_class(transformers: Any, config: Any) -> Any:
    """The config's own architecture, else a causal LM, else the bare model."""
    for architecture in getattr(config, "architectures", None) or []:
        if hasattr(transformers, architecture):
            return getattr(transformers, architecture)
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        if type(config) in auto._model_mapping:
            return auto
    return transformers.AutoModel


def _from_directories(args: argparse.Namespace) -> tuple[torch.nn.Module, tuple, dict]:
    import transformers

    if not args.model.is_dir():
        raise CliError(f"model directory not found: {args.model}")
    if not (args.model / "config.json").is_file():
        raise CliError(f"not a transformers model directory (no config.json): {args.model}")
    if args.adapter is not None:
        if not args.adapter.is_dir():
            raise CliError(f"adapter directory not found: {args.adapter}")
        if not (args.adapter / "adapter_config.json").is_file():
            raise CliError(f"not a PEFT adapter directory (no adapter_config.json): {args.adapter}")
    try:
        config = transformers.AutoConfig.from_pretrained(args.model)
        model_class = _model_class(transformers, config)
        if any(args.model.glob("*.safetensors")) or any(args.model.glob("*.bin")):
            model = model_class.from_pretrained(args.model, dtype=_DTYPES[args.dtype])
        else:
            build = model_class.from_config if model_class.__name__.startswith("Auto") else model_class
            model = build(config).to(_DTYPES[args.dtype])
        if args.adapter is not None:
            from peft import PeftModel

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model = PeftModel.from_pretrained(model, args.adapter)
            missing = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
            if missing:
                raise CliError(f"the adapter does not fit the model: {missing[0][:300]}")
    except CliError:
        raise
    except Exception as error:
        raise CliError(f"could not build the model: {type(error).__name__}: {' '.join(str(error).split())}") from None
    vocab = getattr(config, "vocab_size", None) or 2
    input_ids = torch.randint(0, vocab, (args.batch, args.seq_len))
    return model.eval(), (), {"input_ids": input_ids}


def _audit(args: argparse.Namespace) -> int:
    import dora_fused

    model, inputs, kwargs = _from_factory(args.factory) if args.factory else _from_directories(args)
    try:
        with torch.no_grad():
            report = dora_fused.backend(ops=args.ops).audit(model, *inputs, **kwargs)
    except Exception as error:
        raise CliError(f"tracing the model failed: {type(error).__name__}: {' '.join(str(error).split())}") from None
    if not report.found:
        raise CliError("no DoRA module in the model (no active PEFT layer with use_dora=True, no DoRA subgraph)")
    print(json.dumps(json.loads(report.to_json()), indent=1) if args.json else report)
    if args.strict and report.skipped:
        print(f"dora-fused audit: --strict: {len(report.skipped)} DoRA module(s) left alone", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _audit(args)
    except CliError as error:
        print(f"dora-fused {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
