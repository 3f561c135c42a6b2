"""Convergence parity: does a DoRA fine-tune under backend="dora_fused" train like PEFT eager?

Question: over a real fine-tuning run, how far does each way of running DoRA move the per-step
training loss away from an all-fp32 eager run of the same model, weights and batches, and is
dora_fused's deviation within torch.compile's?

    python benchmarks/convergence.py --out conv.json                          # 3 seeds × 1000 steps, CPU or CUDA
    python benchmarks/convergence.py --device cuda --steps 2000 --seeds 0,1,2,3,4 --out conv.json
    python benchmarks/convergence.py --contenders reference,dora_fused_fp32,torch_compile_fp32 --out fp32.json
    python benchmarks/convergence.py --tiny --steps 4 --inner aot_eager --same-process --out /tmp/t.json  # seconds
    python benchmarks/plot_convergence.py conv.json                            # docs/img/convergence_<device>.png

Contenders (each from the same initial weights and the same batches, per seed):
    reference           every parameter fp32, PEFT eager: the reference trajectory
    eager               bf16 base, PEFT's default fp32 adapters, PEFT eager
    torch_compile       the same dtypes, torch.compile(model) (dora_fused not imported)
    dora_fused          the same dtypes, torch.compile(model, backend="dora_fused"); counts only
                        where every DoRA module was rewritten (dora_fused.reports())
    dora_fused_fp32     every parameter fp32, backend="dora_fused": the rewrite's numerics (factored
                        norm, compose) alone against the reference (no bf16 rounding anywhere)
    torch_compile_fp32  every parameter fp32, torch.compile(model): Inductor's own reordering in fp32

Method:
- Model: a randomly initialized ``LlamaForCausalLM`` with a byte vocabulary (256), built in
  fp32 from ``torch.manual_seed(seed)``, its base weights rounded to bf16 once, so the fp32 and
  the bf16 contenders start from the same values. PEFT LoRA with ``use_dora=True`` on every
  attention and MLP linear layer (``lora_dropout=0``, PEFT's default init: ``B = 0``, so the
  magnitude starts at ``‖W‖_row``), adapters created in fp32 on the CPU; the bf16 contenders then
  cast every non-adapter parameter to bf16 (buffers such as the rotary frequencies stay fp32).
- Data: the bytes of the standard library's ``.py`` sources (``sysconfig.get_paths()["stdlib"]``,
  site-/dist-packages excluded, files sorted by path, joined with a newline). Each step takes
  ``batch`` windows of ``seq`` bytes at offsets drawn from ``torch.Generator().manual_seed(seed)``:
  every contender sees the same batches for one seed. The corpus's size and SHA-256 are recorded
  (it differs between Python versions).
- Training: next-byte cross-entropy (the model's own loss), AdamW on the adapter parameters
  (``lora_A``, ``lora_B``, magnitude), weight decay 0, gradients clipped to norm 1, linear
  warm-up over the first 5% of steps, then cosine decay to 10% of the peak learning rate.
- Per contender and seed, with ``l_c(t)`` the loss of step ``t``:
  ``mean|Δloss|`` to the reference ``= mean_t |l_c(t) − l_ref(t)|`` (also over the first tenth of
  the steps, before the trajectories drift apart, and the last quarter), the signed mean
  ``mean_t (l_c(t) − l_ref(t))`` (> 0: trains worse than the reference), and the same against
  ``eager``. Over seeds: the mean, min, max and standard deviation. For scale, the reference's
  seed-to-seed spread: ``mean_t |l_ref,s1(t) − l_ref,s2(t)|`` averaged over pairs of seeds
  (different initial weights and batches).
- One step at the same weights (``OneStepCheck``, every ``--check-every`` steps): the loss and
  adapter-gradient error of the contender against an fp32 eager copy holding its own adapter
  values, on the same batch: one step's arithmetic, apart from the trajectories' divergence.
- Criterion: dora_fused's mean|Δloss| to the reference must not exceed torch_compile's; the
  ratio of the two (mean over seeds, and per seed) and their paired difference over seeds (mean,
  standard error) are reported as measured.
- Each contender runs all seeds in its own process (``torch.compile`` without dora_fused then
  breaks PEFT's DoRA graph in every layer, as for any user; importing dora_fused would trace it
  as one graph), ``--parallel`` processes at once, each with ``--threads`` intra-op threads on the
  CPU. ``--same-process`` runs them one after another in this process instead (tests).
- Results: one JSON row per (contender, seed) with every step's loss, the one-step checks, the
  rewrite counts and inserted ops, the wall time; ``meta`` holds the environment, the
  configuration, the corpus and the summary above.

On a CPU the backend inserts the same factored-norm and compose math as plain torch ops (its
Triton norm runs only on CUDA; the training compose is the plain-torch folded one on both): a CPU
run speaks for the rewrite's numerics, not for the Triton norm's.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from timing import write_json


@dataclass(frozen=True)
class Contender:
    base_dtype: torch.dtype  # the non-adapter parameters; adapters are always fp32 (PEFT's default)
    compiler: str | None  # None: eager; "default": torch.compile's default backend; "dora_fused"


CONTENDERS = {
    "reference": Contender(torch.float32, None),
    "eager": Contender(torch.bfloat16, None),
    "torch_compile": Contender(torch.bfloat16, "default"),
    "dora_fused": Contender(torch.bfloat16, "dora_fused"),
    "dora_fused_fp32": Contender(torch.float32, "dora_fused"),
    "torch_compile_fp32": Contender(torch.float32, "default"),
}
DEFAULT_CONTENDERS = ("reference", "eager", "torch_compile", "dora_fused")
REFERENCE, EAGER = "reference", "eager"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 256  # one token per byte

SIZES = {
    # hidden, MLP, layers, heads, KV heads, rank, tokens per sequence, sequences per batch
    "default": dict(hidden=128, intermediate=352, layers=4, heads=4, kv_heads=2, rank=16, seq=128, batch=4),
    "tiny": dict(hidden=32, intermediate=64, layers=2, heads=2, kv_heads=1, rank=4, seq=16, batch=2),
}
TINY_CORPUS_BYTES = 1 << 20


# ----------------------------------------------------------------------------
# data


def stdlib_corpus(limit_bytes: int | None = None) -> tuple[torch.Tensor, dict[str, object]]:
    """The standard library's ``.py`` sources as one uint8 tensor, files sorted by path; and its record."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        (p for p in root.rglob("*.py") if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    chunks, size = [], 0
    for path in files:
        if limit_bytes is not None and size >= limit_bytes:
            break
        chunks.append(path.read_bytes())
        size += len(chunks[-1]) + 1
    data = b"\n".join(chunks)[:limit_bytes]
    record = dict(
        root=str(root),
        files=len(chunks),
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    return torch.frombuffer(bytearray(data), dtype=torch.uint8), record


def batch_offsets(corpus_bytes: int, seq: int, batch: int, steps: int, seed: int) -> torch.Tensor:
    """``[steps, batch]`` window starts from a generator seeded with ``seed`` (the same for every contender)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, corpus_bytes - seq, (steps, batch), generator=generator)


# ----------------------------------------------------------------------------
# model and training


def build_model(size: dict[str, int], seed: int, contender: Contender, device: torch.device) -> torch.nn.Module:
    """The seeded random Llama with PEFT DoRA; base weights bf16-representable, cast to the contender's dtype."""
    import transformers
    from peft import LoraConfig, get_peft_model

    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=size["hidden"],
        intermediate_size=size["intermediate"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["kv_heads"],
        max_position_embeddings=size["seq"],
        tie_word_embeddings=False,
        use_cache=False,
    )
    torch.manual_seed(seed)
    base = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for param in base.parameters():
            param.copy_(param.to(torch.bfloat16).float())  # every contender starts from the same values
    lora = LoraConfig(r=size["rank"], lora_alpha=size["rank"], target_modules=TARGETS, use_dora=True, lora_dropout=0.0)
    model = get_peft_model(base, lora)  # adapters fp32; magnitude = ‖W‖_row (B = 0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" not in name:
                param.data = param.data.to(contender.base_dtype)
    return model.to(device)


def learning_rate_factor(step: int, steps: int) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to 10% of the peak."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def compiled_callable(model: torch.nn.Module, contender: Contender, inner: str) -> Callable[..., object]:
    """The model as the contender runs it: itself (eager), or compiled with its backend and ``inner``."""
    if contender.compiler is None:
        return model
    if contender.compiler == "default":
        return torch.compile(model, backend=inner)
    import dora_fused

    return torch.compile(model, backend="dora_fused" if inner == "inductor" else dora_fused.backend(inner=inner))


def rewrite_counts(expected: int) -> dict[str, int]:
    """DoRA modules found / rewritten / left alone over every graph the backend compiled since the last clear."""
    import dora_fused

    found, rewritten = set(), set()
    ops: dict[str, set[str]] = {}
    breaks = 0
    for report in dora_fused.reports():
        found.update(report.found)
        rewritten.update(report.rewritten)
        breaks += len(report.graph_breaks)
        for module in report.modules:
            if module.status == "rewritten":
                ops.setdefault(", ".join(module.ops), set()).add(module.name)
    return dict(
        ops={op: len(names) for op, names in ops.items()},  # the inserted ops: how many modules got each
        dora_modules=expected,
        found=len(found),
        rewritten=len(rewritten),
        left_alone=len(found - rewritten),
        graphs=len(dora_fused.reports()),
        graph_breaks=breaks,
    )


class OneStepCheck:
    """One step's numerical error apart from the trajectory: the fp32 eager model at the contender's own adapter values.

    At a checked step the adapter values of the contender are copied into an fp32 eager copy of the
    same seed's model (the same base values: they are bf16-representable), which runs the same batch.
    ``loss_error = l_c − l_fp32`` and ``grad_rel_error = ‖∇_c − ∇_fp32‖ / ‖∇_fp32‖`` over every
    adapter gradient (before clipping) then measure what one step's arithmetic costs, without the
    divergence of trajectories that the per-step loss difference also contains.
    """

    def __init__(self, size: dict[str, int], seed: int, device: torch.device) -> None:
        self.model = build_model(size, seed, CONTENDERS[REFERENCE], device)
        self.model.train()
        self.params = {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def __call__(self, model: torch.nn.Module, ids: torch.Tensor, loss: float) -> dict[str, float]:
        start = time.perf_counter()
        trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(trained[name])
        reference = self.model(input_ids=ids, labels=ids).loss
        reference.backward()
        difference = total = 0.0
        for name, p in self.params.items():
            difference += (trained[name].grad.float() - p.grad).square().sum().item()
            total += p.grad.square().sum().item()
        self.model.zero_grad(set_to_none=True)
        return dict(
            loss_error=loss - reference.item(),
            grad_rel_error=math.sqrt(difference / total) if total > 0 else 0.0,
            seconds=time.perf_counter() - start,
        )


def train_seed(name: str, seed: int, args: argparse.Namespace, corpus: torch.Tensor, device: torch.device) -> dict:
    """One contender, one seed: ``args.steps`` optimizer steps; the row with every step's loss."""
    contender = CONTENDERS[name]
    size = model_size(args)
    torch._dynamo.reset()  # each seed compiles as a fresh run (the rewrite's records then cover it)
    if contender.compiler == "dora_fused":
        import dora_fused

        dora_fused.clear_reports()
    model = build_model(size, seed, contender, device)
    model.train()
    dora_modules = sum(1 for n, _ in model.named_modules() if n.endswith("lora_magnitude_vector"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, args.steps))
    fn = compiled_callable(model, contender, args.inner)
    offsets = batch_offsets(corpus.numel(), size["seq"], size["batch"], args.steps, seed)
    window = torch.arange(size["seq"])
    row = dict(
        contender=name,
        seed=seed,
        base_dtype=str(contender.base_dtype).removeprefix("torch."),
        compiler=contender.compiler,
        dora_fused_imported="dora_fused" in sys.modules,
        trainable_params=sum(p.numel() for p in params),
    )
    check = OneStepCheck(size, seed, device) if args.check_every > 0 else None
    losses, step_s, checks = [], [], []
    start = time.perf_counter()
    for step in range(args.steps):
        t0 = time.perf_counter()
        ids = corpus[offsets[step, :, None] + window].long().to(device)
        loss = fn(input_ids=ids, labels=ids).loss
        loss.backward()
        if check is not None and step % args.check_every == 0:
            checks.append(dict(step=step, **check(model, ids, loss.item())))
            t0 += checks[-1]["seconds"]  # not a training step's time
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step_s.append(time.perf_counter() - t0)
    row.update(
        losses=losses,
        one_step_checks=checks,
        wall_s=time.perf_counter() - start,
        first_step_s=step_s[0],
        step_ms=statistics.median(step_s[1:]) * 1e3 if len(step_s) > 1 else None,
        status="ok" if all(math.isfinite(x) for x in losses) else "non-finite loss",
    )
    row["dora_fused_imported"] = row["dora_fused_imported"] or "dora_fused" in sys.modules
    if contender.compiler == "dora_fused":
        row.update(rewrite_counts(dora_modules))
        if row["rewritten"] != dora_modules and row["status"] == "ok":
            row["status"] = f"rewrite incomplete: {row['rewritten']} of {dora_modules} DoRA modules rewritten"
    else:
        row["dora_modules"] = dora_modules
    return row


def model_size(args: argparse.Namespace) -> dict[str, int]:
    size = dict(SIZES["tiny" if args.tiny else "default"])
    for key in size:
        if getattr(args, key, None) is not None:
            size[key] = getattr(args, key)
    return size


def load_corpus(args: argparse.Namespace) -> tuple[torch.Tensor, dict[str, object]]:
    return stdlib_corpus(TINY_CORPUS_BYTES if args.tiny else args.corpus_bytes)


def run_contender(name: str, args: argparse.Namespace) -> list[dict]:
    """Every seed of one contender, in this process."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    device = torch.device(args.device)
    corpus, _ = load_corpus(args)
    rows = []
    for seed in parse_seeds(args.seeds):
        try:
            row = train_seed(name, seed, args, corpus, device)
        except Exception as error:  # recorded: the other seeds and contenders still run
            row = dict(contender=name, seed=seed, status="error", error=f"{type(error).__name__}: {error}"[:2000])
        print(f"[{name}] seed {seed}: {row_line(row)}", flush=True)
        rows.append(row)
    return rows


def row_line(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['status']} {row.get('error', '')}"
    rewritten = f", {row['rewritten']}/{row['dora_modules']} rewritten" if "rewritten" in row else ""
    return (
        f"loss {row['losses'][0]:.3f} -> {statistics.fmean(row['losses'][-max(1, len(row['losses']) // 20) :]):.3f}, "
        f"{row['wall_s']:.0f} s (first step {row['first_step_s']:.1f} s){rewritten}"
    )


# ----------------------------------------------------------------------------
# processes


def worker_command(name: str, args: argparse.Namespace, out: str) -> list[str]:
    argv = [a for a in args.argv if a != "--same-process"]
    return [sys.executable, os.path.abspath(__file__), *argv, "--worker", name, "--worker-out", out]


def run_workers(names: list[str], args: argparse.Namespace) -> list[dict]:
    """One process per contender, ``args.parallel`` at once; their rows."""
    work = tempfile.mkdtemp(prefix="dora_fused_convergence_")

    def run(name: str) -> list[dict]:
        out = os.path.join(work, f"{name}.json")
        log = os.path.join(work, f"{name}.log")
        with open(log, "w") as f:
            proc = subprocess.run(worker_command(name, args, out), stdout=f, stderr=subprocess.STDOUT)
        if proc.returncode == 0 and os.path.exists(out):
            with open(out) as f:
                return json.load(f)
        tail = Path(log).read_text()[-2000:]
        return [
            dict(contender=name, seed=s, status=f"worker exit {proc.returncode}", error=tail)
            for s in parse_seeds(args.seeds)
        ]

    # the compiled contenders (the longest: their compiles) start first
    started = sorted(names, key=lambda n: CONTENDERS[n].compiler is None)
    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        by_name = dict(zip(started, pool.map(run, started), strict=True))
    results = [by_name[name] for name in names]
    if all(row["status"] == "ok" for rows in results for row in rows):
        shutil.rmtree(work)
    else:
        print(f"worker logs: {work}", flush=True)
    for name, rows in zip(names, results, strict=True):
        for row in rows:
            print(f"[{name}] seed {row['seed']}: {row_line(row)}", flush=True)
    return [row for rows in results for row in rows]


# ----------------------------------------------------------------------------
# summary


def _spread(values: list[float]) -> dict[str, float | None]:
    return dict(
        mean=statistics.fmean(values),
        min=min(values),
        max=max(values),
        std=statistics.stdev(values) if len(values) > 1 else None,
    )


def _deviation(losses: list[float], against: list[float]) -> dict[str, float]:
    diffs = [a - b for a, b in zip(losses, against, strict=True)]
    first = diffs[: max(1, len(diffs) // 10)]
    last = diffs[len(diffs) - max(1, len(diffs) // 4) :]
    return dict(
        mean_abs=statistics.fmean(abs(d) for d in diffs),
        first_tenth_mean_abs=statistics.fmean(abs(d) for d in first),
        last_quarter_mean_abs=statistics.fmean(abs(d) for d in last),
        mean_signed=statistics.fmean(diffs),
    )


def summarize_runs(rows: list[dict]) -> dict:
    """Per contender: |Δloss| to the reference and to eager, per seed and over seeds; the criterion's ratio."""
    ok = {(r["contender"], r["seed"]): r for r in rows if r["status"] == "ok"}
    names = list(dict.fromkeys(r["contender"] for r in rows))
    seeds = sorted({r["seed"] for r in rows})
    summary: dict[str, object] = dict(contenders={})
    for name in names:
        entry: dict[str, object] = dict(seeds_ok=[s for s in seeds if (name, s) in ok])
        for against in (REFERENCE, EAGER):
            if name == against:
                continue
            per_seed = {
                s: _deviation(ok[name, s]["losses"], ok[against, s]["losses"])
                for s in seeds
                if (name, s) in ok and (against, s) in ok
            }
            if not per_seed:
                continue
            entry[f"to_{against}"] = dict(
                per_seed={str(s): d for s, d in per_seed.items()},
                **{key: _spread([d[key] for d in per_seed.values()]) for key in next(iter(per_seed.values()))},
            )
        runs = [ok[name, s] for s in seeds if (name, s) in ok]
        if runs:
            tail = max(1, len(runs[0]["losses"]) // 20)
            entry["final_loss"] = _spread([statistics.fmean(r["losses"][-tail:]) for r in runs])
            entry["wall_s"] = sum(r["wall_s"] for r in runs)
            checked = [r["one_step_checks"] for r in runs if r.get("one_step_checks")]
            if checked:
                entry["one_step"] = dict(
                    loss_abs_error=_spread([statistics.fmean(abs(c["loss_error"]) for c in cs) for cs in checked]),
                    grad_rel_error=_spread([statistics.fmean(c["grad_rel_error"] for c in cs) for cs in checked]),
                )
            if "rewritten" in runs[0]:
                entry["rewritten"] = [r["rewritten"] for r in runs]
                entry["dora_modules"] = runs[0]["dora_modules"]
        summary["contenders"][name] = entry
    references = [ok[REFERENCE, s]["losses"] for s in seeds if (REFERENCE, s) in ok]
    if len(references) > 1:
        pairs = [_deviation(a, b)["mean_abs"] for a, b in itertools.combinations(references, 2)]
        summary["reference_seed_spread_mean_abs"] = statistics.fmean(pairs)
    summary["criterion"] = criterion(summary["contenders"], "dora_fused", "torch_compile")
    if "dora_fused_fp32" in names and "torch_compile_fp32" in names:
        summary["criterion_fp32"] = criterion(summary["contenders"], "dora_fused_fp32", "torch_compile_fp32")
    return summary


def criterion(contenders: dict, ours: str, theirs: str) -> dict | None:
    """``ours``'s mean|Δloss| to the reference ÷ ``theirs``'s (≤ 1 passes), over seeds and per seed."""
    a, b = contenders.get(ours, {}).get("to_reference"), contenders.get(theirs, {}).get("to_reference")
    if not a or not b:
        return None
    ratio = a["mean_abs"]["mean"] / b["mean_abs"]["mean"]
    per_seed = {
        s: a["per_seed"][s]["mean_abs"] / b["per_seed"][s]["mean_abs"] for s in a["per_seed"] if s in b["per_seed"]
    }
    differences = [a["per_seed"][s]["mean_abs"] - b["per_seed"][s]["mean_abs"] for s in per_seed]
    std = statistics.stdev(differences) if len(differences) > 1 else None
    paired = dict(
        mean=statistics.fmean(differences),
        std=std,
        stderr=std / math.sqrt(len(differences)) if std is not None else None,
    )
    return dict(
        contender=ours, against=theirs, ratio=ratio, per_seed=per_seed, paired_difference=paired, met=ratio <= 1.0
    )


def table(summary: dict) -> str:
    """The summary as a markdown table (mean over seeds, min–max in parentheses), then the criterion."""
    header = (
        "| contender | seeds | rewritten | mean abs Δloss to reference | first tenth | last quarter | "
        "mean signed Δloss to reference | mean abs Δloss to eager | one step at the same weights: abs Δloss, "
        "grad rel. error | final loss | wall s |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for name, e in summary["contenders"].items():

        def cell(key: str, stat: str = "mean_abs", e=e) -> str:
            d = e.get(key)
            if not d:
                return "-"
            s = d[stat]
            if stat == "mean_signed":
                return f"{s['mean']:+.2e}"
            return f"{s['mean']:.2e} ({s['min']:.2e}–{s['max']:.2e})"

        rewritten = f"{min(e['rewritten'])}/{e['dora_modules']}" if "rewritten" in e else "-"
        one_step = e.get("one_step")
        if one_step:
            one_step = f"{one_step['loss_abs_error']['mean']:.2e}, {one_step['grad_rel_error']['mean']:.2e}"
        final = f"{e['final_loss']['mean']:.4f}" if "final_loss" in e else "-"
        wall = f"{e['wall_s']:.0f}" if "wall_s" in e else "-"
        lines.append(
            f"| {name} | {len(e['seeds_ok'])} | {rewritten} | {cell('to_reference')} | "
            f"{cell('to_reference', 'first_tenth_mean_abs')} | {cell('to_reference', 'last_quarter_mean_abs')} | "
            f"{cell('to_reference', 'mean_signed')} | {cell('to_eager')} | {one_step or '-'} | {final} | {wall} |"
        )
    if "reference_seed_spread_mean_abs" in summary:
        lines.append(f"reference seed-to-seed mean abs Δloss: {summary['reference_seed_spread_mean_abs']:.3e}")
    for key in ("criterion", "criterion_fp32"):
        c = summary.get(key)
        if c:
            per_seed = ", ".join(f"{v:.2f}" for v in c["per_seed"].values())
            verdict = "met" if c["met"] else "NOT met"
            paired = c["paired_difference"]
            stderr = f" ± {paired['stderr']:.2e} (standard error)" if paired["stderr"] is not None else ""
            lines.append(
                f"{c['contender']} ÷ {c['against']}, mean abs Δloss to reference: {c['ratio']:.3f} "
                f"(per seed {per_seed}): {verdict}; paired difference {paired['mean']:+.2e}{stderr}"
            )
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# entry point


def parse_seeds(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="results JSON")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per seed (1000; --tiny 4)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--contenders", default=",".join(DEFAULT_CONTENDERS), help=f"any of {list(CONTENDERS)}")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of AdamW")
    for key, value in SIZES["default"].items():
        tiny = SIZES["tiny"][key]
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help=f"{value}; --tiny {tiny}")
    parser.add_argument(
        "--check-every", type=int, default=None, help="steps between one-step checks (steps ÷ 10; 0: none)"
    )
    parser.add_argument("--corpus-bytes", type=int, default=None, help="use only the first N bytes of the corpus")
    parser.add_argument("--inner", default="inductor", help="compiler of the compiled contenders: inductor, aot_eager")
    parser.add_argument("--parallel", type=int, default=1, help="contender processes at once")
    parser.add_argument(
        "--threads", type=int, default=None, help="intra-op threads per process (CPU; default: cores ÷ --parallel)"
    )
    parser.add_argument("--same-process", action="store_true", help="run the contenders in this process, in turn")
    parser.add_argument("--tiny", action="store_true", help="toy sizes: seconds on a CPU")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.steps is None:
        args.steps = 4 if args.tiny else 1000
    if args.check_every is None:
        args.check_every = max(1, args.steps // 10)
    names = [n for n in args.contenders.split(",") if n]
    unknown = set(names) - set(CONTENDERS)
    if unknown:
        parser.error(f"unknown contenders {sorted(unknown)}; known: {list(CONTENDERS)}")
    args.contender_names = names
    if args.threads is None and args.device == "cpu":
        args.threads = max(1, (os.cpu_count() or 1) // max(1, args.parallel))
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.worker:
        rows = run_contender(args.worker, args)
        with open(args.worker_out, "w") as f:
            json.dump(rows, f)
        return {}
    start = time.perf_counter()
    if args.same_process:
        rows = [row for name in args.contender_names for row in run_contender(name, args)]
    else:
        rows = run_workers(args.contender_names, args)
    summary = summarize_runs(rows)
    _, corpus = load_corpus(args)
    meta = write_json(
        args.out,
        rows,
        device=args.device,
        threads=args.threads,
        parallel=1 if args.same_process else args.parallel,
        same_process=args.same_process,
        inner=args.inner,
        steps=args.steps,
        check_every=args.check_every,
        seeds=parse_seeds(args.seeds),
        contenders=args.contender_names,
        model=model_size(args),
        targets=TARGETS,
        vocab=VOCAB,
        lr=args.lr,
        optimizer="AdamW(betas=(0.9, 0.999), eps=1e-8, weight_decay=0), grad norm clipped to 1",
        schedule="linear warm-up over 5% of steps, cosine to 10% of the peak",
        corpus=corpus,
        tiny=args.tiny,
        total_wall_s=time.perf_counter() - start,
        summary=summary,
    )
    print(table(summary))
    return meta


if __name__ == "__main__":
    main()
