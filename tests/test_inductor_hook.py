"""The Inductor hook: ``enable_inductor_hook()`` makes ``backend="inductor"`` rewrite DoRA layers as the backend does.

Settings (enable, disable, composition with a user's pass) and the pass on Dynamo's graphs
run without compiling; one test compiles with real Inductor through both paths and compares
the graphs Inductor receives. The trainers that compile with Inductor are in test_trainers.py.
"""

from __future__ import annotations

import os
import pickle
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY_LLAMA, assert_close, dora_module_names, tiny_llama_dora
from torch._inductor.custom_graph_pass import CustomGraphPass

import dora_fused
from dora_fused.graph_rewrite import backend_owns_graph
from dora_fused.inductor_hook import ENV_VAR, DoraInductorPass
from dora_fused.passes import DoraRewritePass, Form
from dora_fused.passes.peft_linear import match_peft_linear
from dora_fused.passes.rewrite import rewrite_with_compose


class RecordingPass(CustomGraphPass):
    """A user's pre-grad pass: keeps the code of every graph Inductor hands it."""

    def __init__(self) -> None:
        self.codes: list[str] = []

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.codes.append(graph.python_code("self").src)

    def uuid(self) -> str:
        return "recording-pass"


@pytest.fixture
def inductor_settings():
    """Inductor's pre-grad settings as they were before the test, restored after it."""
    config = torch._inductor.config
    before = (config.pre_grad_custom_pass, config.pre_grad_pass_timing)
    yield config
    dora_fused.disable_inductor_hook()
    config.pre_grad_custom_pass, config.pre_grad_pass_timing = before


def _embeds(seed: int = 3) -> torch.Tensor:
    return torch.randn(1, 5, TINY_LLAMA["hidden_size"], generator=torch.Generator().manual_seed(seed))


