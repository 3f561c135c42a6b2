"""benchmarks/models.py end to end in --tiny mode on the CPU.

One run of the harness (one process per contender and the fp64 reference, compiled contenders
through aot_eager) on a tiny Llama (inference and a training step) and a tiny Qwen2-VL (image +
text inference). The timings are toy numbers; what is checked is the mechanism: every row and
field, the error against fp64 (dora_fused no further from it than PEFT eager), the rewrite of
every DoRA module, the markdown tables, the resume and the time budget.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import import_benchmark

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
LLAMA = ["llama8b-r384-fp32ad-infer", "llama8b-r384-fp32ad-train"]
VLM = ["qwen2vl7b-r384-fp32ad-infer"]
CASES = LLAMA + VLM
CONTENDERS = {"dora_fused", "peft_eager", "merged"}  # merged: on the Llama only, to keep the test short
DORA_MODULES = 14  # 7 linear layers × 2 decoder layers, in both tiny models
# relative error against fp64 of the last position's logits / the checked gradients, bf16 base:
# PEFT eager's own is about 6e-3; dora_fused may be at most RATIO × PEFT's, plus SLACK
MAX_ERROR, RATIO, SLACK = 0.03, 1.1, 1e-4


def _harness(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    command = [sys.executable, str(BENCH / "models.py"), "--tiny", "--inner", "aot_eager", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("models_bench")
    out = tmp / "models.json"
    args = ["--out", str(out), "--work-dir", str(tmp / "work"), "--repeats", "2"]
    # three processes at once: their compiles overlap, their timed calls must not
    llama = [*args, "--cases", ",".join(LLAMA), "--contenders", "dora_fused,peft_eager,merged", "--parallel", "3"]
    vlm = [*args, "--cases", ",".join(VLM), "--contenders", "dora_fused,peft_eager"]
    _harness(*llama)
    _harness(*vlm)  # appends to the same file
    return dict(out=out, llama_args=llama, data=json.loads(out.read_text()))


def _rows(data: dict) -> dict[tuple[str, str], dict]:
    return {(r["case"], r["contender"]): r for r in data["rows"]}


@pytest.mark.slow
def test_every_case_and_contender_has_a_good_row(run):
    rows = _rows(run["data"])
    expected = {(case, c) for case in CASES for c in CONTENDERS if c != "merged" or case == LLAMA[0]}
    expected |= {(case, "fp64_ref") for case in CASES}
    assert set(rows) == expected
    bad = {key: (row["status"], row.get("error", "")[-500:]) for key, row in rows.items() if row["status"] != "ok"}
    assert not bad


@pytest.mark.slow
def test_fields(run):
    runs = run["data"]["meta"]["runs"].values()
    assert len(runs) == 2
    assert all(env["torch"] and env["peft"] and env["transformers"] and env["tiny"] is True for env in runs)
    for (_, contender), row in _rows(run["data"]).items():
        if contender == "fp64_ref":
            continue
        assert row["layers"] == 2 and row["r"] == 8 and row["adapters"] == "fp32ad" and row["seq"] == 32
        assert len(row["times"]) == 2 and all(t > 0 for t in row["times"])
        assert row["q10"] <= row["ms"] <= row["q90"]
        assert row["first_call_s"] > 0 and row["compile_s"] >= 0 and row["tokens_per_s"] > 0
        assert row["graphs_compiled_timed"] == 0  # nothing recompiles while timed
        assert row["weights_gb"] > 0 and "peak_gb" not in row  # no CUDA: no peak memory
        if row["mode"] == "train":
            assert 0 < row["fwd_bwd_ms"] <= row["ms"]
        assert row["dora_fused_imported"] == (contender == "dora_fused")  # the other processes never import it


@pytest.mark.slow
def test_parallel_processes_never_time_at_once(run):
    windows = sorted((r["turn_start"], r["turn_end"]) for r in run["data"]["rows"] if r["contender"] != "fp64_ref")
    assert len(windows) == 2 * len(LLAMA) + 1 + 2 * len(VLM)
    assert all(start < end <= next_start for (start, end), (next_start, _) in itertools.pairwise(windows))
    assert {r["parallel"] for r in run["data"]["rows"] if r["case"] in LLAMA} == {3}


@pytest.mark.slow
def test_block_scope_compiles_each_layer_once_with_checkpointing(tmp_path):
    """--compile-scope block: the decoder layers share one compiled graph, rewritten, checkpointing included."""
    out = tmp_path / "block.json"
    args = ["--out", str(out), "--work-dir", str(tmp_path / "work"), "--repeats", "1", "--warmup", "1"]
    cases = "llama8b-full-r384-fp32ad-infer,llama8b-full-r384-fp32ad-train-gc"
    _harness(*args, "--cases", cases, "--contenders", "dora_fused", "--compile-scope", "block")
    rows = {r["mode"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"infer", "train-gc"} and all(r["status"] == "ok" for r in rows.values())
    for row in rows.values():
        assert row["layers"] == 3 and row["compile_scope"] == "block" and row["dora_modules"] == 21
        # each compiled graph rewrites one decoder layer's 7 linear layers, its records named after the
        # layer it was first compiled for (with checkpointing, layer 0's input needs no grad: a second
        # graph serves layers 1 and 2)
        assert row["rewritten"] == 7 * row["graphs_compiled"]
        assert row["graph_breaks"] == 0 and row["recompile_limit_hits"] == 0
    assert rows["infer"]["graphs_compiled"] == 1
    # checkpointing inside the compiled call (a checkpointed forward, its recompute and backward)
    assert 1 <= rows["train-gc"]["graphs_compiled"] <= 2


@pytest.mark.slow
def test_errors_against_fp64(run):
    rows = _rows(run["data"])
    for case in CASES:
        peft, ours = rows[case, "peft_eager"], rows[case, "dora_fused"]
        keys = ["rel_err"] + (["grad_rel_err"] if case.endswith("-train") else [])
        for key in keys:
            assert 0 < peft[key] < MAX_ERROR, (case, key, peft[key])
            assert ours[key] <= RATIO * peft[key] + SLACK, (case, key, ours[key], peft[key])
    assert 0 < rows[LLAMA[0], "merged"]["rel_err"] < MAX_ERROR  # bf16 merged weights: their own rounding


@pytest.mark.slow
def test_dora_fused_rewrote_every_module(run):
    rows = _rows(run["data"])
    for case in CASES:
        row = rows[case, "dora_fused"]
        assert row["dora_modules"] == DORA_MODULES
        assert row["rewritten"] == DORA_MODULES and row["left_alone"] == 0
        assert "rewritten" not in rows[case, "peft_eager"]


@pytest.mark.slow
def test_tables(run, monkeypatch):
    table = import_benchmark(monkeypatch, "models_table", "models_table")
    text = table.tables(run["data"])
    for case in CASES:
        assert text.count(f"| {case} |") == 4  # time, memory, compile, accuracy
    assert "| 14/14 |" in text


@pytest.mark.slow
def test_plots(run, tmp_path):
    pytest.importorskip("matplotlib")
    subprocess.run(
        [sys.executable, str(BENCH / "plot_models.py"), str(run["out"]), "--out", str(tmp_path / "m")],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert (tmp_path / "m_speedup.png").stat().st_size > 0 and (tmp_path / "m_memory.png").stat().st_size > 0


@pytest.fixture
def harness(monkeypatch):
    """benchmarks/models.py imported in this process (for its planning, without workers)."""
    return import_benchmark(monkeypatch, "models", "models_bench_harness")


@pytest.mark.slow
def test_resume_plans_nothing_already_measured(run, harness):
    args = ["--tiny", "--inner", "aot_eager", *run["llama_args"]]
    assert harness.plan(harness.parse_args(args))  # without --resume: everything again
    assert harness.plan(harness.parse_args([*args, "--resume"])) == []


def test_time_budget_starts_nothing_when_spent(tmp_path, harness):
    out = tmp_path / "budget.json"
    args = ["--tiny", "--out", str(out), "--cases", CASES[0], "--contenders", "peft_eager", "--time-budget", "0"]
    harness.run_all(harness.parse_args([*args, "--no-reference"]))
    [row] = json.loads(out.read_text())["rows"]
    assert row["status"] == "skipped: time budget" and row["case"] == CASES[0]


def test_memory_peak_replay_finds_what_is_alive_at_the_peak(monkeypatch):
    module = import_benchmark(monkeypatch, "memory_peak", "memory_peak")
    trace = [
        dict(action="alloc", addr=1, size=100),
        dict(action="free_requested", addr=99, size=5),  # allocated before recording: ignored
        dict(action="alloc", addr=2, size=50),
        dict(action="free_requested", addr=1, size=100),
        dict(action="free_completed", addr=1, size=100),  # the same block: counted once
        dict(action="alloc", addr=3, size=70),
        dict(action="alloc", addr=4, size=20),  # 50 + 70 + 20 = 140: the peak
        dict(action="free_requested", addr=3, size=70),
        dict(action="alloc", addr=5, size=60),  # 50 + 20 + 60 = 130
    ]
    peak, alive = module.replay_peak(trace)
    assert peak == 150  # 100 + 50, before block 1 was freed
    assert sorted(e["addr"] for e in alive) == [1, 2]
    peak, alive = module.replay_peak(trace[2:])
    assert peak == 140 and sorted(e["addr"] for e in alive) == [2, 3, 4]


GENERATED = """\
# kernel path: /tmp/torchinductor_x/ab/cab.py
# Topologically Sorted Source Nodes: [lora], Original ATen: [aten._to_copy, aten.mul]
triton_poi_fused__to_copy_mul_0 = async_compile.triton('triton_poi_fused__to_copy_mul_0', \'\'\'
\'\'\')
def call(args):
    buf0 = empty_strided_cuda((4096, 14336), (14336, 1), torch.float32)
    # Topologically Sorted Source Nodes: [y], Original ATen: [aten.mm]
    extern_kernels.mm(arg0_1, arg1_1, out=buf0)
    buf1 = empty_strided_cuda((4096, 14336), (14336, 1), torch.float32)
    buf10 = buf0; del buf0  # reuse
    stream0 = get_raw_stream(0)
    triton_poi_fused__to_copy_mul_0.run(buf10, buf1, 58720256, stream=stream0)
    return (buf1, )
"""


def test_memory_peak_names_what_writes_each_generated_buffer(monkeypatch, tmp_path):
    """An allocation in generated code is followed to its first use, with the ATen ops Inductor noted there."""
    module = import_benchmark(monkeypatch, "memory_peak", "memory_peak")
    path = tmp_path / "torchinductor_x" / "cab.py"
    path.parent.mkdir()
    path.write_text(GENERATED)
    lines = GENERATED.splitlines()
    line_of = {text.split(" = ")[0].strip(): i for i, text in enumerate(lines, 1) if "= empty_strided" in text}
    assert module.producer(str(path), line_of["buf0"]) == "extern_kernels.mm(arg0_1, arg1_1, out=buf0) [[aten.mm]]"
    written = module.producer(str(path), line_of["buf1"])  # not buf10: whole names only
    assert written.startswith("triton_poi_fused__to_copy_mul_0.run(buf10, buf1,")
    assert written.endswith("[[aten._to_copy, aten.mul]]")  # from the comment above the kernel's definition
    assert module.producer(str(path), line_of["buf1"] + 1) == ""  # not an allocation
    frames = [dict(filename=str(path), line=line_of["buf0"], name="call")]
    assert module.origin(frames).endswith("<- extern_kernels.mm(arg0_1, arg1_1, out=buf0) [[aten.mm]]")
