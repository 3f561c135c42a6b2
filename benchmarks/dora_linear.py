"""One DoRA Linear: PEFT eager vs torch.compile (Inductor) vs backend="dora_fused", side by side.

Question: what does one PEFT DoRA Linear cost per call, forward without grad
and forward+backward, in time and in transient memory above the resident
weights? Run on a CUDA GPU:

    python benchmarks/dora_linear.py --json results.json

Method: CUDA-event timings, median and 10/90% quantiles of --reps runs after
--warmup runs. Peak memory is torch.cuda.max_memory_allocated during one call,
minus the memory allocated before it (weights, input). Each contender runs on
the same module, weights and input in one process.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from datetime import date

import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model

import dora_fused

SHAPES = [(4096, 4096), (8192, 8192), (4096, 14336), (14336, 4096)]  # (d_in, d_out)


def build(d_in: int, d_out: int, r: int, adapter_fp32: bool) -> nn.Module:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(d_in, d_out, bias=False)).to("cuda", torch.bfloat16)
    config = LoraConfig(r=r, lora_alpha=r, target_modules=["0"], use_dora=True, init_lora_weights=False)
    model = get_peft_model(base, config, autocast_adapter_dtype=adapter_fp32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.1)
    return model


def measure(fn, reps: int, warmup: int) -> tuple[float, float, float, float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak_mb = (torch.cuda.max_memory_allocated() - before) / 2**20
    q = statistics.quantiles(times, n=10)
    return statistics.median(times), q[0], q[-1], peak_mb


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=384)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--shapes", default="all", help="'all' or e.g. 8192x8192")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    shapes = SHAPES if args.shapes == "all" else [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]

    rows = []
    for adapter_fp32 in (False, True):
        for d_in, d_out in shapes:
            model = build(d_in, d_out, args.rank, adapter_fp32)
            x = torch.randn(args.tokens, d_in, device="cuda", dtype=torch.bfloat16)
            contenders = {
                "peft_eager": model,
                "inductor": torch.compile(model),
                "dora_fused": torch.compile(model, backend="dora_fused"),
                "dora_fused_op": torch.compile(model, backend=dora_fused.backend(ops="op")),
            }
            for name, fn in contenders.items():
                xg = x.detach().clone().requires_grad_()

                def forward(fn=fn, x=x):
                    with torch.no_grad():
                        fn(x)

                def train_step(fn=fn, xg=xg):
                    fn(xg).float().sum().backward()

                fwd = measure(forward, args.reps, args.warmup)
                fwd_bwd = measure(train_step, args.reps, args.warmup)
                model.zero_grad(set_to_none=True)
                rows.append(
                    dict(
                        adapters="fp32" if adapter_fp32 else "bf16",
                        shape=f"{d_in}->{d_out}",
                        contender=name,
                        fwd_ms=fwd[0],
                        fwd_q10=fwd[1],
                        fwd_q90=fwd[2],
                        fwd_mb=fwd[3],
                        fwd_bwd_ms=fwd_bwd[0],
                        fwd_bwd_q10=fwd_bwd[1],
                        fwd_bwd_q90=fwd_bwd[2],
                        fwd_bwd_mb=fwd_bwd[3],
                        rewritten=len(dora_fused.last_report().rewritten) if name.startswith("dora_fused") else None,
                    )
                )
                print(rows[-1], flush=True)
            del model, contenders
            torch._dynamo.reset()
            torch.cuda.empty_cache()

    meta = dict(
        gpu=torch.cuda.get_device_name(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        python=platform.python_version(),
        date=str(date.today()),
        tokens=args.tokens,
        rank=args.rank,
        reps=args.reps,
    )
    try:
        import peft
        import triton

        meta.update(peft=peft.__version__, triton=triton.__version__)
    except ImportError:
        pass
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(meta)
    header = "| base/adapters | layer | contender | fwd ms | fwd MB | fwd+bwd ms | fwd+bwd MB |"
    print(header)
    print("|" + "---|" * 7)
    for r in rows:
        print(
            f"| bf16/{r['adapters']} | {r['shape']} | {r['contender']} | {r['fwd_ms']:.2f} | {r['fwd_mb']:.0f} "
            f"| {r['fwd_bwd_ms']:.2f} | {r['fwd_bwd_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
