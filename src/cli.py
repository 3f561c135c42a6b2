"""``python -m dora_fused audit`` (console script ``dora-fused``): audit a model from the command line.

The model comes from one of:

- ``--model DIR``: a local transformers config or checkpoint directory (with
  ``config.json``; weights are loaded when present, else random init), plus
  ``--adapter DIR``, a local PEFT adapter directory (``adapter_config.json`` and
  ``adapter_model.safetensors`` or ``adapter_model.bin``) whose every weight
  must fit the model: a missing weight, one that fits no module, or one of
  another shape rejects it;
- ``--factory module:function``: a Python function returning
  ``(model, example_inputs)``, where ``example_inputs`` is a tuple of positional
  arguments, a dict of keyword arguments, or ``(args, kwargs)``. The module is
  imported with the current directory first on ``sys.path``.

Prints the report's table (or ``--json``). Exit codes:

- 0: done;
- 1: ``--strict`` and some DoRA module was left alone;
- 2: bad input: a bad argument (``--batch``/``--seq-len`` below 1), a missing
  path, a ``config.json``/``adapter_config.json`` that is not valid JSON, not a
  PEFT adapter or no adapter weights, an adapter that does not fit the model, a
  factory module that fails to import or a factory that raises (``SystemExit``
  included), a model that fails to trace, no DoRA in the model.

Bad input is always reported as one line on stderr (``dora-fused audit: error:
...``; argparse puts its usage before it), never a traceback: torch's log
records are silenced while the model is traced, so a failed trace logs nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import logging
import re
import sys
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = ["main"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_MESSAGE_LIMIT = 300
# one mismatch in the message of torch's load_state_dict: the parameter, its shape in the checkpoint, in the model
_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from checkpoint, "
    r"the shape in current model is torch\.Size\((\[[^\]]*\])\)"
)


class CliError(Exception):
    """Bad input: reported as one line, exit code 2."""


def _positive_int(text: str) -> int:
    """argparse type: an integer of at least 1, else argparse's usage error (exit 2)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    """The ``dora-fused`` argument parser (one subcommand, ``audit``)."""
    parser = argparse.ArgumentParser(prog="dora-fused", description="dora_fused tools")
    commands = parser.add_subparsers(dest="command", required=True)
    audit = commands.add_parser("audit", help="show which DoRA modules the backend rewrites, and why not the others")
    source = audit.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="transformers config or checkpoint directory")
    source.add_argument("--factory", help="module:function returning (model, example_inputs)")
    audit.add_argument("--adapter", type=Path, help="PEFT adapter directory (with --model)")
    audit.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32", help="base model dtype (with --model)")
    audit.add_argument("--batch", type=_positive_int, default=1, help="example batch size (with --model)")
    audit.add_argument("--seq-len", type=_positive_int, default=16, help="example sequence length (with --model)")
    audit.add_argument("--ops", choices=["auto", "triton", "torch"], default="auto")
    audit.add_argument("--json", action="store_true", help="print the report as JSON (docs/audit.md)")
    audit.add_argument("--strict", action="store_true", help="exit 1 if any DoRA module is left alone")
    return parser


def _one_line(text: str, limit: int = _MESSAGE_LIMIT) -> str:
    """``text`` with its whitespace runs collapsed to single spaces, cut to ``limit`` characters (ending in "...")."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _raised_at(error: BaseException) -> str:
    """`` (file:line)`` of the innermost traceback frame outside importlib's frozen modules, else ``""``."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if not f.filename.startswith("<frozen ")]
    return f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def _describe(error: BaseException) -> str:
    """``Type: message (file:line)`` on one line; the place is where it was raised (for a SyntaxError, the bad line)."""
    if isinstance(error, SyntaxError):
        return f"SyntaxError: {error.msg} ({error.filename}, line {error.lineno})"
    message = _one_line(str(error))
    return f"{type(error).__name__}{': ' + message if message else ''}{_raised_at(error)}"


