"""Run the Triton kernels on CPU tensors: ``TRITON_INTERPRET=1`` and one interpreter fix.

The Triton interpreter (3.6 to 3.9) stores bf16 values as their uint16 bit
patterns and hands those integers straight to ``np.matmul`` in ``tl.dot``, so
any bf16 dot computes garbage. On a GPU a bf16 dot multiplies exactly and
accumulates in fp32; ``fix_bf16_dot`` makes the interpreter do the same by
widening the bits to fp32 first (a bf16 is the top half of an fp32). Tests only.

Two more interpreter differences the tests allow for: fp32 → bf16 casts
truncate (the GPU rounds to nearest even), so interpreted bf16 outputs may be
off by one ulp; and everything is slow, so interpreted shapes stay small.
"""

from __future__ import annotations

import os

import numpy as np


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def fix_bf16_dot() -> None:
    """Make the interpreter's ``tl.dot`` read bf16 operands as numbers (idempotent)."""
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_dora_fused_fix", False):
        return
    original = builder.create_dot

    def widen(handle):
        if handle.dtype.scalar == tl.bfloat16:
            data = (handle.data.astype(np.uint32) << 16).view(np.float32)
            return interpreter.TensorHandle(data, tl.float32)
        return handle

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    create_dot._dora_fused_fix = True
    builder.create_dot = create_dot
