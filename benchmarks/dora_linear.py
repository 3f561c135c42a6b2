"""One DoRA Linear: PEFT eager vs torch.compile (Inductor) vs backend="dora_fused", side by side.

Question: what does one PEFT DoRA Linear cost per call, forward without grad
and forward+backward, in time and in transient memory above the resident
weights, against plain LoRA of the same rank under Inductor (the price to
match) and against the forward floor measured in the same run (base matmul +
LoRA matmuls as PEFT runs them + one read-and-write pass over the output +
one tensor-core ``W·Aᵀ`` with fp32 output)? Run on a CUDA GPU:

    python benchmarks/dora_linear.py --json results.json [--ranks 16,384] [--mode reduce-overhead]

Method: CUDA-event timings, median and 10/90% quantiles of --reps runs after
--warmup runs, each a single synchronized call; and the forward "back to back":
20 calls in a row between two events, per call, median of --reps such runs
(the floor's parts timed the same way), which is how a layer runs inside a
model, where the host's time to a call's first launch overlaps earlier work.
Peak memory is torch.cuda.max_memory_allocated during one call, minus the
memory allocated before it (weights, input). Each contender runs on the same
module, weights and input in one process; Dynamo's cache is cleared before each
contender, so none pays for looking up another's compiled code. ``--mode`` is passed to every
``torch.compile`` (``reduce-overhead``: CUDA graphs, which take the host's launch
latency out of the compiled contenders; PEFT eager and the floor's parts are not
graphed).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model

import dora_fused

from timing import PeakMemory, summarize, time_back_to_back, time_calls, write_json

SHAPES = [(4096, 4096), (8192, 8192), (4096, 14336), (14336, 4096)]  # (d_in, d_out)


def build(d_in: int, d_out: int, r: int, adapter_fp32: bool, dora: bool = True, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(d_in, d_out, bias=False)).to("cuda", torch.bfloat16)
    config = LoraConfig(
        r=r, lora_alpha=r, target_modules=["0"], use_dora=dora, init_lora_weights=False, lora_dropout=dropout
    )
    model = get_peft_model(base, config, autocast_adapter_dtype=adapter_fp32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.1)
    return model


def measure(fn, reps: int, warmup: int) -> tuple[float, float, float, float]:
    """Median, 10% and 90% quantile ms of ``reps`` calls after ``warmup``; peak MB of one more call."""
    times, _ = time_calls(fn, reps, warmup)
    with PeakMemory() as mem:
        fn()
    stats = summarize(times)
    return stats["ms"], stats["q10"], stats["q90"], mem.peak_mb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--ranks", default="384")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--shapes", default="all", help="'all' or e.g. 8192x8192")
    parser.add_argument("--mode", default=None, help="torch.compile mode of the compiled contenders")
    parser.add_argument("--forward-only", action="store_true", help="skip forward+backward (reported as nan)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    shapes = SHAPES if args.shapes == "all" else [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]

    rows = []
    for rank in [int(r) for r in args.ranks.split(",")]:
        for adapter_fp32 in (False, True):
            for d_in, d_out in shapes:
                rows += run_case(d_in, d_out, rank, adapter_fp32, args)
    info = write_json(args.json, rows, tokens=args.tokens, reps=args.reps, mode=args.mode or "default")
    print_table(rows, info)


BACK_TO_BACK = 20  # calls in a row per back-to-back timing


def back_to_back_ms(fn, reps: int, warmup: int) -> float:
    """Median ms per call of ``fn`` called ``BACK_TO_BACK`` times in a row."""
    return summarize(time_back_to_back(fn, BACK_TO_BACK, reps, warmup))["ms"]


def floor_ms(model: nn.Module, x: torch.Tensor, reps: int, warmup: int) -> tuple[dict[str, float], dict[str, float]]:
    """The forward floor's parts, each timed alone: base matmul, LoRA matmuls, one output pass, W·Aᵀ.

    As single calls and back to back.
    """
    layer = model.base_model.model[0]
    w = layer.base_layer.weight
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    out = torch.empty(x.shape[0], w.shape[0], device="cuda", dtype=torch.bfloat16)
    base_out = x @ w.T
    a16 = a.to(w.dtype)
    with torch.no_grad():
        parts = {
            "base": lambda: torch.mm(x, w.T),
            "lora": lambda: (x.to(a.dtype) @ a.T) @ b.T,
            "pass": lambda: out.copy_(base_out),
            "w_at": lambda: torch.mm(w, a16.T, out_dtype=torch.float32),
        }
        single = {k: measure(f, reps, warmup)[0] for k, f in parts.items()}
        return single, {k: back_to_back_ms(f, reps, warmup) for k, f in parts.items()}


def run_case(d_in: int, d_out: int, rank: int, adapter_fp32: bool, args) -> list[dict]:
    rows = []
    model = build(d_in, d_out, rank, adapter_fp32)
    lora_model = build(d_in, d_out, rank, adapter_fp32, dora=False)
    x = torch.randn(args.tokens, d_in, device="cuda", dtype=torch.bfloat16)
    floor, floor_b2b = floor_ms(model, x, args.reps, args.warmup)
    contenders = {  # name: (callable, the module whose gradients it writes)
        "peft_eager": (model, model),
        "inductor": (torch.compile(model, mode=args.mode), model),
        "dora_fused": (torch.compile(model, backend="dora_fused", mode=args.mode), model),
        "lora_inductor": (torch.compile(lora_model, mode=args.mode), lora_model),
    }
    graphed = args.mode == "reduce-overhead"
    for name, (fn, module) in contenders.items():
        # each contender compiles (lazily, at its first call) into an empty Dynamo cache: the code of the
        # ones before it, cached on the same PEFT forward functions, is not looked up in its calls
        torch._dynamo.reset()
        xg = x.detach().clone().requires_grad_()

        def forward(fn=fn, x=x):
            if graphed:  # a new step: the previous call's graph outputs may be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            with torch.no_grad():
                fn(x)

        def train_step(fn=fn, xg=xg, module=module):
            # fresh gradients each step, as an optimizer's zero_grad gives: accumulating into the
            # previous step's would read CUDA-graph outputs that the next replay overwrites
            module.zero_grad(set_to_none=True)
            xg.grad = None
            if graphed:
                torch.compiler.cudagraph_mark_step_begin()
            fn(xg).float().sum().backward()

        fwd = measure(forward, args.reps, args.warmup)
        fwd_b2b = back_to_back_ms(forward, args.reps, args.warmup)
        fwd_ops = _ops() if name == "dora_fused" else None  # the no-grad graph's (the lora_up compose applies there)
        fwd_bwd = (float("nan"),) * 4 if args.forward_only else measure(train_step, args.reps, args.warmup)
        model.zero_grad(set_to_none=True)
        rows.append(
            dict(
                adapters="fp32" if adapter_fp32 else "bf16",
                rank=rank,
                floor_ms=sum(floor.values()),
                floor_parts=floor,
                shape=f"{d_in}->{d_out}",
                contender=name,
                fwd_ms=fwd[0],
                fwd_q10=fwd[1],
                fwd_q90=fwd[2],
                fwd_mb=fwd[3],
                fwd_b2b_ms=fwd_b2b,
                floor_b2b_ms=sum(floor_b2b.values()),
                floor_b2b_parts=floor_b2b,
                fwd_bwd_ms=fwd_bwd[0],
                fwd_bwd_q10=fwd_bwd[1],
                fwd_bwd_q90=fwd_bwd[2],
                fwd_bwd_mb=fwd_bwd[3],
                rewritten=len(dora_fused.last_report().rewritten) if name == "dora_fused" else None,
                fwd_ops=fwd_ops,
                ops=_ops() if name == "dora_fused" and not args.forward_only else None,  # the training graph's
            )
        )
        print(rows[-1], flush=True)
        model.zero_grad(set_to_none=True)
        lora_model.zero_grad(set_to_none=True)
    del model, lora_model, contenders
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return rows


def _ops() -> tuple[str, ...]:
    """The ops the last dora_fused compile inserted for the layer."""
    return dora_fused.last_report().modules[0].ops


def print_table(rows: list[dict], info: dict) -> None:
    print(info)
    single, back_to_back = [], []
    by_case: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_case.setdefault((r["rank"], r["adapters"], r["shape"]), {})[r["contender"]] = r
    for (rank, adapters, shape), c in by_case.items():
        p, i, o, lo = c["peft_eager"], c["inductor"], c["dora_fused"], c["lora_inductor"]
        single.append(
            f"| {rank} | {adapters} | {shape} | {p['fwd_ms']:.2f} / {i['fwd_ms']:.2f} / {o['fwd_ms']:.2f} / "
            f"{lo['fwd_ms']:.2f} / {o['floor_ms']:.2f} | {p['fwd_bwd_ms']:.2f} / {i['fwd_bwd_ms']:.2f} / "
            f"{o['fwd_bwd_ms']:.2f} / {lo['fwd_bwd_ms']:.2f} | {i['fwd_ms'] / o['fwd_ms']:.2f}, "
            f"{i['fwd_bwd_ms'] / o['fwd_bwd_ms']:.2f} | {o['fwd_ms'] / o['floor_ms']:.2f} | "
            f"{o['fwd_ms'] / lo['fwd_ms']:.2f}, {o['fwd_bwd_ms'] / lo['fwd_bwd_ms']:.2f} | "
            f"{i['fwd_mb']:.0f}, {i['fwd_bwd_mb']:.0f} / {o['fwd_mb']:.0f}, {o['fwd_bwd_mb']:.0f} |"
        )
        back_to_back.append(
            f"| {rank} | {adapters} | {shape} | {p['fwd_b2b_ms']:.2f} / {i['fwd_b2b_ms']:.2f} / "
            f"{o['fwd_b2b_ms']:.2f} / {lo['fwd_b2b_ms']:.2f} / {o['floor_b2b_ms']:.2f} | "
            f"{i['fwd_b2b_ms'] / o['fwd_b2b_ms']:.2f} | {o['fwd_b2b_ms'] / o['floor_b2b_ms']:.2f} | "
            f"{o['fwd_b2b_ms'] / lo['fwd_b2b_ms']:.2f} |"
        )
    print(
        "| r | adapters | layer | fwd ms: PEFT / Inductor / dora_fused / LoRA / floor | fwd+bwd ms: PEFT / Inductor / "
        "dora_fused / LoRA | Inductor÷ours fwd, fwd+bwd | ours÷floor fwd | ours÷LoRA fwd, fwd+bwd | "
        "peak MB fwd, fwd+bwd: Inductor / ours |"
    )
    print("|" + "---|" * 10, *single, sep="\n")
    print(
        f"\nForward, {BACK_TO_BACK} calls back to back, ms per call\n"
        "| r | adapters | layer | PEFT / Inductor / dora_fused / LoRA / floor | Inductor÷ours | ours÷floor "
        "| ours÷LoRA |"
    )
    print("|" + "---|" * 7, *back_to_back, sep="\n")


if __name__ == "__main__":
    main()
