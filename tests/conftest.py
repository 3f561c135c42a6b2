"""Shared fixtures: tiny PEFT DoRA models, an fp64 reference, and a comparison helper."""

from __future__ import annotations

import copy
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors through the interpreter; set before dora_fused is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from triton_interpreter import fix_bf16_dot, interpreting

if interpreting():
    fix_bf16_dot()

# Keep CPU Inductor compiles predictable on the 2-core CI machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def inductor_hook():
    """``dora_fused.enable_inductor_hook()`` for one test, reports cleared; Inductor's settings restored after."""
    import dora_fused

    config = torch._inductor.config
    before = (config.pre_grad_custom_pass, config.pre_grad_pass_timing)
    hook = dora_fused.enable_inductor_hook()
    dora_fused.clear_reports()
    yield hook
    dora_fused.disable_inductor_hook()
    assert (config.pre_grad_custom_pass, config.pre_grad_pass_timing) == before


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def clone_as(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A deep copy with every floating parameter and buffer in ``dtype`` (for the fp64 reference)."""
    return copy.deepcopy(model).to(dtype)
