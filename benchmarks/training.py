"""DoRA training step and prefill: PEFT eager, torch.compile, backend="dora_fused" and LoRA, one matrix.

Question: what do a DoRA training step and a prefill cost under dora_fused, against torch.compile of
the same PEFT model and against plain LoRA of the same rank (the price to match), from one layer to
a 1B-shaped model?

    python benchmarks/training.py --quick --out training.json     # one GPU, about 6-8 minutes
    python benchmarks/training.py --out training.json              # the whole matrix: about 3-4 hours
    python benchmarks/training.py --out t.json --cases 'model4-*-r16-*' --contenders dora_fused,lora
    python benchmarks/training.py --tiny --out /tmp/t.json         # toy sizes: the harness on a CPU

Cases (``--list``), named scope-shape-rank-adapters-work: ranks 8, 16, 64, 384; adapters ``bf16``
or ``fp32`` (PEFT's default fp32 adapters on the bf16 base); work ``train`` (forward, backward,
AdamW step on the adapter parameters) or ``prefill`` (forward under no_grad, eval mode, a model's
logits at the last position only). Scopes, DoRA on every attention and MLP linear layer:
- ``layer``: one bf16 ``nn.Linear``, d_in x d_out of 1024², 2048², 4096², 4096x14336, 14336x4096,
  4096 tokens, the output's gradient a fixed random tensor; single synchronized steps
  (timing.time_calls); ``layer_b2b``: the same layer, 20 steps in a row per timing (time_back_to_back);
- ``model4``: 4 random-init Llama decoder layers of hidden 1024 / 2048 / 4096 (MLP 4096 / 8192 /
  14336, heads of 64 / 64 / 128, 8 KV heads, vocabulary 32000), 1 x 4096 tokens, labels = inputs;
- ``llama1b``: Llama-3.2-1B's shape (16 layers, hidden 2048, MLP 8192, 32 / 8 heads, vocabulary
  128256, tied embeddings).

Contenders: ``peft_eager``; ``torch_compile`` (``torch.compile(model)``, Inductor); ``dora_fused``
(``backend="dora_fused"``, the modules rewritten counted from ``dora_fused.reports()``); ``lora``
(``use_dora=False``, ``torch.compile(model)``). Each runs in a process of its own, one at a time,
with fresh Inductor and Triton caches (every compile is cold; only the dora_fused process imports
dora_fused). A process runs the cases of one layer or model, rank and adapters: prefill, then
train, Dynamo reset in between. ``--parallel N`` starts N processes at once: their builds and
compiles overlap, and each times while every other waits, none compiling or running
(benchmarks/turns.py; each row records its timed window, ``turn_start``/``turn_end``). Times and
peaks are then as clean as one process at a time; the first calls are not (the compiles share the
CPUs), so ``compile_vs_compile`` is left out of such a run's ratios. The first calls run at once
too, so N processes' peaks must fit in the GPU's memory together (at hidden 4096, 8 did not on an
80 GB H100: torch.compile's process ran out of memory).

Method: the same seeded weights and inputs in every process (``init_lora_weights=False``,
magnitudes moved off the row norms by ±50%). ``first_call_s``: the first (compiling) step's wall
time; then --warmup untimed and --reps timed steps: median ms, 10/90% quantiles (CUDA events;
``perf_counter`` on the CPU), and ``peak_mb``, the CUDA memory allocated meanwhile above what was
before (weights, optimizer state, inputs); ``compile_phases``, the first call's seconds per compile
phase (Dynamo's own timers; ``dora_fused_pass``, the rewrite pass's). A process past --timeout is
killed, an exception is caught: either gives its cases a row with the status and the error, and
the matrix goes on. --out is rewritten after every batch of processes (timing.write_json: GPU,
versions, date); the ratios come last:
``speed_vs_compile`` (torch.compile ms / dora_fused ms, target >= 1.00), ``step_vs_lora``
(dora_fused ms / LoRA ms, training, <= 1.10), ``peak_vs_lora`` (the same for peak memory, <= 1.10)
and ``compile_vs_compile`` (dora_fused's first call / torch.compile's, <= 1.30).

``--quick`` (QUICK_CASES, fp32 adapters): the hidden-4096 model4 training step at r = 16; the 4096²
layer's training step at r = 384 and 16, single and back to back; the 1B prefill at r = 16.
Estimated 6-8 minutes on one H100: 16 process starts of 5-10 s, 12 cold compiles of 10-60 s (a
layer's the shortest, the 1B model's the longest), seconds of timed steps; no process starts after
--time-budget (500 s with --quick). ``--tiny``: dimensions / 64, ranks 2-8, one decoder layer,
32 tokens, aot_eager instead of Inductor.
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

import turns  # benchmarks/turns.py: the worker processes' turns on the device
from models import default_dtype
from timing import PeakMemory, summarize, synchronize, time_back_to_back, time_calls, write_json

RANKS = (8, 16, 64, 384)
ADAPTERS = {"bf16": torch.bfloat16, "fp32": torch.float32}
WORKS = ("prefill", "train")  # the order a process runs them in
SCOPES = ("layer", "layer_b2b", "model4", "llama1b")
CONTENDERS = ("peft_eager", "torch_compile", "dora_fused", "lora")
LAYER_SHAPES = ((1024, 1024), (2048, 2048), (4096, 4096), (4096, 14336), (14336, 4096))  # (d_in, d_out)
DECODERS = {  # hidden: the Llama decoder of that width (model4)
    1024: dict(intermediate_size=4096, num_attention_heads=16),
    2048: dict(intermediate_size=8192, num_attention_heads=32),
    4096: dict(intermediate_size=14336, num_attention_heads=32),
}
LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    tie_word_embeddings=True,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
)
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUICK_CASES = (  # in the order they run: a --time-budget cut skips the last first
    "model4-h4096-r16-fp32-train",
    "layer-4096x4096-r384-fp32-train",
    "layer_b2b-4096x4096-r384-fp32-train",
    "llama1b-r16-fp32-prefill",
    "layer-4096x4096-r16-fp32-train",
    "layer_b2b-4096x4096-r16-fp32-train",
)
TARGETS = {  # ratio: (target, True where the ratio must be at least the target, False at most)
    "speed_vs_compile": (1.00, True),
    "step_vs_lora": (1.10, False),
    "peak_vs_lora": (1.10, False),
    "compile_vs_compile": (1.30, False),
}
TINY_RANKS = {8: 2, 16: 4, 64: 6, 384: 8}
BACK_TO_BACK_CALLS = 20
MIN_START_S = 20  # no process starts with less of --time-budget left
SEED, INPUT_SEED, MAGNITUDE_SPREAD, LR = 0, 1234, 0.5, 1e-5
ROW_MARK = "@@row "  # a worker's result lines on its stdout


@dataclass(frozen=True)
class Case:
    scope: str  # one of SCOPES
    shape: str  # layer: "<d_in>x<d_out>"; model4: "h<hidden>"; llama1b: ""
    r: int
    adapters: str  # key of ADAPTERS
    work: str  # one of WORKS

    @property
    def name(self) -> str:
        return "-".join(p for p in (self.scope, self.shape, f"r{self.r}", self.adapters, self.work) if p)

    @property
    def group(self) -> tuple:
        """The cases one process per contender runs: the same layer or model, rank and adapters."""
        return ("layer" if self.scope.startswith("layer") else self.scope, self.shape, self.r, self.adapters)


def all_cases() -> list[Case]:
    layers = [f"{i}x{o}" for i, o in LAYER_SHAPES]
    shapes = dict(layer=layers, layer_b2b=layers, model4=[f"h{h}" for h in DECODERS], llama1b=[""])
    return [
        Case(scope, shape, r, adapters, work)
        for scope in SCOPES
        for shape in shapes[scope]
        for r in RANKS
        for adapters in ADAPTERS
        for work in WORKS
    ]


# --- the worker: one contender, the cases of one group ---------------------------------------------------


def dim(d: int, args) -> int:
    return d // 64 if args.tiny else d


def llama_config(case: Case, args) -> dict:
    if case.scope == "llama1b":
        config = dict(LLAMA_1B)
    else:
        hidden = int(case.shape[1:])
        config = dict(hidden_size=hidden, **DECODERS[hidden], num_hidden_layers=4, num_key_value_heads=8)
        config.update(vocab_size=32000, max_position_embeddings=8192, rope_parameters=LLAMA_1B["rope_parameters"])
    if args.tiny:
        config.update(
            hidden_size=dim(config["hidden_size"], args),
            intermediate_size=dim(config["intermediate_size"], args),
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=97,
            max_position_embeddings=64,
        )
    return dict(config, use_cache=False)


def build(case: Case, contender: str, args, device: torch.device) -> torch.nn.Module:
    """The bf16 base (seeded) with PEFT DoRA, or LoRA for the ``lora`` contender, on its linear layers."""
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(SEED)
    with torch.device(device):
        with default_dtype(torch.bfloat16):  # rotary frequencies stay fp32, as from_pretrained leaves them
            if case.group[0] == "layer":
                d_in, d_out = (dim(int(d), args) for d in case.shape.split("x"))
                base, targets = torch.nn.Sequential(torch.nn.Linear(d_in, d_out, bias=False)), ["0"]
            else:
                llama = transformers.LlamaConfig(**llama_config(case, args))
                base, targets = transformers.LlamaForCausalLM(llama), TARGET_MODULES
        rank = TINY_RANKS[case.r] if args.tiny else case.r
        config = LoraConfig(
            r=rank,
            lora_alpha=rank,
            target_modules=targets,
            use_dora=contender != "lora",
            init_lora_weights=False,
            lora_dropout=0.0,
        )
        model = get_peft_model(base, config, autocast_adapter_dtype=case.adapters == "fp32")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(ADAPTERS[case.adapters])
            if "lora_magnitude_vector" in name:
                spread = torch.rand(param.shape, device=device) * 2 - 1
                param.mul_(1 + MAGNITUDE_SPREAD * spread)
    return model


def compiled(model: torch.nn.Module, contender: str, args):
    if contender == "peft_eager":
        return model
    backend = args.inner
    if contender == "dora_fused":
        import dora_fused

        backend = "dora_fused" if args.inner == "inductor" else dora_fused.backend(inner=args.inner)
    return torch.compile(model, backend=backend)


def make_step(case: Case, model: torch.nn.Module, fn, args, device: torch.device):
    """One step of ``case.work`` on ``fn`` (the model, compiled or not)."""
    gen = torch.Generator().manual_seed(INPUT_SEED)
    training = case.work == "train"
    model.train(training)
    if case.group[0] == "layer":  # the output's gradient: a fixed random tensor
        d_in, d_out = (dim(int(d), args) for d in case.shape.split("x"))
        x = torch.randn(args.tokens, d_in, generator=gen).to(device, torch.bfloat16).requires_grad_(training)
        grad_out = torch.randn(args.tokens, d_out, generator=gen).to(device, torch.bfloat16)

        def forward_backward():
            fn(x).backward(grad_out)
            x.grad = None

        def forward():
            fn(x)

    else:  # the loss: cross-entropy inside the model, labels = inputs; prefill: the last position's logits
        ids = torch.randint(0, llama_config(case, args)["vocab_size"], (1, args.tokens), generator=gen).to(device)

        def forward_backward():
            fn(input_ids=ids, labels=ids).loss.backward()

        def forward():
            fn(input_ids=ids, logits_to_keep=1)

    if not training:

        def prefill():
            with torch.no_grad():
                forward()

        return prefill
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)

    def train_step():
        forward_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return train_step


def base_row(case: Case, contender: str, args) -> dict:
    """What a row of this case and contender says whatever happened: the case's fields, the run's sizes."""
    row = dict(case=case.name, contender=contender, **asdict(case), rank=TINY_RANKS[case.r] if args.tiny else case.r)
    return dict(row, tokens=args.tokens, tiny=args.tiny, inner=args.inner)


def graphs_compiled() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def compile_counts(contender: str, graphs_before: int) -> dict:
    """Graphs Dynamo compiled since ``graphs_before``; for dora_fused, the modules its reports rewrote."""
    counts: dict[str, object] = dict(graphs=graphs_compiled() - graphs_before)
    if contender == "dora_fused":
        import dora_fused

        reports = dora_fused.reports()
        rewritten = {name for report in reports for name in report.rewritten}
        counts.update(
            rewritten=len(rewritten),
            left_alone=len({name for report in reports for name, _ in report.skipped} - rewritten),
            rewrite_errors=[report.error for report in reports if report.error],
        )
    return counts


def compile_seconds() -> dict[str, float]:
    """Dynamo's cumulative seconds per compile phase in this process, and the dora_fused pass's (``timed_pass``)."""
    names, values = torch._dynamo.utils.compile_times(repr="csv", aggregate=True)
    return dict(zip(names, map(float, values), strict=True), dora_fused_pass=PASS_SECONDS[0])


def compile_phases(before: dict[str, float]) -> dict[str, float]:
    """Seconds per compile phase since ``before`` (``compile_seconds``), the phases of 0.05 s or more."""
    now = compile_seconds()
    return {
        name: round(now[name] - before.get(name, 0.0), 3) for name in now if now[name] - before.get(name, 0.0) >= 0.05
    }


PASS_SECONDS = [0.0]  # the dora_fused rewrite pass's wall time in this process


def timed_pass() -> None:
    """Count the dora_fused rewrite pass's wall time in ``PASS_SECONDS`` (worker of the dora_fused contender)."""
    from dora_fused.passes import DoraRewritePass

    call = DoraRewritePass.__call__

    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return call(self, *args, **kwargs)
        finally:
            PASS_SECONDS[0] += time.perf_counter() - start

    DoraRewritePass.__call__ = timed


