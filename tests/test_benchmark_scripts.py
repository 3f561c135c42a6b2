"""Every benchmark script imports and parses its arguments on the CPU: ``python benchmarks/X.py --help``.

The scripts need a GPU to measure (except matching_cost.py and models.py --tiny); this keeps
them from rotting where none is. Each runs in this process as ``__main__`` (no new interpreter,
so no second import of torch) with the benchmarks folder on ``sys.path``, as
``python benchmarks/X.py`` has it.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
HELPERS = {"timing.py"}  # imported by the scripts, not run
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if p.name not in HELPERS)


def test_the_scripts_are_found():
    assert {"ops.py", "dora_linear.py", "models.py", "memory_peak.py", "matching_cost.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setattr(sys, "argv", [str(BENCH / script), "--help"])
    before = set(sys.modules)
    try:
        with pytest.raises(SystemExit) as exit_:  # argparse's --help exits 0; a script without it would run
            runpy.run_path(str(BENCH / script), run_name="__main__")
    finally:  # the scripts' sibling modules (timing, models, ...) leave with the folder
        for name in set(sys.modules) - before:
            if str(BENCH) in str(getattr(sys.modules[name], "__file__", None) or ""):
                del sys.modules[name]
    assert exit_.value.code == 0
