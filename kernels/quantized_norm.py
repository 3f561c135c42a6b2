"""Row norm of ``W + s·B·A`` read from a quantized base's packed weight (bitsandbytes NF4 / FP4 and int8).

The factored norm (``factored_norm``) needs ``‖W_i‖²`` and ``U = W·Aᵀ``. For a
bitsandbytes base, PEFT first dequantizes the whole weight into a dense
``[d_out, d_in]`` copy. Here the weight is dequantized a tile at a time in
registers, inside the loop that forms ``U`` and ``‖W‖²``: no dequantized copy
of the weight exists on the norm's path. The rest is the factored norm's
math: ``G = A·Aᵀ`` from its Gram (``gram_terms``), then
``n² = ‖W_i‖² + 2s·Σ_k B_ik·U_ik + s²·Σ_k (B·G)_ik·B_ik``, clamped at 0, and
the rows where that sum cancels recomputed densely (``ill_conditioned_rows``'s
rule), from dequantized rows.

Formats, as bitsandbytes stores and dequantizes them (flat index ``f = i·d_in + k``):

- 4-bit (``Params4bit``, NF4 or FP4): two codes per byte of ``packed``
  (``[(d_out·d_in + 1) // 2, 1]`` uint8), the even ``f`` in the high nibble;
  one fp32 ``absmax`` per ``blocksize`` consecutive values::

      W_f = round_dtype(code[nibble(f)] · absmax[f // blocksize])

  ``code`` is the 16-value NF4 or FP4 table, ``dtype`` the quant state's
  (the weight's dtype before quantization). With double quantization bitsandbytes
  stores ``absmax`` itself as 8-bit codes in blocks of 256 with an fp32 scale per
  block and an offset: ``absmax_b = code2[q_b] · absmax2[b // 256] + offset``.
  The graph already computes that fp32 vector with bitsandbytes' own op
  (``d_out·d_in / blocksize`` values, 1/32 of a bf16 weight's bytes at
  blocksize 64), and this op takes it as ``scales``.
  The product is formed in fp32 and rounded once to ``dtype``, as bitsandbytes
  does, so each tile holds exactly the values of bitsandbytes' dequantized weight;
  ``U`` is then a tensor-core product of that tile with ``A``'s exact 16-bit terms,
  accumulated in fp32, as in ``factored_norm``.
- int8 (``Int8Params``, LLM.int8()): ``W_ik = q_ik · SCB_i / 127`` (bitsandbytes
  computes ``(q·SCB)·(1/127)`` in fp32). ``|q| ≤ 127`` is exact in bf16/fp16, so
  the loop multiplies ``q`` itself on tensor cores and scales each row once:
  ``U_i = (SCB_i/127)·(q·Aᵀ)_i``, ``‖W_i‖² = (SCB_i/127)²·Σ_k q_ik²``. That
  differs from the norm of bitsandbytes' fp32 values by fp32 rounding only
  (the dense path itself rounds at fp32). Dense rows use bitsandbytes' exact values.

Where bitsandbytes' base matmul dequantizes (bitsandbytes 0.50, CUDA):
``Linear4bit`` calls ``matmul_4bit``; for more than 1536 tokens (and for
training, ``MatMul4Bit``) it runs ``gemm_4bit``'s fallback: ``dequantize_4bit``
into a ``[d_out, d_in]`` buffer of the compute dtype, then ``F.linear``; the
backward dequantizes again for ``dx``. ``Linear8bitLt`` (``MatMul8bitLt``)
quantizes the activations to int8 row-wise and runs an int8 matmul
(``int8_scaled_mm``) against ``CB`` with no dequantized weight, except the
outlier columns (threshold > 0), and dequantizes ``CB`` for ``dx`` in the
backward. This op leaves that matmul as it is.

Fusing the base matmul's dequantize (a 4-bit GEMM that dequantizes its tiles
in registers) is not worth it at 4096 tokens, from bytes moved: the fallback
reads ``d_out·d_in/2`` bytes of codes and writes then reads ``2·d_out·d_in``
bytes of bf16 weight, 4.5 bytes per weight value, ~0.26 GB for a 4096×14336
layer, ~90 µs at 3 TB/s; the matmul itself is ``2·4096·d_out·d_in`` FLOP, ~0.5
TFLOP, ~0.6 ms at 800 TFLOP/s. The dequantize is ~15% of the base layer, and
a fused GEMM still reads the codes (1/9 of the bytes), so it saves at most
~80 µs per layer per pass; it would be a GEMM of our own against cuBLAS.
The norm's own bytes were expected to decide its time the same way (it does
``d_out·d_in·r·2`` FLOP, and reads 0.5 byte per 4-bit value instead of the
dequantize's 4.5 and the dense norm's 2). For int8 they do: this norm took
0.11-0.41× bitsandbytes' dequantize plus the dense norm. For 4-bit codes the
per-value work (split the byte, select the code's value, scale, round, move
the tile into the tensor cores' operand layout) costs more than the bytes it
saves: 1.7-2.3× that dense path (Llama-8B shapes, docs/benchmarks.md), so the
rewrite gives 4-bit bases the dense norm of bitsandbytes' dequantized weight
and calls this op for int8 only.

Layout: pure-torch references → ``@triton.jit`` kernels → plan and launcher →
``torch.library`` op with a fake implementation → public function.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .common import adapter_terms, multiprocessors
from .factored_norm import factored_row_norm_torch
from .gram import gram_plan, gram_terms
from .ill_conditioned_rows import ill_conditioned
from .norm_plan import norm_splits

__all__ = [
    "FP4_CODE",
    "NF4_CODE",
    "QUANT_TYPES",
    "QuantizedNormPlan",
    "dequantize_4bit_reference",
    "dequantize_int8_reference",
    "dequantize_reference",
    "four_bit_code",
    "quantized_norm_plan",
    "quantized_products",
    "quantized_row_norm",
    "quantized_row_norm_reference",
    "quantized_row_norm_triton",
    "triton_supports_quantized_norm",
]

# bitsandbytes' 4-bit code tables (``bitsandbytes.functional.get_4bit_type``), fp32 values
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
FP4_CODE = tuple(v / 12.0 for v in (0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3))
QUANT_TYPES = ("nf4", "fp4", "int8")
INT8_SCALE = 7.874015718698502e-3  # 1/127 as bitsandbytes writes it


def four_bit_code(quant_type: str, device: torch.device | str = "cpu") -> Tensor:
    """The 16 fp32 values of ``quant_type``'s codes (``"nf4"`` or ``"fp4"``)."""
    return torch.tensor(NF4_CODE if quant_type == "nf4" else FP4_CODE, dtype=torch.float32, device=device)


