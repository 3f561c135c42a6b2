"""Every benchmark script imports and parses its arguments on the CPU: ``python benchmarks/X.py --help``;
benchmarks/training.py also runs end to end at toy sizes.

The scripts need a GPU to measure (except matching_cost.py and models.py --tiny); this keeps
them from rotting where none is. Each runs in this process as ``__main__`` (no new interpreter,
so no second import of torch) with the benchmarks folder on ``sys.path``, as
``python benchmarks/X.py`` has it.
"""

from __future__ import annotations

import importlib.util
import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
HELPERS = {"timing.py"}  # imported by the scripts, not run
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if p.name not in HELPERS)


def test_the_scripts_are_found():
    assert {"ops.py", "dora_linear.py", "models.py", "memory_peak.py", "matching_cost.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setattr(sys, "argv", [str(BENCH / script), "--help"])
    before = set(sys.modules)
    try:
        with pytest.raises(SystemExit) as exit_:  # argparse's --help exits 0; a script without it would run
            runpy.run_path(str(BENCH / script), run_name="__main__")
    finally:  # the scripts' sibling modules (timing, models, ...) leave with the folder
        for name in set(sys.modules) - before:
            if str(BENCH) in str(getattr(sys.modules[name], "__file__", None) or ""):
                del sys.modules[name]
    assert exit_.value.code == 0


# --- benchmarks/training.py end to end at toy sizes (--tiny: aot_eager, CPU) --------------------------------------

TRAINING_CASES = [
    f"{scope}-1024x1024-r16-fp32-{work}" for scope in ("layer", "layer_b2b") for work in ("prefill", "train")
]
TRAINING_CASES += ["model4-h1024-r8-bf16-train"]
TRAINING_CONTENDERS = ("peft_eager", "torch_compile", "dora_fused", "lora")


@pytest.fixture(scope="module")
def training():
    """benchmarks/training.py imported in this process: its parent part runs here, its workers in processes."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCH))
        before = set(sys.modules)
        spec = importlib.util.spec_from_file_location("training_bench", BENCH / "training.py")
        module = importlib.util.module_from_spec(spec)
        patch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
        spec.loader.exec_module(module)
        yield module
        for name in set(sys.modules) - before:  # its sibling modules (timing, models) leave with the folder
            if str(BENCH) in str(getattr(sys.modules[name], "__file__", None) or ""):
                del sys.modules[name]


def _run_training(training, out: Path, *args: str) -> dict:
    training.run_all(training.parse_args(["--tiny", "--out", str(out), *args]))
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def training_run(training, tmp_path_factory) -> dict:
    """Every contender on a layer (both works, single and back-to-back steps) and a 1-layer model's training step."""
    return _run_training(training, tmp_path_factory.mktemp("training") / "t.json", "--cases", ",".join(TRAINING_CASES))


@pytest.mark.slow
def test_training_matrix_rows(training_run):
    meta, rows = training_run["meta"], training_run["rows"]
    assert meta["torch"] and meta["peft"] and meta["transformers"] and meta["date"] and meta["gpu"] is None
    assert meta["tiny"] is True and meta["inner"] == "aot_eager" and meta["tokens"] == 32
    by_key = {(r["case"], r["contender"]): r for r in rows}
    assert set(by_key) == {(case, c) for case in TRAINING_CASES for c in TRAINING_CONTENDERS}
    assert not {key: row.get("error") for key, row in by_key.items() if row["status"] != "ok"}
    for (case, contender), row in by_key.items():
        assert len(row["times"]) == 2 and row["ms"] > 0 and row["first_call_s"] > 0 and row["compile_s"] >= 0
        assert row["peak_mb"] is None and row["process_s"] > 0  # no CUDA: no peak memory
        assert row["adapted_modules"] == (1 if case.startswith("layer") else 7)  # one decoder layer's 7 linears
        assert row["dora_fused_imported"] == (contender == "dora_fused")  # the others never import it
        assert (row["graphs"] == 0) == (contender == "peft_eager")  # graphs compiled by the first step
        assert row["graphs_after_first_call"] == 0  # nothing recompiled while timed
        if contender == "dora_fused":
            assert row["rewritten"] == row["adapted_modules"] and row["left_alone"] == 0
            assert row["rewrite_errors"] == []
        else:
            assert "rewritten" not in row


@pytest.mark.slow
def test_training_matrix_ratios(training_run):
    meta = training_run["meta"]
    ratios = {entry["case"]: entry for entry in meta["ratios"]}
    assert set(ratios) == set(TRAINING_CASES)
    for case, entry in ratios.items():
        assert set(entry) == {"case", *meta["targets"]}
        assert entry["speed_vs_compile"] > 0 and entry["compile_vs_compile"] > 0
        assert (entry["step_vs_lora"] is not None) == case.endswith("-train")
        assert entry["peak_vs_lora"] is None  # no CUDA: no peak memory


@pytest.mark.slow
def test_training_plots(training_run, tmp_path):
    pytest.importorskip("matplotlib")
    results = tmp_path / "training.json"
    results.write_text(json.dumps(training_run))
    command = [sys.executable, str(BENCH / "plot_training.py"), str(results), "--out", str(tmp_path / "t")]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    assert (tmp_path / "t_ratios.png").stat().st_size > 0 and (tmp_path / "t_vs_lora.png").stat().st_size > 0


def test_training_matrix_records_failures_and_goes_on(training, tmp_path):
    """A process that fails to compile and one past its timeout each give their cases a row; the run finishes."""
    case = "layer-1024x1024-r8-bf16-prefill"
    [failed] = _run_training(training, tmp_path / "f.json", "--cases", case, "--contenders", "lora", "--inner", "nope")[
        "rows"
    ]
    assert failed["status"] == "error" and "nope" in failed["error"] and failed["case"] == case
    timed_out = _run_training(
        training, tmp_path / "t.json", "--cases", case, "--contenders", "lora", "--timeout", "0.5"
    )
    [row] = timed_out["rows"]
    assert row["status"].startswith("timeout") and row["case"] == case
    assert timed_out["meta"]["ratios"] == [
        dict(case=case, speed_vs_compile=None, step_vs_lora=None, peak_vs_lora=None, compile_vs_compile=None)
    ]