def _import_factory(spec: str) -> Any:
    """The function ``module:function`` names, imported with the current directory first on ``sys.path``."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise CliError(f"--factory must be module:function, got {spec!r}")
    if sys.path[:1] != [str(Path.cwd())]:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise CliError(f"cannot load factory {spec!r}: importing {module_name} raised {_describe(error)}") from None
        raise CliError(f"cannot load factory {spec!r}: no module named {module_name!r}") from None
    except (Exception, SystemExit) as error:
        raise CliError(f"cannot load factory {spec!r}: importing {module_name} raised {_describe(error)}") from None
    if not hasattr(module, function_name):
        raise CliError(f"cannot load factory {spec!r}: module {module_name!r} has no attribute {function_name!r}")
    return getattr(module, function_name)


def _from_factory(spec: str) -> tuple[torch.nn.Module, tuple, dict]:
    """``(model, args, kwargs)`` from the factory's ``(model, example_inputs)``."""
    function = _import_factory(spec)
    try:
        built = function()
    except (Exception, SystemExit) as error:
        raise CliError(f"factory {spec!r} failed: {_describe(error)}") from None
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


def _check_json_object(path: Path) -> None:
    """Raise :class:`CliError` naming ``path`` unless it holds a JSON object."""
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CliError(f"{path} is not valid JSON: {_one_line(str(error))}") from None
    if not isinstance(body, dict):
        raise CliError(f"{path} is not valid JSON: expected an object, got {type(body).__name__}")


def _check_directories(model_dir: Path, adapter_dir: Path | None) -> None:
    """Raise :class:`CliError` unless ``model_dir`` (and ``adapter_dir``, when given) look loadable."""
    if not model_dir.is_dir():
        raise CliError(f"model directory not found: {model_dir}")
    if not (model_dir / "config.json").is_file():
        raise CliError(f"not a transformers model directory (no config.json): {model_dir}")
    _check_json_object(model_dir / "config.json")
    if adapter_dir is None:
        return
    if not adapter_dir.is_dir():
        raise CliError(f"adapter directory not found: {adapter_dir}")
    if not (adapter_dir / "adapter_config.json").is_file():
        raise CliError(f"not a PEFT adapter directory (no adapter_config.json): {adapter_dir}")
    _check_json_object(adapter_dir / "adapter_config.json")
    if not any((adapter_dir / name).is_file() for name in _ADAPTER_WEIGHTS):
        raise CliError(f"no adapter weights ({' or '.join(_ADAPTER_WEIGHTS)}) in {adapter_dir}")


