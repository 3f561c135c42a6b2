"""Shared memory the tensor-core kernels need on an H100, compiled on the CPU (no GPU needed).

Triton compiles for a target it is told, here sm_90, given the specializations a
launch on an aligned layer gets: 16-byte-aligned pointers, integer arguments
divisible by 16, and unit strides as the constant 1 (Triton specializes
arguments equal to 1). Those are what let it pipeline the loads through shared
memory, and the pipeline is what can outgrow the 227 KB a block may use on an
H100 or H200: the norm's config for 33-64 columns with fp32 adapters needed
360448 bytes and failed at launch on an H200, and this reproduces that number
(Triton 3.6 and 3.9).

Run as a script (``python tests/sm90_resources.py``) it prints one JSON object,
``{case: bytes}``, for every config class the launchers use. It must run
without ``TRITON_INTERPRET`` (the interpreter's kernels cannot be compiled), so
``test_launch_resources.py`` runs it in a subprocess.
"""

from __future__ import annotations

import inspect
import json

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dora_fused.kernels import factored_norm as fn  # the modules (kernels/__init__ exports functions)
from dora_fused.kernels import gram
from dora_fused.kernels import quantized_norm as qn
from dora_fused.kernels.lora_up_compose import IEEE_FP32, _lora_up_compose_kernel, lora_up_config
from dora_fused.kernels.norm_plan import norm_plan

H100_SHARED_BYTES = 232448  # the most dynamic shared memory one block may use on an H100 / H200 (227 KB)
SM90 = GPUTarget("cuda", 90, 32)
_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def sm90_shared_bytes(
    kernel: object,
    *,
    pointers: dict[str, str],
    constexprs: dict[str, object],
    unit: tuple[str, ...] = (),
    floats: tuple[str, ...] = (),
    num_warps: int = 4,
    num_stages: int = 3,
) -> int:
    """Bytes of shared memory ``kernel`` needs for sm_90 with these constants, on aligned tensors.

    ``pointers``: element type of each pointer argument (``"bf16"``, ``"fp32"``, …);
    ``unit``: integer arguments equal to 1 (unit strides); ``floats``: fp32 scalars;
    every other non-constexpr argument is an integer divisible by 16.
    ``num_stages`` 3 is Triton's default.
    """
    names = list(inspect.signature(kernel.fn).parameters)
    constants = {**constexprs, **dict.fromkeys(unit, 1)}
    signature = {}
    for name in names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
        else:
            signature[name] = "fp32" if name in floats else "i32"
    aligned = [n for n in names if signature[n] not in ("constexpr", "fp32")]
    source = ASTSource(
        kernel,
        signature,
        constexprs={(names.index(n),): v for n, v in constants.items()},
        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned},
    )
    compiled = triton.compile(source, target=SM90, options=dict(num_warps=num_warps, num_stages=num_stages))
    return compiled.metadata.shared


def _norm_bytes(weight: str, adapters: str, constexprs: dict[str, object], **launch: int) -> int:
    """``_fused_norm_kernel`` with these constants, for a ``weight``-dtype ``W`` and ``adapters``-dtype ``B``."""
    pointers = dict(W=weight, A=weight, A_SCALE="fp32", B=adapters, G="bf16", U="fp32", WSQ="fp32", PART="fp32")
    pointers["LSQ"] = "fp32"
    pointers["NORM"] = "fp32"
    return sm90_shared_bytes(
        fn._fused_norm_kernel,
        pointers=pointers,
        constexprs=constexprs,
        unit=("stride_wi", "stride_ak", "stride_br"),
        floats=("scaling",),
        **launch,
    )


def _norm_case(weight: torch.dtype, adapters: torch.dtype, r: int) -> int:
    a_count = 1 if adapters == weight else 3
    plan = norm_plan(4096, 4096, r, a_count, multiprocessors=132)
    options = dict(plan.kernel)
    launch = dict(num_warps=options.pop("num_warps"), num_stages=options.pop("num_stages", 3))
    constexprs = dict(
        options,
        A_TERMS=a_count,
        A_SCALED=weight == torch.float16 and a_count == 3,
        B_TERMS=fn._TERMS[adapters],
        U_IN=plan.u_from_cublas,
        W_SQUARES=plan.fused_squares,
        FINISH=plan.finish_in_kernel,
    )
    return _norm_bytes(_DTYPES[weight], _DTYPES[adapters], constexprs, **launch)


