"""``dora-fused audit`` on bad input: exit 2 and one line on stderr naming the problem, never a traceback."""

from __future__ import annotations

import io
import logging
import shutil
from pathlib import Path

import pytest
import torch
from helpers import TINY_LLAMA
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from dora_fused import cli
from dora_fused.logs import ENV_VAR

ONE_LAYER = {**TINY_LLAMA, "num_hidden_layers": 1}
TWO_LAYERS = {**TINY_LLAMA, "num_hidden_layers": 2}
NARROW = {**ONE_LAYER, "hidden_size": 32, "head_dim": 8}  # 4 heads of 8: q_proj is 32x32, not 48x48
DORA_KEYS_PER_LAYER = 6  # q_proj and v_proj: lora_A, lora_B, magnitude


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


def _save_model_and_dora(root: Path, name: str, config_kwargs: dict) -> None:
    """``root/name-model`` (config only, random init) and ``root/name-dora`` (a PEFT DoRA adapter for it)."""
    torch.manual_seed(0)
    config = LlamaConfig(**config_kwargs)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(root / f"{name}-model")
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True)
    get_peft_model(LlamaForCausalLM(config), lora).save_pretrained(root / f"{name}-dora")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> Path:
    """Models and DoRA adapters of one layer, two layers, and one narrow layer (hidden 32, not 48)."""
    root = tmp_path_factory.mktemp("cli-dirs")
    for name, config_kwargs in (("one", ONE_LAYER), ("two", TWO_LAYERS), ("narrow", NARROW)):
        _save_model_and_dora(root, name, config_kwargs)
    return root


@pytest.fixture
def torch_log_output(monkeypatch) -> io.StringIO:
    """What torch's own log handlers print: they hold the stderr of their creation, out of capsys's reach."""
    output = io.StringIO()
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.split(".")[0] == "torch" and isinstance(logger, logging.Logger):
            for handler in logger.handlers:
                if type(handler) is logging.StreamHandler:  # not torch's trace-file handler
                    monkeypatch.setattr(handler, "stream", output)
    return output


def _audit(args: list[str], capsys) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of ``dora-fused audit ARGS`` run in-process."""
    code = cli.main(["audit", *args])
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str) -> str:
    """The one line ``err`` holds, after checking that it is exactly one non-empty CLI error line."""
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith("dora-fused audit: error: "), err
    return lines[0]


def _rejected(args: list[str], capsys) -> str:
    """The error line of an audit that must exit 2 and print nothing on stdout."""
    code, out, err = _audit(args, capsys)
    assert code == 2 and out == "", (code, out, err)
    return _one_error_line(err)


def _write_factory(tmp_path: Path, monkeypatch, module: str, source: str) -> None:
    """``tmp_path/module.py`` holding ``source``, importable as ``module`` from the current directory."""
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))


# --- 1. --batch / --seq-len -------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--batch", "--seq-len"])
@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_batch_and_seq_len_must_be_positive_integers(dirs, capsys, flag, value):
    with pytest.raises(SystemExit) as exited:
        cli.main(["audit", "--model", str(dirs / "one-model"), "--adapter", str(dirs / "one-dora"), flag, value])
    out, err = capsys.readouterr()
    assert exited.value.code == 2 and out == ""
    assert "Traceback" not in err
    *usage, last = err.rstrip("\n").split("\n")
    assert usage and usage[0].startswith("usage: dora-fused audit") and all(line.strip() for line in usage), err
    assert last == f"dora-fused audit: error: argument {flag}: must be a positive integer, got {value!r}"


# --- 2. factories that fail to import or raise ------------------------------------------------------


_BAD_FACTORIES = {
    # module: (its source, how the error line starts after "error: ", how it ends: where it failed)
    "syntax_error": (
        "def f(:\n    pass\n",
        "cannot load factory 'syntax_error:f': importing syntax_error raised SyntaxError: ",
        "{path}, line 1)",
    ),
    "raises_at_import": (
        "x = 1\nraise RuntimeError('no GPU')\n",
        "cannot load factory 'raises_at_import:f': importing raises_at_import raised RuntimeError: no GPU",
        "{path}:2)",
    ),
    "exits_at_import": (
        "import sys\nsys.exit(7)\n",
        "cannot load factory 'exits_at_import:f': importing exits_at_import raised SystemExit: 7",
        "{path}:2)",
    ),
    "exits_when_called": (
        "def f():\n    raise SystemExit(7)\n",
        "factory 'exits_when_called:f' failed: SystemExit: 7",
        "{path}:2)",
    ),
}


@pytest.mark.parametrize("module", sorted(_BAD_FACTORIES))
def test_factory_failing_to_import_or_exiting_is_one_line(tmp_path, monkeypatch, capsys, module):
    source, start, end = _BAD_FACTORIES[module]
    _write_factory(tmp_path, monkeypatch, module, source)
    line = _rejected(["--factory", f"{module}:f"], capsys)
    assert line.startswith(f"dora-fused audit: error: {start}"), line
    assert line.endswith(end.format(path=tmp_path / f"{module}.py")), line


# --- 3. a model that fails to trace -----------------------------------------------------------------

_TRACE_FAILURES = """\
import torch
from helpers import small_dora_mlp


