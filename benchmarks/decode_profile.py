"""Where a decoded token's time goes: host against GPU, kernels and graph launches, the host's top functions.

Used by ``inference.py --profile`` inside a decode process's timed turn. ``generate`` is run for
1 and for ``n`` new tokens under ``torch.profiler`` (CPU and CUDA activity), and the per-token
figures are the differences divided by ``n - 1``, so the prefill drops out:

- ``wall_ms``: host wall time per token (``perf_counter`` around each ``generate``);
- ``gpu_ms``: the summed duration of the GPU kernels and copies per token (busy time, overlaps
  counted once per kernel);
- ``kernels``, ``graph_launches``: GPU kernels (and copies) and ``cudaGraphLaunch`` calls per token;
- ``cudagraphs``: Inductor's CUDA-graph counters for the whole process (``cudagraph_skips``: graphs
  run without CUDA graphs; ``cudagraph_recorded_non_static_inputs``: inputs copied in at each replay);
- ``frozen``: the frozen runtime's counters for the whole process (``refresh``: folded values
  recomputed; ``variant``, ``recompile``);
- ``first_token``: the same four figures for ``generate`` of one token (the prefill);
- ``host_top``: the host functions with the most own time per token over the ``n``-token call
  (``cProfile``, a separate run: its overhead inflates Python-heavy paths, so it ranks them and
  does not time them). A function's own time includes the C++ it calls that cProfile does not
  see: the frame that calls a compiled module also holds Dynamo's guard evaluation.

``wall_ms`` well above ``gpu_ms`` means the token waits on the host.
"""

from __future__ import annotations

import cProfile
import pstats
import time
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["profile_decode"]


def _gpu_stats(call: Callable[[], object]) -> tuple[float, float, int, int]:
    """(wall ms, GPU busy ms, GPU kernels, cudaGraphLaunch calls) of one call."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        call()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = (time.perf_counter() - start) * 1e3
    gpu_us, kernels, launches = 0.0, 0, 0
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            gpu_us += event.time_range.elapsed_us()
            kernels += 1
        elif event.name in ("cudaGraphLaunch", "cuGraphLaunch"):
            launches += 1
    return wall, gpu_us / 1e3, kernels, launches


def _host_top(call: Callable[[], object], per: int, top: int) -> list[dict[str, object]]:
    """The ``top`` functions by own time of one call under cProfile, in ms per ``per``."""
    profiler = cProfile.Profile()
    profiler.enable()
    call()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (calls, primitive, tottime, cumtime, callers)
    rows = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    return [
        dict(
            function=f"{name} ({Path(file).name}:{line})",
            calls=calls / per,
            own_ms=tottime * 1e3 / per,
            cumulative_ms=cumtime * 1e3 / per,
        )
        for (file, line, name), (calls, _, tottime, cumtime, _) in rows
    ]


def profile_decode(generate: Callable[[int], object], new: int, *, top: int = 12) -> dict[str, object]:
    """Per decoded token: host wall ms, GPU busy ms, kernels, graph launches; and the host's top functions."""
    one = _gpu_stats(lambda: generate(1))
    full = _gpu_stats(lambda: generate(new))
    per = new - 1
    wall, gpu, kernels, launches = ((b - a) / per for a, b in zip(one, full, strict=True))
    counters = torch._dynamo.utils.counters
    return dict(
        cudagraphs={k: v for k, v in counters["inductor"].items() if k.startswith("cudagraph")},
        frozen=dict(counters["dora_fused"]),
        first_token=dict(zip(("wall_ms", "gpu_ms", "kernels", "graph_launches"), one, strict=True)),
        wall_ms=wall,
        gpu_ms=gpu,
        kernels=kernels,
        graph_launches=launches,
        host_top=_host_top(lambda: generate(new), new, top),
    )
