"""QDoRA: DoRA on a bitsandbytes-quantized base, PEFT eager vs torch.compile vs dora_fused, and QLoRA.

Llama-3-8B-shaped decoder layers (hidden 4096, MLP 14336, 32 heads / 8 KV
heads, vocab 32000), 2-4 of them, batch 1, 4096 tokens, bf16 compute; the
decoder's linear layers quantized by bitsandbytes (NF4 with double
quantization, QLoRA's setting, or LLM.int8() with threshold 6.0), PEFT's
default fp32 adapters on all of them. Matrix:

- cases: NF4 r = 16, NF4 r = 64, int8 r = 8 (FinLoRA's published 8-bit DoRA setting);
- modes: ``train`` (forward, backward and an AdamW step of the adapters) and
  ``prefill`` (a forward without gradients, eval mode);
- contenders: ``peft_eager`` (PEFT's QDoRA as written), ``torch_compile``
  (``torch.compile`` with Inductor), ``dora_fused`` (``backend="dora_fused"``),
  ``qlora`` (plain LoRA of the same rank on the same base, ``torch.compile``).

Each (case, contender) runs in a subprocess of its own (both modes, prefill
first), so one contender's allocations and compiled code never reach
another's timings. ``--parallel N`` runs them in batches of N processes at
once: their compiles overlap, their timed parts take turns
(benchmarks/turns.py). A process times a mode (its warm-up and timed calls)
only while every other process of the batch waits, none compiling or running;
the train graphs compile after every process has timed prefill. So every
``--parallel`` gives clean times and peaks; only ``first_call_s`` (the
compiling call, wall time) grows with it, N compiles sharing the CPU cores.
A process takes 3-4 minutes on its own, most of it Inductor's compiles.
Times are medians of CUDA-event timed calls with 10/90% quantiles, after
warm-up calls (the first compiles); peak memory is the most allocated above
what was resident before the timed calls (model, optimizer state).
For int8, the compiled contenders set
``torch._dynamo.config.capture_dynamic_output_shape_ops = True``: LLM.int8()'s
outlier columns have a data-dependent count, which Dynamo otherwise breaks the
graph at (docs/patterns.md).

Results: a JSON file (``--out``) with the GPU, versions and date, one row per
(case, contender, mode); a table is printed last. ``--quick`` runs a reduced
matrix (NF4 r = 16 only, 2 decoder layers, 3 timed calls; about 4 minutes on one
H100, most of it Inductor's compiles).

    python benchmarks/qdora.py --quick                                   # ~4 min
    python benchmarks/qdora.py --cases nf4-r16,nf4-r64 --out qdora_nf4.json   # one case ~4 min at --parallel 4
    python benchmarks/qdora.py --cases int8-r8 --out qdora_int8.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import turns  # benchmarks/turns.py: the worker processes' turns on the device

CASES = {  # name: (scheme, rank)
    "nf4-r16": ("bnb-nf4-dq", 16),
    "nf4-r64": ("bnb-nf4-dq", 64),
    "int8-r8": ("bnb-int8", 8),
}
QUICK_CASES = ("nf4-r16",)
CONTENDERS = ("peft_eager", "torch_compile", "dora_fused", "qlora")
MODES = ("prefill", "train")
LLAMA_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=32000,
    max_position_embeddings=8192,
)


# --- worker: one (case, contender) in its own process ------------------------------------------------------------


SMOKE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, vocab_size=101)


def build_model(scheme: str, rank: int, layers: int, dora: bool, smoke: bool = False):
    """The quantized Llama on the GPU (``smoke``: a toy one on the CPU) with PEFT (Q)DoRA or LoRA on its linears."""
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    device = "cpu" if smoke else "cuda"
    config = LlamaConfig(**{**LLAMA_8B, **(SMOKE if smoke else {})}, num_hidden_layers=layers)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    for layer in model.model.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if not isinstance(child, torch.nn.Linear):
                    continue
                dims = (child.in_features, child.out_features)
                if scheme == "bnb-int8":
                    module = bnb.nn.Linear8bitLt(*dims, bias=False, has_fp16_weights=False, threshold=6.0)
                    module.weight = bnb.nn.Int8Params(child.weight.data.cpu(), requires_grad=False)
                else:
                    module = bnb.nn.Linear4bit(
                        *dims, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4"
                    )
                    if smoke:  # bitsandbytes' CPU inference layout needs sizes the toy model lacks (as in the tests)
                        module.support_avx512bf16_for_cpu = False
                    module.weight = bnb.nn.Params4bit(
                        child.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4"
                    )
                setattr(parent, name, module.to(device))  # quantizes
                del child
    if scheme == "bnb-int8":
        model.is_loaded_in_8bit = True
    else:
        model.is_loaded_in_4bit = True
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, use_dora=dora, lora_dropout=0.0)
    if not smoke:
        torch.cuda.empty_cache()
    return get_peft_model(model, lora)


def run_worker(case: str, contender: str, args) -> list[dict]:
    import torch

    import dora_fused

    from timing import PeakMemory, summarize, synchronize, time_calls

    scheme, rank = CASES[case]
    if scheme == "bnb-int8" and contender != "peft_eager":
        torch._dynamo.config.capture_dynamic_output_shape_ops = True  # LLM.int8()'s outlier columns (docstring)
    model = build_model(scheme, rank, args.layers, dora=contender != "qlora", smoke=args.smoke)
    inner = "aot_eager" if args.smoke else "inductor"  # the smoke run checks the harness, not Inductor
    backend = {"torch_compile": inner, "qlora": inner, "dora_fused": dora_fused.backend(inner=inner)}.get(contender)
    run = torch.compile(model, backend=backend) if backend else model
    device = "cpu" if args.smoke else "cuda"
    vocab = (SMOKE if args.smoke else LLAMA_8B)["vocab_size"]
    ids = torch.randint(0, vocab, (1, args.seq), device=device, generator=torch.Generator(device).manual_seed(1))
    if scheme == "bnb-int8":  # bitsandbytes' first 8-bit forward moves CB/SCB into the layer's state: settle it
        with torch.no_grad():
            model(input_ids=ids[:, :8])
    rows = []
    for mode in MODES:
        if backend and mode == "train":
            torch._dynamo.reset()  # the training graphs compiled on their own
        dora_fused.clear_reports()
        if mode == "prefill":
            model.eval()

            def step():
                with torch.no_grad():
                    run(input_ids=ids)

        else:
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=1e-5, foreach=True)

            def step():
                run(input_ids=ids, labels=ids).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        start = time.perf_counter()
        step()  # compiles
        synchronize()
        first_s = time.perf_counter() - start
        # the device to this process alone (with --turns): nobody else compiles or runs meanwhile
        with turns.device_turn(args.turns, f"{case}:{contender}:{mode}") as window, PeakMemory() as memory:
            times, _ = time_calls(step, args.repeats, warmup=args.warmup)
        reports = dora_fused.reports()
        records = [m for r in reports for m in r.modules]
        rows.append(
            dict(
                case=case,
                scheme=scheme,
                rank=rank,
                contender=contender,
                mode=mode,
                layers=args.layers,
                tokens=args.seq,
                first_call_s=first_s,
                turn_start=window[0],  # wall clock: the timed part's window, apart from every other process's
                turn_end=window[1],
                peak_mb=memory.peak_mb,
                resident_mb=memory.resident / 2**20 if memory.resident is not None else None,
                graphs=len(reports) if contender == "dora_fused" else None,  # compiled in this mode
                rewritten=sum(m.status == "rewritten" for m in records) if contender == "dora_fused" else None,
                packed_norms=sum("dora_fused.quantized_row_norm" in m.ops for m in records),
                **summarize(times),
            )
        )
        print(json.dumps(rows[-1]), flush=True)
        if mode == "train":
            del optimizer
    return rows


# --- driver ----------------------------------------------------------------------------------------------------


def _table(rows: list[dict]) -> str:
    """ms and peak MB per contender, then dora_fused against QLoRA, torch.compile and PEFT eager."""
    header = "  fused/qlora  mem/qlora  mem/compile  eager/fused"
    lines = [f"{'case':9} {'mode':8} " + " ".join(f"{c:>22}" for c in CONTENDERS) + header]
    by_key = {(r["case"], r["mode"], r["contender"]): r for r in rows if "ms" in r}
    for case in dict.fromkeys(r["case"] for r in rows):
        for mode in MODES:
            cells, got = [], {c: by_key.get((case, mode, c)) for c in CONTENDERS}
            for c in CONTENDERS:
                r = got[c]
                peak = f"{r['peak_mb']:7.0f}" if r and r["peak_mb"] is not None else f"{'-':>7}"
                cells.append(f"{r['ms']:8.1f} ms {peak} MB" if r else f"{'-':>22}")
            fused, qlora, compiled, eager = (got[c] for c in ("dora_fused", "qlora", "torch_compile", "peft_eager"))

            def ratio(a, b, key):
                return f"{a[key] / b[key]:.2f}" if a and b and a[key] is not None and b[key] else "-"

            lines.append(
                f"{case:9} {mode:8} " + " ".join(cells)
                + f"  {ratio(fused, qlora, 'ms'):>11}  {ratio(fused, qlora, 'peak_mb'):>9}"
                + f"  {ratio(fused, compiled, 'peak_mb'):>11}  {ratio(eager, fused, 'ms'):>11}"
            )  # fmt: skip
    return "\n".join(lines)


def _environment() -> dict:
    from timing import environment

    info = environment()
    for name in ("bitsandbytes", "torchao"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    return info


def _worker_command(args, case: str, contender: str) -> list[str]:
    command = [sys.executable, os.path.abspath(__file__), "--worker", f"{case}:{contender}", "--turns"]
    command += ["--layers", str(args.layers), "--seq", str(args.seq)]
    return command + ["--repeats", str(args.repeats), "--warmup", str(args.warmup)] + ["--smoke"] * args.smoke


def _collect(case: str, contender: str, outcome: turns.Outcome) -> list[dict]:
    """The worker's rows (its stdout lines that start with "{"); a row with its output's tail if it failed."""
    rows = [json.loads(line) for line in outcome.kept]
    if outcome.returncode != 0 or len(rows) < len(MODES):
        status = "timeout" if outcome.timed_out else f"exit {outcome.returncode}"
        rows.append(dict(case=case, contender=contender, status=status, tail=outcome.tail[-15:]))
        print("\n".join(outcome.tail[-15:]), file=sys.stderr)
    return rows


def run_all(args) -> None:
    cases = QUICK_CASES if args.quick else tuple(args.cases.split(","))
    contenders = tuple(args.contenders.split(","))
    results = {"meta": {**_environment(), "args": vars(args)}, "rows": []}
    pending = [(case, contender) for case in cases for contender in contenders]
    size = max(1, args.parallel)
    for first in range(0, len(pending), size):
        batch = pending[first : first + size]
        commands = [_worker_command(args, case, contender) for case, contender in batch]
        outcomes = turns.run_batch(commands, time.monotonic() + args.timeout, keep=lambda line: line.startswith("{"))
        for (case, contender), outcome in zip(batch, outcomes, strict=True):
            results["rows"] += _collect(case, contender, outcome)
            status = "timeout" if outcome.timed_out else f"exit {outcome.returncode}"
            print(f"{case} {contender}: {status} after {outcome.seconds:.0f} s", file=sys.stderr, flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
    print(json.dumps(results["meta"]))
    print(_table(results["rows"]))


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="results JSON")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {tuple(CASES)}")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help=f"comma-separated, of {CONTENDERS}")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (4; --quick 2)")
    parser.add_argument("--seq", type=int, default=4096, help="tokens")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (10; --quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls after the compiling one (2; --quick 1)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=900,
        help="seconds per batch of --parallel processes (they run together, waiting on each other's turns); "
        "past it the batch's processes are killed",
    )
    parser.add_argument("--quick", action="store_true", help="NF4 r=16 only, 2 layers, 3 calls")
    parser.add_argument(
        "--parallel",
        type=int,
        default=None,
        help="processes at once (4; --smoke 2): their compiles overlap; each times while the others wait",
    )
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: checks the harness in a minute")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--turns", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke and args.parallel is None:
        args.parallel = 2  # two processes at once: the smoke run exercises the turns too
    for name, full, quick in (("layers", 4, 2), ("repeats", 10, 3), ("warmup", 2, 1), ("parallel", 4, 4)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.smoke:
        args.layers, args.seq, args.repeats, args.warmup = 1, 16, 2, 0
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        case, contender = args.worker.split(":")
        run_worker(case, contender, args)
    else:
        run_all(args)


if __name__ == "__main__":
    main()