_CODE_TABLES: dict[tuple[str, str], Tensor] = {}


def _code_table(quant_type: str, device: torch.device) -> Tensor:
    """``four_bit_code`` on ``device``, made once per device: a constant, never a parameter.

    Only plain tensors are kept (not a tracer's fake or functional ones). Eager
    calls captured in a CUDA graph find the table an earlier call made: a
    host-to-device copy cannot run during capture.
    """
    key = (quant_type, str(device))
    table = _CODE_TABLES.get(key)
    if table is None:
        table = four_bit_code(quant_type, device)
        if type(table) is Tensor:
            _CODE_TABLES[key] = table
    return table


def dequantize_4bit_reference(
    packed: Tensor, absmax: Tensor, blocksize: int, quant_type: str, shape: tuple[int, int], dtype: torch.dtype
) -> Tensor:
    """bitsandbytes' 4-bit dequantize in torch: ``round_dtype(code[nibble] · absmax[block])``, high nibble first."""
    flat = packed.reshape(-1).to(torch.int32)
    count = math.prod(shape)
    nibbles = torch.stack((flat >> 4, flat & 15), dim=1).reshape(-1)[:count]
    blocks = torch.arange(count, device=packed.device) // blocksize
    return (four_bit_code(quant_type, packed.device)[nibbles] * absmax[blocks]).to(dtype).reshape(shape)


def dequantize_int8_reference(rows: Tensor, scales: Tensor) -> Tensor:
    """bitsandbytes' int8 dequantize: ``(q · SCB) · (1/127)`` in fp32."""
    return rows.float() * scales.view(-1, 1) * INT8_SCALE


def dequantize_reference(
    packed: Tensor, scales: Tensor, quant_type: str, blocksize: int, shape: tuple[int, int], dtype: torch.dtype
) -> Tensor:
    """The dense weight of either format (``quant_type`` ``"int8"`` takes ``scales`` as ``SCB``)."""
    if quant_type == "int8":
        return dequantize_int8_reference(packed.reshape(shape), scales)
    return dequantize_4bit_reference(packed, scales, blocksize, quant_type, shape, dtype)


