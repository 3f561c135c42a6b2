"""The ops alone on a CUDA GPU: compose in GB/s against copy bandwidth, the factored norm against dense B·A.

Questions (``--parts``):
1. ``compose``: do the compose kernels (forward, backward) run at ≥ 80% of the card's copy bandwidth?
2. ``norm``: is the factored norm faster than the dense ``B·A`` + norm it replaces (eager and
   Inductor-compiled), with working memory ≤ 4·(d_out·r + r²) bytes + 64 MB, and how close is
   each to the fp64 dense norm (max relative error)?
3. ``small``: below which layer size, if any, does the Triton norm stop paying off against the
   plain-torch one (``ops="auto"`` in ``passes/heuristics.py``)?
4. ``lora_up``: is the LoRA up-projection with the compose in its epilogue faster than
   cuBLAS's ``h·Bᵀ`` followed by Inductor's compose, and which tiles suit it (``lora_up_config``),
   for bf16 adapters and for fp32 ones (an IEEE fp32 product, or their bf16 terms on tensor cores)?
5. ``refinement``: what does the ill-conditioned-row check cost the Triton norm, with no row
   flagged and with ``--flagged`` rows made to cancel (their dense recomputation included)?
6. ``sweep``, ``gram``, ``parts`` (tuning): which tile configuration suits the fused norm kernel
   (``norm_config``), which tiles the Gram products (``gram_plan``), and where the norm's time goes
   launch by launch.

    python benchmarks/ops.py --json ops.json                     # compose, norm, small, lora_up
    python benchmarks/ops.py --parts refinement --json refinement.json
    python benchmarks/ops.py --parts sweep,gram,parts --json sweep.json

Method: GPU time, as compiled code or CUDA graphs see it: ``inner`` back-to-back
calls are captured in one CUDA graph after warm-up, and CUDA events time --reps
replays (median and 10/90% quantiles, per call; ``timing.time_cuda_graph``). Peak MB is
max_memory_allocated during one eager call minus what was allocated before it.
``small`` and ``refinement`` also time calls launched back to back from the host
(``timing.time_back_to_back``), where the host's launches count. The JSON has the
GPU, versions and date (``timing.write_json``).
"""

from __future__ import annotations

import argparse

import torch
from torch._library.triton import set_wrap_triton_enabled

from dora_fused.kernels import compose_reference, dense_row_norm_reference, factored_row_norm_torch
from dora_fused.kernels.factored_norm import factored_row_norm_reference, factored_row_norm_triton
from dora_fused.kernels.ill_conditioned_rows import refine_ill_conditioned_rows_triton
from dora_fused.kernels.lora_up_compose import FP32_TERMS, IEEE_FP32, lora_up_compose_triton, lora_up_config
from dora_fused.kernels.products import product

from timing import peak_mb, summarize, time_back_to_back, time_cuda_graph, write_json

SHAPES = [(4096, 4096), (8192, 8192), (4096, 14336), (14336, 4096)]  # (d_in, d_out)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
compose_op = torch.ops.dora_fused.compose
compose_backward_op = torch.ops.dora_fused.compose_backward


def timed(fn, reps: int = 20, inner: int = 10, warmup: int = 3) -> dict[str, float]:
    """GPU time per call (``inner`` calls in one CUDA graph, ``reps`` replays) and the peak MB of one eager call."""
    mb = peak_mb(fn)
    return dict(summarize(time_cuda_graph(fn, calls=inner, reps=reps, warmup=warmup)), mb=mb)


