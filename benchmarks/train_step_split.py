"""One training step of a DoRA Linear, split: host and GPU time of its forward and of its backward.

Question: where does a single synchronized training step of a small layer spend its time, and is it
bound by the host? Each contender (``dora_fused``, Inductor's DoRA, plain LoRA under Inductor) gets
a fresh module and a cleared Dynamo cache and compiles only the training graph. Run on a CUDA GPU:

    python benchmarks/train_step_split.py [--layers 4096x384,8192x384]

Method: after 8 warm-up steps, 30 single steps (gradients set to ``None`` first, as
``dora_linear.py``'s fwd+bwd does), each followed by a synchronize; medians of
- ``host_fwd`` / ``host_total``: ms from the step's start until the forward / the backward call
  returned on the host (``time.perf_counter``),
- ``gpu_fwd`` / ``gpu_total``: ms from an event recorded at the start to one recorded after the
  forward / the backward (what the GPU had finished by then, as queued),
- ``wall``: ms until the synchronize returned;
then 20 steps back to back: host ms per step (until the last call returned) and GPU ms per step
(events around all 20). Host ≈ GPU back to back means the step is host-bound.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from dora_linear import build

import dora_fused  # noqa: F401  (registers the backend)


def _mark(marks: list) -> None:
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    marks.append((time.perf_counter(), event))


def split_step(d: int, rank: int, backend: str, dora: bool = True, reps: int = 30) -> dict[str, float]:
    torch._dynamo.reset()
    model = build(d, d, rank, False, dora=dora)
    compiled = torch.compile(model, backend=backend)
    xg = torch.randn(4096, d, device="cuda", dtype=torch.bfloat16).requires_grad_()

    def step(marks: list) -> None:
        model.zero_grad(set_to_none=True)
        xg.grad = None
        loss = compiled(xg).float().sum()
        _mark(marks)
        loss.backward()
        _mark(marks)

    for _ in range(8):
        step([])
    torch.cuda.synchronize()
    rows = []
    for _ in range(reps):
        marks: list = []
        _mark(marks)
        step(marks)
        host_end = time.perf_counter()
        torch.cuda.synchronize()
        (t0, e0), (t_fwd, e_fwd), (_, e_bwd) = marks
        rows.append(
            dict(
                host_fwd=(t_fwd - t0) * 1e3,
                host_total=(host_end - t0) * 1e3,
                wall=(time.perf_counter() - t0) * 1e3,
                gpu_fwd=e0.elapsed_time(e_fwd),
                gpu_total=e0.elapsed_time(e_bwd),
            )
        )
    result = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
    marks = []
    _mark(marks)
    for _ in range(20):
        step([])
    host = (time.perf_counter() - marks[0][0]) / 20 * 1e3
    _mark(marks)
    torch.cuda.synchronize()
    result.update(b2b_host=host, b2b_gpu=marks[0][1].elapsed_time(marks[1][1]) / 20)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="4096x384,4096x16,8192x384", help="d_in = d_out x rank, all-bf16")
    args = parser.parse_args()
    for layer in args.layers.split(","):
        d, rank = map(int, layer.split("x"))
        for name, backend, dora in [
            ("dora_fused", "dora_fused", True),
            ("inductor", "inductor", True),
            ("lora", "inductor", False),
        ]:
            result = split_step(d, rank, backend, dora)
            print(f"{name:10s} {d}² r={rank:<4d} " + "  ".join(f"{k} {v:6.3f}" for k, v in result.items()), flush=True)


if __name__ == "__main__":
    main()
