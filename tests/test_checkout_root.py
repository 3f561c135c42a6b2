"""The checkout root on ``sys.path`` shadows nothing.

``python -m ...`` and ``python -c ...`` put the working directory first on
``sys.path``. Run from the checkout root, the project's top-level folders
(``kernels/``, ``passes/``, ``src/``) would otherwise be found before installed
packages of the same names: Hugging Face's ``kernels``, which transformers
imports, among them. Each case runs in a fresh interpreter with the root as its
working directory, as a user at a shell would.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_the_root_is_first_on_sys_path_in_these_runs():
    done = _run("-c", "import os, sys; print(os.path.abspath(sys.path[0] or os.curdir))")
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == ROOT


def test_import_kernels_gives_the_installed_package_or_an_empty_namespace():
    """Installed: Hugging Face's package. Not installed: what a folder without ``__init__.py`` would give."""
    done = _run("-c", "import kernels; print(getattr(kernels, '__file__', None), hasattr(kernels, '__version__'))")
    assert done.returncode == 0, done.stderr[-3000:]
    location, has_version = done.stdout.split()
    if _installed("kernels"):
        assert ROOT / "kernels" not in Path(location).resolve().parents, location
    else:
        assert (location, has_version) == ("None", "False")


def test_transformers_sees_kernels_exactly_when_it_is_installed():
    script = "from transformers.utils import is_kernels_available; print(is_kernels_available())"
    done = _run("-c", script)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == str(_installed("kernels"))


@pytest.mark.parametrize("name", ["passes", "src"])
def test_the_other_top_level_folders_shadow_nothing(name):
    done = _run("-c", f"import {name}; print(getattr({name}, '__file__', None))")
    assert done.returncode == 0, done.stderr[-3000:]
    location = done.stdout.strip()
    if location != "None":  # a package of that name is installed: it is the one imported
        assert ROOT / name not in Path(location).resolve().parents, location


def test_transformers_and_dora_fused_import_from_the_root():
    done = _run("-c", "import transformers.modeling_utils, peft, dora_fused, dora_fused.kernels; print('OK')")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "OK"


def test_the_cli_from_the_root_reports_bad_input_without_a_traceback(tmp_path):
    done = _run("-m", "dora_fused", "audit", "--model", str(tmp_path / "missing"), "--adapter", str(tmp_path))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "model directory not found" in done.stderr


@pytest.mark.slow
def test_the_backend_by_name_rewrites_from_the_root():
    script = textwrap.dedent(
        """
        import torch
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        model = get_peft_model(
            torch.nn.Sequential(torch.nn.Linear(16, 12)),
            LoraConfig(r=4, target_modules=["0"], use_dora=True, init_lora_weights=False),
        ).eval()
        x = torch.randn(3, 16)
        with torch.no_grad():
            out = torch.compile(model, backend="dora_fused")(x)
            torch.testing.assert_close(out, model(x))
        import dora_fused
        print(len(dora_fused.last_report().rewritten))
        """
    )
    done = _run("-c", script)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "1"
