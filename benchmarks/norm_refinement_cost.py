"""What the ill-conditioned-row check costs the Triton norm: the check alone, with no row and with some rows flagged.

For each layer (bf16 ``W``, fp32 or bf16 adapters, 4096 tokens do not enter: the
norm reads parameters only), back-to-back calls of:

- ``norm``: ``factored_row_norm`` as shipped (the check included);
- ``check``: the check kernel alone on the same layer with no row flagged
  (random adapters), launched directly;
- ``flagged``: the check kernel with ``--flagged`` rows made to cancel
  (their dense recomputation included).

Back-to-back eager calls include each launch's host time (Python launches of a
Triton kernel take tens of µs); the ``graphs`` columns replay CUDA graphs of the
same calls, which leaves the GPU time alone (what compiled code with CUDA
graphs pays). Prints a table and writes JSON (``--out``) with GPU, versions and date.
Run: ``python benchmarks/norm_refinement_cost.py --out bench-out/norm_refinement.json``.
"""

from __future__ import annotations

import argparse
import json

import torch

from dora_fused.kernels.factored_norm import factored_row_norm
from dora_fused.kernels.ill_conditioned_rows import refine_ill_conditioned_rows_triton

from timing import environment, summarize, time_back_to_back

LAYERS = [(4096, 4096), (8192, 8192), (14336, 4096), (4096, 14336)]
SCALING = 2.0


def _layer(d_out: int, d_in: int, r: int, adapter_dtype: torch.dtype, flagged: int):
    gen = torch.Generator(device="cuda").manual_seed(d_out * 31 + d_in + r)
    w = (torch.randn(d_out, d_in, device="cuda", generator=gen) / d_in**0.5).to(torch.bfloat16)
    a = torch.randn(r, d_in, device="cuda", generator=gen) / d_in**0.5
    b = torch.randn(d_out, r, device="cuda", generator=gen) / r**0.5
    if flagged:
        rows = torch.randperm(d_out, device="cuda", generator=gen)[:flagged]
        a[0] = w[rows[0]].float()
        b[rows] = 0.0
        b[rows, 0] = -(1 - 1e-4) / SCALING
        w[rows] = w[rows[0]].clone()
    return w, a.to(adapter_dtype), b.to(adapter_dtype)


def _terms(w, a, b):
    w32, a32, b32 = w.float(), a.float(), b.float()
    return (w32 * w32).sum(1), SCALING**2 * ((b32 @ (a32 @ a32.T)) * b32).sum(1)


def _graph_time_us(fn, calls: int = 20, reps: int = 20) -> float:
    """GPU time of one call, from CUDA-graph replays of ``calls`` calls (no host launch cost)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps * calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 384])
    parser.add_argument("--flagged", type=int, default=16, help="rows made to cancel in the 'flagged' case")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    rows = []
    for d_out, d_in in LAYERS:
        for r in args.ranks:
            for adapter_dtype in (torch.float32, torch.bfloat16):
                case = dict(d_out=d_out, d_in=d_in, r=r, adapters=str(adapter_dtype).removeprefix("torch."))
                w, a, b = _layer(d_out, d_in, r, adapter_dtype, 0)
                norm = factored_row_norm(w, a, b, SCALING)
                w_sq, lora_sq = _terms(w, a, b)
                scratch = norm.clone()
                times = {
                    "norm": time_back_to_back(lambda: factored_row_norm(w, a, b, SCALING), args.calls, args.reps, 3),
                    "check": time_back_to_back(
                        lambda: refine_ill_conditioned_rows_triton(scratch, w_sq, lora_sq, w, a, b, SCALING),
                        args.calls,
                        args.reps,
                        3,
                    ),
                }
                w, a, b = _layer(d_out, d_in, r, adapter_dtype, args.flagged)
                norm = factored_row_norm(w, a, b, SCALING)
                w_sq, lora_sq = _terms(w, a, b)
                times["flagged"] = time_back_to_back(
                    lambda: refine_ill_conditioned_rows_triton(norm.clone(), w_sq, lora_sq, w, a, b, SCALING),
                    args.calls,
                    args.reps,
                    3,
                )
                rows.append({**case, **{k: summarize(v) for k, v in times.items()}})
                rows[-1]["graph_us"] = {
                    "norm": _graph_time_us(lambda: factored_row_norm(w, a, b, SCALING)),
                    "check": _graph_time_us(
                        lambda: refine_ill_conditioned_rows_triton(scratch, w_sq, lora_sq, w, a, b, SCALING)
                    ),
                }
                median = {k: rows[-1][k]["ms"] * 1e3 for k in times}
                graph = rows[-1]["graph_us"]
                print(
                    f"{d_out:>5}x{d_in:<5} r={r:<4} {case['adapters']:<9} norm {median['norm']:8.1f} us"
                    f"  check {median['check']:6.1f} us ({median['check'] / median['norm']:5.1%})"
                    f"  {args.flagged} rows flagged {median['flagged']:8.1f} us"
                    f"  | graphs: norm {graph['norm']:6.1f} us check {graph['check']:5.1f} us",
                    flush=True,
                )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": environment(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
