"""Why the fused norm's main loop runs at about half cuBLAS's speed: its loop alone, in variants (CUDA GPU).

The loop forms ``U = W·Aᵀ`` (and ``‖W‖²``) over a split of ``d_in``, as ``_fused_norm_kernel``
does before its epilogue. Variants:

- ``CHAIN=0``: one tensor-core accumulation started from zero per ``BLOCK_K`` chunk (two dots),
  added to the running sum in fp32: the shipped loop. Triton 3.6 waits for every dot
  (``warp_group_dot_wait`` with 0 pending in the TTGIR).
- ``CHAIN=1``: one dot per iteration into one long accumulation, which Triton pipelines
  (1 pending).
- ``SQ=0``: no ``‖W‖²``; ``SQ=1``: squares of the tiles the dots read; ``SQ=2``: squares of a
  second load of ``W`` as int32 pairs (bf16 ``W`` only), apart from the tensor-core copy.

Each is timed with ``triton.testing.do_bench`` (median) at split-K 1-4 next to cuBLAS's
``torch.mm(W, Aᵀ, out_dtype=fp32)`` and the row-squares kernel, and ``U``'s error is measured
against fp64 (max error over max |U|). Results: ``docs/results/norm_main_loop_study_h100_2026-11-26.json``
(its "shipped norm" rows are eager calls of the whole op, bound by the host's launches: not comparable).

    python benchmarks/norm_main_loop_study.py --json out.json
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl
from torch._library.triton import set_wrap_triton_enabled
from triton.testing import do_bench

from dora_fused.kernels import factored_norm

VARIANTS = [  # CHAIN, SQ, BLOCK_M, BLOCK_N, BLOCK_K, SUB_K, warps, stages
    (0, 1, 128, 128, 128, 64, 8, 3),
    (1, 1, 128, 128, 64, 64, 8, 4),
    (1, 0, 128, 128, 64, 64, 8, 4),
    (1, 2, 128, 128, 64, 64, 8, 4),
    (1, 2, 128, 128, 64, 64, 8, 3),
    (1, 0, 128, 256, 64, 64, 8, 3),
    (1, 2, 128, 256, 64, 64, 8, 3),
    (1, 0, 256, 128, 64, 64, 8, 3),
    (1, 2, 256, 128, 64, 64, 8, 3),
    (1, 2, 128, 128, 64, 64, 4, 4),
]
SHAPES = [(8192, 8192), (4096, 14336), (14336, 4096), (4096, 4096)]  # (d_out, d_in)


@triton.jit
def pair_squares(W32, rows, rmask, stride_wo, k_start, k_hi, SUB_K: tl.constexpr):
    """Squares of a bf16 ``W``'s ``[rows, k_start : k_start + SUB_K]`` tile, from ``W`` read again as int32 pairs.

    Returns the squares of the pairs' low and high halves (``[rows, SUB_K / 2]`` each, fp32): the
    high half of a pair is the upper bf16 as the top of an fp32, the low half shifted up is the lower.
    """
    ks2 = k_start // 2 + tl.arange(0, SUB_K // 2)
    pairs = tl.load(
        W32 + rows[:, None] * (stride_wo // 2) + ks2[None, :], mask=rmask[:, None] & (ks2 < k_hi // 2)[None, :], other=0
    )
    lo = (pairs << 16).to(tl.float32, bitcast=True)
    hi = (pairs & -65536).to(tl.float32, bitcast=True)
    return lo * lo, hi * hi


@triton.jit
def _main_loop_kernel(
    W, W32, A, U, WSQ, d_out, d_in, r, k_per_split, stride_wo, stride_wi, stride_ar, stride_ak,
    CHAIN: tl.constexpr, SQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SUB_K: tl.constexpr,
):  # fmt: skip
    """``U[split] = W[:, split]·A[:, split]ᵀ`` (fp32) and ``WSQ[split] = Σ_{k in split} W²`` (with ``SQ``)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < d_out
    cmask = cols < r
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, d_in)
    u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    squares = tl.zeros([BLOCK_M, SUB_K], dtype=tl.float32)
    sq_lo = tl.zeros([BLOCK_M, SUB_K // 2], dtype=tl.float32)
    sq_hi = tl.zeros([BLOCK_M, SUB_K // 2], dtype=tl.float32)
    w_rows = W + rows[:, None] * stride_wo
    a_cols = A + cols[None, :] * stride_ar
    for k0 in range(k_lo, k_hi, BLOCK_K):
        c = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for step in tl.static_range(BLOCK_K // SUB_K):
            ks = k0 + step * SUB_K + tl.arange(0, SUB_K)
            kmask = ks < k_hi
            w = tl.load(w_rows + ks[None, :] * stride_wi, mask=rmask[:, None] & kmask[None, :], other=0.0)
            a = tl.load(a_cols + ks[:, None] * stride_ak, mask=cmask[None, :] & kmask[:, None], other=0.0)
            if CHAIN:
                u = tl.dot(w, a, u)
            else:
                c = tl.dot(w, a, c)
            if SQ == 1:
                wf = w.to(tl.float32)
                squares += wf * wf
            if SQ == 2:
                lo2, hi2 = pair_squares(W32, rows, rmask, stride_wo, k0 + step * SUB_K, k_hi, SUB_K)
                sq_lo += lo2
                sq_hi += hi2
        if not CHAIN:
            u += c
    tl.store(U + split * d_out * r + rows[:, None] * r + cols[None, :], u, mask=rmask[:, None] & cmask[None, :])
    if SQ == 1 and pid_n == 0:
        tl.store(WSQ + split * d_out + rows, tl.sum(squares, axis=1), mask=rmask)
    if SQ == 2 and pid_n == 0:
        tl.store(WSQ + split * d_out + rows, tl.sum(sq_lo, axis=1) + tl.sum(sq_hi, axis=1), mask=rmask)


def _plain_launch(op, *args):
    """``op`` with its Triton kernels launched directly: an eager ``wrap_triton`` call dispatches on the host first."""
    with set_wrap_triton_enabled(False):
        return op(*args)


def run_shape(d_out: int, d_in: int, r: int) -> list[dict]:
    w = torch.randn(d_out, d_in, device="cuda", dtype=torch.bfloat16) * 0.02
    a = torch.randn(r, d_in, device="cuda", dtype=torch.bfloat16) * 0.02
    u_exact, sq_exact = w.double() @ a.double().T, (w.double() ** 2).sum(1)
    shape = f"{d_in}->{d_out}"
    row_squares = factored_norm.row_squares_triton
    rows = [
        dict(shape=shape, cfg="cuBLAS W·Aᵀ", us=1e3 * do_bench(lambda: torch.mm(w, a.T, out_dtype=torch.float32))),
        dict(shape=shape, cfg="row squares", us=1e3 * do_bench(lambda: _plain_launch(row_squares, w))),
    ]
    w32 = w.view(torch.int32)
    for chain, sq, bm, bn, bk, sub, warps, stages in VARIANTS:
        for splits in (1, 2, 3, 4):
            k_per_split = triton.cdiv(triton.cdiv(d_in, splits), bk) * bk
            shares = triton.cdiv(d_in, k_per_split)
            u = torch.empty(shares, d_out, r, device="cuda", dtype=torch.float32)
            wsq = torch.zeros(shares, d_out, device="cuda", dtype=torch.float32)
            grid = (triton.cdiv(r, bn), triton.cdiv(d_out, bm), shares)
            options = dict(CHAIN=chain, SQ=sq, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SUB_K=sub)

            def launch(u=u, wsq=wsq, grid=grid, k=k_per_split, options=options, warps=warps, stages=stages):
                _main_loop_kernel[grid](
                    w, w32, a, u, wsq, d_out, d_in, r, k, w.stride(0), w.stride(1), a.stride(0), a.stride(1),
                    **options, num_warps=warps, num_stages=stages,
                )  # fmt: skip

            name = f"c{chain} sq{sq} {bm}x{bn}x{bk}/{sub} w{warps} s{stages} split{shares}"
            try:
                us = 1e3 * do_bench(launch)
                launch()
                err_u = ((u.double().sum(0) - u_exact).abs().max() / u_exact.abs().max()).item()
                err_sq = ((wsq.double().sum(0) - sq_exact).abs().max() / sq_exact.abs().max()).item() if sq else 0.0
                rows.append(dict(shape=shape, cfg=name, us=us, err_u=err_u, err_sq=err_sq))
            except Exception as error:  # out of shared memory or registers
                rows.append(dict(shape=shape, cfg=name, us=None, error=type(error).__name__))
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=384)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = [row for d_out, d_in in SHAPES for row in run_shape(d_out, d_in, args.rank)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