def measure_work(cases: list[Case], contender: str, model, fn, args, device: torch.device) -> list[dict]:
    """Compile (the first call), then time each case of one work: single steps or back to back."""
    torch._dynamo.reset()  # each work compiles as in a fresh process
    if contender == "dora_fused":
        import dora_fused

        dora_fused.clear_reports()
    graphs_before, seconds_before = graphs_compiled(), compile_seconds()
    step = make_step(cases[0], model, fn, args, device)
    start = time.perf_counter()
    step()
    synchronize()
    first_call_s = time.perf_counter() - start
    counts = dict(compile_counts(contender, graphs_before), compile_phases=compile_phases(seconds_before))
    if device.type == "cuda":
        torch.cuda.empty_cache()  # a process waiting for its turn holds no cached blocks (--parallel)
    rows = []
    for case in cases:
        reps, warmup = (2, 1) if args.tiny else (20, 5) if case.group[0] == "layer" else (10, 2)
        reps, warmup = args.reps or reps, warmup if args.warmup is None else args.warmup
        # the device to this process alone (with --turns): nobody else compiles or runs meanwhile
        with turns.device_turn(args.turns, case.name) as window, PeakMemory() as memory:
            if case.scope == "layer_b2b":
                times = time_back_to_back(step, 3 if args.tiny else BACK_TO_BACK_CALLS, reps, warmup)
            else:
                times, _ = time_calls(step, reps, warmup)
        stats = summarize(times)
        row = dict(base_row(case, contender, args), status="ok", **stats, times=times, **counts)
        row.update(turn_start=window[0], turn_end=window[1])
        row.update(peak_mb=memory.peak_mb, resident_mb=None if memory.resident is None else memory.resident / 2**20)
        row.update(first_call_s=first_call_s, compile_s=max(0.0, first_call_s - stats["ms"] / 1e3))
        row["graphs_after_first_call"] = graphs_compiled() - graphs_before - counts["graphs"]  # recompiles: 0
        rows.append(row)
    return rows