def copy_bandwidth() -> float:
    x = torch.empty(2**29, dtype=torch.bfloat16, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    t = timed(lambda: y.copy_(x), inner=5)
    return 2 * x.numel() * x.element_size() / (t["ms"] * 1e-3) / 1e9


def bench_compose(tokens: int, copy_gbs: float) -> list[dict]:
    rows = []
    for d_out in (4096, 8192, 14336):
        for adapters, adt in DTYPES.items():
            gen = torch.Generator(device="cuda").manual_seed(0)
            res = torch.randn(tokens, d_out, device="cuda", generator=gen).bfloat16()
            lora = torch.randn(tokens, d_out, device="cuda", generator=gen).to(adt)
            m = (torch.rand(d_out, device="cuda", generator=gen) + 1).to(adt)
            n = torch.rand(d_out, device="cuda", generator=gen) + 1
            out_dtype = torch.promote_types(torch.bfloat16, adt)
            dy = torch.randn(tokens, d_out, device="cuda", generator=gen).to(out_dtype)
            elems = tokens * d_out
            fwd_bytes = elems * (res.element_size() + lora.element_size() + dy.element_size())
            bwd_bytes = elems * (dy.element_size() + 2 * res.element_size() + 2 * lora.element_size())
            inductor_fwd = torch.compile(compose_reference)
            cases = {
                "fwd triton": (lambda: compose_op(res, lora, m, n, None, 0.5, out_dtype), fwd_bytes),
                "fwd inductor": (lambda: inductor_fwd(res, lora, m, n, None, 0.5, out_dtype), fwd_bytes),
                "bwd triton": (lambda: compose_backward_op(dy, res, lora, m, n, None, 0.5), bwd_bytes),
            }
            for case, (fn, nbytes) in cases.items():
                t = timed(fn)
                gbs = nbytes / (t["ms"] * 1e-3) / 1e9
                rows.append(
                    dict(op="compose", case=case, d_out=d_out, adapters=adapters, **t, gbs=gbs, of_copy=gbs / copy_gbs)
                )
                print(rows[-1], flush=True)
    return rows


def _tiles(bt: int, bn: int, warps: int, stages: int, **more: int) -> dict[str, int]:
    return dict(BLOCK_T=bt, BLOCK_N=bn, GROUP_T=8, num_warps=warps, num_stages=stages, **more)


LORA_UP_TILES = {  # adapters: {name: the kernel's options besides BLOCK_R}
    torch.bfloat16: {
        "T128 N256 w8 s3": _tiles(128, 256, 8, 3),
        "T64 N128 w4 s4": _tiles(64, 128, 4, 4),
        "T128 N128 w4 s4": _tiles(128, 128, 4, 4),
        "T64 N256 w8 s3": _tiles(64, 256, 8, 3),
    },
    torch.float32: {
        "ieee T64 N64 w4 s2": _tiles(64, 64, 4, 2, PRODUCT=IEEE_FP32),
        "ieee T128 N128 w8 s2": _tiles(128, 128, 8, 2, PRODUCT=IEEE_FP32),
        "terms T64 N128 w4 s3": _tiles(64, 128, 4, 3, PRODUCT=FP32_TERMS),
        "terms T128 N128 w8 s3": _tiles(128, 128, 8, 3, PRODUCT=FP32_TERMS),
        "terms T128 N256 w8 s3": _tiles(128, 256, 8, 3, PRODUCT=FP32_TERMS),
    },
}


def bench_lora_up(tokens: int, ranks: list[int], adapter_dtypes: list[torch.dtype]) -> list[dict]:
    """``out = g·(result + s·h·Bᵀ)``, bf16 ``result``: unfused (cuBLAS, then Inductor's compose) vs the kernel.

    bf16 and fp32 adapters (PEFT's default; the kernel's IEEE fp32 product or its bf16 terms on
    tensor cores) at every rank. Timed with a bf16 output; ``err`` (max error relative to the
    largest output, against fp64) from an fp32 output, where the product's own precision shows.
    """
    rows = []
    compose = torch.compile(compose_reference)
    for adapters in adapter_dtypes:
        configs = {"default": None, **LORA_UP_TILES[adapters]}
        for r in ranks:
            for d_out in (4096, 14336):
                gen = torch.Generator(device="cuda").manual_seed(d_out + r)
                res = torch.randn(tokens, d_out, device="cuda", generator=gen).bfloat16()
                h = torch.randn(tokens, r, device="cuda", generator=gen).to(adapters)
                b = (torch.randn(d_out, r, device="cuda", generator=gen) / r**0.5).to(adapters)
                m = (torch.rand(d_out, device="cuda", generator=gen) + 1).bfloat16()
                n = torch.rand(d_out, device="cuda", generator=gen) + 1
                exact = (m.double() / n.double()) * (res.double() + 0.5 * (h.double() @ b.double().T))
                cases = {"unfused": lambda out=torch.bfloat16: compose(res, h @ b.T, m, n, None, 0.5, out)}
                for name, cfg in configs.items():
                    cfg = None if cfg is None else {**cfg, "BLOCK_R": lora_up_config(r, adapters)["BLOCK_R"]}
                    cases[name] = lambda out=torch.bfloat16, cfg=cfg: lora_up_compose_triton(
                        res, h, b, m, n, None, 0.5, out, cfg
                    )
                for case, fn in cases.items():
                    err = ((fn(torch.float32).double() - exact).abs().max() / exact.abs().max()).item()
                    t = timed(fn)
                    gbs = 2 * tokens * d_out * 2 / (t["ms"] * 1e-3) / 1e9  # bf16 result read + output written
                    adapter_name = "fp32" if adapters == torch.float32 else "bf16"
                    row = dict(op="lora_up", case=case, adapters=adapter_name, d_out=d_out, r=r, **t, gbs=gbs, err=err)
                    rows.append(row)
                    print(rows[-1], flush=True)
    return rows


def norm_inputs(d_in: int, d_out: int, r: int, adapter_dtype: torch.dtype, seed: int):
    """A bf16 ``W`` and adapters of ``adapter_dtype``, scaled so that ``W`` and ``s·B·A`` are alike in size."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    w = (torch.randn(d_out, d_in, device="cuda", generator=gen) / d_in**0.5).bfloat16()
    a = (torch.randn(r, d_in, device="cuda", generator=gen) / d_in**0.5).to(adapter_dtype)
    b = (torch.randn(d_out, r, device="cuda", generator=gen) / r**0.5).to(adapter_dtype)
    return w, a, b


def dense_norm(w, a, b, s):
    """What PEFT computes: the dense product in the adapter dtype, added to W in that dtype, then the norm."""
    return torch.linalg.vector_norm(w.to(a.dtype) + s * (b @ a), dim=1)


def bench_norm(ranks: list[int]) -> list[dict]:
    rows = []
    dense_compiled = torch.compile(dense_norm)
    for d_in, d_out in SHAPES:
        for r in ranks:
            for adapters, adt in DTYPES.items():
                w, a, b = norm_inputs(d_in, d_out, r, adt, seed=0)
                exact = dense_row_norm_reference(w.double(), a.double(), b.double(), 1.0)
                bound_mb = (4 * (d_out * r + r * r) + 64 * 2**20) / 2**20
                cases = {
                    "triton": lambda: torch.ops.dora_fused.factored_row_norm(w, a, b, 1.0),
                    "torch factored": lambda: factored_row_norm_torch(w, a, b, 1.0),
                    "dense eager": lambda: dense_norm(w, a, b, 1.0),
                    "dense inductor": lambda: dense_compiled(w, a, b, 1.0),
                }
                for case, fn in cases.items():
                    t = timed(fn, inner=3)
                    err = ((fn().double() - exact).abs() / exact).max().item()  # max relative error vs fp64
                    rows.append(
                        dict(
                            op="norm",
                            case=case,
                            shape=f"{d_in}->{d_out}",
                            r=r,
                            adapters=adapters,
                            **t,
                            err=err,
                            bound_mb=bound_mb,
                        )
                    )
                    print(rows[-1], flush=True)
    return rows


def bench_small(tokens: int) -> list[dict]:
    """Norm + compose as ``ops="auto"`` inserts them, compiled: the Triton norm vs the plain-torch norm.

    Both with Inductor's compose (``auto``'s compose). GPU time in a CUDA graph, and
    50 calls back to back launched from the host (compiled code without CUDA
    graphs: where the host's launches take longer than the GPU's work, they
    count). Each case compiles afresh without dynamic shapes: one compiled
    function for every case reached Dynamo's recompile limit and ran the later
    cases eagerly.
    """
    rows = []

    def with_ops(w, a, b, m, res, lora):
        norm = torch.ops.dora_fused.factored_row_norm(w, a, b, 0.5)
        return compose_reference(res, lora, m, norm, None, 0.5, torch.bfloat16)

    def with_torch(w, a, b, m, res, lora):
        return compose_reference(res, lora, m, factored_row_norm_torch(w, a, b, 0.5), None, 0.5, torch.bfloat16)

    for d, r in [(64, 8), (128, 16), (256, 16), (512, 16), (768, 16), (1024, 16), (1024, 64), (2048, 64)]:
        for adapters, adt in DTYPES.items():
            torch._dynamo.reset()
            compiled = {"triton": torch.compile(with_ops, dynamic=False)}
            compiled["torch"] = torch.compile(with_torch, dynamic=False)
            gen = torch.Generator(device="cuda").manual_seed(0)
            w = torch.randn(d, d, device="cuda", generator=gen).bfloat16() / d**0.5
            a = (torch.randn(r, d, device="cuda", generator=gen) / d**0.5).to(adt)
            b = (torch.randn(d, r, device="cuda", generator=gen) / r**0.5).to(adt)
            m = (torch.rand(d, device="cuda", generator=gen) + 1).to(adt)
            res = torch.randn(tokens, d, device="cuda", generator=gen).bfloat16()
            lora = torch.randn(tokens, d, device="cuda", generator=gen).to(adt)
            for case, fn in compiled.items():
                t = timed(lambda fn=fn: fn(w, a, b, m, res, lora))
                # launched from the host as compiled code runs without CUDA graphs (host time included)
                t["b2b_ms"] = summarize(
                    time_back_to_back(lambda fn=fn: fn(w, a, b, m, res, lora), calls=50, reps=20, warmup=5)
                )["ms"]
                rows.append(dict(op="small", case=case, d=d, r=r, adapters=adapters, **t))
                print(rows[-1], flush=True)
    return rows


REFINEMENT_SCALING = 2.0


def refinement_layer(d_out: int, d_in: int, r: int, adapter_dtype: torch.dtype, flagged: int):
    """A bf16 ``W`` and random adapters; with ``flagged`` > 0, that many rows cancel to 1e-4 of ``‖W_i‖``."""
    gen = torch.Generator(device="cuda").manual_seed(d_out * 31 + d_in + r)
    w = (torch.randn(d_out, d_in, device="cuda", generator=gen) / d_in**0.5).to(torch.bfloat16)
    a = torch.randn(r, d_in, device="cuda", generator=gen) / d_in**0.5
    b = torch.randn(d_out, r, device="cuda", generator=gen) / r**0.5
    if flagged:
        rows = torch.randperm(d_out, device="cuda", generator=gen)[:flagged]
        a[0] = w[rows[0]].float()
        b[rows] = 0.0
        b[rows, 0] = -(1 - 1e-4) / REFINEMENT_SCALING
        w[rows] = w[rows[0]].clone()
    return w, a.to(adapter_dtype), b.to(adapter_dtype)


def bench_refinement(ranks: list[int], flagged: int, calls: int, reps: int) -> list[dict]:
    """The ill-conditioned-row check: ``factored_row_norm`` as shipped, the check kernel alone (no row
    flagged), and the check with ``flagged`` rows recomputed densely; back to back and in CUDA graphs."""
    s = REFINEMENT_SCALING
    rows = []
    for d_out, d_in in [(4096, 4096), (8192, 8192), (14336, 4096), (4096, 14336)]:
        for r in ranks:
            for adapters, adt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                w, a, b = refinement_layer(d_out, d_in, r, adt, 0)
                norm = torch.ops.dora_fused.factored_row_norm(w, a, b, s)
                w32, a32, b32 = w.float(), a.float(), b.float()
                w_sq, lora_sq = (w32 * w32).sum(1), s**2 * ((b32 @ (a32 @ a32.T)) * b32).sum(1)

                def run_norm(w=w, a=a, b=b):
                    return torch.ops.dora_fused.factored_row_norm(w, a, b, s)

                scratch = norm.clone()

                def check(scratch=scratch, w_sq=w_sq, lora_sq=lora_sq, w=w, a=a, b=b):
                    return refine_ill_conditioned_rows_triton(scratch, w_sq, lora_sq, w, a, b, s)

                fw, fa, fb = refinement_layer(d_out, d_in, r, adt, flagged)
                f32 = [t.float() for t in (fw, fa, fb)]
                f_sq = (f32[0] * f32[0]).sum(1), s**2 * ((f32[2] @ (f32[1] @ f32[1].T)) * f32[2]).sum(1)
                f_norm = torch.ops.dora_fused.factored_row_norm(fw, fa, fb, s)

                def check_flagged(fw=fw, fa=fa, fb=fb, f_sq=f_sq, f_norm=f_norm):
                    return refine_ill_conditioned_rows_triton(f_norm.clone(), *f_sq, fw, fa, fb, s)

                row = dict(op="refinement", shape=f"{d_in}->{d_out}", r=r, adapters=adapters, flagged=flagged)
                for case, fn in (("norm", run_norm), ("check", check), ("flagged", check_flagged)):
                    row[f"{case}_b2b"] = summarize(time_back_to_back(fn, calls, reps, warmup=3))
                for case, fn in (("norm", run_norm), ("check", check)):
                    row[f"{case}_graph"] = summarize(time_cuda_graph(fn, calls=20, reps=reps))
                rows.append(row)
                print(rows[-1], flush=True)
    return rows


def bench_gram() -> list[dict]:
    """``gram_terms`` with tile plans other than ``gram_plan``'s, and the error of ``G`` against fp64."""
    from dora_fused.kernels import factored_norm as fn

    rows = []
    for d_in, adapters in [(8192, "fp32"), (14336, "fp32"), (4096, "fp32"), (8192, "bf16")]:
        a = (torch.randn(384, d_in, device="cuda") / d_in**0.5).to(DTYPES[adapters])
        a_terms, scale = fn.adapter_terms(a, torch.bfloat16)
        exact = a.double() @ a.double().T
        choices = {"default": None}
        for tiles in [(64, 64, 4), (64, 128, 4), (128, 64, 8), (128, 128, 8)]:
            choices["T{} K{} w{}".format(*tiles)] = tiles
        for case, tiles in choices.items():
            with set_wrap_triton_enabled(False):
                t = timed(lambda tiles=tiles: fn.gram_terms(a_terms, scale, 384, tiles=tiles), inner=3)
                g = fn.gram_terms(a_terms, scale, 384, tiles=tiles).double().sum(0)
            t["err"] = ((g - exact).abs().max() / exact.abs().max()).item()
            rows.append(dict(op="gram", case=case, d_in=d_in, adapters=adapters, **t))
            print(rows[-1], flush=True)
    return rows


