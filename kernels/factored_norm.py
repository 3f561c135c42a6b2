"""Row norm of ``W + s·B·A`` without the dense ``[d_out, d_in]`` product.

For each output row ``i``::

    ||W_i + s·(B·A)_i||² = ||W_i||² + 2s·Σ_k B_ik·U_ik + s²·Σ_k (B·G)_ik·B_ik
    with  U = W·Aᵀ  [d_out, r]   and   G = A·Aᵀ  [r, r]

so the only intermediates are ``O(d_out·r + r²)``, plus a bounded chunk of rows
of ``W`` promoted to the accumulation dtype. The sum is clamped at zero before
the square root (it is a norm; rounding may push a tiny value below zero).

Accumulation is in fp32, or fp64 when any input is fp64: never below the
precision of the dense path it replaces (PEFT computes the dense product in the
adapter dtype, adds in the input dtype and takes the norm there).

Two pure-torch implementations behind one op:

- tensor cores (CUDA, bf16/fp16 ``W``): ``U = W·Aᵀ`` as low-precision products
  with fp32 accumulation and fp32 output (``torch.mm(..., out_dtype=float32)``),
  reading ``W`` in its own dtype, never an fp32 copy of it. An fp32 ``A`` is split
  exactly into three bf16 terms ``A_hi + A_mid + A_lo`` (8 significand bits
  each, bf16 has fp32's exponent range), so ``U`` is as precise as an fp32 product;
- chunked (everything else): rows of ``W`` promoted to the accumulation dtype,
  at most ``CHUNK_BYTES`` at a time.

On CUDA the op runs Triton instead (``factored_row_norm_triton``): the Gram
kernels, then one main kernel that either reads ``W`` once for both ``U = W·Aᵀ``
and ``‖W‖²`` (split-K where the tiles alone leave SMs idle), or, for fp32
adapters at ``r > 64``, reads ``U`` from one cuBLAS product; ``B·G`` is formed
in its epilogue and never reaches memory (``norm_plan`` decides).

Layout: pure-torch reference → implementations → ``torch.library`` op with a
fake implementation. The op has no autograd: DoRA detaches the norm
(paper §4.3), and the rewrite detaches its inputs exactly where PEFT does.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .ill_conditioned_rows import refine_ill_conditioned_rows, refine_ill_conditioned_rows_triton
from .products import has_mm_out_dtype, product

__all__ = [
    "GramPlan",
    "accumulation_dtype",
    "adapter_terms",
    "bf16_terms_triton",
    "dense_row_norm_reference",
    "factored_row_norm",
    "factored_row_norm_reference",
    "factored_row_norm_torch",
    "factored_row_norm_triton",
    "gram_fp32",
    "gram_plan",
    "gram_terms",
    "gram_triton",
    "norm_plan",
    "split_terms",
    "triton_supports_norm",
]

# Rows of W promoted at a time by the chunked implementation: bounds the
# transient memory to CHUNK_BYTES whatever the layer size.
CHUNK_BYTES = 64 * 2**20


def accumulation_dtype(*tensors: Tensor) -> torch.dtype:
    """fp64 if any input is fp64, else fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def dense_row_norm_reference(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """The dense definition, ``||W + s·B·A||_row``, in the accumulation dtype (tests only)."""
    acc = accumulation_dtype(weight, lora_A, lora_B)
    dense = weight.to(acc) + scaling * (lora_B.to(acc) @ lora_A.to(acc))
    return torch.linalg.vector_norm(dense, dim=1)


def factored_row_norm_reference(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """The factored identity written plainly (promotes all of ``W`` at once)."""
    acc = accumulation_dtype(weight, lora_A, lora_B)
    w, a, b = weight.to(acc), lora_A.to(acc), lora_B.to(acc)
    u = w @ a.T
    gram = a @ a.T
    squared = (w * w).sum(1) + 2.0 * scaling * (b * u).sum(1) + scaling * scaling * ((b @ gram) * b).sum(1)
    return squared.clamp_min(0.0).sqrt()


def _factored_sums_chunked(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> tuple[Tensor, ...]:
    """``(n², T0, T2)``: the factored sum, ``‖W_i‖²``, ``s²·‖(B·A)_i‖²``; ``CHUNK_BYTES`` of W promoted at a time."""
    acc = accumulation_dtype(weight, lora_A, lora_B)
    d_out, d_in = weight.shape
    a = lora_A.to(acc)
    a_t = a.T
    gram = a @ a_t
    itemsize = torch.finfo(acc).bits // 8
    rows = max(1, CHUNK_BYTES // max(1, d_in * itemsize))
    sums, w_squares, lora_squares = [], [], []
    for start in range(0, d_out, rows):
        w = weight[start : start + rows].to(acc)
        b = lora_B[start : start + rows].to(acc)
        w_squared = (w * w).sum(1)
        lora_squared = (scaling * scaling) * ((b @ gram) * b).sum(1)
        sums.append(w_squared + (2.0 * scaling) * (b * (w @ a_t)).sum(1) + lora_squared)
        w_squares.append(w_squared)
        lora_squares.append(lora_squared)
    if len(sums) == 1:
        return sums[0], w_squares[0], lora_squares[0]
    return torch.cat(sums), torch.cat(w_squares), torch.cat(lora_squares)


def split_terms(t: Tensor, dtype: torch.dtype, terms: int) -> list[Tensor]:
    """``t = Σ parts`` (up to the last part's rounding), each part exactly representable in ``dtype``.

    Each part is the ``dtype`` rounding of what the previous parts left over,
    computed in fp32: three bf16 parts carry all 24 significand bits of an fp32 ``t``.
    """
    parts, rest = [], t.float()
    for _ in range(terms):
        part = rest.to(dtype)
        parts.append(part)
        rest = rest - part.float()
    return parts


def _tensor_core_terms(weight: Tensor, lora_A: Tensor) -> int:
    """How many ``weight.dtype`` terms carry ``lora_A`` exactly; 0 if the tensor-core path does not apply."""
    if weight.device.type != "cuda" or weight.dtype not in (torch.bfloat16, torch.float16):
        return 0
    if lora_A.dtype == weight.dtype:
        return 1
    if weight.dtype == torch.bfloat16 and lora_A.dtype == torch.float32:
        return 3
    return 0  # fp16 splits of fp32 can underflow: use the chunked path


def _factored_sums_tensor_cores(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> tuple[Tensor, ...]:
    """``(n², T0, T2)`` with ``U = W·Aᵀ`` on tensor cores, fp32 accumulation; ``W`` read in its own dtype."""
    terms = split_terms(lora_A, weight.dtype, _tensor_core_terms(weight, lora_A))
    u = torch.mm(weight, terms[0].T, out_dtype=torch.float32)
    for term in terms[1:]:
        u = u + torch.mm(weight, term.T, out_dtype=torch.float32)
    a, b = lora_A.float(), lora_B.float()
    gram = a @ a.T
    w_squared = torch.linalg.vector_norm(weight, dim=1, dtype=torch.float32).square()
    lora_squared = (scaling * scaling) * ((b @ gram) * b).sum(1)
    return w_squared + (2.0 * scaling) * (b * u).sum(1) + lora_squared, w_squared, lora_squared


def factored_row_norm_torch(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """The factored norm in plain torch ops: the tensor-core path where it applies, else chunked.

    Ill-conditioned rows are then recomputed densely (``ill_conditioned_rows``).
    Traceable: the rewrite inserts it directly (Inductor then compiles it with the
    rest of the graph, with no per-call Python cost; the refinement is one opaque
    op); the op below wraps it.
    """
    if _tensor_core_terms(weight, lora_A) and has_mm_out_dtype():
        squared, w_squared, lora_squared = _factored_sums_tensor_cores(weight, lora_A, lora_B, scaling)
    else:
        squared, w_squared, lora_squared = _factored_sums_chunked(weight, lora_A, lora_B, scaling)
    norm = squared.clamp_min(0.0).sqrt()
    return refine_ill_conditioned_rows(norm, w_squared, lora_squared, weight, lora_A, lora_B, scaling)


# ----------------------------------------------------------------------------
# Triton kernels (CUDA; also run on CPU tensors under TRITON_INTERPRET=1)
#
# Tensor-core products at fp32 accuracy: an fp32 operand is split into bf16
# parts (three carry its 24 bits), each exact, and the products of parts whose
# orders add up to at most 2 are accumulated in fp32 (the dropped ones are below
# fp32's rounding). ``A`` is split once (``adapter_terms``), and the Gram and the
# norm's main loop take its stacked terms; the norm kernel's epilogue splits
# ``B``'s tiles in registers for ``B·G``. Two tiles of the same 16-bit dtype are
# multiplied directly. Every long product is a sum of short tensor-core
# accumulations, each started from zero and added in fp32.


@triton.jit
def _bf16_terms(v, TERMS: tl.constexpr):
    """``v`` as up to three bf16 terms ``v0 + v1 + v2`` (each the rounding of what the previous left)."""
    vf = v.to(tl.float32)
    v0 = vf.to(tl.bfloat16)
    if TERMS == 1:
        return v0, v0, v0
    rest = vf - v0.to(tl.float32)
    v1 = rest.to(tl.bfloat16)
    v2 = (rest - v1.to(tl.float32)).to(tl.bfloat16)
    return v0, v1, v2


@triton.jit
def _dot_terms(x0, x1, x2, y0, y1, y2, acc, X_TERMS: tl.constexpr, Y_TERMS: tl.constexpr):
    """``acc + (Σ x_i) @ (Σ y_j)`` over the term products with ``i + j <= 2``, smallest first."""
    if X_TERMS > 1 and Y_TERMS > 1:
        acc = tl.dot(x1, y1, acc)
    if X_TERMS > 2:
        acc = tl.dot(x2, y0, acc)
    if Y_TERMS > 2:
        acc = tl.dot(x0, y2, acc)
    if X_TERMS > 1:
        acc = tl.dot(x1, y0, acc)
    if Y_TERMS > 1:
        acc = tl.dot(x0, y1, acc)
    return tl.dot(x0, y0, acc)


@triton.jit
def _pair_products_kernel(
    X, P, AFTER, n, d_in, r, k_per_split, stride_xn, stride_xk, MAX_ORDER: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``P[split] = X[:, K_split]·X[:, K_split]ᵀ`` (fp32) for a stack ``X = [A_0; A_1; …]`` of ``[r, d_in]`` terms.

    Tensor cores multiply; each ``BLOCK_K`` chunk is one accumulation started
    from zero (two half-chunk dots, so the compiler cannot fold the add into the
    dot) added to the running sum in fp32: one long tensor-core accumulation
    over ``d_in`` loses bits: with ``G`` from one cuBLAS product of the terms, the
    norm was 1.2e-6 to 1.3e-5 off fp64 on the H100 (2e-7 with this kernel).
    Tiles lying wholly in blocks ``A_i·A_jᵀ`` with ``i + j > MAX_ORDER`` are skipped.
    ``P`` is symmetric: only the tiles on and above the diagonal are computed, and
    each one above it is also stored transposed, below it.
    ``AFTER`` is never read (``after`` of ``factored_row_norm_triton``).
    """
    HALF: tl.constexpr = BLOCK_K // 2
    ti = tl.program_id(0)
    tj = tl.program_id(1)
    split = tl.program_id(2)
    if ti <= tj and (ti * BLOCK) // r + (tj * BLOCK) // r <= MAX_ORDER:
        rows = ti * BLOCK + tl.arange(0, BLOCK)
        cols = tj * BLOCK + tl.arange(0, BLOCK)
        k_lo = split * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, d_in)
        acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            ks0 = k0 + tl.arange(0, HALF)
            ks1 = ks0 + HALF
            x_rows = X + rows[:, None] * stride_xn
            y_cols = X + cols[None, :] * stride_xn
            x_mask = rows[:, None] < n
            y_mask = cols[None, :] < n
            x0 = tl.load(x_rows + ks0[None, :] * stride_xk, mask=x_mask & (ks0 < k_hi)[None, :], other=0.0)
            x1 = tl.load(x_rows + ks1[None, :] * stride_xk, mask=x_mask & (ks1 < k_hi)[None, :], other=0.0)
            y0 = tl.load(y_cols + ks0[:, None] * stride_xk, mask=y_mask & (ks0 < k_hi)[:, None], other=0.0)
            y1 = tl.load(y_cols + ks1[:, None] * stride_xk, mask=y_mask & (ks1 < k_hi)[:, None], other=0.0)
            acc += tl.dot(x1, y1, tl.dot(x0, y0))
        mask = (rows < n)[:, None] & (cols < n)[None, :]
        tl.store(P + split * n * n + rows[:, None] * n + cols[None, :], acc, mask=mask)
        if ti < tj:
            tl.store(P + split * n * n + cols[None, :] * n + rows[:, None], acc, mask=mask)


@triton.jit
def _gram_combine_kernel(
    P,
    SCALE,
    G_TERMS,
    r,
    splits,
    TERMS: tl.constexpr,
    MAX_ORDER: tl.constexpr,
    SCALED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``G = Σ_split Σ_{i+j <= MAX_ORDER} P[split]_ij / SCALE²`` as three bf16 terms ``[3, r, r]``.

    ``P[split]`` is ``[TERMS·r, TERMS·r]``: block ``P_ij`` is ``A_i·A_jᵀ``. Splits
    are added in a fixed order, then the blocks smallest order first (the
    dropped orders, ``2^-24`` of ``G`` and below, are under fp32's rounding).
    ``SCALE`` (read only when ``SCALED``) is a power of two, so dividing by its
    square is exact.
    """
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < r * r
    i = offsets // r
    j = offsets % r
    width = TERMS * r
    g = tl.zeros([BLOCK], dtype=tl.float32)
    for order in tl.static_range(MAX_ORDER, -1, -1):
        for ti in tl.static_range(TERMS):
            tj = order - ti
            if tj >= 0 and tj < TERMS:
                block = tl.zeros([BLOCK], dtype=tl.float32)
                for split in range(0, splits):
                    block += tl.load(
                        P + split * width * width + (ti * r + i) * width + tj * r + j, mask=mask, other=0.0
                    )
                g += block
    if SCALED:
        s = tl.load(SCALE)
        g = g / (s * s)
    g0, g1, g2 = _bf16_terms(g, 3)
    size = r * r
    tl.store(G_TERMS + offsets, g0, mask=mask)
    tl.store(G_TERMS + size + offsets, g1, mask=mask)
    tl.store(G_TERMS + 2 * size + offsets, g2, mask=mask)


@triton.jit
def _bf16_split_kernel(
    X, TERMS, AFTER, rows, cols, stride_xr, stride_xc, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr
):  # fmt: skip
    """``TERMS[t·rows + i, j]`` = the ``t``-th bf16 term of ``X[i, j]`` (three terms carry fp32 exactly).

    ``AFTER`` is never read (``after`` of ``factored_row_norm_triton``).
    """
    rs = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rs < rows)[:, None] & (cs < cols)[None, :]
    x = tl.load(X + rs[:, None] * stride_xr + cs[None, :] * stride_xc, mask=mask, other=0.0)
    t0, t1, t2 = _bf16_terms(x, 3)
    out = TERMS + rs[:, None] * cols + cs[None, :]
    tl.store(out, t0, mask=mask)
    tl.store(out + rows * cols, t1, mask=mask)
    tl.store(out + 2 * rows * cols, t2, mask=mask)


@triton.jit
def _fused_norm_kernel(
    W,
    A,
    A_SCALE,
    B,
    G,
    U,
    WSQ,
    PART,
    LSQ,
    NORM,
    d_out,
    d_in,
    r,
    k_per_split,
    scaling,
    stride_wo,
    stride_wi,
    stride_ar,
    stride_ak,
    stride_bo,
    stride_br,
    stride_uo,
    A_TERMS: tl.constexpr,
    A_SCALED: tl.constexpr,
    B_TERMS: tl.constexpr,
    U_IN: tl.constexpr,
    W_SQUARES: tl.constexpr,
    FINISH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SUB_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """One ``[BLOCK_M rows, BLOCK_N of r]`` tile of the norm over one split of ``d_in``, ``U`` in registers::

        PART[split, j, i] = 2s·Σ_{k in tile j} B_ik·U_ik + LSQ[split, j, i]
        LSQ[split, j, i]  = s²·Σ_{k in tile j} B_ik·Σ_{l < end of tile j} c_l·B_il·G_lk
                            U = W[:, split]·A[:, split]ᵀ,  c_l = 2 before tile j, 1 inside it
        WSQ[split, i]     = Σ_{k in split} W_ik²          (column tile 0, with ``W_SQUARES``)

    ``LSQ`` and ``WSQ`` summed are the sum's terms ``s²·‖(B·A)_i‖²`` and ``‖W_i‖²``,
    which ``ill_conditioned_rows`` reads.

    ``U`` and ``‖W‖²`` are linear in the columns of ``d_in`` and the ``B·G`` term
    in its ``r`` chunks, so split-K programs each take a share of both and the
    finish kernel adds the shares in a fixed order (no atomics: deterministic).

    The main loop is the tensor-core product ``W·Aᵀ`` with ``W`` read in its own
    dtype. ``A`` arrives as ``A_TERMS`` stacked terms of W's dtype
    (``[A_TERMS·r, d_in]``, ``A = Σ_t A_t / A_SCALE``, read only when ``A_SCALED``); each term has its own
    accumulator, so the small terms' products are not rounded against the large
    ones', and they are added smallest first at the end. Each ``BLOCK_K`` chunk
    is one tensor-core accumulation started from zero (``BLOCK_K // SUB_K >= 2``
    chained dots, so the compiler cannot fold the fp32 add into the dot), added
    to the running sum in fp32.
    ``‖W_i‖²`` comes from the same W tiles (squares summed elementwise, reduced
    once at the end). With ``U_IN`` the main loop is skipped: ``U``'s terms come
    from memory (a cuBLAS product) and ``‖W‖²`` from ``_row_squares_kernel``.
    The epilogue forms this split's share of ``B·G`` from G's three bf16 terms
    (``G [3, r, r]``) and ``B``'s ``B_TERMS``, each ``BLOCK_R`` chunk one
    accumulation added in fp32, and reduces the tile's columns. ``G`` is
    symmetric, so ``Σ_kl B_ik·G_kl·B_il`` needs only the blocks on and above the
    diagonal: tile ``j`` takes G's rows up to its own end, the chunks before the
    tile counted twice (``BLOCK_R`` divides ``BLOCK_N``, so a chunk lies wholly
    before or inside it). That is about half the products of the full ``B·G``
    when ``r`` spans several tiles. With one column tile and one split
    (``FINISH``) it writes ``NORM`` and the totals ``WSQ`` and ``LSQ``.
    """
    s = tl.cast(scaling, tl.float32)  # Inductor passes Python floats as fp64
    pid_n = tl.program_id(0)  # column tiles vary fastest: programs sharing W's rows run together
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(2)
    splits = tl.num_programs(2)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < d_out
    cmask = cols < r
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, d_in)

    u0 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    u1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    u2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    squares = tl.zeros([BLOCK_M, SUB_K], dtype=tl.float32)
    if U_IN:  # U's terms from memory, side by side ([d_out, A_TERMS·r]); split 0 adds them
        u_tile = U + rows[:, None] * stride_uo + cols[None, :]
        first = tl.full([BLOCK_M], split, tl.int32) == 0
        u_mask = (rmask & first)[:, None] & cmask[None, :]
        u0 = tl.load(u_tile, mask=u_mask, other=0.0)
        if A_TERMS == 3:
            u1 = tl.load(u_tile + r, mask=u_mask, other=0.0)
            u2 = tl.load(u_tile + 2 * r, mask=u_mask, other=0.0)
    else:  # the main loop: one tensor-core accumulation from zero per BLOCK_K chunk, added in fp32
        w_rows = W + rows[:, None] * stride_wo
        a_cols = A + cols[None, :] * stride_ar
        for k0 in range(k_lo, k_hi, BLOCK_K):
            c0 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            c1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            c2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for step in tl.static_range(BLOCK_K // SUB_K):
                ks = k0 + step * SUB_K + tl.arange(0, SUB_K)
                kmask = ks < k_hi
                w = tl.load(w_rows + ks[None, :] * stride_wi, mask=rmask[:, None] & kmask[None, :], other=0.0)
                a_tile = a_cols + ks[:, None] * stride_ak
                a_mask = cmask[None, :] & kmask[:, None]
                c0 = tl.dot(w, tl.load(a_tile, mask=a_mask, other=0.0), c0)
                if A_TERMS == 3:
                    c1 = tl.dot(w, tl.load(a_tile + r * stride_ar, mask=a_mask, other=0.0), c1)
                    c2 = tl.dot(w, tl.load(a_tile + 2 * r * stride_ar, mask=a_mask, other=0.0), c2)
                if W_SQUARES:
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

    # Σ_k (B·G)_ik B_ik over this tile's columns, G's rows taken up to the tile's end: G is
    # symmetric, so the chunks before the tile count twice and the ones after it not at all.
    bg = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    tile_lo = pid_n * BLOCK_N
    for k0 in range(split * BLOCK_R, tl.minimum(tile_lo + BLOCK_N, r), splits * BLOCK_R):
        ks = k0 + tl.arange(0, BLOCK_R)
        kmask = ks < r
        b_k = tl.load(
            B + rows[:, None] * stride_bo + ks[None, :] * stride_br, mask=rmask[:, None] & kmask[None, :], other=0.0
        )
        g_offsets = G + ks[:, None] * r + cols[None, :]
        g_mask = kmask[:, None] & cmask[None, :]
        g0 = tl.load(g_offsets, mask=g_mask, other=0.0)
        g1 = tl.load(g_offsets + r * r, mask=g_mask, other=0.0)
        g2 = tl.load(g_offsets + 2 * r * r, mask=g_mask, other=0.0)
        b0, b1, b2 = _bf16_terms(b_k, B_TERMS)
        chunk = _dot_terms(b0, b1, b2, g0, g1, g2, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), B_TERMS, 3)
        bg += chunk * (1.0 + (k0 < tile_lo).to(tl.float32))
    b = tl.load(
        B + rows[:, None] * stride_bo + cols[None, :] * stride_br, mask=rmask[:, None] & cmask[None, :], other=0.0
    ).to(tl.float32)
    lora_squared = (s * s) * tl.sum(b * bg, axis=1)
    partial = (2.0 * s) * tl.sum(b * u, axis=1) + lora_squared
    share = (split * tl.num_programs(0) + pid_n) * d_out + rows
    tl.store(LSQ + share, lora_squared, mask=rmask)
    if FINISH:
        w_squared = tl.sum(squares, axis=1)
        tl.store(NORM + rows, tl.sqrt_rn(tl.maximum(w_squared + partial, 0.0)), mask=rmask)
        tl.store(WSQ + rows, w_squared, mask=rmask)
    else:
        tl.store(PART + share, partial, mask=rmask)
        if W_SQUARES:
            if pid_n == 0:
                tl.store(WSQ + split * d_out + rows, tl.sum(squares, axis=1), mask=rmask)


@triton.jit
def _row_squares_kernel(
    W, WSQ, AFTER, d_out, d_in, stride_wo, stride_wi, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr
):  # fmt: skip
    """``WSQ[i] = Σ_k W_ik²`` in fp32 (``‖W‖²`` in its own pass, for ``W_SQUARES=False``).

    ``AFTER`` is never read (``after`` of ``factored_row_norm_triton``).
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < d_out
    squares = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(
            W + rows[:, None] * stride_wo + ks[None, :] * stride_wi,
            mask=rmask[:, None] & (ks < d_in)[None, :],
            other=0.0,
        ).to(tl.float32)
        squares += w * w
    tl.store(WSQ + rows, tl.sum(squares, axis=1), mask=rmask)


@triton.jit
def _norm_finish_kernel(
    WSQ, PART, LSQ, NORM, WSQ_TOTAL, LSQ_TOTAL, d_out, wsq_parts, parts, BLOCK: tl.constexpr
):  # fmt: skip
    """``NORM = sqrt(max(Σ_j WSQ[j] + Σ_j PART[j], 0))``, the shares added in a fixed order.

    Also writes the terms' totals ``WSQ_TOTAL = Σ_j WSQ[j]`` and ``LSQ_TOTAL = Σ_j LSQ[j]``.
    """
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < d_out
    total = tl.zeros([BLOCK], dtype=tl.float32)
    lora_squared = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(0, parts):
        total += tl.load(PART + j * d_out + offsets, mask=mask, other=0.0)
        lora_squared += tl.load(LSQ + j * d_out + offsets, mask=mask, other=0.0)
    w_squared = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(0, wsq_parts):
        w_squared += tl.load(WSQ + j * d_out + offsets, mask=mask, other=0.0)
    tl.store(NORM + offsets, tl.sqrt_rn(tl.maximum(w_squared + total, 0.0)), mask=mask)
    tl.store(WSQ_TOTAL + offsets, w_squared, mask=mask)
    tl.store(LSQ_TOTAL + offsets, lora_squared, mask=mask)


# ----------------------------------------------------------------------------
# Launchers

_TERMS = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}


def triton_supports_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor) -> bool:
    """Whether the CUDA path applies: a bf16/fp16 ``W``, bf16/fp16/fp32 adapters.

    An fp32 or fp64 ``W`` stays on the plain-torch path (its ``W·Aᵀ`` is an fp32/fp64
    product there; the fused kernel's fp32 ``tl.dot`` failed a small-shape accuracy
    test on an H100 with Triton 3.6).
    """
    return weight.dtype in (torch.bfloat16, torch.float16) and all(t.dtype in _TERMS for t in (lora_A, lora_B))


def adapter_terms(lora_A: Tensor, dtype: torch.dtype, after: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """``A`` as stacked ``dtype`` terms ``[T·r, d_in]`` and a scale: ``A = Σ_t terms_t / scale``.

    One term when ``A`` already has ``dtype``; otherwise three, each the rounding
    of what the previous left (exact to fp32's 24 bits). bf16 terms come from one
    Triton kernel. fp16 terms are taken of ``A·scale`` with a power-of-two scale
    that puts ``max|A|`` near 2^14, so the small terms stay above fp16's
    underflow (bf16 has fp32's range: no scale). The scale is ``None`` where there
    is none (the kernels then skip it: no tensor of ones, which costs a launch).
    ``after``: see ``factored_row_norm_triton`` (bf16 terms only).
    """
    if lora_A.dtype == dtype:
        return lora_A, None
    if dtype == torch.bfloat16 and lora_A.dtype == torch.float32:
        return bf16_terms_triton(lora_A, after), None
    a = lora_A.float()
    scale = None
    if dtype == torch.float16:
        peak = a.abs().amax().clamp_min(2.0**-100)
        scale = torch.exp2(14.0 - torch.ceil(torch.log2(peak))).reshape(1)
        a = a * scale
    return torch.cat(split_terms(a, dtype, 3)), scale


def bf16_terms_triton(x: Tensor, after: Tensor | None = None) -> Tensor:
    """An fp32 ``[rows, cols]`` matrix as its three bf16 terms stacked ``[3·rows, cols]`` (one kernel).

    ``after``: see ``factored_row_norm_triton``.
    """
    rows, cols = x.shape
    terms = torch.empty(3 * rows, cols, dtype=torch.bfloat16, device=x.device)
    grid = (triton.cdiv(rows, 32), triton.cdiv(cols, 128))
    wrap_triton(_bf16_split_kernel)[grid](
        x, terms, x if after is None else after, rows, cols, x.stride(0), x.stride(1), BLOCK_R=32, BLOCK_C=128
    )
    return terms


def gram_fp32(lora_A: Tensor) -> Tensor:
    """``G = A·Aᵀ`` as an fp32 product (the reference for ``gram_triton``)."""
    a = lora_A.float()
    return a @ a.T


_GRAM_PROGRAMS = 264  # about two programs per H100 SM: tiles x splits aims at this many
_GRAM_MIN_SPLIT = 512  # columns of d_in per split at least


@dataclasses.dataclass(frozen=True)
class GramPlan:
    """How ``_pair_products_kernel`` runs: output tiles, columns per accumulation, split-K shares."""

    block: int  # rows and columns of an output tile
    block_k: int  # columns per tensor-core accumulation; splits are whole multiples of it
    num_warps: int
    splits: int
    k_per_split: int


def gram_plan(r: int, d_in: int, a_count: int, tiles: tuple[int, int, int] | None = None) -> GramPlan:
    """The plan for ``a_count`` stacked ``[r, d_in]`` terms; ``tiles``, ``(block, block_k, num_warps)``,
    overrides the choice below (benchmarks).

    Measured on an H200, pair products and their sum:
    - over 512 rows of terms (fp32 adapters at r = 384: 1152), tiles of 128 with
      128-column accumulations: 48 / 73 / 31 µs at d_in = 8192 / 14336 / 4096,
      against 75 / 126 / 43 µs for tiles of 64 with 64-column accumulations, and
      G closer to fp64 (3.3e-7 against 6.5e-7 of max |G|). Computing only the
      tiles on and above the diagonal then took it to 31 / 44 / 23 µs;
    - 97 to 512 rows (16-bit adapters at r = 384), tiles of 64 with 128-column
      accumulations: 13.5 µs at d_in = 8192, against 17.1 with 64 columns and
      17.2 with tiles of 128;
    - up to 96 rows, tiles of 32.
    """
    n = a_count * r
    if tiles is not None:
        block, block_k, num_warps = tiles
    elif n > 512:
        block, block_k, num_warps = 128, 128, 8
    elif n > 96:
        block, block_k, num_warps = 64, 128, 4
    else:
        block, block_k, num_warps = 32, 64, 4
    tiles = triton.cdiv(n, block) ** 2
    splits = max(1, min(triton.cdiv(_GRAM_PROGRAMS, tiles), triton.cdiv(d_in, _GRAM_MIN_SPLIT)))
    k_per_split = triton.cdiv(triton.cdiv(d_in, splits), block_k) * block_k
    return GramPlan(block, block_k, num_warps, triton.cdiv(d_in, k_per_split), k_per_split)


def gram_terms(
    a_terms: Tensor,
    scale: Tensor | None,
    r: int,
    after: Tensor | None = None,
    tiles: tuple[int, int, int] | None = None,
) -> Tensor:
    """``G = A·Aᵀ`` at fp32 accuracy as three bf16 terms ``[3, r, r]`` (``G = Σ_t terms[t]``).

    ``a_terms`` and ``scale`` are ``adapter_terms``'s (``A = Σ_t A_t / scale``, or
    ``Σ_t A_t`` for no scale).
    Two kernels: split-K products of the stacked terms with themselves on tensor
    cores (every ``A_i·A_jᵀ`` with ``i + j <= 2``, short accumulations added in
    fp32), then their fixed-order sum, with the power-of-two ``scale²`` divided
    out, split into bf16 terms. ``after``: see ``factored_row_norm_triton``;
    ``tiles``: see ``gram_plan`` (benchmarks).
    """
    n, d_in = a_terms.shape
    count = n // r
    max_order = min(2, 2 * count - 2)
    plan = gram_plan(r, d_in, count, tiles)
    pairs = torch.empty(plan.splits, n, n, dtype=torch.float32, device=a_terms.device)
    tiles = triton.cdiv(n, plan.block)
    wrap_triton(_pair_products_kernel)[(tiles, tiles, plan.splits)](
        a_terms,
        pairs,
        a_terms if after is None else after,
        n,
        d_in,
        r,
        plan.k_per_split,
        a_terms.stride(0),
        a_terms.stride(1),
        MAX_ORDER=max_order,
        BLOCK=plan.block,
        BLOCK_K=plan.block_k,
        num_warps=plan.num_warps,
    )
    terms = torch.empty(3, r, r, dtype=torch.bfloat16, device=a_terms.device)
    wrap_triton(_gram_combine_kernel)[(triton.cdiv(r * r, 1024),)](
        pairs,
        pairs if scale is None else scale,  # (never read without a scale)
        terms,
        r,
        plan.splits,
        TERMS=count,
        MAX_ORDER=max_order,
        SCALED=scale is not None,
        BLOCK=1024,
    )
    return terms


def gram_triton(lora_A: Tensor) -> Tensor:
    """``G = A·Aᵀ`` in fp32 from ``gram_terms`` (tests and diagnostics)."""
    a_terms, scale = adapter_terms(lora_A, torch.bfloat16 if lora_A.dtype == torch.float32 else lora_A.dtype)
    terms = gram_terms(a_terms, scale, lora_A.shape[0]).float()
    return (terms[2] + terms[1]) + terms[0]


def norm_config(r: int, a_terms: int) -> dict[str, object]:
    """Options of ``_fused_norm_kernel`` (H100 sweep, ``benchmarks/ops.py --parts sweep``).

    ``SPLIT_K`` is left to ``norm_splits``. With fp32 adapters and ``r > 64`` the
    three products of ``U`` run on cuBLAS (one call over the stacked terms):
    0.40-0.41 ms at 8192² and 14336→4096 on the H100 against 0.50-0.51 ms for
    the kernel's own three-accumulator loop (errors against fp64: up to 3.4e-7
    against 2.4e-7).
    """
    if r <= 64:  # streaming W dominates: one column tile, long K steps
        n = max(16, triton.next_power_of_2(r))
        if a_terms == 3 and n == 64:
            # three A tiles of 64 columns: the long steps' pipeline needs 352 KB of shared
            # memory (an H100/H200 has 227 KB). Measured on the H200, 4096² / 8192²: 48-49 /
            # 149-158 µs; K steps of 128 with Triton's default three stages were 61 / 186-189 µs.
            return dict(BLOCK_M=64, BLOCK_N=n, BLOCK_K=128, SUB_K=64, BLOCK_R=16, num_warps=4, num_stages=2)
        return dict(BLOCK_M=64, BLOCK_N=n, BLOCK_K=256, SUB_K=128, BLOCK_R=16, num_warps=4)
    if a_terms == 3 and has_mm_out_dtype():
        # the kernel is the epilogue only; on an H200 (r = 384, four layer shapes, before the epilogue
        # took half of B·G) G in 64-row chunks with three stages took 141-352 µs for the whole norm,
        # 32-row chunks with two stages 143-382 µs
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, BLOCK_R=64, U_FROM="cublas", num_warps=4, num_stages=3)
    if a_terms == 3:  # three accumulators
        return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, SUB_K=32, BLOCK_R=32, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, SUB_K=64, BLOCK_R=32, num_warps=8, num_stages=3)


_MIN_SPLIT_K = 1024  # columns of d_in per split at least: each split pays the epilogue and a partial sum
_SPLIT_GAIN = 0.85  # more splits only for 15% fewer waves (336 tiles: 3 → 2.67 waves measured 6% slower)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter: one split unless a config asks for more
    return torch.cuda.get_device_properties(device).multi_processor_count


def norm_splits(tiles: int, d_in: int, multiprocessors: int) -> int:
    """Split-K count for ``tiles`` output tiles: the fewest splits that minimize waves per unit of work.

    A program's time is its share of ``d_in``, so ``splits`` programs per tile take
    ``ceil(tiles·splits / SMs) / splits`` full-tile wave times: 192 tiles on 132
    SMs are two waves at ``splits = 1`` (the second 45% full) and 1.5 at 2.
    Each split adds an epilogue and a partial sum, so a split must save 15%.
    """
    best, best_waves = 1, float(-(-tiles // multiprocessors))
    for splits in range(2, 9):
        if d_in < splits * _MIN_SPLIT_K:
            break
        waves = -(-tiles * splits // multiprocessors) / splits
        if waves < _SPLIT_GAIN * best_waves:
            best, best_waves = splits, waves
    return best if multiprocessors > 1 else 1


def row_squares_triton(weight: Tensor, out: Tensor | None = None, after: Tensor | None = None) -> Tensor:
    """``‖W_i‖²`` for every row, fp32 ``[d_out]`` (``out`` may be a ``[1, d_out]`` buffer).

    ``after``: see ``factored_row_norm_triton``.
    """
    d_out, d_in = weight.shape
    out = torch.empty(d_out, dtype=torch.float32, device=weight.device) if out is None else out
    wrap_triton(_row_squares_kernel)[(triton.cdiv(d_out, 4),)](
        weight,
        out,
        weight if after is None else after,
        d_out,
        d_in,
        weight.stride(0),
        weight.stride(1),
        BLOCK_M=4,
        BLOCK_K=512,
    )
    return out


@dataclasses.dataclass(frozen=True)
class NormPlan:
    """How ``factored_row_norm_triton`` runs one layer: ``_fused_norm_kernel``'s grid, options and buffers."""

    kernel: dict[str, int]  # tile sizes and launch options of _fused_norm_kernel
    u_from_cublas: bool  # U from one cuBLAS product, read by the kernel's epilogue
    fused_squares: bool  # ‖W‖² from the kernel's own W tiles (else _row_squares_kernel)
    parts: int  # column tiles of r
    row_tiles: int
    splits: int  # shares of d_in (and of B·G's r chunks)
    k_per_split: int

    @property
    def finish_in_kernel(self) -> bool:
        return self.parts == 1 and self.splits == 1 and self.fused_squares

    def workspace_bytes(self, d_out: int, d_in: int, r: int, a_count: int) -> int:
        """Bytes the norm allocates besides its ``[d_out]`` result."""
        total = (a_count > 1) * a_count * r * d_in * 2  # A's 16-bit terms
        total += 2 * d_out * 4  # the sum's terms, for the ill-conditioned rows
        total += gram_plan(r, d_in, a_count).splits * (a_count * r) ** 2 * 4 + 3 * r * r * 2  # Gram partials, G's terms
        total += self.u_from_cublas * d_out * a_count * r * 4
        if not self.finish_in_kernel:
            total += (2 * self.splits * self.parts + (self.splits if self.fused_squares else 1)) * d_out * 4
        return total


def norm_plan(
    d_out: int, d_in: int, r: int, a_count: int, multiprocessors: int, config: dict[str, object] | None = None
) -> NormPlan:
    """The plan for a ``[d_out, d_in]`` layer of rank ``r`` whose A enters as ``a_count`` terms.

    ``config`` overrides ``norm_config`` (benchmarks, tests): its ``SPLIT_K``
    overrides ``norm_splits``, ``W_SQUARES=False`` takes ``‖W‖²`` in a pass of its
    own and ``U_FROM="cublas"`` takes ``U`` from a cuBLAS product.
    """
    cfg = dict(config) if config is not None else norm_config(r, a_count)
    cfg.setdefault("SUB_K", cfg["BLOCK_K"] // 2)
    if cfg["BLOCK_K"] < 2 * cfg["SUB_K"]:
        raise ValueError("BLOCK_K must hold two SUB_K dots (one would fold the fp32 add into the dot)")
    if cfg["BLOCK_N"] % cfg["BLOCK_R"]:
        raise ValueError("BLOCK_R must divide BLOCK_N (the epilogue's chunks of G lie before or inside a tile)")
    u_from_cublas = cfg.pop("U_FROM", "kernel") == "cublas"
    fused_squares = bool(cfg.pop("W_SQUARES", True)) and not u_from_cublas
    parts = triton.cdiv(r, cfg["BLOCK_N"])
    row_tiles = triton.cdiv(d_out, cfg["BLOCK_M"])
    splits = cfg.pop("SPLIT_K", None) or (1 if u_from_cublas else norm_splits(parts * row_tiles, d_in, multiprocessors))
    k_per_split = triton.cdiv(triton.cdiv(d_in, splits), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    splits = triton.cdiv(d_in, k_per_split)  # rounding the share up may leave fewer
    return NormPlan(cfg, u_from_cublas, fused_squares, parts, row_tiles, splits, k_per_split)


def factored_row_norm_triton(
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    config: dict[str, object] | None = None,
    after: Tensor | None = None,
) -> Tensor:
    """The factored norm on a GPU; fp32 ``[d_out]``.

    - an fp32 ``A`` under a 16-bit ``W``: its exact 16-bit terms (``adapter_terms``);
    - ``G = A·Aᵀ`` at fp32 accuracy from one product of the terms (``gram_terms``);
    - ``_fused_norm_kernel`` (``norm_plan`` picks its options): ``U = W·Aᵀ`` on
      tensor cores with ``W`` read once in its own dtype and ``‖W‖²`` from the same
      tiles, split-K where the output tiles alone leave SMs idle for part of a
      wave; or ``U`` from one cuBLAS product and ``‖W‖²`` from a row-squares pass.
      ``B·G`` and the row sums are its epilogue; ``B·G`` never reaches memory;
    - where ``r`` spans several column tiles or ``d_in`` several splits, a small
      kernel adds the shares in a fixed order, clamps and takes a correctly
      rounded square root;
    - the rows where the sum cancels are recomputed densely, in one kernel that
      stops at once where none is flagged (``ill_conditioned_rows``).

    Working memory: ``NormPlan.workspace_bytes``, ``O(d_out·r + r·d_in + r²)``.

    ``after``, a tensor the norm does not read, orders it after the kernel that
    writes ``after``: each kernel that starts a chain of the norm (the terms, the
    Gram products, the row squares) takes it as an argument it never loads, and
    Inductor schedules a kernel after the producers of all its tensor arguments.
    The rewrite passes the base layer's output, so the norm's launches overlap
    the base matmul instead of holding up an idle GPU (docs/design.md). Not
    ordered: the few plain-torch ops that scale fp32 adapters for an fp16 ``W``.
    """
    if not triton_supports_norm(weight, lora_A, lora_B):
        raise ValueError(f"the Triton norm takes a bf16/fp16 weight and 16/32-bit adapters, not {weight.dtype}")
    d_out, d_in = weight.shape
    r = lora_A.shape[0]
    a_terms, scale = adapter_terms(lora_A, weight.dtype, after)
    a_count = a_terms.shape[0] // r
    plan = norm_plan(d_out, d_in, r, a_count, _multiprocessors(weight.device), config)
    g_terms = gram_terms(a_terms, scale, r, after)
    device = weight.device
    norm = torch.empty(d_out, dtype=torch.float32, device=device)
    w_total = torch.empty(d_out, dtype=torch.float32, device=device)  # the sum's terms ‖W_i‖² and s²·‖(B·A)_i‖²
    lora_total = torch.empty(d_out, dtype=torch.float32, device=device)
    finish = plan.finish_in_kernel
    shares = plan.splits * plan.parts
    partial = norm if finish else torch.empty(shares, d_out, dtype=torch.float32, device=device)
    lora_squared = lora_total if finish else torch.empty(shares, d_out, dtype=torch.float32, device=device)
    wsq_parts = plan.splits if plan.fused_squares else 1
    w_squared = w_total if finish else torch.empty(wsq_parts, d_out, dtype=torch.float32, device=device)
    if not plan.fused_squares:
        row_squares_triton(weight, out=w_squared, after=after)
    u = product(weight, a_terms.T) if plan.u_from_cublas else norm  # (a placeholder when the kernel forms U)
    wrap_triton(_fused_norm_kernel)[(plan.parts, plan.row_tiles, plan.splits)](
        weight,
        a_terms,
        a_terms if scale is None else scale,  # (never read without a scale)
        lora_B,
        g_terms,
        u,
        w_squared,
        partial,
        lora_squared,
        norm,
        d_out,
        d_in,
        r,
        plan.k_per_split,
        scaling,
        weight.stride(0),
        weight.stride(1),
        a_terms.stride(0),
        a_terms.stride(1),
        lora_B.stride(0),
        lora_B.stride(1),
        u.stride(0),
        A_TERMS=a_count,
        A_SCALED=scale is not None,
        B_TERMS=_TERMS[lora_B.dtype],
        U_IN=plan.u_from_cublas,
        W_SQUARES=plan.fused_squares,
        FINISH=finish,
        **plan.kernel,
    )
    if not finish:
        wrap_triton(_norm_finish_kernel)[(triton.cdiv(d_out, 1024),)](
            w_squared, partial, lora_squared, norm, w_total, lora_total, d_out, wsq_parts, shares, BLOCK=1024
        )
    refine_ill_conditioned_rows_triton(norm, w_total, lora_total, weight, lora_A, lora_B, scaling, launch=wrap_triton)
    return norm


# ----------------------------------------------------------------------------
# Op: Triton on CUDA, plain torch elsewhere (Inductor traces into both branches)


@triton_op("dora_fused::factored_row_norm", mutates_args=())
def _factored_row_norm_op(
    weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, after: Tensor | None = None
) -> Tensor:
    torch._check(weight.dim() == 2 and lora_A.dim() == 2 and lora_B.dim() == 2)
    torch._check(lora_A.shape[1] == weight.shape[1] and lora_B.shape[0] == weight.shape[0])
    torch._check(lora_A.shape[0] == lora_B.shape[1])
    if weight.is_cuda and triton_supports_norm(weight, lora_A, lora_B):
        ordered = after is not None and after.device == weight.device
        return factored_row_norm_triton(weight, lora_A, lora_B, scaling, after=after if ordered else None)
    return factored_row_norm_torch(weight, lora_A, lora_B, scaling)


def factored_row_norm(
    weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, after: Tensor | None = None
) -> Tensor:
    """``||W + s·B·A||_row`` for ``W [d_out, d_in]``, ``A [r, d_in]``, ``B [d_out, r]``.

    Returns ``[d_out]`` in the accumulation dtype (fp32, or fp64 for fp64
    inputs). Not differentiable: callers detach, as DoRA does. ``after`` is
    never read; in compiled code the norm's kernels run after whatever writes it
    (``factored_row_norm_triton``).
    """
    return torch.ops.dora_fused.factored_row_norm(weight, lora_A, lora_B, float(scaling), after)