def run_worker(contender: str, cases: list[Case], args) -> None:
    """Build the contender's model once, then each work: its rows (or error rows) to stdout."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)  # toy tensors gain nothing from threads, and stall on a busy machine
    if contender == "dora_fused":
        timed_pass()  # imports dora_fused: the only process that does
    model = fn = adapted = failure = None
    try:
        model = build(cases[0], contender, args, device)
        fn = compiled(model, contender, args)
        adapted = sum(1 for m in model.modules() if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict))
    except Exception as error:  # recorded in every row of this process
        failure = f"build: {type(error).__name__}: {error}"
    for work in WORKS:
        work_cases = sorted((c for c in cases if c.work == work), key=lambda c: SCOPES.index(c.scope))
        if not work_cases:
            continue
        error = failure
        if error is None:
            try:
                rows = measure_work(work_cases, contender, model, fn, args, device)
            except Exception as caught:  # e.g. out of memory: recorded, and the next work still runs
                error = f"{type(caught).__name__}: {caught}"
        if error is not None:
            rows = [dict(base_row(c, contender, args), status="error", error=error[:2000]) for c in work_cases]
        for row in rows:
            row.update(adapted_modules=adapted, dora_fused_imported="dora_fused" in sys.modules)
            print(ROW_MARK + json.dumps(row), flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


# --- the parent: one process per (group, contender), --parallel of them at once --------------------------------


def worker_command(contender: str, cases: list[Case], args) -> list[str]:
    """The command line of the worker process for (contender, cases)."""
    command = [sys.executable, os.path.abspath(__file__), "--worker", contender, "--turns"]
    command += ["--cases", ",".join(c.name for c in cases), "--inner", args.inner, "--tokens", str(args.tokens)]
    command += ["--tiny"] * args.tiny
    for flag, value in (("--reps", args.reps), ("--warmup", args.warmup)):
        command += [] if value is None else [flag, str(value)]
    return command


def run_processes(processes: list[tuple[str, list[Case]]], args, timeout: float, run_dir: str) -> list[dict]:
    """One worker per (contender, cases), all at once, each with its own compile caches; their rows.

    Their timed parts take turns (benchmarks/turns.py). Past ``timeout`` every worker left is
    killed; a worker's cases without a row get one with its status and the last lines it printed.
    """
    caches = {"TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton"}
    work_dirs = [tempfile.mkdtemp(prefix=f"{contender}-", dir=run_dir) for contender, _ in processes]
    outcomes = turns.run_batch(
        [worker_command(contender, cases, args) for contender, cases in processes],
        time.monotonic() + timeout,
        keep=lambda line: line.startswith(ROW_MARK),
        envs=[{k: os.path.join(d, v) for k, v in caches.items()} for d in work_dirs],
    )
    rows = []
    for (contender, cases), outcome, work_dir in zip(processes, outcomes, work_dirs, strict=True):
        shutil.rmtree(work_dir, ignore_errors=True)
        got = [json.loads(line[len(ROW_MARK) :]) for line in outcome.kept]
        if outcome.timed_out:
            status = f"timeout: killed after {timeout:g} s"
        else:
            status = f"crashed: exit code {outcome.returncode}" if outcome.returncode else "crashed: no row"
        named = {row["case"] for row in got}
        tail = "\n".join([line for line in outcome.tail if not line.startswith(ROW_MARK)][-20:])
        got += [dict(base_row(c, contender, args), status=status, error=tail) for c in cases if c.name not in named]
        rows += [dict(row, process_s=outcome.seconds) for row in got]
    return rows


def ratio(a: dict | None, b: dict | None, key: str) -> float | None:
    if not a or not b or a.get(key) is None or not b.get(key):
        return None
    return a[key] / b[key]


def ratio_rows(rows: list[dict], clean_compiles: bool = True) -> list[dict]:
    """Per case: the four ratios of TARGETS (None where a contender or a value is missing).

    ``clean_compiles``: whether each compile ran alone; not (``--parallel``), no ``compile_vs_compile``.
    """
    ok = {(r["case"], r["contender"]): r for r in rows if r.get("status") == "ok"}
    out = []
    for case in dict.fromkeys(r["case"] for r in rows):
        fused, inductor, lora = (ok.get((case, c)) for c in ("dora_fused", "torch_compile", "lora"))
        train = fused is not None and fused["work"] == "train"
        out.append(
            dict(
                case=case,
                speed_vs_compile=ratio(inductor, fused, "ms"),
                step_vs_lora=ratio(fused, lora, "ms") if train else None,
                peak_vs_lora=ratio(fused, lora, "peak_mb") if train else None,
                compile_vs_compile=ratio(fused, inductor, "first_call_s") if clean_compiles else None,
            )
        )
    return out


def results_table(rows: list[dict]) -> str:
    """Markdown: median ms per contender (or its status), dora_fused's and LoRA's peak, first calls."""
    got = {(r["case"], r["contender"]): r for r in rows}
    lines = ["| case | " + " | ".join(f"{c} ms" for c in CONTENDERS) + " | peak MB dora_fused / lora | "]
    lines[0] += "first call s dora_fused / torch_compile | rewritten |"
    lines.append("|---" * (len(CONTENDERS) + 4) + "|")

    def cell(case: str, contender: str, key: str, fmt: str) -> str:
        row = got.get((case, contender))
        if row is None or row["status"] != "ok":
            return row["status"].split(":")[0] if row else ""
        return "-" if row.get(key) is None else format(row[key], fmt)

    for case in dict.fromkeys(r["case"] for r in rows):
        times = [cell(case, c, "ms", ".2f") for c in CONTENDERS]
        peaks = f"{cell(case, 'dora_fused', 'peak_mb', '.0f')} / {cell(case, 'lora', 'peak_mb', '.0f')}"
        firsts = (
            f"{cell(case, 'dora_fused', 'first_call_s', '.1f')} / {cell(case, 'torch_compile', 'first_call_s', '.1f')}"
        )
        fused = got.get((case, "dora_fused")) or {}
        rewritten = f"{fused['rewritten']}/{fused['adapted_modules']}" if "rewritten" in fused else ""
        lines.append(f"| {case} | {' | '.join(times)} | {peaks} | {firsts} | {rewritten} |")
    return "\n".join(lines)


def ratio_table(ratios: list[dict]) -> str:
    """Markdown: each ratio, "!" where it misses its target; then how many met theirs."""
    lines = ["| case | " + " | ".join(f"{k} {'≥' if up else '≤'} {t:.2f}" for k, (t, up) in TARGETS.items()) + " |"]
    lines.append("|---" * (len(TARGETS) + 1) + "|")
    met = total = 0
    for entry in ratios:
        cells = []
        for key, (target, at_least) in TARGETS.items():
            value = entry[key]
            good = value is None or (value >= target if at_least else value <= target)
            met, total = met + (value is not None and good), total + (value is not None)
            cells.append("-" if value is None else f"{value:.2f}{'' if good else ' !'}")
        lines.append(f"| {entry['case']} | " + " | ".join(cells) + " |")
    return "\n".join([*lines, f"targets met: {met} of {total} ratios"])


def summary_line(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {(row.get('error') or '').splitlines()[-1:]}"
    text = f"{row['ms']:.3f} ms [{row['q10']:.3f}, {row['q90']:.3f}], first call {row['first_call_s']:.1f} s"
    text += "" if row["peak_mb"] is None else f", peak {row['peak_mb']:.0f} MB"
    return text + (f", rewritten {row['rewritten']}/{row['adapted_modules']}" if "rewritten" in row else "")


def select_cases(args) -> list[Case]:
    cases = all_cases()
    if args.quick and not args.cases:
        by_name = {c.name: c for c in cases}
        return [by_name[name] for name in QUICK_CASES]
    patterns = args.cases.split(",") if args.cases else ["*"]
    return [c for c in cases if any(fnmatch.fnmatch(c.name, p) for p in patterns)]


def run_all(args) -> list[dict]:
    groups: dict[tuple, list[Case]] = {}
    for case in select_cases(args):
        groups.setdefault(case.group, []).append(case)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    run_dir = tempfile.mkdtemp(prefix="dora_fused_training_")
    meta = dict(argv=" ".join(sys.argv), quick=args.quick, tiny=args.tiny, inner=args.inner, tokens=args.tokens)
    meta["parallel"] = args.parallel
    processes = [(contender, cases) for cases in groups.values() for contender in args.contender_list]
    print(f"{len(processes)} processes, {args.parallel} at a time", flush=True)
    rows: list[dict] = []
    start = time.monotonic()
    for first in range(0, len(processes), args.parallel):
        batch = processes[first : first + args.parallel]
        left = None if args.time_budget is None else args.time_budget - (time.monotonic() - start)
        if left is not None and left < MIN_START_S:
            rows += [dict(base_row(c, p, args), status="skipped: time budget") for p, cases in batch for c in cases]
            continue
        new = run_processes(batch, args, args.timeout if left is None else min(args.timeout, left), run_dir)
        for row in new:
            print(f"[{row['contender']}] {row['case']}: {summary_line(row)}", flush=True)
        rows += new
        write_json(args.out, rows, **meta)
    shutil.rmtree(run_dir, ignore_errors=True)
    ratios = ratio_rows(rows, clean_compiles=args.parallel == 1)
    info = write_json(args.out, rows, **meta, targets=TARGETS, ratios=ratios)
    print({k: v for k, v in info.items() if k not in ("ratios", "targets")})
    print(f"done in {time.monotonic() - start:.0f} s; results in {args.out}\n")
    print(results_table(rows), ratio_table(ratios), sep="\n\n")
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="results JSON (rewritten after every process)")
    parser.add_argument("--quick", action="store_true", help="QUICK_CASES (about 6-8 minutes on one H100)")
    parser.add_argument("--tiny", action="store_true", help="toy sizes, aot_eager: the harness on a CPU")
    parser.add_argument("--cases", default=None, help="comma-separated globs over case names (--list)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help=f"comma-separated, of {CONTENDERS}")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per step (--tiny: 32)")
    parser.add_argument("--reps", type=int, default=None, help="timed steps (layers 20, models 10; --tiny 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps after the first (5, 2; --tiny 1)")
    parser.add_argument("--inner", default=None, help="backend of the compiled contenders (inductor; --tiny aot_eager)")
    parser.add_argument(
        "--parallel", type=int, default=1, help="processes at once: compiles overlap, timed parts take turns"
    )
    parser.add_argument(
        "--timeout", type=float, default=None, help="seconds per batch of --parallel processes (900; --quick 240)"
    )
    parser.add_argument("--time-budget", type=float, default=None, help="s; no process starts after (--quick 500)")
    parser.add_argument("--list", action="store_true", help="print the case names and exit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--turns", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.inner = args.inner or ("aot_eager" if args.tiny else "inductor")
    args.tokens = args.tokens or (32 if args.tiny else 4096)
    if args.quick:
        args.time_budget = 500.0 if args.time_budget is None else args.time_budget
    args.timeout = args.timeout or (240.0 if args.quick else 900.0)
    args.contender_list = [c for c in args.contenders.split(",") if c]
    if set(args.contender_list) - set(CONTENDERS):
        parser.error(f"unknown contenders {sorted(set(args.contender_list) - set(CONTENDERS))}")
    if not (args.list or args.worker or args.out):
        parser.error("--out is required")
    if args.parallel < 1:
        parser.error("--parallel must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.list:
        print("\n".join(c.name for c in select_cases(args)))
    elif args.worker:
        by_name = {c.name: c for c in all_cases()}
        run_worker(args.worker, [by_name[n] for n in args.cases.split(",")], args)
    else:
        run_all(args)


if __name__ == "__main__":
    main()