@contextlib.contextmanager
def _recorded_load_results() -> Iterator[list[Any]]:
    """The ``(missing_keys, unexpected_keys)`` results of each ``PeftModel.load_adapter`` call in the block.

    ``PeftModel.from_pretrained`` loads through ``load_adapter`` and drops its result, so ``load_adapter`` is
    wrapped while the block runs.
    """
    from peft import PeftModel

    results: list[Any] = []
    load_adapter = PeftModel.load_adapter

    @functools.wraps(load_adapter)
    def recording(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = load_adapter(self, *args, **kwargs)
        results.append(result)
        return result

    PeftModel.load_adapter = recording
    try:
        yield results
    finally:
        PeftModel.load_adapter = load_adapter


def _size_mismatch_error(error: RuntimeError) -> CliError | None:
    """The one-line error for ``load_state_dict``'s size mismatches in ``error``, or None when it has none."""
    mismatches = _SIZE_MISMATCH.findall(str(error))
    if not mismatches:
        return None
    name, adapter_shape, model_shape = mismatches[0]
    return CliError(
        f"the adapter does not fit the model: {len(mismatches)} weight(s) differ in shape, first {name}: "
        f"{adapter_shape} in the adapter, {model_shape} in the model"
    )


def _with_adapter(model: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
    """``model`` with the PEFT adapter in ``adapter_dir`` loaded; :class:`CliError` unless every key fits."""
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught, _recorded_load_results() as results:
        warnings.simplefilter("always")
        try:
            model = PeftModel.from_pretrained(model, adapter_dir)
        except RuntimeError as error:
            mismatch = _size_mismatch_error(error)
            if mismatch is None:
                raise
            raise mismatch from None
    warned = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
    if warned:
        missing = re.findall(r"'([^']+)'", warned[0])
        if not missing:
            raise CliError(f"the adapter does not fit the model: {_one_line(warned[0])}")
        raise CliError(
            f"the adapter does not fit the model: it has no weights for {len(missing)} adapter key(s) of the model, "
            f"e.g. {missing[0]}"
        )
    unexpected = [key for result in results for key in result.unexpected_keys]
    if unexpected:
        raise CliError(
            f"the adapter does not fit the model: {len(unexpected)} adapter key(s) fit no module of the model, "
            f"e.g. {unexpected[0]}"
        )
    return model


def _from_directories(args: argparse.Namespace) -> tuple[torch.nn.Module, tuple, dict]:
    """``(model, (), {"input_ids": ...})`` from ``--model`` (and ``--adapter``), random tokens of the asked shape."""
    import transformers

    _check_directories(args.model, args.adapter)
    try:
        config = transformers.AutoConfig.from_pretrained(args.model)
        model_class = _model_class(transformers, config)
        if any(args.model.glob("*.safetensors")) or any(args.model.glob("*.bin")):
            model = model_class.from_pretrained(args.model, dtype=_DTYPES[args.dtype])
        else:
            build = model_class.from_config if model_class.__name__.startswith("Auto") else model_class
            model = build(config).to(_DTYPES[args.dtype])
        if args.adapter is not None:
            model = _with_adapter(model, args.adapter)
    except CliError:
        raise
    except Exception as error:
        raise CliError(f"could not build the model: {type(error).__name__}: {_one_line(str(error))}") from None
    vocab = getattr(config, "vocab_size", None) or 2
    input_ids = torch.randint(0, vocab, (args.batch, args.seq_len))
    return model.eval(), (), {"input_ids": input_ids}


@contextlib.contextmanager
def _torch_logs_silenced() -> Iterator[None]:
    """No record of the ``torch`` loggers is emitted in the block, unless a logger has a level of its own.

    A failed trace logs its exception with a traceback (``torch._subclasses.fake_tensor``) before it raises;
    the audit reports the exception as its one error line instead.
    """
    torch_log = logging.getLogger("torch")
    level = torch_log.level
    torch_log.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        torch_log.setLevel(level)


def _trace_error(error: Exception) -> CliError:
    """The one-line error for a failed trace: Dynamo's message without its hints, and the line it failed at.

    The line is the innermost user-code frame Dynamo names, else where the exception was raised.
    """
    text = " ".join(str(error).split())
    places = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', text.partition(" from user code: ")[2])
    message = re.split(r" Hint: | Developer debug context: | from user code: | Set TORCHDYNAMO_VERBOSE", text)[0]
    where = f" ({places[-1][0]}:{places[-1][1]} in {places[-1][2]})" if places else _raised_at(error)
    return CliError(f"tracing the model failed: {type(error).__name__}: {_one_line(message)}{where}")


def _audit(args: argparse.Namespace) -> int:
    """Print the audit of the model ``args`` name; the exit code (0, or 1 for ``--strict`` findings)."""
    import dora_fused

    model, inputs, kwargs = _from_factory(args.factory) if args.factory else _from_directories(args)
    try:
        with torch.no_grad(), _torch_logs_silenced():
            report = dora_fused.backend(ops=args.ops).audit(model, *inputs, **kwargs)
    except Exception as error:
        raise _trace_error(error) from None
    if not report.found:
        raise CliError("no DoRA module in the model (no active PEFT layer with use_dora=True, no DoRA subgraph)")
    print(json.dumps(json.loads(report.to_json()), indent=1) if args.json else report)
    if args.strict and report.skipped:
        print(f"dora-fused audit: --strict: {len(report.skipped)} DoRA module(s) left alone", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command ``argv`` (default ``sys.argv[1:]``) names; the exit code (see the module docstring).

    A bad argument exits through argparse (``SystemExit(2)``, usage and one ``error:`` line on stderr).
    """
    args = _parser().parse_args(argv)
    try:
        return _audit(args)
    except CliError as error:
        print(f"dora-fused {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