class ShapeError(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = small_dora_mlp()

    def forward(self, x):
        return self.inner(x) @ torch.ones(7, 7)  # (3, 6) @ (7, 7)


class Raises(ShapeError):
    def forward(self, x):
        raise ValueError("no forward for this input")


def shape_error():
    return ShapeError(), (torch.randn(3, 12),)


def raises():
    return Raises(), (torch.randn(3, 12),)
"""


@pytest.mark.parametrize(
    "function,message",
    [
        ("shape_error", "TorchRuntimeError: "),
        ("raises", "ValueError: no forward for this input"),
    ],
)
def test_model_failing_to_trace_is_one_line_and_logs_nothing(
    tmp_path, monkeypatch, capsys, torch_log_output, function, message
):
    module = f"trace_failures_{function}"
    _write_factory(tmp_path, monkeypatch, module, _TRACE_FAILURES)
    torch_level = logging.getLogger("torch").level
    line = _rejected(["--factory", f"{module}:{function}"], capsys)
    assert line.startswith("dora-fused audit: error: tracing the model failed: ") and message in line, line
    assert f"{tmp_path / module}.py:" in line, line  # the line of the model's code that failed
    assert "Hint:" not in line and len(line) < 500, line
    assert torch_log_output.getvalue() == ""  # torch logged no traceback of its own
    assert logging.getLogger("torch").level == torch_level  # the silencing ends with the audit


# --- 4. an adapter from a larger or smaller model ----------------------------------------------------


def test_adapter_from_a_larger_model_is_rejected(dirs, capsys):
    line = _rejected(["--model", str(dirs / "one-model"), "--adapter", str(dirs / "two-dora")], capsys)
    assert "the adapter does not fit the model: " in line, line
    assert f"{DORA_KEYS_PER_LAYER} adapter key(s) fit no module of the model, e.g. " in line, line
    assert ".layers.1.self_attn." in line, line  # the example names a key of the layer the model lacks


def test_adapter_from_a_smaller_model_is_rejected(dirs, capsys):
    line = _rejected(["--model", str(dirs / "two-model"), "--adapter", str(dirs / "one-dora")], capsys)
    assert "the adapter does not fit the model: " in line, line
    assert f"it has no weights for {DORA_KEYS_PER_LAYER} adapter key(s) of the model, e.g. " in line, line
    assert ".layers.1.self_attn." in line, line


# --- 5. corrupt JSON ---------------------------------------------------------------------------------


@pytest.mark.parametrize("directory,file", [("one-model", "config.json"), ("one-dora", "adapter_config.json")])
def test_corrupt_json_names_the_file(dirs, tmp_path, capsys, directory, file):
    copies = {name: tmp_path / name for name in ("one-model", "one-dora")}
    for name, copy in copies.items():
        shutil.copytree(dirs / name, copy)
    (copies[directory] / file).write_text('{"r": 4,')
    line = _rejected(["--model", str(copies["one-model"]), "--adapter", str(copies["one-dora"])], capsys)
    assert f"error: {copies[directory] / file} is not valid JSON: " in line, line


# --- 6. an adapter of other shapes -------------------------------------------------------------------


def test_adapter_of_other_shapes_is_one_short_line(dirs, capsys):
    line = _rejected(["--model", str(dirs / "one-model"), "--adapter", str(dirs / "narrow-dora")], capsys)
    assert line == (
        f"dora-fused audit: error: the adapter does not fit the model: {DORA_KEYS_PER_LAYER} weight(s) differ in "
        "shape, first base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight: "
        "[4, 32] in the adapter, [4, 48] in the model"
    )
    assert len(line) <= 300


# --- 7. an adapter directory without weights ---------------------------------------------------------


def test_adapter_without_weights_says_so(dirs, tmp_path, capsys):
    adapter = tmp_path / "config-only"
    adapter.mkdir()
    shutil.copy(dirs / "one-dora" / "adapter_config.json", adapter)
    line = _rejected(["--model", str(dirs / "one-model"), "--adapter", str(adapter)], capsys)
    weights = "adapter_model.safetensors or adapter_model.bin"
    assert line == f"dora-fused audit: error: no adapter weights ({weights}) in {adapter}"


def test_fitting_adapter_is_audited(dirs, capsys):
    args = ["--model", str(dirs / "two-model"), "--adapter", str(dirs / "two-dora"), "--strict"]
    code, out, err = _audit(args, capsys)
    assert code == 0, err
    assert out.startswith("dora_fused: 1 graph, 0 graph breaks, 4 DoRA modules found, 4 rewritten, 0 left alone")