def _cfg(bm, bn, bk, nw, st, sub=None, split=None, squares=True, cublas=False, br=32):
    """A ``_fused_norm_kernel`` config: ``split`` K shares, ``cublas``: U from a cuBLAS product."""
    cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SUB_K=sub or bk // 2, BLOCK_R=br, num_warps=nw, num_stages=st)
    if split:
        cfg["SPLIT_K"] = split  # otherwise norm_splits picks
    if not squares:
        cfg["W_SQUARES"] = False
    if cublas:
        cfg["U_FROM"] = "cublas"
    return cfg


SWEEP = [  # 16-bit adapters, r > 64
    _cfg(128, 128, 128, 8, 3, split=1),  # one program per output tile
    _cfg(128, 128, 128, 8, 3),
    _cfg(64, 128, 64, 4, 2, cublas=True),
    _cfg(64, 64, 64, 4, 2, cublas=True),
    _cfg(64, 64, 64, 4, 3, cublas=True, br=64),
]
SWEEP_TERMS = [  # fp32 adapters (three accumulators), r > 64
    _cfg(128, 64, 64, 8, 3),
    _cfg(64, 128, 64, 4, 2, cublas=True),
    _cfg(64, 64, 64, 4, 2, cublas=True),
    _cfg(64, 64, 64, 4, 3, cublas=True, br=64),
    _cfg(128, 64, 64, 8, 3, cublas=True, br=64),
    _cfg(64, 128, 64, 4, 2, cublas=True, br=64),
]
SWEEP_SMALL_R = [
    _cfg(64, 16, 256, 4, 3, split=1, br=16),
    _cfg(64, 16, 256, 4, 3, br=16),
    _cfg(64, 16, 64, 4, 2, cublas=True, br=16),
]


