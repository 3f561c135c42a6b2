"""Audit: the report's table, JSON, logging and the CLI."""

from __future__ import annotations

import json
import logging

import expecttest
import pytest
import torch
from helpers import TINY_LLAMA, HandWrittenDora, dora_module_names, small_dora_mlp, tiny_llama_dora
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import dora_fused
from dora_fused import cli
from dora_fused.logs import ENV_VAR, configure_from_env, log


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


class TestTable(expecttest.TestCase):
    def test_table_of_a_small_model(self):
        report = dora_fused.audit(small_dora_mlp(), torch.randn(3, 12))
        self.assertExpectedInline(
            str(report),
            """\
dora_fused: 1 graph, 0 graph breaks, 2 DoRA modules found, 2 rewritten, 0 left alone
module              kind         d_out x d_in  r  base/adapter  adapter  status     ops                                                norm memory
base_model.model.0  PEFT Linear  10x12         2  fp32/fp32     default  rewritten  norm: torch, compose: torch (scale folded into B)  1.6 KB -> 792 B
base_model.model.2  PEFT Linear  6x10          2  fp32/fp32     default  rewritten  norm: torch, compose: torch (scale folded into B)  960 B -> 456 B
ops (2 modules): auto: cpu device, Triton kernels run on CUDA; training: the scale s*m/n folded into the LoRA up-projection's weight""",
        )

    def test_a_module_left_alone_shows_its_reason(self):
        mixed = HandWrittenDora(adapter_dtype=torch.float64)  # fp64 adapters on an fp32 W: left alone
        report = dora_fused.audit(mixed, torch.randn(3, 5, dtype=torch.float64))
        self.assertExpectedInline(
            str(report),
            """\
dora_fused: 1 graph, 0 graph breaks, 1 DoRA modules found, 0 rewritten, 1 left alone
module  kind       d_out x d_in  r  base/adapter  adapter  status   ops  norm memory
(root)  DoRA-like  -             -  -             -        skipped  -    -
left alone: (root): hand-written DoRA with mixed dtypes is not a supported form yet""",
        )


@pytest.mark.slow
def test_audit_matches_what_the_backend_does_and_compiles_nothing():
    model = tiny_llama_dora(torch.float32, torch.float32).eval()
    embeds = torch.randn(1, 5, TINY_LLAMA["hidden_size"])
    report = dora_fused.audit(model, inputs_embeds=embeds)
    assert isinstance(report, dora_fused.RewriteReport)
    assert report.graph_count == 1 and report.graph_breaks == [] and report.error is None
    assert set(report.rewritten) == set(report.found) == dora_module_names(model)
    for m in report.modules:
        assert m.kind == "PEFT Linear" and m.active_adapters == ("default",)
        assert m.dense_bytes > m.rewritten_bytes > 0
    before = len(dora_fused.reports())
    compiled = torch.compile(model, backend="dora_fused")
    compiled(inputs_embeds=embeds)
    assert len(dora_fused.reports()) == before + 1  # audit itself recorded no compile
    last = dora_fused.last_report()
    assert type(last) is type(report)
    strip = lambda ms: [(m.name, m.adapter, m.status, m.ops, m.d_out, m.d_in, m.rank) for m in ms]  # noqa: E731
    assert strip(last.modules) == strip(report.modules)


def test_graph_breaks_and_modules_outside_any_graph_are_reported():
    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = small_dora_mlp()

        def forward(self, x):
            peft = self.inner.base_model.model
            x = peft[1](peft[0](x))
            torch._dynamo.graph_break()
            return self._eager_tail(x)

        @torch.compiler.disable
        def _eager_tail(self, x):
            return self.inner.base_model.model[2](x)

    report = dora_fused.audit(Broken(), torch.randn(3, 12))
    assert report.graph_count >= 1 and len(report.graph_breaks) >= 1
    assert any("graph_break" in reason for reason in report.graph_breaks), report.graph_breaks
    assert report.rewritten == ["inner.base_model.model.0"]
    [(name, reason)] = report.skipped
    assert name == "inner.base_model.model.2" and "in no traced graph" in reason


