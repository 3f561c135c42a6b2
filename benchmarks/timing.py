"""Timing, memory, environment and result-file helpers shared by the benchmark scripts.

Timing (each returns a list of ms per call; ``summarize`` turns it into a median and quantiles):

- ``time_calls``: ``reps`` single calls, each synchronized, timed with CUDA events on a GPU
  and ``time.perf_counter`` on the CPU (where every op is synchronous), after warm-up calls;
  the function may mark intermediate points (``lap``). What a synchronized step costs,
  the host's time to the first launch included.
- ``time_back_to_back``: ``calls`` calls in a row without synchronizing, as the layers of a
  model run (the host's work for a call overlaps the GPU's work of earlier calls).
- ``time_cuda_graph``: GPU time alone: calls captured in one CUDA graph and replayed (what
  compiled code with CUDA graphs pays). CUDA only.
- ``summarize``: median and 10/90% quantiles of such a list.

Memory: ``PeakMemory`` (a context manager) and ``peak_mb`` (one call): peak CUDA memory
above what was allocated before (``None`` on the CPU).

Results: ``environment`` (GPU name, torch/CUDA/triton/peft/transformers/Python versions,
date) and ``write_json``, which writes ``{"meta": environment() + extra, "rows": rows}``.

A new script::

    from timing import peak_mb, summarize, time_cuda_graph, write_json

    rows = [dict(case="...", **summarize(time_cuda_graph(fn)), mb=peak_mb(fn))]
    write_json(args.json, rows, tokens=args.tokens)

The scripts run as ``python benchmarks/<script>.py``, which puts this folder on
``sys.path``: they import this module as ``timing``.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from datetime import date

import torch

__all__ = [
    "PeakMemory",
    "environment",
    "peak_mb",
    "summarize",
    "synchronize",
    "time_back_to_back",
    "time_calls",
    "time_cuda_graph",
    "write_json",
]


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _point():
    if torch.cuda.is_available():
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def _elapsed_ms(start, end) -> float:
    if isinstance(start, float):
        return (end - start) * 1e3
    return start.elapsed_time(end)


def time_calls(
    fn: Callable[..., object], reps: int, warmup: int = 0, *, laps: bool = False
) -> tuple[list[float], list[list[float]]]:
    """``warmup`` untimed calls, then ``reps`` timed ones, synchronized after each.

    Returns the ms of each timed call and, with ``laps=True`` (``fn`` is then
    called as ``fn(lap)``), the ms from the call's start to each ``lap()`` it made.
    """
    noop = lambda: None  # noqa: E731
    for _ in range(warmup):
        fn(noop) if laps else fn()
    synchronize()
    totals: list[float] = []
    splits: list[list[float]] = []
    for _ in range(reps):
        points = [_point()]
        if laps:
            fn(lambda: points.append(_point()))
        else:
            fn()
        points.append(_point())
        synchronize()
        ms = [_elapsed_ms(points[0], p) for p in points[1:]]
        totals.append(ms[-1])
        splits.append(ms[:-1])
    return totals, splits


def time_back_to_back(fn: Callable[[], object], calls: int, reps: int, warmup: int = 0) -> list[float]:
    """ms per call of ``calls`` calls in a row (one synchronize after them), for each of ``reps`` runs.

    A single synchronized call also pays the host's time to its first launch;
    here only the GPU's time per call counts once the host keeps ahead of it
    (and the host's where it does not).
    """
    for _ in range(warmup):
        fn()
    synchronize()
    times = []
    for _ in range(reps):
        start = _point()
        for _ in range(calls):
            fn()
        end = _point()
        synchronize()
        times.append(_elapsed_ms(start, end) / calls)
    return times


def time_cuda_graph(fn: Callable[[], object], calls: int = 10, reps: int = 20, warmup: int = 3) -> list[float]:
    """GPU ms per call: ``calls`` calls captured in one CUDA graph, replayed ``reps`` times.

    ``warmup`` calls run on a side stream first (as capture requires); one untimed
    replay follows the capture. Each replay is timed with CUDA events and divided
    by ``calls``. The host's launch time is not counted. CUDA only.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    return times


def summarize(times: list[float]) -> dict[str, float]:
    """Median (``ms``) and 10/90% quantiles (``q10``, ``q90``); all three equal for a single time."""
    if len(times) == 1:
        return dict(ms=times[0], q10=times[0], q90=times[0])
    q = statistics.quantiles(times, n=10)
    return dict(ms=statistics.median(times), q10=q[0], q90=q[-1])


class PeakMemory:
    """``with PeakMemory() as mem: ...``: ``mem.resident`` (bytes allocated at entry) and
    ``mem.peak`` (the most allocated inside, minus ``resident``); both ``None`` without CUDA."""

    def __init__(self) -> None:
        self.resident: int | None = None
        self.peak: int | None = None

    def __enter__(self) -> PeakMemory:
        if torch.cuda.is_available():
            synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.resident = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.resident

    @property
    def peak_mb(self) -> float | None:
        return None if self.peak is None else self.peak / 2**20


def peak_mb(fn: Callable[[], object]) -> float | None:
    """Peak MB of one call of ``fn`` above what was allocated before it (``None`` without CUDA)."""
    with PeakMemory() as mem:
        fn()
    return mem.peak_mb


def environment() -> dict[str, object]:
    """GPU name (``None`` on the CPU), CPU, torch/CUDA/triton/peft/transformers/Python versions and date."""
    import peft
    import transformers

    info: dict[str, object] = dict(
        gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        cpu=platform.processor() or platform.machine(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        peft=peft.__version__,
        transformers=transformers.__version__,
        python=platform.python_version(),
        date=str(date.today()),
    )
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def write_json(path: str | None, rows: list[dict], **meta: object) -> dict:
    """Write ``{"meta": {**environment(), **meta}, "rows": rows}`` to ``path`` (nothing where it is ``None``).

    Returns the meta dict, for printing.
    """
    info = {**environment(), **meta}
    if path:
        with open(path, "w") as f:
            json.dump(dict(meta=info, rows=rows), f, indent=1)
    return info
