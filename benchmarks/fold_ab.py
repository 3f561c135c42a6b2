"""A/B on a CUDA GPU: training through dora_fused with the folded compose against the unfolded one.

The folded compose (``kernels/folded_compose.py``) has the same forward as the unfolded
``compose_torch`` and a backward that folds ``s·g`` into ``B``: no ``[tokens, d_out]`` LoRA
output saved, no LoRA-output gradient written. ``ops="auto"`` picks it wherever a DoRA output
needs a gradient; this script turns that choice off for the "unfolded" contender
(``passes.dora_pass.foldable_lora_up``) to measure what it buys.

- ``--what layer``: one PEFT DoRA Linear (bias-free, bf16 base, r = 384), 4096 tokens, at
  4096², 8192², 4096→14336 and 14336→4096 (``--shapes``), with Inductor's DoRA and LoRA under
  Inductor beside them; ``--dropout`` > 0 gives PEFT's dropout form. Each contender is compiled
  once on its own copy of the module; then 7 rounds, each timing 20 back-to-back training steps
  (``out.float().sum().backward()``) of every contender in turn. Median over rounds; peak MB of
  one step.
- ``--what model``: an 8B-shaped Llama (``benchmarks/models.py``, 4 layers, 4096 tokens), DoRA
  r = 384 on every linear layer, forward+backward of the loss; 6 rounds of 3 steps.

    python benchmarks/fold_ab.py --what layer --adapters bf16 --json out.json
    python benchmarks/fold_ab.py --what model --adapters fp32 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from collections.abc import Callable

import torch
from dora_linear import build

import dora_fused
import dora_fused.passes.dora_pass as dora_pass

from timing import PeakMemory, environment

FOLDABLE = dora_pass.foldable_lora_up
COMPOSES: dict[bool, set[str]] = {False: set(), True: set()}  # the compose each contender's compiles inserted
SHAPES = [(4096, 4096), (8192, 8192), (4096, 14336), (14336, 4096)]  # (d_in, d_out)


def dora_fused_compiled(module: torch.nn.Module, fold: bool) -> Callable:
    """``module`` compiled by dora_fused, with the folded compose allowed or not (decided at the first call)."""
    configured = dora_fused.backend()

    def compile_with(gm, example):  # equal backend instances count as one: each contender gets its own function
        dora_pass.foldable_lora_up = FOLDABLE if fold else (lambda match: False)
        try:
            compiled = configured(gm, example)
        finally:
            dora_pass.foldable_lora_up = FOLDABLE
        COMPOSES[fold].update(m.ops[1] for m in dora_fused.last_report().modules if m.ops)
        return compiled

    return torch.compile(module, backend=compile_with)


def interleaved(steps: dict[str, Callable[[], None]], rounds: int, inner: int) -> dict[str, list[float]]:
    """ms per step of ``inner`` back-to-back steps of each contender in turn, for ``rounds`` rounds."""
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            step()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                step()
            end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end) / inner)
    return times


def prepared(steps: dict[str, Callable[[], None]]) -> dict[str, float]:
    """Compile (three warm-up steps) and return the peak MB of one more step, per contender."""
    peaks = {}
    for name, step in steps.items():
        for _ in range(3):
            step()
        with PeakMemory() as peak:
            step()
        peaks[name] = peak.peak_mb
    return peaks


def layer_rows(fp32: bool, rank: int, dropout: float, shapes: list[tuple[int, int]]) -> list[dict]:
    rows = []
    for d_in, d_out in shapes:
        torch._dynamo.reset()
        model = build(d_in, d_out, rank, fp32, dropout=dropout)
        lora_model = build(d_in, d_out, rank, fp32, dora=False, dropout=dropout)
        xg = torch.randn(4096, d_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        unfolded, folded = copy.deepcopy(model), copy.deepcopy(model)  # Dynamo keys compiled code on the module
        contenders = {
            "inductor": (model, torch.compile(model)),
            "unfolded": (unfolded, dora_fused_compiled(unfolded, fold=False)),
            "folded": (folded, dora_fused_compiled(folded, fold=True)),
            "lora": (lora_model, torch.compile(lora_model)),
        }

        def step_of(module, fn):
            def step():
                module.zero_grad(set_to_none=True)
                xg.grad = None
                fn(xg).float().sum().backward()

            return step

        steps = {name: step_of(module, fn) for name, (module, fn) in contenders.items()}
        peaks = prepared(steps)
        times = interleaved(steps, rounds=7, inner=20)
        rows.append(
            dict(
                shape=f"{d_in}->{d_out}",
                r=rank,
                adapters="fp32" if fp32 else "bf16",
                dropout=dropout,
                ms={k: statistics.median(v) for k, v in times.items()},
                rounds=times,
                mb=peaks,
                composes={"unfolded": sorted(COMPOSES[False]), "folded": sorted(COMPOSES[True])},
            )
        )
        print(json.dumps(rows[-1]), flush=True)
        for inserted in COMPOSES.values():
            inserted.clear()
        del contenders, steps, model, lora_model, unfolded, folded
        torch.cuda.empty_cache()
    return rows


def model_rows(fp32: bool, rank: int) -> list[dict]:
    import models

    adapters = "fp32ad" if fp32 else "bf16"
    args = models.parse_args(["--out", "unused.json"])
    case = models.Case("llama8b", rank, adapters, "train", 1)
    spec = models.model_spec(case, args)
    batch = models.make_inputs(spec, args, 1, torch.device("cuda"), torch.bfloat16)[0]
    steps = {}
    for name in ("unfolded", "folded"):
        model = models.build_peft(spec, adapters, torch.device("cuda")).train()
        fn = dora_fused_compiled(model, fold=name == "folded")

        def step(fn=fn, model=model):
            model.zero_grad(set_to_none=True)
            fn(**batch).loss.backward()

        steps[name] = step
    peaks = prepared(steps)
    times = interleaved(steps, rounds=6, inner=3)
    case_name = f"llama8b x{spec['layers']} r{rank} {adapters} train (fwd+bwd), {args.seq} tokens"
    composes = {"unfolded": sorted(COMPOSES[False]), "folded": sorted(COMPOSES[True])}
    ms = {k: statistics.median(v) for k, v in times.items()}
    return [dict(case=case_name, ms=ms, rounds=times, mb=peaks, composes=composes)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--what", choices=["layer", "model"], default="layer")
    parser.add_argument("--adapters", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--rank", type=int, default=384)
    parser.add_argument("--dropout", type=float, default=0.0, help="layer: PEFT's lora_dropout (the dropout form)")
    parser.add_argument("--shapes", default="all", help="layer: 'all' or e.g. 8192x8192,4096x14336 (d_in x d_out)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    fp32 = args.adapters == "fp32"
    shapes = SHAPES if args.shapes == "all" else [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    rows = layer_rows(fp32, args.rank, args.dropout, shapes) if args.what == "layer" else model_rows(fp32, args.rank)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=environment(), rows=rows), f, indent=1)
    for row in rows:
        ms, mb = row["ms"], row["mb"]
        print(
            f"{row.get('shape', row.get('case'))}: unfolded {ms['unfolded']:.3f} ms, folded {ms['folded']:.3f} ms "
            f"({ms['unfolded'] / ms['folded']:.3f}x); peak MB {mb['unfolded']:.0f} -> {mb['folded']:.0f}"
        )


if __name__ == "__main__":
    main()
