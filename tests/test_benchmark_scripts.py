"""Every benchmark script imports and parses its arguments on the CPU: ``python benchmarks/X.py --help``;
benchmarks/training.py also runs end to end at toy sizes.

The scripts need a GPU to measure (except matching_cost.py, models.py --tiny and convergence.py);
this keeps them from rotting where none is. Each runs in this process as ``__main__`` (no new
interpreter, so no second import of torch) with the benchmarks folder on ``sys.path``, as
``python benchmarks/X.py`` has it. convergence.py also trains its toy model a few steps here, every
contender in this process, and its summary's arithmetic is checked on made-up losses.
benchmarks/turns.py (the parent/worker turns of models.py, qdora.py and inference.py) runs toy worker processes;
inference.py --parallel runs at toy sizes.
"""

from __future__ import annotations

import itertools
import json
import math
import runpy
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import import_benchmark

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
HELPERS = {"decode_profile.py", "timing.py", "turns.py"}  # imported by the scripts, not run
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


# --- benchmarks/turns.py: worker processes compile at once and time one by one ----------------------------------

# A toy worker: per round, "compiles" (busy), then "times" in a turn; prints each round's intervals as a JSON row.
# argv: name, rounds, and where to die (busy1: exit 3 before its second turn; timing0: exit 4 inside its first).
TURN_WORKER = """
import json, os, sys, time
sys.path.insert(0, {bench!r})
from turns import device_turn
name, rounds, die = sys.argv[1], int(sys.argv[2]), sys.argv[3]
busy_start = time.monotonic()
for round_ in range(rounds):
    time.sleep(0.05)  # compiles
    if die == f"busy{{round_}}":
        print("dying while busy", file=sys.stderr, flush=True)
        sys.exit(3)
    busy = (busy_start, time.monotonic())
    with device_turn(True, name):
        start = time.monotonic()
        if die == f"timing{{round_}}":
            os._exit(4)
        time.sleep(0.05)  # times
        timed = (start, time.monotonic())
    busy_start = time.monotonic()  # after "next"
    print(json.dumps(dict(name=name, round=round_, busy=busy, timed=timed)), flush=True)
"""


@pytest.fixture
def turns(monkeypatch):
    return import_benchmark(monkeypatch, "turns", "turns_bench")


def _toy_worker(name: str, rounds: int = 2, die: str = "-") -> list[str]:
    return [sys.executable, "-c", TURN_WORKER.format(bench=str(BENCH)), name, str(rounds), die]


def _run_turns(turns, commands: list[list[str]], deadline_s: float, **kwargs) -> list:
    """``turns.run_batch`` in a thread: a parent that hangs past its deadline fails the test, not the suite."""
    outcomes: list = []
    deadline = time.monotonic() + deadline_s

    def run() -> None:
        outcomes.append(turns.run_batch(commands, deadline, **kwargs))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(deadline_s + 15)
    assert outcomes, "run_batch hung past its deadline"
    return outcomes[0]


