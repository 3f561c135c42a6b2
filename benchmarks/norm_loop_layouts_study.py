"""Two more layouts of the fused norm's main loop, timed beside the shipped loop and cuBLAS (CUDA GPU).

Both form ``U = W·Aᵀ`` (fp32) and, optionally, ``‖W‖²`` over a split of ``d_in``, as the
main loop of ``_fused_norm_kernel`` does before its epilogue (16-bit ``W`` and ``A``):

- ``all-r``: one program per ``BLOCK_M`` rows takes all of ``r`` as ``NB`` column blocks, one
  loop-carried accumulator each, so every ``W`` tile is read from memory once (the shipped loop
  reads it once per 128 columns of ``r``). Three dots per K step; Triton 3.6 keeps them in flight
  across iterations (``warp_group_dot_wait`` with 3 pending, checked in the sm_90 TTGIR).
  ``SQ`` picks where ``‖W‖²`` comes from: 0 none; 1 the tiles the dots read (the pattern the
  shipped loop had to avoid when pipelined); 2 a second load of ``W`` as int32 pairs; 3 the
  tile in registers, which then feeds the dots from registers too (``tl.where`` keeps the
  compiler from folding the copy away).
- ``tma``: the loop with host-side TMA descriptors (``TensorDescriptor``), one loop-carried
  accumulator, ``SQ`` 0 or 1. Warp specialization (``tl.range(..., warp_specialize=True)``) is
  left out: on an H200 with Triton 3.6 its first launch did not return within 400 s.

Errors are against fp64: ``U`` as max error over max |U|, ``‖W‖²`` and the norm (assembled in
fp64 from this ``U`` and ``‖W‖²``, with the exact ``B·G`` term) as the largest relative error.
Timing: ``triton.testing.do_bench`` medians, kernels launched directly (no host dispatch).

    python benchmarks/norm_loop_layouts_study.py --json out.json

Results: ``docs/results/norm_loop_layouts_h100_2026-11-26.json`` (both layouts, H100);
``docs/results/norm_loop_tma_ws_h200_2026-11-26.txt`` is the log of an earlier form of the tma
loop (``tl.range`` with ``warp_specialize``) on an H200, cut short where warp specialization hung.
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl
from norm_main_loop_study import _main_loop_kernel, pair_squares
from triton.testing import do_bench

SHAPES = [(8192, 8192), (14336, 4096), (4096, 14336), (4096, 4096)]  # (d_out, d_in)
ALL_R = [  # SQ, BLOCK_M, BLOCK_N, SUB_K, warps, stages
    (3, 64, 128, 64, 8, 3),
    (3, 64, 128, 64, 8, 4),
    (3, 64, 128, 64, 4, 3),
    (3, 128, 128, 64, 8, 3),
    (3, 64, 128, 32, 8, 4),
    (2, 64, 128, 64, 8, 3),
    (0, 64, 128, 64, 8, 3),
    (1, 64, 128, 64, 8, 3),
]
TMA = [  # SQ, BLOCK_M, BLOCK_N, BLOCK_K, warps, stages
    (0, 128, 128, 64, 8, 4),
    (1, 128, 128, 64, 8, 4),
    (0, 128, 256, 64, 8, 3),
    (1, 128, 256, 64, 8, 3),
    (0, 256, 128, 64, 8, 3),
    (1, 256, 128, 64, 8, 3),
]


@triton.jit
def _all_r_loop_kernel(
    W, W32, A, U, WSQ, d_out, d_in, r, k_per_split, stride_wo, stride_ar,
    SQ: tl.constexpr, NB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB_K: tl.constexpr,
):  # fmt: skip
    """``U[split, rows, :r] = W[rows, split]·A[:, split]ᵀ`` in ``NB ≤ 3`` blocks of ``BLOCK_N`` columns."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    rmask = rows < d_out
    cols = tl.arange(0, BLOCK_N)
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, d_in)
    u0 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    u1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    u2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    squares = tl.zeros([BLOCK_M, SUB_K], dtype=tl.float32)
    sq_lo = tl.zeros([BLOCK_M, SUB_K // 2], dtype=tl.float32)
    sq_hi = tl.zeros([BLOCK_M, SUB_K // 2], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, SUB_K):
        ks = k0 + tl.arange(0, SUB_K)
        kmask = ks < k_hi
        w = tl.load(W + rows[:, None] * stride_wo + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        if SQ == 1:
            wf = w.to(tl.float32)
            squares += wf * wf
        if SQ == 3:  # squares from registers; the dots then take W from the same registers
            wf = w.to(tl.float32)
            squares += wf * wf
            w = tl.where(kmask[None, :], w, 0.0)
        if SQ == 2:  # a second load of W as int32 pairs
            lo2, hi2 = pair_squares(W32, rows, rmask, stride_wo, k0, k_hi, SUB_K)
            sq_lo += lo2
            sq_hi += hi2
        a_tile = A + cols[None, :] * stride_ar + ks[:, None]
        u0 = tl.dot(w, tl.load(a_tile, mask=(cols < r)[None, :] & kmask[:, None], other=0.0), u0)
        if NB > 1:
            a1 = tl.load(a_tile + BLOCK_N * stride_ar, mask=(cols + BLOCK_N < r)[None, :] & kmask[:, None], other=0.0)
            u1 = tl.dot(w, a1, u1)
        if NB > 2:
            a2 = tl.load(
                a_tile + 2 * BLOCK_N * stride_ar, mask=(cols + 2 * BLOCK_N < r)[None, :] & kmask[:, None], other=0.0
            )
            u2 = tl.dot(w, a2, u2)
    out = U + split * d_out * r + rows[:, None] * r + cols[None, :]
    tl.store(out, u0, mask=rmask[:, None] & (cols < r)[None, :])
    if NB > 1:
        tl.store(out + BLOCK_N, u1, mask=rmask[:, None] & (cols + BLOCK_N < r)[None, :])
    if NB > 2:
        tl.store(out + 2 * BLOCK_N, u2, mask=rmask[:, None] & (cols + 2 * BLOCK_N < r)[None, :])
    if SQ == 1 or SQ == 3:
        tl.store(WSQ + split * d_out + rows, tl.sum(squares, axis=1), mask=rmask)
    if SQ == 2:
        tl.store(WSQ + split * d_out + rows, tl.sum(sq_lo, axis=1) + tl.sum(sq_hi, axis=1), mask=rmask)


@triton.jit
def _tma_loop_kernel(
    w_desc, a_desc, U, WSQ, d_out, d_in, r, k_per_split,
    SQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``U[split]`` for one ``[BLOCK_M, BLOCK_N]`` tile, ``W`` and ``A`` tiles through TMA descriptors."""
    row0 = tl.program_id(1) * BLOCK_M
    col0 = tl.program_id(0) * BLOCK_N
    split = tl.program_id(2)
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, d_in)
    u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    squares = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        w = w_desc.load([row0, k0])
        u = tl.dot(w, a_desc.load([col0, k0]).T, u)
        if SQ == 1:
            wf = w.to(tl.float32)
            squares += wf * wf
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = col0 + tl.arange(0, BLOCK_N)
    tl.store(
        U + split * d_out * r + rows[:, None] * r + cols[None, :], u, mask=(rows < d_out)[:, None] & (cols < r)[None, :]
    )
    if SQ == 1 and tl.program_id(0) == 0:
        tl.store(WSQ + split * d_out + rows, tl.sum(squares, axis=1), mask=rows < d_out)


def _errors(u: torch.Tensor, wsq: torch.Tensor | None, exact: dict[str, torch.Tensor]) -> dict[str, float]:
    """``U``'s, ``‖W‖²``'s and the assembled norm's errors against fp64 (shares summed first)."""
    u = u.double().sum(0)
    errors = dict(err_u=((u - exact["u"]).abs().max() / exact["u"].abs().max()).item())
    if wsq is not None:
        wsq = wsq.double().sum(0)
        errors["err_sq"] = ((wsq - exact["sq"]) / exact["sq"]).abs().max().item()
        norm = (wsq + 2 * (exact["b"] * u).sum(1) + exact["bgb"]).clamp_min(0).sqrt()
        errors["err_norm"] = ((norm - exact["norm"]) / exact["norm"]).abs().max().item()
    return errors


def _timed(shape: str, name: str, launch, result) -> dict:
    try:
        us = 1e3 * do_bench(launch)
        launch()
        return dict(shape=shape, cfg=name, us=us, **result())
    except Exception as error:  # out of shared memory or registers for this config
        return dict(shape=shape, cfg=name, us=None, error=f"{type(error).__name__}: {str(error)[:160]}")


def run_shape(d_out: int, d_in: int, r: int, layouts: list[str]) -> list[dict]:
    from triton.tools.tensor_descriptor import TensorDescriptor

    gen = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(d_out, d_in, device="cuda", generator=gen) / d_in**0.5).bfloat16()
    a = (torch.randn(r, d_in, device="cuda", generator=gen) / d_in**0.5).bfloat16()
    b = (torch.randn(d_out, r, device="cuda", generator=gen) / r**0.5).bfloat16()
    wd, ad, bd = w.double(), a.double(), b.double()
    exact = dict(
        u=wd @ ad.T, sq=(wd**2).sum(1), b=bd, bgb=((bd @ (ad @ ad.T)) * bd).sum(1), norm=(wd + bd @ ad).norm(dim=1)
    )
    shape = f"{d_in}->{d_out}"
    w32 = w.view(torch.int32)
    rows = []
    cublas = torch.mm(w, a.T, out_dtype=torch.float32)
    rows.append(
        dict(
            shape=shape,
            cfg="cuBLAS W·Aᵀ",
            us=1e3 * do_bench(lambda: torch.mm(w, a.T, out_dtype=torch.float32)),
            **_errors(cublas[None], exact["sq"][None], exact),
        )
    )
    print(rows[-1], flush=True)

    def buffers(shares: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(shares, d_out, r, device="cuda"), torch.zeros(shares, d_out, device="cuda")

    for splits in (1, 2, 3):  # the shipped loop: chunks of two dots, squares from the same tiles
        k = triton.cdiv(triton.cdiv(d_in, splits), 128) * 128
        u, wsq = buffers(triton.cdiv(d_in, k))
        grid = (triton.cdiv(r, 128), triton.cdiv(d_out, 128), u.shape[0])

        def shipped(u=u, wsq=wsq, grid=grid, k=k):
            _main_loop_kernel[grid](
                w, w32, a, u, wsq, d_out, d_in, r, k, w.stride(0), 1, a.stride(0), 1,
                CHAIN=0, SQ=1, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, SUB_K=64, num_warps=8, num_stages=3,
            )  # fmt: skip

        rows.append(_timed(shape, f"shipped split{u.shape[0]}", shipped, lambda u=u, wsq=wsq: _errors(u, wsq, exact)))
        print(rows[-1], flush=True)
    if "all-r" in layouts:
        for sq, bm, bn, sub, warps, stages in ALL_R:
            for splits in (1, 2, 3, 4):
                k = triton.cdiv(triton.cdiv(d_in, splits), sub) * sub
                u, wsq = buffers(triton.cdiv(d_in, k))
                grid = (triton.cdiv(d_out, bm), u.shape[0])
                options = dict(SQ=sq, NB=triton.cdiv(r, bn), BLOCK_M=bm, BLOCK_N=bn, SUB_K=sub)

                def all_r(u=u, wsq=wsq, grid=grid, k=k, options=options, warps=warps, stages=stages):
                    _all_r_loop_kernel[grid](
                        w, w32, a, u, wsq, d_out, d_in, r, k, w.stride(0), a.stride(0),
                        **options, num_warps=warps, num_stages=stages,
                    )  # fmt: skip

                name = f"all-r sq{sq} {bm}x{bn}/{sub} w{warps} s{stages} split{u.shape[0]}"
                result = lambda u=u, wsq=wsq, sq=sq: _errors(u, wsq if sq else None, exact)  # noqa: E731
                rows.append(_timed(shape, name, all_r, result))
                print(rows[-1], flush=True)
    if "tma" in layouts:
        for sq, bm, bn, bk, warps, stages in TMA:
            w_desc, a_desc = TensorDescriptor.from_tensor(w, [bm, bk]), TensorDescriptor.from_tensor(a, [bn, bk])
            for splits in (1, 2, 3):
                k = triton.cdiv(triton.cdiv(d_in, splits), bk) * bk
                u, wsq = buffers(triton.cdiv(d_in, k))
                grid = (triton.cdiv(r, bn), triton.cdiv(d_out, bm), u.shape[0])
                options = dict(SQ=sq, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)

                def tma(u=u, wsq=wsq, grid=grid, k=k, options=options, warps=warps, stages=stages):
                    _tma_loop_kernel[grid](
                        w_desc, a_desc, u, wsq, d_out, d_in, r, k, **options, num_warps=warps, num_stages=stages
                    )

                name = f"tma sq{sq} {bm}x{bn}x{bk} w{warps} s{stages} split{u.shape[0]}"
                result = lambda u=u, wsq=wsq, sq=sq: _errors(u, wsq if sq else None, exact)  # noqa: E731
                rows.append(_timed(shape, name, tma, result))
                print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=384)
    parser.add_argument("--layouts", default="all-r,tma")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    layouts = args.layouts.split(",")
    rows = [row for d_out, d_in in SHAPES for row in run_shape(d_out, d_in, args.rank, layouts)]
    if args.json:
        with open(args.json, "w") as f:
            info = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
            json.dump(dict(info, rows=rows), f, indent=1)
    for shape in dict.fromkeys(row["shape"] for row in rows):
        for row in sorted((x for x in rows if x["shape"] == shape and x["us"]), key=lambda x: x["us"])[:8]:
            errors = " ".join(f"{k[4:]} {row[k]:.1e}" for k in ("err_u", "err_sq", "err_norm") if k in row)
            print(f"{shape:12s} {row['cfg']:42s} {row['us']:7.1f} µs  {errors}")


if __name__ == "__main__":
    main()