_SHORT = dict(
    BLOCK_M="M",
    BLOCK_N="N",
    BLOCK_K="K",
    SUB_K="sub",
    BLOCK_R="R",
    SPLIT_K="split",
    W_SQUARES="sq",
    U_FROM="U:",
    num_warps="w",
    num_stages="s",
)


def _bounds(w, a, b) -> dict[str, object]:
    """What the fused kernel competes with: cuBLAS's W·Aᵀ (one product per bf16 term of A) and a pass over W."""
    terms = [a] if a.dtype == w.dtype else [a.bfloat16()] * 3
    return {
        "cuBLAS W·Aᵀ": lambda: [torch.mm(w, t.T, out_dtype=torch.float32) for t in terms],
        "‖W‖² pass": lambda: torch.linalg.vector_norm(w, dim=1, dtype=torch.float32),
        "torch factored": lambda: factored_row_norm_torch(w, a, b, 1.0),
    }


def bench_parts() -> list[dict]:
    """The norm's launches one by one (default config), to see where its time goes."""
    from dora_fused.kernels import factored_norm as fn

    rows = []
    for (d_in, d_out), r, adapters in [
        ((8192, 8192), 384, "bf16"),
        ((8192, 8192), 384, "fp32"),
        ((14336, 4096), 384, "fp32"),
        ((8192, 8192), 16, "bf16"),
    ]:
        w, a, b = norm_inputs(d_in, d_out, r, DTYPES[adapters], seed=r)
        a_terms, scale = fn.adapter_terms(a, w.dtype)
        cases = {
            "whole op": lambda: fn.factored_row_norm_triton(w, a, b, 1.0),
            "adapter_terms": lambda: fn.adapter_terms(a, w.dtype),
            "gram_terms": lambda: fn.gram_terms(a_terms, scale, r),
            "U product (cuBLAS)": lambda: product(w, a_terms.T),
            "row_squares_triton": lambda: fn.row_squares_triton(w),
        }
        for case, f in cases.items():
            with set_wrap_triton_enabled(False):
                t = timed(f, inner=3, reps=10)
            rows.append(dict(op="sweep", shape=f"{d_in}->{d_out}", r=r, adapters=adapters, config=case, **t))
            print(rows[-1], flush=True)
    return rows


