"""Where the quantized norm's time goes, and which tiles suit its main loop (CUDA, bitsandbytes).

Question: for one bitsandbytes layer (NF4 with double quantization, blocksize 64, or
LLM.int8()), what does ``quantized_row_norm`` (the norm read from the packed weight)
cost next to the dense path it replaces (bitsandbytes' dequantize, then the factored
norm of the dense weight), how much of it is the products kernel, and which
``QuantizedNormPlan`` tiles (rows per block, warps, pipeline stages, the aligned tile
reader or the per-element one, codes decoded by selects or read from a table) make that
kernel fastest?

    python benchmarks/quantized_norm.py --json quantized_norm.json
    python benchmarks/quantized_norm.py --sweep none --json q.json     # the timings, no tile sweep

Method: GPU time as compiled code sees it, ``timing.time_cuda_graph`` (10 calls captured in
one CUDA graph, median of 20 replays, ms per call). Every row also says how far the norm is
from the fp64 norm of bitsandbytes' dequantized weight (max relative error). Rows:

- ``dequantize``: bitsandbytes' dequantize of the whole weight (what PEFT's DoRA runs first);
- ``dense_norm``: ``factored_row_norm`` of that dense weight;
- ``dequantize+dense_norm``: both, the norm's cost on the dense path;
- ``packed``: ``quantized_row_norm`` as it runs (the plan's own tiles);
- ``products[...]``: the products kernel alone at each swept tile option.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from timing import summarize, time_cuda_graph, write_json

SHAPES = ((14336, 4096), (4096, 14336), (4096, 4096))  # d_out, d_in: Llama-8B's q/o, gate/up, down
RANKS = (64, 16)
SWEEP = {  # (block_m, num_warps, num_stages, aligned, decode)
    "full": [(m, w, st, True, d) for m in (64, 128) for w in (4, 8) for st in (2, 3) for d in ("select", "table")]
    + [(64, w, 2, False, d) for w in (4, 8) for d in ("select", "table")],
    "none": [],
}


def _layer(quant_type: str, d_out: int, d_in: int, r: int, adapters: torch.dtype, seed: int = 0):
    import bitsandbytes.functional as F

    gen = torch.Generator(device="cuda").manual_seed(seed)
    dense = torch.randn(d_out, d_in, generator=gen, device="cuda").to(torch.bfloat16) * 0.02
    lora_A = (torch.randn(r, d_in, generator=gen, device="cuda") / d_in**0.5).to(adapters)
    lora_B = (torch.randn(d_out, r, generator=gen, device="cuda") * 0.02).to(adapters)
    if quant_type == "int8":
        packed, scb, _ = F.int8_vectorwise_quant(dense.half())
        return dict(packed=packed, scales=scb, blocksize=0, dtype=torch.float32,
                    dequantize=lambda: F.int8_vectorwise_dequant(packed, scb)), lora_A, lora_B  # fmt: skip
    packed, state = F.quantize_4bit(dense, blocksize=64, compress_statistics=True, quant_type=quant_type)
    scales = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return dict(packed=packed, scales=scales, blocksize=64, dtype=torch.bfloat16,
                dequantize=lambda: F.dequantize_4bit(packed, state)), lora_A, lora_B  # fmt: skip


def _max_relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).abs() / expected.abs().clamp_min(1e-30)).max().item()


def _products(qn, quant_type, layer, lora_A, plan, shape):
    """A closure running the products kernel alone with ``plan``'s tiles."""
    from dora_fused.kernels.common import adapter_terms

    tile = qn._tile_dtype(quant_type, layer["dtype"], lora_A.dtype)
    a_terms, a_scale = adapter_terms(lora_A, tile, None)
    weight = (layer["packed"], layer["scales"], quant_type, layer["blocksize"], shape, lora_A.shape[0])
    return lambda: qn.quantized_products(*weight, a_terms, a_scale, plan, tile)


