"""Every tensor-core kernel config the launchers use fits an H100's shared memory (checked on the CPU).

A launch whose pipeline needs more shared memory than the GPU has fails with
``OutOfResources``; the GPU tests only see the shapes they run. Here each config
class is compiled for sm_90 on aligned tensors (``sm90_resources.py``), in a
subprocess without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sm90_resources import H100_SHARED_BYTES

CANARY = "canary: former 64-column fp32-adapter norm config"


@pytest.fixture(scope="module")
def shared_bytes() -> dict[str, int]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("sm90_resources.py")
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_check_reproduces_the_launch_failure_seen_on_the_gpu(shared_bytes):
    """The former config failed at launch on an H200 asking for 360448 bytes: the check must see it too."""
    assert shared_bytes[CANARY] > H100_SHARED_BYTES


@pytest.mark.slow
def test_every_launch_config_fits_an_h100(shared_bytes):
    cases = {case: size for case, size in shared_bytes.items() if case != CANARY}
    assert len(cases) >= 20 and all(size > 0 for size in cases.values())
    too_big = {case: size for case, size in cases.items() if size > H100_SHARED_BYTES}
    assert not too_big, f"needs more than {H100_SHARED_BYTES} bytes of shared memory: {too_big}"
