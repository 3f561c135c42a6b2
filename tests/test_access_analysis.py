"""Torch's access analysis of this package's kernels runs once per specialization (kernels/access_analysis.py).

The key must tell apart everything Triton specializes (else a cached answer could
name the wrong written arguments) and nothing else (else each call site lowers
the kernel again). The unit tests count the calls of a stand-in analysis; the
last test runs torch's real analysis for sm_90 on the CPU in a subprocess.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl
from access_analysis_check import intercepting

from dora_fused.kernels.access_analysis import ANALYSES, install, memoized

compose_module = importlib.import_module("dora_fused.kernels.compose")


def _compose_launch(dtype=torch.bfloat16, bias: bool = False, columns: int = 96) -> tuple[object, dict]:
    """The kernel and arguments ``compose_forward_triton`` launches, captured instead of run."""
    captured = {}

    def capture(kernel, arguments):
        captured.update(kernel=kernel, kwargs=arguments)

    result, lora = torch.randn(4, columns, dtype=dtype), torch.randn(4, columns, dtype=dtype)
    magnitude, norm = torch.rand(columns), torch.rand(columns) + 1
    original = compose_module.wrap_triton
    compose_module.wrap_triton = intercepting(capture)
    try:
        compose_module.compose_forward_triton(
            result, lora, magnitude, norm, torch.randn(columns) if bias else None, 2.0, dtype
        )
    finally:
        compose_module.wrap_triton = original
    return captured["kernel"], captured["kwargs"]


def _counting():
    calls = []

    def analysis(kernel, kwargs, *rest):
        calls.append(kernel)
        return {"writes": ["OUT"]}

    return memoized(analysis), calls


def test_one_analysis_per_specialization():
    analysis, calls = _counting()
    kernel, kwargs = _compose_launch()
    first = analysis(kernel, kwargs, {})
    second = analysis(kernel, dict(kwargs), {})
    assert len(calls) == 1 and first == second and first is not second  # each caller its own copy
    _, wider = _compose_launch(columns=112)  # another multiple of 16: the same specialization
    analysis(kernel, wider, {})
    assert len(calls) == 1


@pytest.mark.parametrize(
    "change",
    ["int equal to 1", "int not a multiple of 16", "64-bit int", "dtype", "constexpr", "bias", "float", "option"],
)
def test_each_specialization_is_analyzed_on_its_own(change):
    analysis, calls = _counting()
    kernel, kwargs = _compose_launch()
    analysis(kernel, kwargs, {})
    integer = next(name for name, value in kwargs.items() if type(value) is int and value % 16 == 0)
    changed = dict(kwargs)
    if change == "int equal to 1":
        changed[integer] = 1
    elif change == "int not a multiple of 16":
        changed[integer] = 97
    elif change == "64-bit int":
        changed[integer] = 2**33
    elif change == "dtype":
        changed = _compose_launch(dtype=torch.float16)[1]
    elif change == "constexpr":
        changed["BLOCK_N"] = changed["BLOCK_N"] * 2
    elif change == "bias":
        changed = _compose_launch(bias=True)[1]
    elif change == "float":
        changed["scaling"] = 0.5
    else:
        changed["num_warps"] = 8
    analysis(kernel, changed, {})
    assert len(calls) == 2


def test_symbolic_integers_share_one_analysis():
    import sympy

    analysis, calls = _counting()
    kernel, kwargs = _compose_launch()
    integer = next(name for name, value in kwargs.items() if type(value) is int and value % 16 == 0)
    for value in (sympy.Integer(4096), sympy.Symbol("s0") + 1):  # Inductor's: torch lowers any as one placeholder
        analysis(kernel, {**kwargs, integer: value}, {})
    assert len(calls) == 1


@triton.jit
def _foreign_kernel(X, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(X + offsets, tl.load(X + offsets, mask=offsets < n), mask=offsets < n)


def test_other_kernels_and_unknown_arguments_are_not_cached():
    analysis, calls = _counting()
    foreign = dict(X=torch.zeros(4), n=4, BLOCK=4)
    analysis(_foreign_kernel, foreign, {})
    analysis(_foreign_kernel, foreign, {})
    kernel, kwargs = _compose_launch()
    unknown = {**kwargs, "scaling": object()}
    analysis(kernel, unknown, {})
    analysis(kernel, unknown, {})
    assert len(calls) == 4


def test_installed_once_on_import():
    from torch._higher_order_ops import triton_kernel_wrap

    import dora_fused  # noqa: F401

    present = [name for name in ANALYSES if hasattr(triton_kernel_wrap, name)]
    assert present and all(hasattr(getattr(triton_kernel_wrap, name), "uncached") for name in present)
    assert install() == []


@pytest.mark.slow
def test_torch_analysis_memoized_finds_the_same_writes_and_lowers_each_kernel_once():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("access_analysis_check.py")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])["rows"]
    kernels = [row["kernel"] for row in rows]
    assert len(rows) >= 10 and kernels[: len(rows) // 2] == kernels[len(rows) // 2 :]
    assert all(row["memoized"] == row["uncached"] and row["uncached"] for row in rows)
    assert [row["lowered"] for row in rows] == [True] * (len(rows) // 2) + [False] * (len(rows) // 2)