def _overlap(a: list[float], b: list[float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def test_turns_time_one_by_one_while_nobody_else_runs(turns):
    """No timed part overlaps another worker's timed or busy part; a round's compiles start once all have timed;
    a worker that dies while busy or while timing holds nobody up."""
    commands = [_toy_worker("a"), _toy_worker("b"), _toy_worker("c", die="busy1"), _toy_worker("d", die="timing0")]
    outcomes = _run_turns(turns, commands, 20, keep=lambda line: line.startswith("{"))
    assert [o.returncode for o in outcomes] == [0, 0, 3, 4] and not any(o.timed_out for o in outcomes)
    rows = [json.loads(line) for o in outcomes for line in o.kept]
    assert sorted((r["name"], r["round"]) for r in rows) == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("c", 0)]
    assert "dying while busy" in outcomes[2].tail and not any("turn" in line for o in outcomes for line in o.tail)
    for r, other in itertools.permutations(rows, 2):
        if r["name"] != other["name"]:
            assert not _overlap(r["timed"], other["timed"]) and not _overlap(r["timed"], other["busy"]), (r, other)
    # "next" only once every worker has timed: no second-round compile before the last first-round timed part ends
    assert min(r["busy"][0] for r in rows if r["round"] == 1) > max(r["timed"][1] for r in rows if r["round"] == 0)


def test_turns_deadline_kills_the_batch(turns):
    """A worker that never asks for its turn holds the others' turns up to the deadline, then all are killed."""
    hang = [sys.executable, "-c", "import time; time.sleep(60)"]
    outcomes = _run_turns(turns, [hang, _toy_worker("a")], 1.0)
    assert all(o.timed_out and o.returncode < 0 for o in outcomes)  # "a" asked for its turn and never got it
    assert all(o.seconds < 20 for o in outcomes)


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
        before = set(sys.modules)
        module = import_benchmark(patch, "training", "training_bench")
        yield module
        for name in set(sys.modules) - before:  # its sibling modules (timing, models) leave with the folder
            if str(BENCH) in str(getattr(sys.modules[name], "__file__", None) or ""):
                del sys.modules[name]


def _run_training(training, out: Path, *args: str) -> dict:
    training.run_all(training.parse_args(["--tiny", "--out", str(out), *args]))
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def training_run(training, tmp_path_factory) -> dict:
    """Every contender on a layer (both works, single and back-to-back steps) and a 1-layer model's training step.

    Two processes at a time (``--parallel 2``): their timed parts take turns.
    """
    out = tmp_path_factory.mktemp("training") / "t.json"
    return _run_training(training, out, "--cases", ",".join(TRAINING_CASES), "--parallel", "2")


@pytest.mark.slow
def test_training_matrix_rows(training_run):
    meta, rows = training_run["meta"], training_run["rows"]
    assert meta["torch"] and meta["peft"] and meta["transformers"] and meta["date"] and meta["gpu"] is None
    assert meta["tiny"] is True and meta["inner"] == "aot_eager" and meta["tokens"] == 32 and meta["parallel"] == 2
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
    windows = sorted((r["turn_start"], r["turn_end"]) for r in rows)  # each case's timed part, in its own turn
    assert all(later[0] >= earlier[1] for earlier, later in itertools.pairwise(windows))


@pytest.mark.slow
def test_training_matrix_ratios(training_run):
    meta = training_run["meta"]
    ratios = {entry["case"]: entry for entry in meta["ratios"]}
    assert set(ratios) == set(TRAINING_CASES)
    for case, entry in ratios.items():
        assert set(entry) == {"case", *meta["targets"]}
        assert entry["speed_vs_compile"] > 0
        assert entry["compile_vs_compile"] is None  # the compiles overlapped (--parallel): not compared
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


@pytest.fixture
def convergence(monkeypatch):
    """benchmarks/convergence.py imported in this process, the benchmarks folder on ``sys.path``."""
    module = import_benchmark(monkeypatch, "convergence", "convergence_bench")
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)  # main() sets the intra-op threads it was given


def test_convergence_tiny_run(convergence, tmp_path):
    """Every contender trains a few steps from the same start; dora_fused rewrote every DoRA module."""
    out = tmp_path / "convergence.json"
    argv = ["--tiny", "--steps", "3", "--seeds", "0", "--inner", "aot_eager", "--same-process", "--threads", "1"]
    convergence.main([*argv, "--out", str(out)])
    data = json.loads(out.read_text())
    meta, rows = data["meta"], {r["contender"]: r for r in data["rows"]}
    assert meta["device"] == "cpu" and meta["steps"] == 3 and meta["seeds"] == [0] and meta["tiny"] is True
    assert meta["torch"] and meta["peft"] and meta["transformers"] and meta["date"]
    assert meta["corpus"]["bytes"] > 0 and len(meta["corpus"]["sha256"]) == 64
    assert set(rows) == {"reference", "eager", "torch_compile", "dora_fused"}
    for row in rows.values():
        assert row["status"] == "ok" and row["seed"] == 0 and len(row["losses"]) == 3
        assert all(math.isfinite(x) for x in row["losses"])
    # the same weights and first batch: the first losses agree to bf16 rounding of the activations
    first = [row["losses"][0] for row in rows.values()]
    assert max(first) - min(first) < 1e-2
    assert rows["reference"]["base_dtype"] == "float32" and rows["dora_fused"]["base_dtype"] == "bfloat16"
    ours = rows["dora_fused"]
    assert ours["dora_modules"] == 14 and ours["rewritten"] == 14 and ours["left_alone"] == 0
    # on the CPU the rewrite inserts the plain-torch factored norm and, in training, the folded compose
    assert ours["ops"] == {"torch:factored_row_norm_torch, torch:lora_up_folded_compose_torch": 14}
    assert not rows["torch_compile"].get("rewritten")
    summary = meta["summary"]
    for name in ("eager", "torch_compile", "dora_fused"):
        deviation = summary["contenders"][name]["to_reference"]["mean_abs"]
        assert deviation["min"] <= deviation["mean"] <= deviation["max"]
        # one step at the same adapter values as the fp32 eager model: bf16's error, not more
        assert 0 < summary["contenders"][name]["one_step"]["grad_rel_error"]["mean"] < 0.05
    # the fp32 eager model checked against itself: the same arithmetic, no error
    assert [c["step"] for c in rows["reference"]["one_step_checks"]] == [0, 1, 2]
    assert all(c["loss_error"] == 0 and c["grad_rel_error"] == 0 for c in rows["reference"]["one_step_checks"])
    assert summary["criterion"]["contender"] == "dora_fused" and summary["criterion"]["ratio"] > 0


