"""FSDP2 training step of an 8B-shaped Llama with DoRA over N GPUs: PEFT eager vs torch.compile vs dora_fused vs LoRA.

Question: with the model sharded by FSDP2 (``fully_shard`` on each decoder layer and on the root,
``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``), one process per GPU, what does a
DoRA training step cost per GPU, in time and in peak memory, under each way of running it, and how
far is it from plain LoRA of the same rank?

    torchrun --nproc-per-node 8 benchmarks/fsdp2.py --out fsdp2.json                  # every contender, r = 16, 384
    torchrun --nproc-per-node 1 benchmarks/fsdp2.py --out fsdp2.json --ranks 384      # one GPU
    torchrun --nproc-per-node 8 benchmarks/fsdp2.py --out f.json --contender dora_fused   # one contender, here
    torchrun --nproc-per-node 2 benchmarks/fsdp2.py --dry-run --out /tmp/fsdp2.json   # CPU, gloo, tiny: seconds

Contenders:
    peft_eager     PEFT DoRA as is
    torch_compile  PEFT DoRA, torch.compile with the default backend (dora_fused is not imported in
                   its process, so PEFT's DoRA breaks the graph in every layer, as for any user)
    dora_fused     PEFT DoRA, torch.compile(backend="dora_fused")
    lora           the same model with use_dora=False, torch.compile with the default backend

Without ``--contender`` each process torchrun started is a driver: for each rank r and contender
it starts one child process per GPU (same RANK, WORLD_SIZE and LOCAL_RANK, a fresh port agreed
among the drivers), waits for it (killed after ``--timeout`` s) and moves on together with the
other drivers. Each child measures one contender at one r in a fresh process: no compiled code,
Dynamo state or allocator state carries over. Rank 0 writes one JSON (``meta``: GPU, GPU count,
versions, date, settings; ``rows``: one per contender and r) and prints a table last.

Method:
- Model: ``LlamaForCausalLM`` with Llama-3-8B's shapes (hidden 4096, MLP 14336, 32 heads, 8 KV
  heads, vocabulary 128256; ``--layers`` decoder layers, ``--vocab``), random init on each GPU from
  one seed, bf16 parameters, no KV cache. PEFT on every linear layer of the decoder layers
  (``lora_alpha = r``), adapters in fp32 (PEFT's default ``autocast_adapter_dtype``),
  ``init_lora_weights=False`` and, for DoRA, magnitudes moved off the weights' row norms by a seeded
  ±50%: the adapter is not an identity.
- Sharding: ``fully_shard`` on each decoder layer, then on the root, with
  ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` (``--param-dtype none``: no cast,
  the fp32 adapters are then gathered and computed in fp32). FSDP2 casts every parameter of a
  group to ``param_dtype``: under the default policy the adapters are computed in bf16, and the
  optimizer updates their fp32 shards.
- Compile: each decoder layer compiled in place after ``fully_shard`` (``layer.compile()``), or
  the whole model (``--compile whole``).
- Step: forward with labels (cross-entropy inside the model), backward, AdamW step on the adapter
  shards, ``zero_grad``. ``--batch`` × ``--seq`` tokens per GPU (default 1 × 4096), different on
  each rank. ``--warmup`` untimed steps (the first compiles), then ``--steps`` timed ones.
- Time: CUDA events around each step, synchronized after each (``time.perf_counter`` on the CPU);
  median and 10/90% quantiles per rank; the row's ``ms`` is rank 0's, ``ms_max`` the slowest rank's
  median. ``tokens_per_s_per_gpu`` = tokens per GPU / median step time.
- Memory: ``torch.cuda.max_memory_allocated()`` over the timed steps (``peak_gb``, the largest over
  the ranks), and what was allocated before them (``resident_gb``: weight and adapter shards,
  optimizer state).
- ``loss0``: the first step's loss averaged over the ranks (DoRA contenders compute the same
  function; LoRA another).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist

from timing import PeakMemory, environment, summarize, time_calls

CONTENDERS = ("peft_eager", "torch_compile", "dora_fused", "lora")
SEED = 0
INPUT_SEED = 1234
MAGNITUDE_SPREAD = 0.5  # m ← m·(1 + spread·u), u ~ U(-1, 1)
LR = 1e-5

LLAMA_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
)
TINY = dict(  # --tiny: odd toy sizes, as in tests/helpers.py
    hidden_size=48,
    intermediate_size=88,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=12,
    max_position_embeddings=64,
)
TINY_RANKS = {16: 2, 384: 8}  # --tiny: r as the adapter's rank of the toy model
TARGETS = r".*layers\.\d+\.(self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


# --- one contender at one rank, in this process --------------------------------------------------


def device_of(args) -> torch.device:
    if args.device == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def adapter_rank(args, r: int) -> int:
    return TINY_RANKS.get(r, 4) if args.tiny else r


def build_model(args, contender: str, r: int, device: torch.device) -> torch.nn.Module:
    """The PEFT model, the same on every rank (one seed), before sharding."""
    import transformers
    from peft import LoraConfig, get_peft_model

    shapes = TINY if args.tiny else LLAMA_8B
    config = transformers.LlamaConfig(
        **shapes,
        vocab_size=args.vocab,
        num_hidden_layers=args.layers,
        tie_word_embeddings=False,
        use_cache=False,
    )
    torch.manual_seed(SEED)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            base = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    rank = adapter_rank(args, r)
    lora = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=TARGETS,
        use_dora=contender != "lora",
        init_lora_weights=False,
        lora_dropout=0.0,
    )
    with torch.device(device):
        model = get_peft_model(base, lora, autocast_adapter_dtype=True)  # fp32 adapters on the bf16 base
    gen = torch.Generator(device).manual_seed(SEED + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                u = torch.rand(param.shape, generator=gen, device=device, dtype=torch.float32) * 2 - 1
                param.copy_((param.float() * (1 + MAGNITUDE_SPREAD * u)).to(param.dtype))
    return model.train()


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    return model.get_base_model().model.layers


def shard(model: torch.nn.Module, args, device: torch.device) -> None:
    """``fully_shard`` each decoder layer, then the root, under the mixed-precision policy of ``--param-dtype``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    param_dtype = torch.bfloat16 if args.param_dtype == "bf16" else None
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def backend_for(contender: str, args):
    """What ``torch.compile`` gets; None for eager. dora_fused is imported only where it is measured."""
    if contender == "peft_eager":
        return None
    if contender == "dora_fused":
        import dora_fused

        return "dora_fused" if args.inner == "inductor" else dora_fused.backend(inner=args.inner)
    return args.inner