def quantized_row_norm_reference(
    packed: Tensor,
    scales: Tensor,
    quant_type: str,
    blocksize: int,
    shape: tuple[int, int],
    dtype: torch.dtype,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
) -> Tensor:
    """The dequantized weight, then the factored norm (``factored_row_norm_torch``, refinement included)."""
    weight = dequantize_reference(packed, scales, quant_type, blocksize, shape, dtype)
    return factored_row_norm_torch(weight, lora_A, lora_B, scaling)


# ----------------------------------------------------------------------------
# Triton kernels (CUDA; also run on CPU tensors under TRITON_INTERPRET=1)


@triton.jit
def _select16(n, c0: tl.constexpr, c1: tl.constexpr, c2: tl.constexpr, c3: tl.constexpr, c4: tl.constexpr,
              c5: tl.constexpr, c6: tl.constexpr, c7: tl.constexpr, c8: tl.constexpr, c9: tl.constexpr,
              c10: tl.constexpr, c11: tl.constexpr, c12: tl.constexpr, c13: tl.constexpr, c14: tl.constexpr,
              c15: tl.constexpr):  # fmt: skip
    """``(c0, …, c15)[n]`` in fp32 for integers ``0 ≤ n < 16``: 15 selects on ``n``'s bits, no memory read."""
    b0 = (n & 1) != 0
    b1 = (n & 2) != 0
    b2 = (n & 4) != 0
    p0 = tl.where(b1, tl.where(b0, c3, c2), tl.where(b0, c1, c0))
    p1 = tl.where(b1, tl.where(b0, c7, c6), tl.where(b0, c5, c4))
    p2 = tl.where(b1, tl.where(b0, c11, c10), tl.where(b0, c9, c8))
    p3 = tl.where(b1, tl.where(b0, c15, c14), tl.where(b0, c13, c12))
    return tl.where((n & 8) != 0, tl.where(b2, p3, p2), tl.where(b2, p1, p0))


@triton.jit
def _code_value(CODE, n, mask, DECODE: tl.constexpr):
    """The 4-bit code ``n``'s fp32 value: read from the table ``CODE`` (``DECODE == 0``), or selected
    from NF4's (1) or FP4's (2) values written here, the fp32 numbers of ``NF4_CODE`` / ``FP4_CODE``."""
    if DECODE == 0:
        if mask is None:
            return tl.load(CODE + n)
        return tl.load(CODE + n, mask=mask, other=0.0)
    elif DECODE == 1:
        return _select16(
            n, -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
            1.0,
        )  # fmt: skip
    else:
        return _select16(
            n, 0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5, 0.1666666716337204,
            0.25, -0.0, -0.0052083334885537624, -0.6666666865348816, -1.0, -0.3333333432674408, -0.5,
            -0.1666666716337204, -0.25,
        )  # fmt: skip


@triton.jit
def _dequantized_tile(Q, SCALES, CODE, rows, ks, mask, d_in, block_shift, FORMAT: tl.constexpr, OUT: tl.constexpr,
                      DECODE: tl.constexpr):  # fmt: skip
    """``W[rows, ks]`` in ``OUT``: 4-bit (``FORMAT == 0``) as bitsandbytes' values; int8 (1) the codes ``q`` unscaled.

    The fp32 product is rounded to bf16 to nearest even by hand (the same bits as
    the GPU's cast; the Triton interpreter's cast truncates), and integers reach
    16-bit floats through fp32 (the interpreter casts them to bf16's bit pattern).
    """
    flat = rows[:, None].to(tl.int64) * d_in + ks[None, :]
    if FORMAT == 0:
        byte = tl.load(Q + (flat >> 1), mask=mask, other=0).to(tl.int32)
        nibble = tl.where((flat & 1) == 0, byte >> 4, byte & 15)
        absmax = tl.load(SCALES + (flat >> block_shift), mask=mask, other=0.0)
        value = _code_value(CODE, nibble, mask, DECODE) * absmax
        if OUT == tl.bfloat16:
            bits = value.to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            value = bits.to(tl.float32, bitcast=True)
        return value.to(OUT)
    else:
        return tl.load(Q + flat, mask=mask, other=0).to(tl.float32).to(OUT)


