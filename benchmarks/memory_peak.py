"""What is alive at the peak of a training step: the allocations, grouped by the line that made them.

Question: where does one contender's peak memory differ from another's? The model, adapters,
inputs and compile are those of benchmarks/models.py. One process per contender (run it twice
to compare): two untimed steps, then one step with CUDA's allocator history recorded. The
history is replayed to find the moment of the step's peak; the allocations alive then are
grouped by the innermost frame in generated (Inductor) or project code, with that line's text.
For a buffer allocated in Inductor's generated code, the group also names what writes it: the
first later line that names the buffer (an extern call such as ``extern_kernels.mm``, or a
Triton kernel's launch, with the ATen ops Inductor made that kernel from).

    python benchmarks/memory_peak.py --case llama8b-r384-bf16-train --contender dora_fused --layers 2
    python benchmarks/memory_peak.py --case llama8b-r384-bf16-train --contender inductor --layers 2

CUDA only (the allocator history is a CUDA feature). Prints the peak above the allocations made
before the recorded step, and the largest groups; --json writes them all (``rows``), with the GPU, versions and date.
"""

from __future__ import annotations

import argparse
import collections
import functools
import linecache
import os
import re
import sys

import torch

import models  # benchmarks/models.py: the same model, inputs and contenders
from timing import write_json


def replay_peak(trace: list[dict]) -> tuple[int, list[dict]]:
    """(bytes at the peak, the allocations alive then) from one device's allocator trace.

    Counts what this trace allocated: blocks allocated before recording began are the baseline.
    A block counts from its ``alloc`` to its first free event.
    """
    live: dict[int, dict] = {}
    current = peak = peak_index = 0
    for index, event in enumerate(trace):
        if event["action"] == "alloc":
            live[event["addr"]] = event
            current += event["size"]
            if current > peak:
                peak, peak_index = current, index
        elif event["action"] in ("free_requested", "free_completed") and event["addr"] in live:
            current -= live.pop(event["addr"])["size"]
    live = {}
    for event in trace[: peak_index + 1]:  # again, up to the peak
        if event["action"] == "alloc":
            live[event["addr"]] = event
        elif event["action"] in ("free_requested", "free_completed"):
            live.pop(event["addr"], None)
    return peak, list(live.values())


def _noted_aten(comments: list[str]) -> str:
    """The ops of the last ``Original ATen:`` comment among ``comments`` ('' if none)."""
    for comment in reversed(comments):
        if "Original ATen:" in comment:
            return comment.split("Original ATen:", 1)[1].strip()
    return ""


def _original_aten(lines: list[str], at: int, kernel: str | None) -> str:
    """The ``Original ATen`` ops Inductor noted for the call at ``lines[at]`` ('' if none).

    Inductor writes them in a comment just above the call, or above the kernel's definition.
    """
    noted = _noted_aten(lines[max(0, at - 3) : at])
    if noted or kernel is None:
        return noted
    definition = re.compile(rf"^{re.escape(kernel)} = async_compile\.\w+\(")
    start = next((index for index, text in enumerate(lines) if definition.match(text)), None)
    return "" if start is None else _noted_aten(lines[max(0, start - 12) : start])


@functools.cache  # one answer per allocation site: every block allocated there asks again
def producer(filename: str, line: int) -> str:
    """What writes the buffer allocated at ``filename:line`` (1-based) of generated code ('' if not an allocation).

    The first later line that names the buffer (an extern call, or a kernel's launch), with the
    ATen ops Inductor noted for it.
    """
    allocation = re.match(r"\s*(\w+) = empty_strided", linecache.getline(filename, line))
    if allocation is None:
        return ""
    lines = linecache.getlines(filename)
    name = re.compile(rf"\b{allocation.group(1)}\b")
    at = next((index for index in range(line, len(lines)) if name.search(lines[index])), None)
    if at is None:
        return ""
    call = lines[at].strip()
    launch = re.match(r"(\w+)(?:\.run)?\(", call)  # a Triton kernel's launch, or a C++ kernel's call
    aten = _original_aten(lines, at, launch.group(1) if launch else None)
    return f"{call[:160]} [{aten}]" if aten else call[:160]


def origin(frames: list[dict]) -> str:
    """The innermost frame in generated code or in this project, with its source line (and, in generated
    code, what writes the buffer allocated there: ``producer``)."""
    for frame in frames:
        name = frame.get("filename", "")
        if "torchinductor" in name or "/dora_fused/" in name or "/kernels/" in name or "/passes/" in name:
            line = frame.get("line", 0)
            text = linecache.getline(name, line).strip()
            written = f" <- {producer(name, line)}" if "torchinductor" in name else ""
            return f"{os.path.basename(name)}:{line} {frame.get('name')}: {text}{written}"
    first = frames[0] if frames else {}
    return f"{os.path.basename(first.get('filename', '?'))}:{first.get('line')} {first.get('name')}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", default="llama8b-r384-bf16-train")
    parser.add_argument("--contender", default="dora_fused", choices=models.CONTENDERS)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--json", default=None, help="write every group here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("CUDA only: the allocator history is a CUDA feature")

    case = models.CASES_BY_NAME[args.case]
    bench = models.parse_args(["--out", os.devnull, "--layers", str(args.layers)])
    spec = models.model_spec(case, bench)
    device = torch.device("cuda")
    model, fn = models.make_contender(args.contender, spec, case.adapters, bench, device)
    batch = models.make_inputs(spec, bench, 1, device, models.BASE_DTYPE)[0]
    if case.mode == "train-gc":
        models.enable_checkpointing(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=models.LR)

    def step() -> None:
        fn(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):  # compile, then a step in steady state
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    step()
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    measured = torch.cuda.max_memory_allocated() - resident

    peak, alive = replay_peak(snapshot["device_traces"][torch.cuda.current_device()])
    groups: dict[str, list[int]] = collections.defaultdict(list)
    for event in alive:
        groups[origin(event.get("frames", []))].append(event["size"])
    rows = sorted(((sum(sizes), len(sizes), where) for where, sizes in groups.items()), reverse=True)
    print(f"{args.contender} {args.case} ({args.layers} layers): peak {peak / 2**30:.3f} GB above the step's start")
    print(f"(max_memory_allocated says {measured / 2**30:.3f} GB)")
    print("   MB  count  where (innermost generated or project frame)")
    for total, count, where in rows[: args.top]:
        print(f"{total / 2**20:7.1f} {count:5d}  {where[:400]}")
    groups = [dict(bytes=t, count=c, where=w) for t, c, w in rows]
    write_json(args.json, groups, peak=peak, measured=measured, case=args.case, contender=args.contender)


if __name__ == "__main__":
    main()
