"""Where the time of one compiled DoRA Linear goes: host time per call, and torch.profiler tables.

python benchmarks/profile_layer.py --shape 4096x4096 --adapters bf16 [--backend dora_fused|inductor] [--ops auto]
    [--trace trace.json]

Host time per call is the Python/launch time of 20 back-to-back calls before
the final synchronize: when it reaches the GPU time, the layer is host-bound.
``--trace`` writes a Chrome trace of three single calls, each synchronized as
the layer benchmark times them, and prints when each kernel was launched on the
host and when it ran on the GPU, hence where the GPU waited for the host.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

import dora_fused

from dora_linear import build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="4096x4096")
    parser.add_argument("--adapters", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--backend", default="dora_fused")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=384)
    parser.add_argument("--train", action="store_true")
    parser.add_argument("--ops", default="auto", choices=["auto", "triton", "torch"])
    parser.add_argument("--trace", default=None, help="write a Chrome trace of three single calls here")
    args = parser.parse_args()
    d_in, d_out = map(int, args.shape.split("x"))
    model = build(d_in, d_out, args.rank, args.adapters == "fp32")
    backend = dora_fused.backend(ops=args.ops) if args.backend == "dora_fused" else args.backend
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
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    host = time.perf_counter()
    for _ in range(20):
        step()
    host = (time.perf_counter() - host) / 20 * 1e3
    end.record()
    torch.cuda.synchronize()
    print(
        f"== {args.backend} ops={args.ops} {args.shape} adapters={args.adapters} train={args.train}: "
        f"host {host:.3f} ms/call, GPU {start.elapsed_time(end) / 20:.3f} ms/call"
    )
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=70))
    if args.trace:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
                torch.cuda.synchronize()
        prof.export_chrome_trace(args.trace)
        print_timeline(args.trace)


def print_timeline(trace_path: str) -> None:
    """Per synchronized call of a Chrome trace: when each kernel was launched and ran, and the GPU's idle time.

    Times are µs from the call's first launch; ``gap`` is the GPU's idle time before
    the kernel (it waited for the host where the launch came after the previous end).
    """
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    kernels = sorted(
        (e for e in events if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy")), key=lambda e: e["ts"]
    )
    launches = {
        e["args"]["correlation"]: e["ts"]
        for e in events
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})
    }
    syncs = sorted(e["ts"] for e in events if e.get("name") == "cudaDeviceSynchronize")
    sync_ends = sorted(e["ts"] + e["dur"] for e in events if e.get("name") == "cudaDeviceSynchronize")
    host_cats = ("cpu_op", "user_annotation", "python_function")
    host = [e for e in events if e.get("ph") == "X" and e.get("cat") in host_cats]
    calls: dict[int, list[tuple[float, dict]]] = {}
    for k in kernels:
        launched = launches.get(k["args"].get("correlation"), k["ts"])
        calls.setdefault(sum(s < launched for s in syncs), []).append((launched, k))
    for index, items in sorted(calls.items()):
        t0 = min(launched for launched, _ in items)
        call_start = max((s for s in sync_ends if s < t0), default=None)
        if call_start is not None:  # host work between the previous synchronize and this call's first launch
            before = [e for e in host if call_start < e["ts"] < t0 and e["ts"] + e.get("dur", 0) <= t0 + 1]
            top = sorted(before, key=lambda e: -e.get("dur", 0))[:6]
            print(f"-- call {index}: host {t0 - call_start:.1f} µs from the previous synchronize to the first launch;")
            print("   longest host events there: " + "; ".join(f"{e['name'][:48]} {e['dur']:.0f}" for e in top))
        end, idle = None, 0.0
        print(f"-- call {index}: launch / start / duration / GPU idle before, µs")
        for launched, k in items:
            gap = 0.0 if end is None else max(0.0, k["ts"] - end)
            idle += gap
            print(f"  {launched - t0:8.1f} {k['ts'] - t0:8.1f} {k['dur']:7.1f} {gap:6.1f}  {k['name'][:70]}")
            end = k["ts"] + k["dur"]
        print(f"  first launch to last end {end - t0:.1f} µs; GPU idle between kernels {idle:.1f} µs")


if __name__ == "__main__":
    main()
