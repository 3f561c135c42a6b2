"""Torch's access analysis of this package's kernels, memoized against not, on the CPU.

Run as a script (no ``TRITON_INTERPRET``: the analysis lowers kernels to Triton IR
for a target, here sm_90, given without a GPU). It runs the norm and compose
launchers twice with every ``wrap_triton`` launch replaced by the analysis of that
launch, and prints one JSON object: per launch, the kernel, the written arguments
found by the memoized and the uncached analysis, and whether the memoized one
lowered the kernel again (``lowered``).
"""

from __future__ import annotations

import importlib
import inspect
import json

import torch
import triton
from triton.backends.compiler import GPUTarget


class _Sm90Driver:
    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)


def main() -> None:
    triton.runtime.driver.set_active(_Sm90Driver())
    from torch._higher_order_ops import triton_kernel_wrap

    from dora_fused.kernels.access_analysis import ANALYSES, memoized

    # by module path: the package exports functions under some of these names
    common, compose, factored_norm, gram = (
        importlib.import_module(f"dora_fused.kernels.{name}") for name in ("common", "compose", "factored_norm", "gram")
    )

    installed = next(getattr(triton_kernel_wrap, name) for name in ANALYSES if hasattr(triton_kernel_wrap, name))
    uncached = installed.uncached
    lowerings: list[int] = []

    def counted(*args):
        lowerings.append(1)
        return uncached(*args)

    analysis = memoized(counted)
    rows = []

    def analyze(kernel, arguments):
        before = len(lowerings)
        memo = _writes(analysis(kernel, dict(arguments), {}))
        lowered = len(lowerings) > before
        plain = _writes(uncached(kernel, dict(arguments), {}))
        rows.append(dict(kernel=kernel.fn.__name__, memoized=memo, uncached=plain, lowered=lowered))

    for module in (common, compose, factored_norm, gram):
        module.wrap_triton = intercepting(analyze)
    weight = torch.randn(96, 80, dtype=torch.bfloat16)
    lora_A, lora_B = torch.randn(8, 80), torch.randn(96, 8)
    result, lora = torch.randn(4, 96, dtype=torch.bfloat16), torch.randn(4, 96, dtype=torch.bfloat16)
    magnitude, norm = torch.rand(96), torch.rand(96) + 1
    for _ in range(2):
        factored_norm.factored_row_norm_triton(weight, lora_A, lora_B, 2.0)
        compose.compose_forward_triton(result, lora, magnitude, norm, None, 2.0, torch.bfloat16)
    print(json.dumps(dict(installed=installed.__name__, rows=rows)))


def intercepting(on_launch):
    """A stand-in for ``wrap_triton``: a launch calls ``on_launch(kernel, its arguments by name)`` and runs nothing."""

    class Intercepted:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                names = list(inspect.signature(self.kernel.fn).parameters)
                on_launch(self.kernel, {**dict(zip(names, args, strict=False)), **kwargs})

            return launch

    return Intercepted


def _writes(accesses) -> list[str]:
    writes = accesses.read_writes.writes if hasattr(accesses, "read_writes") else accesses
    return sorted(getattr(dep, "name", dep) for dep in writes)


if __name__ == "__main__":
    main()