def bench_sweep() -> list[dict]:
    """Tile configurations of the fused norm, with their error against fp64, next to cuBLAS bounds."""
    rows = []
    for (d_in, d_out), r, adapters in [
        ((8192, 8192), 384, "bf16"),
        ((14336, 4096), 384, "bf16"),
        ((4096, 14336), 384, "bf16"),
        ((4096, 4096), 384, "bf16"),
        ((8192, 8192), 384, "fp32"),
        ((14336, 4096), 384, "fp32"),
        ((4096, 4096), 384, "fp32"),
        ((8192, 8192), 16, "bf16"),
        ((4096, 4096), 16, "bf16"),
        ((14336, 4096), 16, "fp32"),
    ]:
        w, a, b = norm_inputs(d_in, d_out, r, DTYPES[adapters], seed=r)
        exact = factored_row_norm_reference(w.double(), a.double(), b.double(), 1.0)
        where = dict(op="sweep", shape=f"{d_in}->{d_out}", r=r, adapters=adapters)
        for case, fn in _bounds(w, a, b).items():
            rows.append(dict(where, config=case, **timed(fn, inner=3, reps=10)))
            print(rows[-1], flush=True)
        configs = SWEEP_SMALL_R if r <= 64 else SWEEP_TERMS if adapters == "fp32" else SWEEP
        for cfg in configs:
            try:
                with set_wrap_triton_enabled(False):  # plain launches, as inside the op
                    t = timed(lambda cfg=cfg: factored_row_norm_triton(w, a, b, 1.0, config=cfg), inner=3, reps=10)
                    got = factored_row_norm_triton(w, a, b, 1.0, config=cfg)
                t["err"] = ((got.double() - exact).abs() / exact).max().item()
            except Exception as error:  # out of shared memory / registers for this config
                t = dict(ms=float("nan"), error=type(error).__name__)
            rows.append(dict(where, config=cfg, **t))
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--ranks", default="16,384")
    parser.add_argument(
        "--parts",
        default="compose,norm,small,lora_up",
        help="any of compose,norm,small,lora_up,refinement,sweep,gram,parts",
    )
    parser.add_argument("--lora-up-adapters", default="bf16,fp32", help="lora_up: adapter dtypes, of bf16,fp32")
    parser.add_argument("--flagged", type=int, default=16, help="refinement: rows made to cancel")
    parser.add_argument("--calls", type=int, default=50, help="refinement: calls back to back per timing")
    parser.add_argument("--reps", type=int, default=20, help="refinement: timings per case")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    parts = args.parts.split(",")
    ranks = [int(r) for r in args.ranks.split(",")]
    copy_gbs = copy_bandwidth()
    print(f"copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
    rows: list[dict] = []
    if "parts" in parts:
        rows += bench_parts()
    if "sweep" in parts:
        rows += bench_sweep()
    if "gram" in parts:
        rows += bench_gram()
    if "compose" in parts:
        rows += bench_compose(args.tokens, copy_gbs)
    if "norm" in parts:
        rows += bench_norm(ranks)
    if "small" in parts:
        rows += bench_small(512)
    if "lora_up" in parts:
        names = {"bf16": torch.bfloat16, "fp32": torch.float32}
        rows += bench_lora_up(args.tokens, ranks, [names[a] for a in args.lora_up_adapters.split(",")])
    if "refinement" in parts:
        rows += bench_refinement(ranks, args.flagged, args.calls, args.reps)
    print(write_json(args.json, rows, copy_gbs=copy_gbs, tokens=args.tokens))
    for r in rows:
        print(_line(r))


def _line(r: dict) -> str:
    """One result row as a line of text."""
    if r["op"] == "compose":
        return (
            f"compose {r['case']:13s} d_out={r['d_out']:5d} {r['adapters']}: {r['ms']:.3f} ms "
            f"{r['gbs']:.0f} GB/s ({100 * r['of_copy']:.0f}% of copy)"
        )
    if r["op"] == "norm":
        return (
            f"norm {r['case']:15s} {r['shape']:11s} r={r['r']:3d} {r['adapters']}: {r['ms']:.3f} ms "
            f"{r['mb']:.0f} MB (bound {r['bound_mb']:.0f}), error {r['err']:.1e}"
        )
    if r["op"] == "lora_up":
        return (
            f"lora_up {r['case']:20s} {r.get('adapters', 'bf16')} d_out={r['d_out']:5d} r={r['r']:3d}: "
            f"{1000 * r['ms']:.1f} us "
            f"{r['gbs']:.0f} GB/s err {r['err']:.1e}"
        )
    if r["op"] == "small":
        where = f"{r['case']:6s} d={r['d']:4d} r={r['r']:2d} {r['adapters']}"
        return f"small {where}: {1000 * r['ms']:.1f} us in a CUDA graph, {1000 * r['b2b_ms']:.1f} us back to back"
    if r["op"] == "gram":
        return f"gram {r['case']:14s} d_in={r['d_in']:5d} {r['adapters']}: {1000 * r['ms']:.1f} us err {r['err']:.1e}"
    if r["op"] == "refinement":
        us = {k: 1000 * r[k]["ms"] for k in ("norm_b2b", "check_b2b", "flagged_b2b", "norm_graph", "check_graph")}
        return (
            f"refinement {r['shape']:11s} r={r['r']:3d} {r['adapters']}: back to back norm {us['norm_b2b']:.1f} us, "
            f"check {us['check_b2b']:.1f} us, {r['flagged']} rows flagged {us['flagged_b2b']:.1f} us; "
            f"CUDA graphs: norm {us['norm_graph']:.1f} us, check {us['check_graph']:.1f} us"
        )
    cfg = r["config"]
    if isinstance(cfg, dict):
        cfg = " ".join(f"{_SHORT[k]}{v}" for k, v in cfg.items())
    err = f" err {r['err']:.1e}" if "err" in r else ""
    return f"sweep {r['shape']:11s} r={r['r']:3d} {r['adapters']}: {r['ms']:.3f} ms{err}  {cfg}"


if __name__ == "__main__":
    main()