def test_json_round_trip_and_schema():
    mixed = HandWrittenDora(adapter_dtype=torch.float64)
    report = dora_fused.audit(mixed, torch.randn(3, 5, dtype=torch.float64))
    text = report.to_json()
    body = json.loads(text)
    assert body["schema"] == dora_fused.SCHEMA == "dora_fused.report/1"
    assert body["summary"] == {"found": 1, "rewritten": 0, "left_alone": 1}
    assert set(body["modules"][0]) >= {
        "name",
        "kind",
        "d_out",
        "d_in",
        "rank",
        "status",
        "reason",
        "ops",
        "ops_reason",
        "weight_dtype",
        "adapter_dtype",
        "active_adapters",
        "dense_bytes",
        "rewritten_bytes",
        "quantization",
    }
    again = dora_fused.RewriteReport.from_json(text)
    assert again.modules == report.modules and again.graph_breaks == report.graph_breaks
    assert again.to_json() == text
    with pytest.raises(ValueError, match="schema"):
        dora_fused.RewriteReport.from_json(json.dumps({**body, "schema": "dora_fused.report/0"}))
    # a report written before "quantization" was added reads back (a field added within the major version)
    older = {**body, "modules": [{k: v for k, v in m.items() if k != "quantization"} for m in body["modules"]]}
    assert dora_fused.RewriteReport.from_json(json.dumps(older)).modules[0].quantization is None


@pytest.mark.slow
def test_logging_one_info_line_per_graph_and_details_at_debug(caplog):
    with caplog.at_level(logging.DEBUG, logger="dora_fused"):
        torch.compile(small_dora_mlp(), backend="dora_fused")(torch.randn(3, 12))
    info = [r for r in caplog.records if r.name == "dora_fused" and r.levelno == logging.INFO]
    debug = [r for r in caplog.records if r.name == "dora_fused" and r.levelno == logging.DEBUG]
    assert len(info) == 1 and "2 DoRA modules found, 2 rewritten" in info[0].getMessage()
    assert len(debug) == 2 and all("rewritten base_model.model." in r.getMessage() for r in debug)


def test_environment_variable_turns_logging_on(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "debug")
    handlers, level = list(log.handlers), log.level
    try:
        configure_from_env()
        configure_from_env()  # idempotent
        added = [h for h in log.handlers if h not in handlers]
        assert len(added) == 1 and log.level == logging.DEBUG
    finally:
        log.handlers[:] = handlers
        log.setLevel(level)


# --- CLI -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    config = LlamaConfig(**TINY_LLAMA)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(root / "model")
    dora = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    dora.save_pretrained(root / "dora")
    lora = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj"]))
    lora.save_pretrained(root / "lora")
    (root / "factories.py").write_text(
        "import torch\n"
        "from helpers import HandWrittenDora, small_dora_mlp\n"
        "def hand_written():\n    m = HandWrittenDora(adapter_dtype=torch.float64)\n"
        "    return m, (torch.randn(3, 5, dtype=torch.float64),)\n"
        "def peft_mlp():\n    return small_dora_mlp(), ((torch.randn(3, 12),), {})\n"
        "def broken():\n    raise OSError('no such checkpoint')\n"
    )
    return root


def _run(args, capsys):
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_audits_a_model_and_adapter_directory(model_dirs, capsys):
    code, out, err = _run(
        ["audit", "--model", str(model_dirs / "model"), "--adapter", str(model_dirs / "dora"), "--strict"], capsys
    )
    assert code == 0, err
    assert out.startswith("dora_fused: 1 graph, 0 graph breaks, 4 DoRA modules found, 4 rewritten, 0 left alone")
    code, out, _ = _run(
        ["audit", "--model", str(model_dirs / "model"), "--adapter", str(model_dirs / "dora"), "--json"], capsys
    )
    assert code == 0 and json.loads(out)["summary"]["rewritten"] == 4


def test_cli_strict_fails_when_a_module_is_left_alone(model_dirs, capsys, monkeypatch):
    monkeypatch.chdir(model_dirs)
    code, out, err = _run(["audit", "--factory", "factories:hand_written"], capsys)
    assert code == 0 and "left alone: " in out
    code, _, err = _run(["audit", "--factory", "factories:hand_written", "--strict"], capsys)
    assert code == 1 and "1 DoRA module(s) left alone" in err
    code, out, _ = _run(["audit", "--factory", "factories:peft_mlp", "--strict"], capsys)
    assert code == 0 and "2 rewritten" in out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "{root}/missing"], "model directory not found"),
        (["--model", "{root}/model", "--adapter", "{root}/missing"], "adapter directory not found"),
        (["--model", "{root}/model", "--adapter", "{root}/model"], "not a PEFT adapter directory"),
        (["--model", "{root}/dora"], "not a transformers model directory"),
        (["--model", "{root}/model", "--adapter", "{root}/lora"], "no DoRA module in the model"),
        (["--model", "{root}/model"], "no DoRA module in the model"),
        (["--factory", "factories:broken"], "factory 'factories:broken' failed: OSError"),
        (["--factory", "factories"], "--factory must be module:function"),
        (["--factory", "no_such_module:f"], "cannot load factory"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(model_dirs, capsys, monkeypatch, args, message):
    monkeypatch.chdir(model_dirs)
    code, out, err = _run(["audit", *[a.format(root=model_dirs) for a in args]], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("dora-fused audit: error: ") and message in err, err