def _dynamo_graph(model: torch.nn.Module, *args, **kwargs) -> torch.fx.GraphModule:
    """The one graph Dynamo hands a backend for ``model(*args, **kwargs)``, as it was handed."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=keep)(*args, **kwargs)
    [gm] = graphs
    return gm


# --- settings --------------------------------------------------------------------------------------


def test_enable_runs_first_before_a_users_pass_is_idempotent_and_disable_restores(inductor_settings):
    config = inductor_settings
    user = RecordingPass()
    config.pre_grad_custom_pass = user
    hook = dora_fused.enable_inductor_hook()
    assert dora_fused.enable_inductor_hook() is hook  # idempotent
    assert config.pre_grad_custom_pass == [hook, user] and dora_fused.inductor_hook_enabled()
    assert config.pre_grad_pass_timing == "early"  # runs on cache hits too: every graph gets a report
    dora_fused.disable_inductor_hook()
    assert config.pre_grad_custom_pass is user and config.pre_grad_pass_timing == "default"
    assert not dora_fused.inductor_hook_enabled()
    dora_fused.disable_inductor_hook()  # disabling twice changes nothing
    assert config.pre_grad_custom_pass is user


def test_disable_after_the_setting_changed_removes_only_the_hook(inductor_settings):
    config = inductor_settings
    config.pre_grad_pass_timing = "late"  # a user's choice: kept (the hook's uuid keys the caches then)
    hook = dora_fused.enable_inductor_hook()
    assert config.pre_grad_custom_pass == [hook] and config.pre_grad_pass_timing == "late"
    other = RecordingPass()
    config.pre_grad_custom_pass = [*config.pre_grad_custom_pass, other]
    dora_fused.disable_inductor_hook()
    assert config.pre_grad_custom_pass == [other] and config.pre_grad_pass_timing == "late"


def test_hook_uses_the_backends_default_ops_and_a_stable_cache_key():
    hook = DoraInductorPass()
    assert hook.ops == dora_fused.backend().ops == "auto"
    assert hook.uuid() == DoraInductorPass().uuid() == pickle.loads(pickle.dumps(hook.uuid()))
    assert hook.uuid() != DoraInductorPass(ops="torch").uuid()


# --- the pass on Dynamo's graphs (no compile) ------------------------------------------------------


def test_hook_rewrites_dynamo_graphs_as_the_backend_and_records_each_once(inductor_hook):
    model = tiny_llama_dora(r=4, layers=1).eval()
    by_backend = _dynamo_graph(model, inputs_embeds=_embeds())
    DoraRewritePass(ops=dora_fused.backend().ops)(by_backend)
    gm = _dynamo_graph(model, inputs_embeds=_embeds())

    inductor_hook(gm.graph)
    assert gm.code == by_backend.code
    [report] = dora_fused.reports()
    assert len(report.rewritten) == len(dora_module_names(model)) and report.skipped == [] and report.error is None

    inductor_hook(torch.fx.symbolic_trace(torch.nn.Linear(3, 3)).graph)  # not a graph Dynamo compiled
    with backend_owns_graph():  # the backend compiles this one
        inductor_hook(_dynamo_graph(model, inputs_embeds=_embeds()).graph)
    assert len(dora_fused.reports()) == 1


def _raising_rewrite(graph, match, impl):
    rewrite_with_compose(graph, match, impl)  # mutate the graph half-way, then fail
    raise RuntimeError("injected failure")


def test_an_error_in_the_pass_leaves_the_graph_as_it_was_and_is_recorded(inductor_hook):
    gm = _dynamo_graph(tiny_llama_dora(r=4, layers=1).eval(), inputs_embeds=_embeds())
    before = gm.code
    hook = DoraInductorPass()
    faulty = Form("faulty", "PEFT Linear", "test form", match_peft_linear, _raising_rewrite)
    hook.rewrite_pass = DoraRewritePass(forms=(faulty,))
    hook(gm.graph)
    report = dora_fused.last_report()
    assert gm.code == before
    assert "injected failure" in report.error and report.rewritten == []


# --- through Inductor ------------------------------------------------------------------------------


def test_backend_and_hook_hand_inductor_the_same_graph(inductor_settings):
    """``backend="dora_fused"`` and ``backend="inductor"`` with the hook: the same graph reaches Inductor.

    A user's pre-grad pass, set before the hook is enabled and so run after it, records what
    Inductor compiles. Each compile records one report (the backend's graph is not rewritten a
    second time by the hook), the two reports list the same modules and ops, and the outputs are
    equal.
    """
    recording = RecordingPass()
    inductor_settings.pre_grad_custom_pass = recording
    dora_fused.enable_inductor_hook()
    dora_fused.clear_reports()
    model = tiny_llama_dora(r=4, layers=1).eval()
    embeds = _embeds()
    with torch.no_grad():
        expected = model(inputs_embeds=embeds).logits
        by_backend = torch.compile(model, backend="dora_fused")(inputs_embeds=embeds).logits
        torch._dynamo.reset()
        by_hook = torch.compile(model)(inputs_embeds=embeds).logits

    backend_code, hook_code = recording.codes
    assert hook_code == backend_code
    assert "linalg_norm" not in hook_code and "eye" not in hook_code
    backend_report, hook_report = dora_fused.reports()
    assert hook_report.modules == backend_report.modules
    assert len(hook_report.rewritten) == len(dora_module_names(model)) and hook_report.error is None
    assert torch.equal(by_hook, by_backend)
    assert_close(by_hook, expected, rtol=1e-5, atol=1e-5, what="logits")


# --- DORA_FUSED_INDUCTOR=1 at interpreter start ----------------------------------------------------


def _installed_pth() -> Path | None:
    for folder in [*site.getsitepackages(), site.getusersitepackages()]:
        path = Path(folder) / "dora_fused_inductor.pth"
        if path.exists():
            return path
    return None


@pytest.mark.skipif(_installed_pth() is None, reason="dora_fused is not installed (no dora_fused_inductor.pth)")
@pytest.mark.parametrize("value", [None, "0", "1"])
def test_the_environment_variable_enables_the_hook_at_interpreter_start(tmp_path, value):
    """The installed .pth file imports dora_fused and enables the hook only with DORA_FUSED_INDUCTOR=1."""
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    if value is not None:
        env[ENV_VAR] = value
    script = (
        "import sys; loaded = 'torch' in sys.modules, 'dora_fused' in sys.modules; "
        "print(*loaded, loaded[1] and sys.modules['dora_fused'].inductor_hook_enabled())"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    enabled = str(value == "1")
    assert result.stdout.split() == [enabled, enabled, enabled]  # neither torch nor dora_fused imported unless enabled