def _gram_case(dtype: torch.dtype, r: int, count: int) -> int:
    plan = gram.gram_plan(r, 4096, count)
    constexprs = dict(MAX_ORDER=min(2, 2 * count - 2), BLOCK=plan.block, BLOCK_K=plan.block_k)
    pointers = dict(X=_DTYPES[dtype], P="fp32", AFTER=_DTYPES[dtype])
    return sm90_shared_bytes(
        gram._pair_products_kernel,
        pointers=pointers,
        constexprs=constexprs,
        unit=("stride_xk",),
        num_warps=plan.num_warps,
    )


def _lora_up_case(dtype: torch.dtype, adapters: torch.dtype, r: int, **overrides: int) -> int:
    options = lora_up_config(r, adapters) | overrides
    launch = dict(num_warps=options.pop("num_warps"), num_stages=options.pop("num_stages", 3))
    t, a = _DTYPES[dtype], _DTYPES[adapters]
    pointers = dict(RESULT=t, HIDDEN=a, B=a, MAG=t, NORM="fp32", BIAS=t, OUT=t)
    return sm90_shared_bytes(
        _lora_up_compose_kernel,
        pointers=pointers,
        constexprs=dict(options, HAS_BIAS=True, G_GIVEN=False),
        unit=("stride_hr", "stride_br"),
        floats=("scaling",),
        **launch,
    )


def _quantized_case(quant_type: str, weight: torch.dtype, adapters: torch.dtype, r: int) -> int:
    """``_quantized_products_kernel`` as ``quantized_norm_plan`` launches it for a 4096² layer."""
    plan = qn.quantized_norm_plan(4096, 4096, r, weight, adapters, 132, quant_type)
    tile = qn._tile_dtype(quant_type, weight, adapters)
    pointers = dict(Q="u8", SCALES="fp32", CODE="fp32", A=_DTYPES[tile], A_SCALE="fp32", U="fp32", WSQ="fp32")
    constexprs = dict(
        FORMAT=int(quant_type == "int8"),
        W_DTYPE=qn._TL_DTYPES[tile],
        A_TERMS=plan.a_count,
        A_SCALED=tile == torch.float16 and plan.a_count == 3,
        ALIGNED=plan.aligned,
        DECODE=qn._decode(quant_type, plan.decode),
        BLOCK_M=plan.block_m,
        BLOCK_N=plan.block_n,
        BLOCK_K=plan.block_k,
        SUB_K=plan.sub_k,
    )
    return sm90_shared_bytes(
        qn._quantized_products_kernel,
        pointers=pointers,
        constexprs=constexprs,
        unit=("stride_ak",),
        num_stages=plan.num_stages,
    )


def _canary() -> int:
    """The norm's former config for 64 columns of fp32 adapters (three A terms): 360448 bytes on the H200."""
    constexprs = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=256, SUB_K=128, BLOCK_R=16, A_TERMS=3, A_SCALED=False)
    constexprs.update(B_TERMS=3, U_IN=False, W_SQUARES=True, FINISH=True)
    return _norm_bytes("bf16", "fp32", constexprs)


def cases() -> dict[str, int]:
    """Shared bytes of every config class the launchers use, and of the canary."""
    out = {"canary: former 64-column fp32-adapter norm config": _canary()}
    pairs = [
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float16),
        (torch.float16, torch.float32),
    ]
    for weight, adapters in pairs:
        for r in (16, 32, 64, 384):
            out[f"norm W {_DTYPES[weight]} adapters {_DTYPES[adapters]} r={r}"] = _norm_case(weight, adapters, r)
    for dtype in (torch.bfloat16, torch.float16):
        for r, count in ((16, 1), (16, 3), (384, 1), (384, 3)):
            out[f"gram {_DTYPES[dtype]} r={r} terms={count}"] = _gram_case(dtype, r, count)
        for r in (16, 384):
            out[f"lora_up {_DTYPES[dtype]} r={r}"] = _lora_up_case(dtype, dtype, r)
        for r in (8, 64, 384):
            out[f"lora_up {_DTYPES[dtype]} adapters fp32 r={r}"] = _lora_up_case(dtype, torch.float32, r)
            ieee = _lora_up_case(dtype, torch.float32, r, PRODUCT=IEEE_FP32)
            out[f"lora_up {_DTYPES[dtype]} adapters fp32 in IEEE fp32 r={r}"] = ieee
    for quant_type, weight in (("nf4", torch.bfloat16), ("fp4", torch.float16), ("int8", torch.bfloat16)):
        for adapters in (weight, torch.float32):
            for r in (8, 16, 64, 384):
                name = f"quantized norm {quant_type} W {_DTYPES[weight]} adapters {_DTYPES[adapters]} r={r}"
                out[name] = _quantized_case(quant_type, weight, adapters, r)
    return out


if __name__ == "__main__":
    print(json.dumps(cases()))
