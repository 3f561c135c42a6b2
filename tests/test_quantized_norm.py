"""The quantized norm (kernels/quantized_norm.py): bitsandbytes' packed NF4 / FP4 and int8 weights read in place.

Under the Triton interpreter (CPU) at small odd shapes, and at full size on a
GPU (``gpu``): the reference dequantize gives bitsandbytes' values exactly, and
the Triton norm is within fp32 rounding of fp64 of bitsandbytes' dequantized
weight, including double quantization, partial last blocks, ranks spanning two
column tiles, and rows where the adapter cancels the base row (recomputed densely).
"""

from __future__ import annotations

import pytest
import torch
from quantized_models import HAS_BNB

from dora_fused.kernels.factored_norm import dense_row_norm_reference, factored_row_norm_reference
from dora_fused.kernels.quantized_norm import (
    FP4_CODE,
    NF4_CODE,
    dequantize_reference,
    four_bit_code,
    quantized_row_norm,
    quantized_row_norm_reference,
    quantized_row_norm_triton,
)

pytestmark = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed")
TOL = 2e-6  # max relative error against fp64 (fp32 accumulation over d_in ≤ 130 here)


def _quantized(quant_type: str, nested: bool, blocksize: int, d_out: int, d_in: int, dtype=torch.bfloat16, seed=0):
    """``(packed, scales, dequantized)`` of a random weight, by bitsandbytes (scales after double dequantization)."""
    import bitsandbytes.functional as F

    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(d_out, d_in, generator=gen).to(dtype)
    if quant_type == "int8":
        rows, scb, _ = F.int8_vectorwise_quant(weight.half())
        return rows, scb, F.int8_vectorwise_dequant(rows, scb)
    packed, state = F.quantize_4bit(weight, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
    scales = F.dequantize_blockwise(state.absmax, state.state2) + state.offset if nested else state.absmax
    return packed, scales, F.dequantize_4bit(packed, state)


def _adapters(d_out: int, d_in: int, r: int, dtype: torch.dtype, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lora_A = (torch.randn(r, d_in, generator=gen) / d_in**0.5).to(dtype)
    return lora_A, torch.randn(d_out, r, generator=gen).to(dtype)


def _max_relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected) / expected).abs().max().item()


def test_code_tables_are_bitsandbytes():
    from bitsandbytes.functional import get_4bit_type

    assert torch.equal(torch.tensor(NF4_CODE, dtype=torch.float32), get_4bit_type("nf4", device="cpu"))
    assert torch.equal(torch.tensor(FP4_CODE, dtype=torch.float32), get_4bit_type("fp4", device="cpu"))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double-quant"])