@triton.jit
def _dequantized_aligned_tile(Q, SCALES, CODE, rows, k0, mask, d_in, block_shift, SUB_K: tl.constexpr,
                              OUT: tl.constexpr, DECODE: tl.constexpr):  # fmt: skip
    """4-bit ``W[rows, k0:k0+SUB_K]`` where each row's chunk lies in one quantization block, ``k0`` even.

    The same values as ``_dequantized_tile``, read with one byte load per two
    codes and one ``absmax`` per row: the bytes' high and low nibbles are looked
    up apart and interleaved (``tl.join``), the even column from the high nibble.
    ``mask`` is per row (the chunk is wholly inside or outside ``d_in``).
    """
    starts = rows.to(tl.int64) * d_in + k0
    pairs = (starts >> 1)[:, None] + tl.arange(0, SUB_K // 2)[None, :]
    byte = tl.load(Q + pairs, mask=mask[:, None] & (pairs >= 0), other=0).to(tl.int32)
    high = _code_value(CODE, byte >> 4, None, DECODE)
    low = _code_value(CODE, byte & 15, None, DECODE)
    absmax = tl.load(SCALES + (starts >> block_shift), mask=mask, other=0.0)
    value = tl.reshape(tl.join(high, low), (rows.shape[0], SUB_K)) * absmax[:, None]
    if OUT == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        value = bits.to(tl.float32, bitcast=True)
    return value.to(OUT)


@triton.jit
def _quantized_products_kernel(
    Q, SCALES, CODE, A, A_SCALE, U, WSQ, d_out, d_in, r, k_per_split, block_shift, stride_ar, stride_ak,
    FORMAT: tl.constexpr, W_DTYPE: tl.constexpr, A_TERMS: tl.constexpr, A_SCALED: tl.constexpr,
    ALIGNED: tl.constexpr, DECODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, SUB_K: tl.constexpr,
):  # fmt: skip
    """One ``[BLOCK_M, BLOCK_N of r]`` tile of ``U = W·Aᵀ`` over one split of ``d_in``, W dequantized in registers::

        U[split, i, j] = Σ_{k in split} W_ik·A_jk          (fp32)
        WSQ[split, i]  = Σ_{k in split} W_ik²              (column tile 0)

    ``A = Σ_t A_t / A_SCALE`` arrives as ``A_TERMS`` stacked terms of ``W_DTYPE``
    (``adapter_terms``), one accumulator per term, added smallest first; each
    ``BLOCK_K`` chunk is one tensor-core accumulation from zero (``BLOCK_K // SUB_K``
    chained dots) added in fp32, as ``factored_norm``'s main loop. For int8 the
    tiles hold ``q`` and both sums are scaled by the row's ``SCB/127`` at the end.
    ``ALIGNED`` (4-bit, ``d_in`` and the blocksize multiples of ``SUB_K``): every
    ``SUB_K`` chunk of a row lies in one quantization block and wholly inside or
    outside the split, so the tile is read by ``_dequantized_aligned_tile``.
    """
    pid_n = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(2)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < d_out
    cmask = cols < r
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, d_in)
    u0 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    u1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    u2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    squares = tl.zeros([BLOCK_M, SUB_K], dtype=tl.float32)
    a_cols = A + cols[None, :] * stride_ar
    for k0 in range(k_lo, k_hi, BLOCK_K):
        c0 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        c1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        c2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for step in tl.static_range(BLOCK_K // SUB_K):
            ks = k0 + step * SUB_K + tl.arange(0, SUB_K)
            kmask = ks < k_hi
            if ALIGNED:  # the chunk's mask per row, as a vector (the interpreter takes no scalar masks)
                chunk = k0 + step * SUB_K
                w = _dequantized_aligned_tile(Q, SCALES, CODE, rows, chunk, rmask & (rows * 0 + chunk < k_hi), d_in,
                                              block_shift, SUB_K, W_DTYPE, DECODE)  # fmt: skip
            else:
                w = _dequantized_tile(Q, SCALES, CODE, rows, ks, rmask[:, None] & kmask[None, :], d_in, block_shift,
                                      FORMAT, W_DTYPE, DECODE)  # fmt: skip
            a_tile = a_cols + ks[:, None] * stride_ak
            a_mask = cmask[None, :] & kmask[:, None]
            c0 = tl.dot(w, tl.load(a_tile, mask=a_mask, other=0.0), c0)
            if A_TERMS == 3:
                c1 = tl.dot(w, tl.load(a_tile + r * stride_ar, mask=a_mask, other=0.0), c1)
                c2 = tl.dot(w, tl.load(a_tile + 2 * r * stride_ar, mask=a_mask, other=0.0), c2)
            if pid_n == 0:
                wf = w.to(tl.float32)
                squares += wf * wf
        u0 += c0
        if A_TERMS == 3:
            u1 += c1
            u2 += c2
    u = u0
    if A_TERMS == 3:
        u = (u2 + u1) + u0
    if A_SCALED:
        u = u / tl.load(A_SCALE)
    w_squared = tl.sum(squares, axis=1)
    if FORMAT == 1:  # int8: W_i = q_i · SCB_i / 127
        row_scale = tl.load(SCALES + rows, mask=rmask, other=0.0) * 7.874015718698502e-3
        u = u * row_scale[:, None]
        w_squared = w_squared * (row_scale * row_scale)
    u_out = U + (split * d_out + rows[:, None]).to(tl.int64) * r + cols[None, :]
    tl.store(u_out, u, mask=rmask[:, None] & cmask[None, :])
    if pid_n == 0:
        tl.store(WSQ + split * d_out + rows, w_squared, mask=rmask)


@triton.jit
def _quantized_combine_kernel(
    U, WSQ, B, G, NORM, WSQ_TOTAL, LSQ_TOTAL, d_out, r, splits, scaling, stride_bo, stride_br,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """``NORM_i = sqrt(max(‖W_i‖² + 2s·Σ_k B_ik·U_ik + s²·Σ_k (B·G)_ik·B_ik, 0))``, the splits added in order.

    ``B·G`` is formed here in ``BLOCK_R`` chunks with fp32 FMAs (``input_precision="ieee"``:
    never TF32, whatever torch's matmul precision setting). Also writes the sum's
    terms ``WSQ_TOTAL = ‖W_i‖²`` and ``LSQ_TOTAL = s²·‖(B·A)_i‖²`` (the dense rows' rule reads them).
    """
    s = tl.cast(scaling, tl.float32)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < d_out
    w_squared = tl.zeros([BLOCK_M], dtype=tl.float32)
    for split in range(0, splits):
        w_squared += tl.load(WSQ + split * d_out + rows, mask=rmask, other=0.0)
    cross = tl.zeros([BLOCK_M], dtype=tl.float32)
    lora = tl.zeros([BLOCK_M], dtype=tl.float32)
    for j0 in range(0, r, BLOCK_R):
        js = j0 + tl.arange(0, BLOCK_R)
        mask_j = rmask[:, None] & (js < r)[None, :]
        b_j = tl.load(B + rows[:, None] * stride_bo + js[None, :] * stride_br, mask=mask_j, other=0.0).to(tl.float32)
        u_j = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for split in range(0, splits):
            u_rows = U + (split * d_out + rows[:, None]).to(tl.int64) * r
            u_j += tl.load(u_rows + js[None, :], mask=mask_j, other=0.0)
        cross += tl.sum(b_j * u_j, axis=1)
        bg = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for l0 in range(0, r, BLOCK_R):
            ls = l0 + tl.arange(0, BLOCK_R)
            b_l = tl.load(
                B + rows[:, None] * stride_bo + ls[None, :] * stride_br,
                mask=rmask[:, None] & (ls < r)[None, :],
                other=0.0,
            ).to(tl.float32)
            g = tl.load(G + ls[:, None] * r + js[None, :], mask=(ls < r)[:, None] & (js < r)[None, :], other=0.0)
            bg = tl.dot(b_l, g, bg, input_precision="ieee")
        lora += tl.sum(b_j * bg, axis=1)
    lora_squared = (s * s) * lora
    total = w_squared + (2.0 * s) * cross + lora_squared
    tl.store(NORM + rows, tl.sqrt_rn(tl.maximum(total, 0.0)), mask=rmask)
    tl.store(WSQ_TOTAL + rows, w_squared, mask=rmask)
    tl.store(LSQ_TOTAL + rows, lora_squared, mask=rmask)


@triton.jit
def _quantized_dense_rows_kernel(
    NORM, FLAGS, Q, SCALES, CODE, A, B, d_out, d_in, r, block_shift, scaling, stride_ar, stride_ak, stride_bo,
    stride_br, FORMAT: tl.constexpr, W_DTYPE: tl.constexpr, DECODE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``NORM_i = ‖W_i + s·B_i·A‖`` for the flagged rows, W dequantized to bitsandbytes' exact values (fp32 FMAs).

    A block with no flagged row reads its flags and stops.
    """
    s = tl.cast(scaling, tl.float32)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < d_out
    flag = rmask & (tl.load(FLAGS + rows, mask=rmask, other=0) != 0)
    if tl.sum(flag.to(tl.int32), axis=0) > 0:
        total = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, d_in, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < d_in
            product = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
            for j in range(0, r):
                b = tl.load(B + rows * stride_bo + j * stride_br, mask=flag, other=0.0).to(tl.float32)
                a = tl.load(A + j * stride_ar + ks * stride_ak, mask=kmask, other=0.0).to(tl.float32)
                product += b[:, None] * a[None, :]
            mask = flag[:, None] & kmask[None, :]
            if FORMAT == 0:
                w = _dequantized_tile(Q, SCALES, CODE, rows, ks, mask, d_in, block_shift, FORMAT, W_DTYPE, DECODE)
                w = w.to(tl.float32)
            else:
                q = _dequantized_tile(Q, SCALES, CODE, rows, ks, mask, d_in, block_shift, FORMAT, tl.float32, DECODE)
                w = q * tl.load(SCALES + rows, mask=flag, other=0.0)[:, None] * 7.874015718698502e-3
            e = w + s * product
            total += tl.sum(e * e, axis=1)
        tl.store(NORM + rows, tl.sqrt(total), mask=flag)


# ----------------------------------------------------------------------------
# Plan and launcher

_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _tile_dtype(quant_type: str, dtype: torch.dtype, adapter_dtype: torch.dtype) -> torch.dtype:
    """The 16-bit dtype the main loop multiplies in: the 4-bit weight's own, or an exact one for int8 codes."""
    if quant_type != "int8":
        return dtype
    return torch.float16 if adapter_dtype == torch.float16 else torch.bfloat16


def triton_supports_quantized_norm(quant_type: str, dtype: torch.dtype, lora_A: Tensor, lora_B: Tensor) -> bool:
    """The CUDA path: NF4/FP4 dequantized to bf16/fp16, or int8; bf16/fp16/fp32 adapters."""
    adapters = all(t.dtype in (torch.bfloat16, torch.float16, torch.float32) for t in (lora_A, lora_B))
    if quant_type == "int8":
        return adapters
    return quant_type in ("nf4", "fp4") and dtype in _TL_DTYPES and adapters


@dataclasses.dataclass(frozen=True)
class QuantizedNormPlan:
    """How ``quantized_row_norm_triton`` runs one layer, and what it allocates."""

    block_m: int
    block_n: int
    block_k: int
    sub_k: int
    parts: int  # column tiles of r
    row_tiles: int
    splits: int  # shares of d_in
    k_per_split: int
    a_count: int  # A's terms
    aligned: bool  # 4-bit chunks of SUB_K columns each inside one quantization block
    decode: str  # 4-bit codes to values: "select" (from the code's bits) or "table" (a load from the code table)
    num_warps: int
    num_stages: int  # the main loop's software pipeline depth
    workspace_bytes: int  # besides the [d_out] norm it returns: A's terms, the Gram's, U and ‖W‖² per split, …


def quantized_norm_plan(
    d_out: int,
    d_in: int,
    r: int,
    tile_dtype: torch.dtype,
    adapter_dtype: torch.dtype,
    sm_count: int,
    quant_type: str = "nf4",
    blocksize: int = 64,
) -> QuantizedNormPlan:
    """Tiles of 64 rows by up to 64 of ``r``, 128-column chunks; split-K as ``norm_splits`` picks it."""
    tile_dtype = _tile_dtype(quant_type, tile_dtype, adapter_dtype)
    a_count = 1 if adapter_dtype == tile_dtype else 3
    block_m, block_k, sub_k = 64, 128, 64
    block_n = max(16, min(64, triton.next_power_of_2(r)))
    # Shared memory of the pipelined main loop on sm_90, 3 stages (Triton's default): 176 KB for
    # 4-bit tiles with one A term at 64 columns, 272 KB with three (fp32 adapters on a 16-bit
    # weight), over the 227 KB a block may use; 2 stages need 160 KB there.
    num_stages = 2 if quant_type != "int8" and a_count > 1 and block_n > 32 else 3
    aligned = quant_type != "int8" and d_in % sub_k == 0 and blocksize % sub_k == 0
    parts, row_tiles = triton.cdiv(r, block_n), triton.cdiv(d_out, block_m)
    splits = norm_splits(parts * row_tiles, d_in, sm_count)
    k_per_split = triton.cdiv(triton.cdiv(d_in, splits), block_k) * block_k
    splits = triton.cdiv(d_in, k_per_split)
    fp32 = 4
    workspace = (a_count > 1) * a_count * r * d_in * 2  # A's 16-bit terms
    workspace += gram_plan(r, d_in, a_count).splits * (a_count * r) ** 2 * fp32 + 3 * r * r * 2 + r * r * fp32
    workspace += splits * d_out * (r + 1) * fp32  # U and ‖W‖² per split
    workspace += 2 * d_out * fp32 + d_out  # the sum's terms, the flags
    return QuantizedNormPlan(
        block_m, block_n, block_k, sub_k, parts, row_tiles, splits, k_per_split, a_count, aligned, "select", 4,
        num_stages,
        workspace + d_out * fp32,
    )  # fmt: skip


def _decode(quant_type: str, decode: str) -> int:
    """The kernels' ``DECODE``: 0 reads the code table, 1 and 2 select NF4's and FP4's values."""
    return 0 if decode == "table" or quant_type == "int8" else (1 if quant_type == "nf4" else 2)


def quantized_products(
    packed: Tensor,
    scales: Tensor,
    quant_type: str,
    blocksize: int,
    shape: tuple[int, int],
    r: int,
    a_terms: Tensor,
    a_scale: Tensor | None,
    plan: QuantizedNormPlan,
    tile: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """``_quantized_products_kernel`` with ``plan``'s tiles: ``U`` ``[splits, d_out, r]``, ``‖W‖²`` ``[splits, d_out]``.

    ``a_terms``, ``a_scale``: ``adapter_terms(lora_A, tile)``, ``tile`` as ``_tile_dtype`` gives it.
    """
    d_out, d_in = shape
    code = _code_table(quant_type if quant_type != "int8" else "nf4", packed.device)
    shift = max(blocksize, 1).bit_length() - 1  # bitsandbytes' blocksizes are powers of two (32 to 4096)
    u = torch.empty(plan.splits, d_out, r, dtype=torch.float32, device=packed.device)
    w_squares = torch.empty(plan.splits, d_out, dtype=torch.float32, device=packed.device)
    wrap_triton(_quantized_products_kernel)[(plan.parts, plan.row_tiles, plan.splits)](
        packed, scales, code, a_terms, a_terms if a_scale is None else a_scale, u, w_squares, d_out, d_in, r,
        plan.k_per_split, shift, a_terms.stride(0), a_terms.stride(1),
        FORMAT=int(quant_type == "int8"), W_DTYPE=_TL_DTYPES[tile], A_TERMS=plan.a_count,
        A_SCALED=a_scale is not None, ALIGNED=plan.aligned, DECODE=_decode(quant_type, plan.decode),
        BLOCK_M=plan.block_m, BLOCK_N=plan.block_n,
        BLOCK_K=plan.block_k, SUB_K=plan.sub_k, num_warps=plan.num_warps, num_stages=plan.num_stages,
    )  # fmt: skip
    return u, w_squares


def quantized_row_norm_triton(
    packed: Tensor,
    scales: Tensor,
    quant_type: str,
    blocksize: int,
    shape: tuple[int, int],
    dtype: torch.dtype,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    after: Tensor | None = None,
) -> Tensor:
    """The norm from the packed weight; fp32 ``[d_out]``.

    1. ``A``'s exact terms in the tile dtype (``adapter_terms``) and ``G = A·Aᵀ`` (``gram_terms``);
    2. ``_quantized_products_kernel``: ``U`` and ``‖W‖²`` per split of ``d_in``;
    3. ``_quantized_combine_kernel``: the splits added, ``B·G``, the sum, the norm;
    4. the rows ``ill_conditioned`` flags, recomputed from dequantized rows (one
       kernel that stops at once where none is flagged; no host sync).

    ``after`` is never read: the first kernels take it so that Inductor orders
    them after the base matmul that writes it (``factored_row_norm_triton``).
    """
    if not triton_supports_quantized_norm(quant_type, dtype, lora_A, lora_B):
        raise ValueError(f"no Triton quantized norm for {quant_type} dequantized to {dtype}")
    if quant_type != "int8" and blocksize & (blocksize - 1):
        raise ValueError(f"4-bit blocksize {blocksize} is not a power of two")
    d_out, d_in = shape
    r = lora_A.shape[0]
    device = packed.device
    packed, scales = packed.contiguous(), scales.contiguous()  # read by flat index (no copy: both are already)
    tile = _tile_dtype(quant_type, dtype, lora_A.dtype)
    a_terms, a_scale = adapter_terms(lora_A, tile, after)
    plan = quantized_norm_plan(d_out, d_in, r, dtype, lora_A.dtype, multiprocessors(device), quant_type, blocksize)
    g_terms = gram_terms(a_terms, a_scale, r, after).float()
    gram = (g_terms[2] + g_terms[1]) + g_terms[0]
    u, w_squares = quantized_products(packed, scales, quant_type, blocksize, shape, r, a_terms, a_scale, plan, tile)
    code = _code_table(quant_type if quant_type != "int8" else "nf4", device)
    fmt = 1 if quant_type == "int8" else 0
    shift = max(blocksize, 1).bit_length() - 1
    norm = torch.empty(d_out, dtype=torch.float32, device=device)
    w_total = torch.empty(d_out, dtype=torch.float32, device=device)
    lora_total = torch.empty(d_out, dtype=torch.float32, device=device)
    wrap_triton(_quantized_combine_kernel)[(triton.cdiv(d_out, 32),)](
        u, w_squares, lora_B, gram, norm, w_total, lora_total, d_out, r, plan.splits, scaling,
        lora_B.stride(0), lora_B.stride(1), BLOCK_M=32, BLOCK_R=32,
    )  # fmt: skip
    flags = ill_conditioned(norm, w_total, lora_total).to(torch.int8)
    wrap_triton(_quantized_dense_rows_kernel)[(triton.cdiv(d_out, 16),)](
        norm, flags, packed, scales, code, lora_A, lora_B, d_out, d_in, r, shift, scaling,
        lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
        FORMAT=fmt, W_DTYPE=_TL_DTYPES[tile], DECODE=_decode(quant_type, plan.decode), BLOCK_M=16, BLOCK_K=128,
    )  # fmt: skip
    return norm


# ----------------------------------------------------------------------------
# Op: Triton on CUDA, the reference elsewhere


@triton_op("dora_fused::quantized_row_norm", mutates_args=())
def _quantized_row_norm_op(
    packed: Tensor,
    scales: Tensor,
    quant_type: str,
    blocksize: int,
    d_out: int,
    d_in: int,
    dtype: torch.dtype,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    after: Tensor | None = None,
) -> Tensor:
    torch._check(quant_type in QUANT_TYPES)
    torch._check(lora_A.dim() == 2 and lora_B.dim() == 2 and lora_A.shape[1] == d_in and lora_B.shape[0] == d_out)
    if packed.is_cuda and triton_supports_quantized_norm(quant_type, dtype, lora_A, lora_B):
        ordered = after if after is not None and after.device == packed.device else None
        shape = (d_out, d_in)
        return quantized_row_norm_triton(
            packed, scales, quant_type, blocksize, shape, dtype, lora_A, lora_B, scaling, after=ordered
        )
    shape = (d_out, d_in)
    return quantized_row_norm_reference(packed, scales, quant_type, blocksize, shape, dtype, lora_A, lora_B, scaling)


@_quantized_row_norm_op.register_fake
def _(packed, scales, quant_type, blocksize, d_out, d_in, dtype, lora_A, lora_B, scaling, after=None):
    return packed.new_empty(d_out, dtype=torch.float32)


def quantized_row_norm(
    packed: Tensor,
    scales: Tensor,
    quant_type: str,
    blocksize: int,
    shape: tuple[int, int],
    dtype: torch.dtype,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    after: Tensor | None = None,
) -> Tensor:
    """``‖W + s·B·A‖_row`` of a bitsandbytes weight, read from its packed form; fp32 ``[d_out]``.

    4-bit: ``packed`` uint8 codes, ``scales`` the fp32 block absmax (after double
    dequantization), ``quant_type`` ``"nf4"``/``"fp4"``, ``dtype`` the quant state's.
    int8: ``packed`` the int8 ``[d_out, d_in]`` rows, ``scales`` ``SCB``,
    ``quant_type="int8"``, ``blocksize=0``, ``dtype=torch.float32``. Not
    differentiable (DoRA detaches the norm). ``after``: see ``factored_row_norm``.
    """
    d_out, d_in = shape
    return torch.ops.dora_fused.quantized_row_norm(
        packed, scales, quant_type, int(blocksize), int(d_out), int(d_in), dtype, lora_A, lora_B, float(scaling), after
    )
