"""Timing, memory and environment helpers shared by the benchmark scripts.

- ``time_calls``: per-call times of a function, timed with CUDA events on a GPU
  and ``time.perf_counter`` on the CPU (where every op is synchronous), after
  warm-up calls; the function may mark intermediate points (``lap``).
- ``time_back_to_back``: per-call time of a function called many times in a row
  without synchronizing, as the layers of a model run (the host's work for a
  call overlaps the GPU's work of earlier calls).
- ``summarize``: median and 10/90% quantiles of a list of times.
- ``PeakMemory``: peak CUDA memory above what was allocated when it started
  (``None`` on the CPU).
- ``environment``: GPU, versions and date, for the ``meta`` of a JSON result.

The scripts run as ``python benchmarks/<script>.py``, which puts this folder on
``sys.path``: they import it as ``timing``.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from datetime import date

import torch

__all__ = ["PeakMemory", "environment", "summarize", "synchronize", "time_back_to_back", "time_calls"]


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


def summarize(times: list[float]) -> dict[str, float]:
    """Median and 10/90% quantiles (both equal to the value for a single time)."""
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


def environment() -> dict[str, object]:
    """GPU (or CPU), library versions and date."""
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