def compiled(model: torch.nn.Module, backend, args):
    """The callable a step runs: each sharded layer compiled in place, the whole model, or the model."""
    if backend is None:
        return model
    if args.compile == "whole":
        return torch.compile(model, backend=backend)
    for layer in decoder_layers(model):
        layer.compile(backend=backend)
    return model


def inputs(args, device: torch.device) -> dict[str, torch.Tensor]:
    """This rank's token ids and labels, from a seeded CPU generator."""
    gen = torch.Generator().manual_seed(INPUT_SEED + dist.get_rank())
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    return dict(input_ids=ids.to(device), labels=labels.to(device))


def dynamo_counts() -> dict[str, int]:
    stats = torch._dynamo.utils.counters
    return dict(graphs=stats["stats"]["unique_graphs"], graph_breaks=sum(stats["graph_break"].values()))


def rewrite_counts() -> dict[str, int]:
    """Distinct DoRA modules rewritten / left alone in the records (layers sharing a graph count once)."""
    if "dora_fused" not in sys.modules:
        return {}
    reports = sys.modules["dora_fused"].reports()
    return dict(
        rewritten=len({name for r in reports for name in r.rewritten}),
        left_alone=len({name for r in reports for name, _ in r.skipped}),
    )


def measure(args, contender: str, r: int, device: torch.device) -> dict[str, object]:
    """One rank's measurements of one contender at rank ``r``."""
    started = time.perf_counter()
    model = build_model(args, contender, r, device)
    dora_modules = sum(len(getattr(m, "lora_magnitude_vector", ())) > 0 for m in model.modules())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shard(model, args, device)
    fn = compiled(model, backend_for(contender, args), args)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    batch = inputs(args, device)
    losses: list[torch.Tensor] = []

    def step() -> None:
        loss = fn(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not losses:
            losses.append(loss.detach().float())

    build_s = time.perf_counter() - started
    warmup_s = []
    for _ in range(args.warmup):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        warmup_s.append(time.perf_counter() - start)
    with PeakMemory() as memory:
        times, _ = time_calls(step, args.steps)
    stats = summarize(times)
    loss0 = losses[0].clone()
    dist.all_reduce(loss0)
    row = dict(
        stats,
        times=times,
        build_s=build_s,
        first_step_s=warmup_s[0] if warmup_s else None,
        warmup_s=warmup_s,
        loss0=loss0.item() / dist.get_world_size(),
        dora_modules=dora_modules,
        trainable_params=trainable,
        **dynamo_counts(),
        **rewrite_counts(),
    )
    if memory.peak is not None:
        row.update(peak_gb=(memory.resident + memory.peak) / 2**30, resident_gb=memory.resident / 2**30)
    return row


def run_contender(args, contender: str, r: int, device: torch.device) -> dict[str, object]:
    """Measure on every rank; rank 0 gets the row (per-rank numbers under ``ranks``), the others None."""
    try:
        mine = dict(status="ok", **measure(args, contender, r, device))
    except Exception as error:  # e.g. out of memory: recorded; the other ranks fail at their next collective
        traceback.print_exc()
        mine = dict(status="error", error=f"{type(error).__name__}: {error}"[:2000])
    gathered: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if dist.get_rank() != 0:
        return None
    return summarize_ranks(args, contender, r, gathered)


def summarize_ranks(args, contender: str, r: int, per_rank: list[dict]) -> dict[str, object]:
    first = per_rank[0]
    row = dict(contender=contender, r=r, adapter_rank=adapter_rank(args, r), world_size=len(per_rank))
    row.update(settings(args), status=first["status"], ranks=per_rank)
    if any(p["status"] != "ok" for p in per_rank):
        row.update(status="error", error=next(p["error"] for p in per_rank if p["status"] != "ok"))
        return row
    row.update({k: first[k] for k in ("ms", "q10", "q90", "loss0", "dora_modules", "trainable_params")})
    row.update({k: first.get(k) for k in ("first_step_s", "graphs", "graph_breaks", "rewritten", "left_alone")})
    row["ms_max"] = max(p["ms"] for p in per_rank)
    row["tokens_per_s_per_gpu"] = args.batch * args.seq / (first["ms"] / 1e3)
    if first.get("peak_gb") is not None:
        row["peak_gb"] = max(p["peak_gb"] for p in per_rank)
        row["resident_gb"] = max(p["resident_gb"] for p in per_rank)
    return row


def settings(args) -> dict[str, object]:
    keys = ("layers", "vocab", "batch", "seq", "compile", "param_dtype", "inner", "device", "tiny", "warmup", "steps")
    return {k: getattr(args, k) for k in keys}


def init_group(args, backend: str) -> None:
    kwargs = {}
    if backend == "nccl":
        torch.cuda.set_device(device_of(args))
        kwargs["device_id"] = device_of(args)
    dist.init_process_group(backend, timeout=timedelta(seconds=args.pg_timeout), **kwargs)


def run_here(args) -> None:
    """``--contender``: measure it at each of ``--ranks`` in this process (Dynamo reset between)."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    device = device_of(args)
    if device.type == "cpu":
        torch.set_num_threads(1)
    init_group(args, "nccl" if device.type == "cuda" else "gloo")
    rows = []
    try:
        for r in args.rank_list:
            fresh_compile_state()
            row = run_contender(args, args.contender, r, device)
            if row is not None:
                row["env"] = environment()
                rows.append(row)
    finally:
        dist.destroy_process_group()
    if dist_rank() != 0:
        return
    if args.row_out:
        with open(args.row_out, "w") as f:
            json.dump(rows, f)
    else:
        write_results(args, rows)
    if any(row["status"] != "ok" for row in rows):
        sys.exit(1)


def fresh_compile_state() -> None:
    """Forget compiled code, Dynamo's counters and dora_fused's records: the next r compiles as anew."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    if "dora_fused" in sys.modules:
        sys.modules["dora_fused"].clear_reports()


def dist_rank() -> int:
    return int(os.environ.get("RANK", "0"))


# --- the driver: one child process per GPU for each contender and r ------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def child_command(args, contender: str, r: int, row_out: str) -> list[str]:
    command = [sys.executable, os.path.abspath(__file__), "--contender", contender, "--ranks", str(r)]
    command += ["--row-out", row_out, "--layers", str(args.layers), "--vocab", str(args.vocab)]
    command += ["--batch", str(args.batch), "--seq", str(args.seq), "--warmup", str(args.warmup)]
    command += ["--steps", str(args.steps), "--compile", args.compile, "--param-dtype", args.param_dtype]
    command += ["--inner", args.inner, "--device", args.device, "--pg-timeout", str(args.pg_timeout)]
    return command + (["--tiny"] if args.tiny else [])


def run_child(args, contender: str, r: int, port: int, row_out: str) -> str | None:
    """Run this rank's child for (contender, r) to its end or ``--timeout``; why it failed, or None."""
    env = dict(os.environ, MASTER_PORT=str(port), PYTHONUNBUFFERED="1")
    env["TORCHELASTIC_USE_AGENT_STORE"] = "False"  # the children's rank 0 hosts their store, on the new port
    proc = subprocess.Popen(child_command(args, contender, r, row_out), env=env, start_new_session=True)
    try:
        code = proc.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return f"timeout: killed after {args.timeout:.0f} s"
    finally:  # also when torchrun stops this driver (SIGTERM): the child never outlives it
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return None if code == 0 else f"exit code {code}"


def exit_on_sigterm() -> None:
    """torchrun stops its processes with SIGTERM: exit through ``finally`` blocks, which stop the children."""

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def drive(args) -> None:
    """Each torchrun process: run the children of every (r, contender) in step with the other drivers."""
    exit_on_sigterm()
    # gloo for the drivers: they never touch a GPU (the children get all of its memory)
    dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout + args.pg_timeout))
    rank = dist.get_rank()
    work = tempfile.mkdtemp(prefix="fsdp2_bench_")
    rows: list[dict] = []
    try:
        for r in args.rank_list:
            for contender in args.contender_list:
                port = [free_port() if rank == 0 else None]
                dist.broadcast_object_list(port, src=0)
                row_out = os.path.join(work, f"{contender}-r{r}.json")
                print(f"[rank {rank}] {contender} r={r}: starting", flush=True)
                failure = run_child(args, contender, r, port[0], row_out)
                dist.barrier()
                if rank == 0:
                    rows += child_rows(args, contender, r, row_out, failure)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        write_results(args, rows)