@pytest.mark.parametrize(("blocksize", "d_out", "d_in"), [(64, 37, 75), (32, 5, 7), (128, 11, 301)])
def test_reference_dequantize_is_bitsandbytes(quant_type, nested, blocksize, d_out, d_in):
    """Odd element counts: the last byte's low nibble is padding and the last block is partial."""
    packed, scales, expected = _quantized(quant_type, nested, blocksize, d_out, d_in)
    assert packed.shape == ((d_out * d_in + 1) // 2, 1)
    actual = dequantize_reference(packed, scales, quant_type, blocksize, (d_out, d_in), expected.dtype)
    assert torch.equal(actual, expected)


def test_reference_dequantize_is_bitsandbytes_int8():
    rows, scb, expected = _quantized("int8", False, 0, 21, 53)
    assert torch.equal(dequantize_reference(rows, scb, "int8", 0, (21, 53), torch.float32), expected)


CASES = {  # quant_type, nested, blocksize, d_out, d_in, r, weight dtype, adapter dtype
    "nf4-fp32-adapters": ("nf4", False, 64, 37, 75, 5, torch.bfloat16, torch.float32),
    "fp4-double-quant-bf16-adapters": ("fp4", True, 32, 19, 97, 3, torch.bfloat16, torch.bfloat16),
    "nf4-double-quant-two-column-tiles": ("nf4", True, 64, 29, 130, 70, torch.bfloat16, torch.float32),
    "nf4-fp16-weight-fp32-adapters": ("nf4", False, 128, 23, 129, 6, torch.float16, torch.float32),
    "nf4-aligned-fp32-adapters": ("nf4", False, 64, 37, 192, 5, torch.bfloat16, torch.float32),
    "nf4-aligned-double-quant-two-column-tiles": ("nf4", True, 128, 29, 256, 70, torch.bfloat16, torch.bfloat16),
    "fp4-aligned-fp16-weight": ("fp4", False, 64, 19, 128, 6, torch.float16, torch.float32),
    "int8-fp32-adapters": ("int8", False, 0, 21, 53, 4, torch.bfloat16, torch.float32),
    "int8-fp16-adapters": ("int8", False, 0, 17, 66, 9, torch.bfloat16, torch.float16),
}


@pytest.mark.parametrize("case", CASES)
def test_triton_norm_is_fp32_exact(case):
    quant_type, nested, blocksize, d_out, d_in, r, dtype, adapter_dtype = CASES[case]
    packed, scales, weight = _quantized(quant_type, nested, blocksize, d_out, d_in, dtype)
    lora_A, lora_B = _adapters(d_out, d_in, r, adapter_dtype)
    args = (packed, scales, quant_type, blocksize, (d_out, d_in), weight.dtype, lora_A, lora_B, 0.75)
    exact = dense_row_norm_reference(weight.double(), lora_A.double(), lora_B.double(), 0.75)
    triton_norm = quantized_row_norm_triton(*args)
    assert triton_norm.dtype == torch.float32 and triton_norm.shape == (d_out,)
    assert _max_relative(triton_norm, exact) < TOL
    assert _max_relative(quantized_row_norm_reference(*args), exact) < TOL
    assert _max_relative(quantized_row_norm(*args), exact) < TOL  # the op (CPU: the reference)


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_cancelling_rows_are_recomputed_from_dequantized_rows(quant_type):
    """Rows where s·(B·A)_i ≈ -W_i: the factored sum cancels; the flagged rows come out as exact as the dense norm."""
    d_out, d_in, s, rows = 24, 70, 0.5, [3, 8]
    packed, scales, weight = _quantized(quant_type, False, 64, d_out, d_in)
    lora_A, lora_B = _adapters(d_out, d_in, 2, torch.float32)
    lora_A[0] = weight[3].float()
    lora_B[3] = torch.tensor([-(1 - 1e-3) / s, 0.0])
    lora_B[8] = torch.tensor([-(1 - 2e-3) / s, 0.0])  # W_8 + s·B_8·A: a cancelling mix of two rows
    exact = dense_row_norm_reference(weight.double(), lora_A.double(), lora_B.double(), s)
    norm = quantized_row_norm_triton(packed, scales, quant_type, 64, (d_out, d_in), weight.dtype, lora_A, lora_B, s)
    others = [i for i in range(d_out) if i not in rows]
    assert _max_relative(norm[others], exact[others]) < TOL
    dense = dense_row_norm_reference(weight.float(), lora_A, lora_B, s)  # PEFT's dense fp32 path
    unrefined = factored_row_norm_reference(weight.float(), lora_A, lora_B, s)  # the factored sum alone
    error = _max_relative(norm[rows], exact[rows])
    assert error <= 2 * _max_relative(dense[rows], exact[rows]) + 1e-7
    assert _max_relative(unrefined[rows], exact[rows]) > 10 * error  # the refinement is what made them exact


def test_op_has_a_fake():
    from torch._subclasses.fake_tensor import FakeTensorMode

    packed, scales, _ = _quantized("nf4", True, 64, 9, 20)
    lora_A, lora_B = _adapters(9, 20, 3, torch.float32)
    with FakeTensorMode(allow_non_fake_inputs=True):
        norm = quantized_row_norm(packed, scales, "nf4", 64, (9, 20), torch.bfloat16, lora_A, lora_B, 0.5)
    assert norm.shape == (9,) and norm.dtype == torch.float32


def test_code_table_is_made_once_and_never_kept_from_a_tracer():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dora_fused.kernels import quantized_norm

    quantized_norm._CODE_TABLES.clear()
    with FakeTensorMode():
        traced = quantized_norm._code_table("fp4", torch.device("cpu"))
    assert type(traced) is not torch.Tensor and not quantized_norm._CODE_TABLES
    table = quantized_norm._code_table("fp4", torch.device("cpu"))
    assert type(table) is torch.Tensor and torch.equal(table, four_bit_code("fp4"))
    assert quantized_norm._code_table("fp4", torch.device("cpu")) is table


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize(("blocksize", "d_out", "d_in"), [(64, 13, 128), (32, 7, 75)], ids=["aligned", "per-element"])
def test_selected_codes_are_the_table(quant_type, blocksize, d_out, d_in):
    """Both 4-bit decodes (the select tree, a load from the code table) give the same products, bit for bit."""
    import dataclasses

    from dora_fused.kernels import quantized_norm as qn
    from dora_fused.kernels.common import adapter_terms

    packed, scales, weight = _quantized(quant_type, True, blocksize, d_out, d_in)
    lora_A, _ = _adapters(d_out, d_in, 3, torch.bfloat16)
    plan = qn.quantized_norm_plan(d_out, d_in, 3, weight.dtype, lora_A.dtype, 4, quant_type, blocksize)
    assert plan.decode == "select" and plan.aligned == (blocksize == 64)
    a_terms, a_scale = adapter_terms(lora_A, weight.dtype, None)
    args = (packed, scales, quant_type, blocksize, (d_out, d_in), 3, a_terms, a_scale)
    selected = qn.quantized_products(*args, plan, weight.dtype)
    read = qn.quantized_products(*args, dataclasses.replace(plan, decode="table"), weight.dtype)
    for a, b in zip(selected, read, strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(selected[1].sum(0), weight.float().square().sum(1), rtol=1e-6, atol=0)  # ‖W‖²


# --- GPU, full size ---------------------------------------------------------------------------------------------

GPU_CASES = {  # quant_type, nested, blocksize, d_out, d_in, r, adapter dtype
    "nf4-dq-4096x4096-r16": ("nf4", True, 64, 4096, 4096, 16, torch.float32),
    "nf4-14336x4096-r64": ("nf4", False, 64, 14336, 4096, 64, torch.float32),
    "fp4-4096x14336-r64-bf16-adapters": ("fp4", True, 64, 4096, 14336, 64, torch.bfloat16),
    "int8-4096x14336-r8": ("int8", False, 0, 4096, 14336, 8, torch.float32),
    "int8-14336x4096-r8": ("int8", False, 0, 14336, 4096, 8, torch.float32),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_full_size(case):
    quant_type, nested, blocksize, d_out, d_in, r, adapter_dtype = GPU_CASES[case]
    import bitsandbytes.functional as F

    gen = torch.Generator(device="cuda").manual_seed(0)
    dense = torch.randn(d_out, d_in, generator=gen, device="cuda").to(torch.bfloat16) * 0.02
    if quant_type == "int8":
        packed, scales, _ = F.int8_vectorwise_quant(dense.half())
        weight = F.int8_vectorwise_dequant(packed, scales)
    else:
        packed, state = F.quantize_4bit(dense, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
        scales = F.dequantize_blockwise(state.absmax, state.state2) + state.offset if nested else state.absmax
        weight = F.dequantize_4bit(packed, state)
    lora_A = (torch.randn(r, d_in, generator=gen, device="cuda") / d_in**0.5).to(adapter_dtype)
    lora_B = (torch.randn(d_out, r, generator=gen, device="cuda") * 0.02).to(adapter_dtype)
    shape = (d_out, d_in)
    # bitsandbytes' CUDA dequantize computes the values the kernel's tiles hold
    assert torch.equal(dequantize_reference(packed, scales, quant_type, blocksize, shape, weight.dtype), weight)
    exact = dense_row_norm_reference(weight.double(), lora_A.double(), lora_B.double(), 2.0)
    norm = quantized_row_norm(packed, scales, quant_type, blocksize, shape, weight.dtype, lora_A, lora_B, 2.0)
    assert _max_relative(norm, exact) < 1e-5
