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

Layout: pure-torch reference → implementations → ``torch.library`` op with a
fake implementation. The op has no autograd: DoRA detaches the norm
(paper §4.3), and the rewrite detaches its inputs exactly where PEFT does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

__all__ = [
    "accumulation_dtype",
    "dense_row_norm_reference",
    "factored_row_norm",
    "factored_row_norm_reference",
    "factored_row_norm_torch",
    "factored_row_norm_triton",
    "gram_triton",
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


def _factored_row_norm_chunked(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """Same math as the reference, promoting at most ``CHUNK_BYTES`` of ``W`` at a time."""
    acc = accumulation_dtype(weight, lora_A, lora_B)
    d_out, d_in = weight.shape
    a = lora_A.to(acc)
    a_t = a.T
    gram = a @ a_t
    itemsize = torch.finfo(acc).bits // 8
    rows = max(1, CHUNK_BYTES // max(1, d_in * itemsize))
    chunks = []
    for start in range(0, d_out, rows):
        w = weight[start : start + rows].to(acc)
        b = lora_B[start : start + rows].to(acc)
        squared = (
            (w * w).sum(1) + (2.0 * scaling) * (b * (w @ a_t)).sum(1) + (scaling * scaling) * ((b @ gram) * b).sum(1)
        )
        chunks.append(squared.clamp_min(0.0).sqrt())
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


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


def _factored_row_norm_tensor_cores(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """``U = W·Aᵀ`` on tensor cores with fp32 accumulation; ``W`` read in its own dtype."""
    terms = split_terms(lora_A, weight.dtype, _tensor_core_terms(weight, lora_A))
    u = torch.mm(weight, terms[0].T, out_dtype=torch.float32)
    for term in terms[1:]:
        u = u + torch.mm(weight, term.T, out_dtype=torch.float32)
    a, b = lora_A.float(), lora_B.float()
    gram = a @ a.T
    base = torch.linalg.vector_norm(weight, dim=1, dtype=torch.float32).square()
    squared = base + (2.0 * scaling) * (b * u).sum(1) + (scaling * scaling) * ((b @ gram) * b).sum(1)
    return squared.clamp_min(0.0).sqrt()


def _has_mm_out_dtype() -> bool:
    return hasattr(torch.ops.aten.mm, "dtype")


def factored_row_norm_torch(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """The factored norm in plain torch ops: the tensor-core path where it applies, else chunked.

    Traceable: the rewrite inserts it directly (Inductor then compiles it with the
    rest of the graph, with no per-call Python cost); the op below wraps it.
    """
    if _tensor_core_terms(weight, lora_A) and _has_mm_out_dtype():
        return _factored_row_norm_tensor_cores(weight, lora_A, lora_B, scaling)
    return _factored_row_norm_chunked(weight, lora_A, lora_B, scaling)


# ----------------------------------------------------------------------------
# Triton kernels (CUDA; also run on CPU tensors under TRITON_INTERPRET=1)
#
# Tensor-core products at fp32 accuracy: an operand tile is split in registers
# into ``terms`` bf16 parts (bf16 W: 1, fp16: 2, fp32: 3), each exact, and the
# products of parts whose orders add up to at most 2 are accumulated in fp32
# (the dropped ones are below fp32's rounding). Two tiles of the same 16-bit
# dtype are multiplied directly.


@triton.jit
def _split_dot(x, y, acc, X_TERMS: tl.constexpr, Y_TERMS: tl.constexpr):
    """``acc + x @ y`` for ``x [M, K]``, ``y [K, N]``; ``X_TERMS == 0`` means a native 16-bit dot."""
    if X_TERMS == 0:
        return tl.dot(x, y, acc)
    xf = x.to(tl.float32)
    x0 = xf.to(tl.bfloat16)
    x_rest = xf - x0.to(tl.float32)
    x1 = x_rest.to(tl.bfloat16)
    x2 = (x_rest - x1.to(tl.float32)).to(tl.bfloat16)
    yf = y.to(tl.float32)
    y0 = yf.to(tl.bfloat16)
    y_rest = yf - y0.to(tl.float32)
    y1 = y_rest.to(tl.bfloat16)
    y2 = (y_rest - y1.to(tl.float32)).to(tl.bfloat16)
    # smallest products first
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
def _gram_kernel(
    A,
    G_PARTIAL,
    r,
    d_in,
    stride_ar,
    stride_ak,
    K_PER_PROGRAM,
    A_TERMS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """G_PARTIAL[p] = A[:, K_p] · A[:, K_p]ᵀ over this program's slice K_p of d_in (split-K)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    split = tl.program_id(2)
    acc = tl.zeros([BLOCK_R, BLOCK_R], dtype=tl.float32)
    k_start = split * K_PER_PROGRAM
    for k0 in range(k_start, k_start + K_PER_PROGRAM, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = (ks < d_in) & (ks < k_start + K_PER_PROGRAM)
        x = tl.load(
            A + rows[:, None] * stride_ar + ks[None, :] * stride_ak,
            mask=(rows < r)[:, None] & kmask[None, :],
            other=0.0,
        )
        y = tl.load(
            A + cols[None, :] * stride_ar + ks[:, None] * stride_ak,
            mask=(cols < r)[None, :] & kmask[:, None],
            other=0.0,
        )
        acc = _split_dot(x, y, acc, A_TERMS, A_TERMS)
    out = G_PARTIAL + split * r * r + rows[:, None] * r + cols[None, :]
    tl.store(out, acc, mask=(rows < r)[:, None] & (cols < r)[None, :])


@triton.jit
def _norm_partials_kernel(
    W,
    A,
    B,
    G,
    W_SQUARED,
    PARTIAL,
    d_out,
    d_in,
    r,
    scaling,
    stride_wo,
    stride_wi,
    stride_ar,
    stride_ai,
    stride_bo,
    stride_br,
    W_TERMS: tl.constexpr,
    A_TERMS: tl.constexpr,
    B_TERMS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """For rows M and adapter columns N of this program::

        U  = W[M, :] · A[N, :]ᵀ                  (tensor cores, fp32 accumulation)
        BG = B[M, :] · G[:, N]
        PARTIAL[n_tile, M] = Σ_N B[M, N] ⊙ (2s·U + s²·BG)
        W_SQUARED[M] = Σ_k W[M, k]²               (from the same W tiles, first column tile only)

    ``U`` and ``BG`` never leave registers.
    """
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(r, BLOCK_N)
    pid_m = pid // n_tiles
    pid_n = pid % n_tiles  # the column tiles of one row block run next to each other: W is read once from HBM
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < d_out
    cmask = cols < r

    u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    w_squared = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < d_in
        w = tl.load(
            W + rows[:, None] * stride_wo + ks[None, :] * stride_wi, mask=rmask[:, None] & kmask[None, :], other=0.0
        )
        a_t = tl.load(
            A + cols[None, :] * stride_ar + ks[:, None] * stride_ai, mask=cmask[None, :] & kmask[:, None], other=0.0
        )
        u = _split_dot(w, a_t, u, W_TERMS, A_TERMS)
        wf = w.to(tl.float32)
        w_squared += tl.sum(wf * wf, axis=1)

    b_tile = tl.load(
        B + rows[:, None] * stride_bo + cols[None, :] * stride_br, mask=rmask[:, None] & cmask[None, :], other=0.0
    ).to(tl.float32)
    cross = tl.sum(b_tile * u, axis=1)

    bg = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, r, BLOCK_R):
        ks = k0 + tl.arange(0, BLOCK_R)
        kmask = ks < r
        b = tl.load(
            B + rows[:, None] * stride_bo + ks[None, :] * stride_br, mask=rmask[:, None] & kmask[None, :], other=0.0
        )
        g = tl.load(G + ks[:, None] * r + cols[None, :], mask=kmask[:, None] & cmask[None, :], other=0.0)
        bg = _split_dot(b, g, bg, B_TERMS, 3)
    gram = tl.sum(b_tile * bg, axis=1)

    partial = (2.0 * scaling) * cross + (scaling * scaling) * gram
    tl.store(PARTIAL + pid_n * d_out + rows, partial, mask=rmask)
    if pid_n == 0:
        tl.store(W_SQUARED + rows, w_squared, mask=rmask)


@triton.jit
def _norm_finish_kernel(W_SQUARED, PARTIAL, NORM, d_out, n_tiles, BLOCK: tl.constexpr):
    """NORM = sqrt(max(W_SQUARED + Σ_tiles PARTIAL, 0)), correctly rounded."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < d_out
    total = tl.load(W_SQUARED + rows, mask=mask, other=0.0)
    for tile in range(0, n_tiles):
        total += tl.load(PARTIAL + tile * d_out + rows, mask=mask, other=0.0)
    tl.store(NORM + rows, tl.sqrt_rn(tl.maximum(total, 0.0)), mask=mask)


# ----------------------------------------------------------------------------
# Launcher

_TERMS = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}


def _dot_terms(x: torch.dtype, y: torch.dtype) -> tuple[int, int]:
    """Split terms for a product of ``x`` and ``y`` tiles; ``(0, 0)`` for a native 16-bit dot."""
    if x == y and x in (torch.bfloat16, torch.float16):
        return 0, 0
    return _TERMS[x], _TERMS[y]


def triton_supports_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor) -> bool:
    """Whether the Triton kernels apply: bf16/fp16/fp32 operands (fp64 stays on the torch path)."""
    return all(t.dtype in _TERMS for t in (weight, lora_A, lora_B))


def _norm_config(d_out: int, r: int) -> dict[str, int]:
    """Tile sizes of the partials kernel: a column tile covers up to 128 adapter columns."""
    block_n = min(128, max(16, triton.next_power_of_2(r)))
    block_m = 64 if d_out * triton.cdiv(r, block_n) <= 64 * 1024 else 128
    return {
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "BLOCK_K": 64,
        "BLOCK_R": 32,
        "num_warps": 8 if block_m == 128 else 4,
    }


def gram_triton(lora_A: Tensor) -> Tensor:
    """``G = A·Aᵀ`` in fp32 on tensor cores (split-K partials summed in a fixed order)."""
    r, d_in = lora_A.shape
    block_r, block_k = (16 if r <= 16 else 32 if r <= 32 else 64), 64
    tiles = triton.cdiv(r, block_r) ** 2
    splits = max(1, min(triton.cdiv(d_in, 4 * block_k), triton.cdiv(256, tiles)))
    k_per_program = triton.cdiv(triton.cdiv(d_in, splits), block_k) * block_k
    splits = triton.cdiv(d_in, k_per_program)
    partial = torch.empty(splits, r, r, dtype=torch.float32, device=lora_A.device)
    terms, _ = _dot_terms(lora_A.dtype, lora_A.dtype)
    grid = (triton.cdiv(r, block_r), triton.cdiv(r, block_r), splits)
    wrap_triton(_gram_kernel)[grid](
        lora_A,
        partial,
        r,
        d_in,
        lora_A.stride(0),
        lora_A.stride(1),
        k_per_program,
        A_TERMS=terms,
        BLOCK_R=block_r,
        BLOCK_K=block_k,
        num_warps=4,
    )
    return partial.sum(0)


def factored_row_norm_triton(
    weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, config: dict[str, int] | None = None
) -> Tensor:
    """The factored norm in three Triton kernels (Gram, partials, finish); fp32 ``[d_out]``.

    Working memory: ``G`` and its split-K partials (``O(r²)``) and
    ``cdiv(r, BLOCK_N)`` partial sums per row; ``U`` stays in registers.
    ``config`` overrides the partials kernel's tile sizes (benchmarks).
    """
    d_out, d_in = weight.shape
    r = lora_A.shape[0]
    gram = gram_triton(lora_A)
    cfg = dict(config) if config is not None else _norm_config(d_out, r)
    num_stages = cfg.pop("num_stages", 3)
    n_tiles = triton.cdiv(r, cfg["BLOCK_N"])
    w_squared = torch.empty(d_out, dtype=torch.float32, device=weight.device)
    partial = torch.empty(n_tiles, d_out, dtype=torch.float32, device=weight.device)
    w_terms, a_terms = _dot_terms(weight.dtype, lora_A.dtype)
    b_terms = _TERMS[lora_B.dtype]
    grid = (triton.cdiv(d_out, cfg["BLOCK_M"]) * n_tiles,)
    wrap_triton(_norm_partials_kernel)[grid](
        weight,
        lora_A,
        lora_B,
        gram,
        w_squared,
        partial,
        d_out,
        d_in,
        r,
        scaling,
        weight.stride(0),
        weight.stride(1),
        lora_A.stride(0),
        lora_A.stride(1),
        lora_B.stride(0),
        lora_B.stride(1),
        W_TERMS=w_terms,
        A_TERMS=a_terms,
        B_TERMS=b_terms,
        num_stages=num_stages,
        **cfg,
    )
    norm = torch.empty(d_out, dtype=torch.float32, device=weight.device)
    wrap_triton(_norm_finish_kernel)[(triton.cdiv(d_out, 1024),)](
        w_squared, partial, norm, d_out, n_tiles, BLOCK=1024, num_warps=4
    )
    return norm


# ----------------------------------------------------------------------------
# Op: Triton on CUDA, plain torch elsewhere (Inductor traces into both branches)


@triton_op("dora_fused::factored_row_norm", mutates_args=())
def _factored_row_norm_op(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    torch._check(weight.dim() == 2 and lora_A.dim() == 2 and lora_B.dim() == 2)
    torch._check(lora_A.shape[1] == weight.shape[1] and lora_B.shape[0] == weight.shape[0])
    torch._check(lora_A.shape[0] == lora_B.shape[1])
    if weight.is_cuda and triton_supports_norm(weight, lora_A, lora_B):
        return factored_row_norm_triton(weight, lora_A, lora_B, scaling)
    return factored_row_norm_torch(weight, lora_A, lora_B, scaling)


def factored_row_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """``||W + s·B·A||_row`` for ``W [d_out, d_in]``, ``A [r, d_in]``, ``B [d_out, r]``.

    Returns ``[d_out]`` in the accumulation dtype (fp32, or fp64 for fp64
    inputs). Not differentiable: callers detach, as DoRA does.
    """
    return torch.ops.dora_fused.factored_row_norm(weight, lora_A, lora_B, float(scaling))
