"""Where the time of one compiled DoRA Linear goes: torch.profiler table of CUDA kernels.

python benchmarks/profile_layer.py --shape 4096x4096 --adapters bf16 [--backend dora_fused|inductor]
"""

from __future__ import annotations

import argparse

import torch
from dora_linear import build
from torch.profiler import ProfilerActivity, profile

import dora_fused


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="4096x4096")
    parser.add_argument("--adapters", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--backend", default="dora_fused")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=384)
    parser.add_argument("--train", action="store_true")
    args = parser.parse_args()
    d_in, d_out = map(int, args.shape.split("x"))
    model = build(d_in, d_out, args.rank, args.adapters == "fp32")
    backend = dora_fused.backend() if args.backend == "dora_fused" else args.backend
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(args.tokens, d_in, device="cuda", dtype=torch.bfloat16, requires_grad=args.train)

    def step():
        if args.train:
            compiled(x).float().sum().backward()
        else:
            with torch.no_grad():
                compiled(x)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    print(f"== {args.backend} {args.shape} adapters={args.adapters} train={args.train} (10 calls)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70))


if __name__ == "__main__":
    main()