def child_rows(args, contender: str, r: int, row_out: str, failure: str | None) -> list[dict]:
    if os.path.exists(row_out):
        with open(row_out) as f:
            rows = json.load(f)
        if rows:
            return rows
    row = dict(contender=contender, r=r, adapter_rank=adapter_rank(args, r), world_size=dist_world())
    row.update(settings(args), status="error", error=failure or "no result written (see the log above)")
    return [row]


def dist_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


# --- results --------------------------------------------------------------------------------------


def write_results(args, rows: list[dict]) -> None:
    env = next((row.pop("env") for row in rows if "env" in row), None) or {}
    for row in rows:
        row.pop("env", None)
    meta = dict(env, gpu_count=dist_world() if args.device == "cuda" else 0, world_size=dist_world())
    meta.update(argv=" ".join(sys.argv), settings=settings(args))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(table(meta, rows), flush=True)


def table(meta: dict, rows: list[dict]) -> str:
    """Markdown table: per r, each contender's step time, throughput, peak memory and ratio to LoRA."""
    where = f"{meta.get('gpu') or 'CPU'} × {meta['world_size']}"
    versions = f"torch {meta.get('torch')}, triton {meta.get('triton')}, peft {meta.get('peft')}"
    lines = [f"FSDP2, {where}; {versions}, transformers {meta.get('transformers')}; {meta.get('date')}", ""]
    lines.append(
        "| r | contender | step ms (q10–q90) | tokens/s/GPU | peak GB/GPU | vs LoRA | first step s | rewritten |"
    )
    lines.append("|---|---|---|---|---|---|---|---|")
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"| {row['r']} | {row['contender']} | {row['status']}: {row['error'][:80]} | | | | | |")
            continue
        lora = next((x for x in rows if x["r"] == row["r"] and x["contender"] == "lora" and x["status"] == "ok"), None)
        ratio = f"{row['ms'] / lora['ms']:.2f}×" if lora else ""
        peak = f"{row['peak_gb']:.2f}" if row.get("peak_gb") is not None else "–"
        first = f"{row['first_step_s']:.1f}" if row.get("first_step_s") is not None else "–"
        done = f"{row['rewritten']}/{row['dora_modules']}" if row.get("rewritten") is not None else ""
        lines.append(
            f"| {row['r']} | {row['contender']} | {row['ms']:.1f} ({row['q10']:.1f}–{row['q90']:.1f}) | "
            f"{row['tokens_per_s_per_gpu']:.0f} | {peak} | {ratio} | {first} | {done} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="results JSON (written by rank 0)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help=f"driver: any of {CONTENDERS}")
    parser.add_argument("--contender", choices=CONTENDERS, help="measure only this one, in this process")
    parser.add_argument("--ranks", default="16,384", help="adapter ranks r, comma-separated")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (4; --tiny 2)")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary (128256, Llama-3's; --tiny 97)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per GPU (1; --tiny 2)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (4096; --tiny 16)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps, the first compiles (3; --tiny 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (10; --tiny 2)")
    parser.add_argument("--compile", choices=("per-layer", "whole"), default="per-layer")
    parser.add_argument("--param-dtype", choices=("bf16", "none"), default="bf16", help="FSDP2's param_dtype")
    parser.add_argument("--inner", default="inductor", help="compiler of the compiled contenders (aot_eager on CPU)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: gloo instead of NCCL")
    parser.add_argument("--tiny", action="store_true", help="toy sizes")
    parser.add_argument("--dry-run", action="store_true", help="--device cpu --tiny --inner aot_eager: the flow on CPU")
    parser.add_argument("--timeout", type=float, default=1800, help="driver: seconds before a child is killed")
    parser.add_argument("--pg-timeout", type=float, default=900, help="seconds a collective may wait")
    parser.add_argument("--row-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device, args.tiny, args.inner = "cpu", True, "aot_eager"
    defaults = dict(layers=(2, 4), vocab=(97, 128256), batch=(2, 1), seq=(16, 4096), warmup=(1, 3), steps=(2, 10))
    for key, (tiny, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else full)
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first step compiles)")
    args.rank_list = [int(r) for r in args.ranks.split(",") if r]
    args.contender_list = [c for c in args.contenders.split(",") if c]
    unknown = set(args.contender_list) - set(CONTENDERS)
    if unknown:
        parser.error(f"unknown contenders {sorted(unknown)}")
    if "RANK" not in os.environ:
        parser.error("launch with torchrun: torchrun --nproc-per-node N benchmarks/fsdp2.py ...")
    return args


def main() -> None:
    args = parse_args()
    if args.contender:
        run_here(args)
    else:
        drive(args)


if __name__ == "__main__":
    main()