def run(args) -> list[dict]:
    from dora_fused.kernels import quantized_norm as qn
    from dora_fused.kernels.common import multiprocessors
    from dora_fused.kernels.factored_norm import dense_row_norm_reference, factored_row_norm

    rows, started = [], time.time()
    cases = [(q, s, r, a) for q in args.quant_types.split(",") for s in SHAPES for r in RANKS
             for a in (torch.float32, torch.bfloat16)]  # fmt: skip
    for quant_type, (d_out, d_in), r, adapters in cases:
        layer, lora_A, lora_B = _layer(quant_type, d_out, d_in, r, adapters)
        weight = layer["dequantize"]()
        exact = dense_row_norm_reference(weight.double(), lora_A.double(), lora_B.double(), 2.0)
        key = dict(quant_type=quant_type, d_out=d_out, d_in=d_in, r=r, adapters=str(adapters).split(".")[-1])
        shape = (d_out, d_in)

        def packed():
            packed_weight = (layer["packed"], layer["scales"], quant_type, layer["blocksize"])
            return qn.quantized_row_norm(*packed_weight, shape, weight.dtype, lora_A, lora_B, 2.0)

        contenders = {
            "dequantize": layer["dequantize"],
            "dense_norm": lambda: factored_row_norm(weight, lora_A, lora_B, 2.0),
            "dequantize+dense_norm": lambda: factored_row_norm(layer["dequantize"](), lora_A, lora_B, 2.0),
            "packed": packed,
        }
        for name, fn in contenders.items():
            out = fn()
            error = None if name == "dequantize" else _max_relative(out, exact)
            rows.append(dict(key, what=name, error=error, **summarize(time_cuda_graph(fn))))
            print(rows[-1], flush=True)
        sms = multiprocessors(torch.device("cuda"))
        base = qn.quantized_norm_plan(d_out, d_in, r, weight.dtype, adapters, sms, quant_type, 64)
        options = SWEEP[args.sweep] if quant_type != "int8" and adapters == torch.float32 else []
        for block_m, warps, stages, aligned, decode in options:
            if time.time() - started > args.budget:
                break
            plan = dataclasses.replace(
                base, block_m=block_m, num_warps=warps, num_stages=stages, aligned=aligned, decode=decode,
                row_tiles=-(-d_out // block_m),
            )  # fmt: skip
            tiles = dict(block_m=block_m, num_warps=warps, num_stages=stages, aligned=aligned, decode=decode)
            try:
                launch = _products(qn, quant_type, layer, lora_A, plan, shape)
                launch()
                timed = summarize(time_cuda_graph(launch))
            except Exception as error:  # out of shared memory or registers: recorded
                timed = dict(failed=f"{type(error).__name__}: {str(error)[:120]}")
            rows.append(dict(key, what="products", plan=tiles, default=plan == base, **timed))
            print(rows[-1], flush=True)
    return rows


def table(rows: list[dict]) -> str:
    timed_parts = ("dequantize", "dense_norm", "dequantize+dense_norm", "packed")
    lines = ["| layer | r | adapters | " + " | ".join(timed_parts) + " | packed ÷ dense path | best products (tiles) |"]
    lines.append("|---" * 9 + "|")
    groups: dict[tuple, dict] = {}
    for row in rows:
        key = (row["quant_type"], row["d_out"], row["d_in"], row["r"], row["adapters"])
        groups.setdefault(key, {}).setdefault(row["what"], []).append(row)
    for (quant_type, d_out, d_in, r, adapters), by in groups.items():
        ms = {k: v[0]["ms"] for k, v in by.items() if "ms" in v[0]}
        timed = [p for p in by.get("products", []) if "ms" in p]
        best = min(timed, key=lambda p: p["ms"]) if timed else None
        best_text = f"{best['ms'] * 1e3:.0f} µs {best['plan']}" if best else "-"
        ratio = ms.get("packed", float("nan")) / ms.get("dequantize+dense_norm", float("nan"))
        cells = [f"{ms.get(k, float('nan')) * 1e3:.0f} µs" for k in timed_parts]
        layer = f"| {quant_type} {d_out}×{d_in} | {r} | {adapters} | "
        lines.append(layer + " | ".join(cells) + f" | {ratio:.2f} | {best_text} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="results file")
    parser.add_argument("--quant-types", default="nf4,int8")
    parser.add_argument("--sweep", choices=tuple(SWEEP), default="full")
    parser.add_argument("--budget", type=float, default=240.0, help="s; no sweep point starts after")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.exit(1, "needs a CUDA GPU and bitsandbytes\n")
    rows = run(args)
    write_json(args.json, rows)
    print(table(rows))


if __name__ == "__main__":
    main()
