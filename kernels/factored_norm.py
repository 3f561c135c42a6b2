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
  at most ``CHUNK_BYTES`` (``norm_plan``) at a time.

On CUDA the op runs Triton instead (``factored_row_norm_triton``): the Gram
kernels (``gram``), then one main kernel that either reads ``W`` once for both
``U = W·Aᵀ`` and ``‖W‖²`` (split-K where the tiles alone leave SMs idle), or,
for fp32 adapters at ``r > 64``, reads ``U`` from one cuBLAS product; ``B·G``
is formed in its epilogue and never reaches memory (``norm_plan`` decides).

Layout: pure-torch reference → implementations → Triton kernels → launchers →
``torch.library`` op with a fake implementation. The op has no autograd: DoRA detaches the norm
(paper §4.3), and the rewrite detaches its inputs exactly where PEFT does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .common import accumulation_dtype, adapter_terms, bf16_terms, dot_terms, multiprocessors, split_terms
from .gram import gram_terms
from .ill_conditioned_rows import refine_ill_conditioned_rows, refine_ill_conditioned_rows_triton
from .norm_plan import CHUNK_BYTES, norm_plan
from .products import has_mm_out_dtype, product

__all__ = [
    "dense_row_norm_reference",
    "factored_row_norm",
    "factored_row_norm_reference",
    "factored_row_norm_torch",
    "factored_row_norm_triton",
    "triton_supports_norm",
]


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
# Tensor-core products at fp32 accuracy from exact 16-bit terms (``common``). ``A`` is
# split once (``adapter_terms``), and the Gram (``gram``) and the main loop take its
# stacked terms; the epilogue splits ``B``'s tiles in registers for ``B·G``. Two tiles of
# the same 16-bit dtype are multiplied directly.


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
        b0, b1, b2 = bf16_terms(b_k, B_TERMS)
        chunk = dot_terms(b0, b1, b2, g0, g1, g2, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), B_TERMS, 3)
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
    plan = norm_plan(d_out, d_in, r, a_count, multiprocessors(weight.device), config)
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