def test_convergence_summary(convergence):
    """The summary's arithmetic on made-up losses; a dora_fused run that rewrote nothing does not count."""

    def row(contender: str, seed: int, losses: list[float], status: str = "ok") -> dict:
        return dict(contender=contender, seed=seed, losses=losses, status=status, wall_s=1.0)

    rows = [
        row("reference", 0, [2.0, 1.0, 1.0, 1.0]),
        row("reference", 1, [3.0, 2.0, 2.0, 2.0]),
        row("eager", 0, [2.0, 1.1, 1.1, 1.1]),
        row("eager", 1, [3.0, 2.1, 2.1, 2.1]),
        row("torch_compile", 0, [2.0, 1.2, 1.2, 0.8]),
        row("torch_compile", 1, [3.0, 2.2, 2.2, 1.8]),
        row("dora_fused", 0, [2.0, 1.1, 1.1, 0.9]),
        row("dora_fused", 1, [3.0, 2.1, 2.1, 1.9]),
    ]
    summary = convergence.summarize_runs(rows)
    tc = summary["contenders"]["torch_compile"]["to_reference"]
    assert tc["mean_abs"]["mean"] == pytest.approx(0.15) and tc["mean_abs"]["std"] == pytest.approx(0.0)
    assert tc["last_quarter_mean_abs"]["mean"] == pytest.approx(0.2)
    assert tc["mean_signed"]["mean"] == pytest.approx(0.05)
    assert summary["contenders"]["dora_fused"]["to_eager"]["mean_abs"]["mean"] == pytest.approx(0.05)
    assert summary["reference_seed_spread_mean_abs"] == pytest.approx(1.0)
    assert summary["criterion"]["ratio"] == pytest.approx(0.075 / 0.15) and summary["criterion"]["met"]

    rows[-2:] = [row(r["contender"], r["seed"], r["losses"], "rewrite incomplete: 0 of 14") for r in rows[-2:]]
    summary = convergence.summarize_runs(rows)
    assert summary["contenders"]["dora_fused"]["seeds_ok"] == [] and summary["criterion"] is None


def test_convergence_plot(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    module = import_benchmark(monkeypatch, "plot_convergence", "plot_convergence_bench")
    rows = [
        dict(contender=name, seed=seed, status="ok", losses=[3.0 - 0.01 * t + 1e-3 * i * seed for t in range(50)])
        for i, name in enumerate(("reference", "eager", "torch_compile", "dora_fused"))
        for seed in (0, 1)
    ]
    meta = dict(device="cpu", cpu="x86_64", gpu=None, steps=50, seeds=[0, 1], model=dict(layers=2, hidden=32, rank=4))
    out = module.plot(dict(meta=meta, rows=rows), str(tmp_path / "convergence.png"), window=5)
    assert Path(out).stat().st_size > 0


@pytest.mark.slow
def test_inference_parallel_processes_time_one_at_a_time(tmp_path):
    """benchmarks/inference.py --parallel at toy sizes: every row measured, no two timed windows overlapping."""
    out = tmp_path / "inference.json"
    command = [sys.executable, str(BENCH / "inference.py"), "--tiny", "--parts", "prefill,decode", "--cases", "llama4"]
    command += ["--contenders", "lora,frozen_norm", "--batches", "1,2", "--parallel", "2", "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["part"], r["contender"]) for r in rows] == list(
        itertools.product(["prefill", "decode"], ["lora", "frozen_norm"])
    )
    assert not [r["error"] for r in rows if "error" in r]
    windows = sorted(w for r in rows for w in r["turns"])
    assert len(windows) == 2 + 2 * 2  # a prefill window per process, a decode window per batch size
    assert all(later[0] >= earlier[1] for earlier, later in itertools.pairwise(windows))
