"""Inference: DoRA with a fixed adapter (frozen) and a live one, against LoRA and the merged model.

Question: what does a DoRA adapter cost at inference, per prefill, per decoded token and per
served request, when the adapter is fixed (``dora_fused.backend(frozen=True)``: norms, or whole
weights, computed once) and when it is live (the norm computed per call, or read from PEFT's
cache), next to plain LoRA of the same rank and the merged model?

    python benchmarks/inference.py --out results.json                  # every part (GPU, long: split it)
    python benchmarks/inference.py --parts prefill --cases layer8192 --out r.json
    python benchmarks/inference.py --parts decode --cases llama4 --contenders frozen_norm,lora,merged --out r.json
    python benchmarks/inference.py --parts server --out r.json         # needs litserve
    python benchmarks/inference.py --quick --out r.json                # a reduced run, about 5 minutes
    python benchmarks/inference.py --parts guard                       # the per-call check's host cost (CPU is fine)
    python benchmarks/inference.py --tiny --out /tmp/t.json            # the same code at toy sizes, on the CPU
    python benchmarks/inference.py --table r.json                      # print the tables of a results file

Parts and cases:
    prefill  ``layer8192``: one 8192² Linear; ``llama4``: 4 Llama-3-8B-shaped decoder layers
             (hidden 4096, MLP 14336, 32 heads / 8 KV, vocabulary 32000); ``llama32``: all 32 layers.
             4096 tokens, batch 1, no gradient, logits of the last position only.
    decode   ``generate`` with a static cache, ``CompileConfig(mode="reduce-overhead")`` (CUDA graphs),
             greedy, prompt 512, 128 new tokens, batch 1 and 8 (``llama4``, ``llama32``). The prefill goes
             through the compiled call too (``prefill_chunk_size`` = the prompt; ``--eager-prefill``: as
             transformers runs it by default, eagerly). Time to first token: ``generate`` of one token;
             decode tokens/s: ``batch × (new - 1) / (t(new) - t(1))``. ``--profile``: per token, host wall
             against GPU busy time, kernels, graph launches, the host's top functions (``decode_profile.py``).
             ``--skip-guards``: the timed calls under ``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``
             (Dynamo checks only the guards that tell its compiled graphs apart), as a server with fixed
             shapes may run once warm; the frozen graphs' own parameter check still runs on every call.
    server   ``examples/serve_litserve.py`` on 127.0.0.1 (``llama4`` saved to a temporary folder), loaded by
             ``--clients`` concurrent clients sending ``--requests`` requests in all (prompt 128, 16 new
             tokens, no logits in the answer): requests/s, p50/p99 latency.
    guard    the host time of the per-call parameter check of a frozen graph (``frozen.Variant.stale``),
             on a 4- and a 32-layer model at toy sizes (the check's cost depends on the count of tensors).

Contenders (each in its own process, on the same model, weights and inputs; with ``--parallel N``,
N prefill or decode processes at once: their compiles overlap, and each times while every other
waits, none compiling or running, ``benchmarks/turns.py``; each row records its timed windows):
    peft_eager       PEFT as is
    inductor         torch.compile(model), dora_fused not imported (PEFT's DoRA breaks the graph per layer)
    dora_fused       torch.compile(model, backend="dora_fused"): live, the norm computed per call
    dora_cached      the same with PEFT's ENABLE_DORA_CACHING: the norm read from PEFT's cache
    frozen_norm      dora_fused.backend(frozen=True): each norm computed once (LoRA's price, no extra memory)
    frozen_merged    dora_fused.backend(frozen=True, merge_budget_bytes=∞): whole weights merged once
    lora             the same model with use_dora=False, torch.compile(model)
    merged           merge_and_unload() of the DoRA model, torch.compile(model)

Model: random init on the GPU (seeded), bf16 base, PEFT DoRA r = 384 on every linear layer of the
language model, PEFT's default fp32 adapters, ``init_lora_weights=False`` and magnitudes moved off
‖W + s·B·A‖ by a seeded ±50%. Times: CUDA events, median and 10/90% quantiles after warm-up calls;
peak memory above the resident weights. Results: one JSON row per (part, case, contender), appended
to --out as soon as it is measured (with GPU, versions and date); the tables are printed last.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch

import turns  # benchmarks/turns.py: the worker processes' turns on the device
from decode_profile import profile_decode
from timing import PeakMemory, environment, summarize, synchronize, time_calls

REPO = Path(__file__).resolve().parent.parent
PARTS = ("prefill", "decode", "server", "guard")
CONTENDERS = (
    "peft_eager",
    "inductor",
    "dora_fused",
    "dora_cached",
    "frozen_norm",
    "frozen_merged",
    "lora",
    "merged",
)
CASES = {
    "prefill": ("layer8192", "llama4", "llama32"),
    "decode": ("llama4", "llama32"),
    "server": ("llama4",),
    "guard": ("llama4", "llama32"),
}
DEFAULT_CASES = {"prefill": ("layer8192", "llama4"), "decode": ("llama4",), "server": ("llama4",), "guard": ()}
SERVER_CONTENDERS = ("peft_eager", "dora_fused", "frozen_norm", "frozen_merged")
LLAMA8B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
)
TINY = dict(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=88,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=12,
    max_position_embeddings=256,
)
RANK, TOKENS = 384, 4096
INF = 1 << 62


# --- models ------------------------------------------------------------------------------------------


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def build(case: str, contender: str, tiny: bool) -> torch.nn.Module:
    """The case's model for one contender: DoRA (or LoRA) adapters, seeded, bf16 base, fp32 adapters, eval."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    rank = 8 if tiny else RANK
    with torch.device(_device()):
        if case == "layer8192":
            width = 64 if tiny else 8192
            base = torch.nn.Sequential(torch.nn.Linear(width, width, bias=False)).to(torch.bfloat16)
            targets: object = ["0"]
        else:
            from transformers import LlamaConfig, LlamaForCausalLM

            layers = (2 if case == "llama4" else 3) if tiny else (4 if case == "llama4" else 32)
            config = LlamaConfig(**(TINY if tiny else LLAMA8B), num_hidden_layers=layers)
            config.eos_token_id = None  # generate never stops early
            previous = torch.get_default_dtype()
            torch.set_default_dtype(torch.bfloat16)  # built in bf16: no fp32 copy of 8B parameters on the way
            try:
                base = LlamaForCausalLM(config)
            finally:
                torch.set_default_dtype(previous)
            targets = "all-linear"
        use_dora = contender != "lora"
        lora = LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=targets, use_dora=use_dora, init_lora_weights=False
        )
        model = get_peft_model(base, lora)
    if use_dora:
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    noise = torch.rand(param.shape, generator=gen, dtype=torch.float64) * 2 - 1
                    param.mul_((1 + 0.5 * noise).to(param.device, param.dtype))
    model = model.eval()
    if contender == "merged":
        model = model.merge_and_unload()
    return model


def backend_of(contender: str, tiny: bool) -> object | None:
    """The ``torch.compile`` backend of a contender (None: eager)."""
    if contender == "peft_eager":
        return None
    if contender in ("inductor", "lora", "merged"):
        return "aot_eager" if tiny else "inductor"
    import dora_fused

    inner = "aot_eager" if tiny else "inductor"
    if contender in ("dora_fused", "dora_cached"):
        return dora_fused.backend(inner=inner)
    budget = INF if contender == "frozen_merged" else 0
    return dora_fused.backend(inner=inner, frozen=True, merge_budget_bytes=budget)


def _prepare(contender: str) -> None:
    if contender != "inductor":  # dora_fused registers PEFT's tracing polyfill on import: not for plain Inductor
        import dora_fused  # noqa: F401
    if contender == "dora_cached":
        from peft.tuners.lora import dora

        dora.ENABLE_DORA_CACHING = True


def _records() -> dict[str, object]:
    if "dora_fused" not in sys.modules:
        return {}
    import dora_fused

    modules = [m for r in dora_fused.reports() for m in r.modules]
    frozen = {kind: sum(m.frozen == kind for m in modules) for kind in ("norm", "merged")}
    return dict(
        rewritten=sum(m.status == "rewritten" for m in modules), frozen=frozen, graphs=len(dora_fused.reports())
    )


# --- prefill ---------------------------------------------------------------------------------------


def run_prefill(case: str, contender: str, args: argparse.Namespace) -> dict[str, object]:
    _prepare(contender)
    model = build(case, contender, args.tiny)
    backend = backend_of(contender, args.tiny)
    call = model if backend is None else torch.compile(model, backend=backend)
    gen = torch.Generator().manual_seed(1)
    tokens = 64 if args.tiny else TOKENS
    if case == "layer8192":
        width = model.base_model.model[0].in_features if hasattr(model, "base_model") else model[0].in_features
        x = torch.randn(1, tokens, width, generator=gen).to(_device(), torch.bfloat16)

        def step() -> object:
            return call(x)
    else:
        ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=gen).to(_device())

        def step() -> object:
            return call(input_ids=ids, use_cache=False, logits_to_keep=1).logits

    start = time.perf_counter()
    with torch.no_grad():
        step()
        synchronize()
        first = time.perf_counter() - start
        with turns.device_turn(args.turns, f"prefill {case} {contender}") as window, PeakMemory() as memory:
            times, _ = time_calls(step, args.repeats, args.warmup)
    return dict(
        **summarize(times), tokens=tokens, peak_mb=memory.peak_mb, first_call_s=first, turns=[window], **_records()
    )


# --- decode ----------------------------------------------------------------------------------------


def run_decode(case: str, contender: str, args: argparse.Namespace) -> dict[str, object]:
    from transformers import CompileConfig

    _prepare(contender)
    model = build(case, contender, args.tiny)
    backend = backend_of(contender, args.tiny)
    prompt = 16 if args.tiny else args.prompt
    new = 6 if args.tiny else args.new_tokens
    rows = []
    windows: list[list[float]] = []  # the timed parts' wall-clock windows, one per batch size
    for batch in args.batches:
        torch._dynamo.reset()  # each batch size compiles as in a fresh process (static shapes, its own CUDA graphs)
        gen = torch.Generator().manual_seed(2)
        ids = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=gen).to(_device())
        kwargs: dict[str, object] = dict(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            cache_implementation="static",
            max_cache_len=prompt + new,  # one cache size for every call: no recompile between 1 and `new` tokens
            pad_token_id=0,
        )
        if backend is None:
            kwargs["disable_compile"] = True
        else:
            config = CompileConfig(backend=backend, mode="default" if args.tiny else "reduce-overhead")
            config._compile_all_devices = args.tiny  # on the CPU, generate compiles only when told to
            kwargs["compile_config"] = config
            if not args.eager_prefill:
                kwargs["prefill_chunk_size"] = prompt  # the prefill through the compiled call as well

        def generate(n: int) -> object:
            return model.generate(**kwargs, max_new_tokens=n, min_new_tokens=n)

        start = time.perf_counter()
        with torch.no_grad():
            out = generate(new)
            synchronize()
            first = time.perf_counter() - start
            assert out.shape[1] == prompt + new, out.shape
            if args.skip_guards:  # every graph compiled first (PEFT's cache: the prefill that reads it is the third)
                generate(new)
                synchronize()
            stance = torch.compiler.set_stance("default", skip_guard_eval_unsafe=args.skip_guards)
            with turns.device_turn(args.turns, f"decode {case} {contender} batch {batch}") as window, stance:
                ttft, _ = time_calls(lambda: generate(1), args.decode_repeats, 1)
                full, _ = time_calls(lambda: generate(new), args.decode_repeats, 1)
                profile = profile_decode(generate, new) if args.profile else None
            windows.append(window)
        t1, tn = statistics.median(ttft), statistics.median(full)
        rows.append(
            dict(
                batch=batch,
                ttft_ms=t1,
                total_ms=tn,
                decode_tokens_per_s=batch * (new - 1) / (tn - t1) * 1e3 if tn > t1 else None,
                tokens_per_s=batch * new / tn * 1e3,
                first_call_s=first,
                **({"profile": profile} if profile else {}),
            )
        )
    return dict(
        prompt=prompt,
        new_tokens=new,
        batches=rows,
        eager_prefill=args.eager_prefill,
        skip_guards=args.skip_guards,
        turns=windows,
        **_records(),
    )


# --- server ------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, payload: dict) -> dict:
    data = json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def _wait_ready(url: str, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        time.sleep(1.0)
    raise RuntimeError(f"the server was not ready after {timeout:.0f} s")


def save_server_model(root: str, tiny: bool) -> tuple[str, str]:
    """The llama4 case's base model and DoRA adapter, saved as a user would have them."""
    model = build("llama4", "dora_fused", tiny)
    model.get_base_model().save_pretrained(f"{root}/base")
    model.save_pretrained(f"{root}/adapter")
    return f"{root}/base", f"{root}/adapter"


def run_server(contender: str, model_dir: str, adapter_dir: str, args: argparse.Namespace) -> dict[str, object]:
    """Start the example server for one contender, load it from ``--clients`` threads, stop it."""
    port = _free_port()
    command = [sys.executable, str(REPO / "examples" / "serve_litserve.py"), "--port", str(port)]
    command += ["--model", model_dir, "--adapter", adapter_dir, "--dtype", "bfloat16"]
    command += ["--inner", "aot_eager"] if args.tiny else []
    command += {"peft_eager": ["--eager"], "frozen_norm": ["--frozen"]}.get(contender, [])
    command += ["--frozen", "--merge-budget-bytes", str(INF)] if contender == "frozen_merged" else []
    log_path = Path(tempfile.mkdtemp()) / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        start = time.perf_counter()
        _wait_ready(f"http://127.0.0.1:{port}/health", server, timeout=args.timeout)
        ready_s = time.perf_counter() - start
        prompt, new = (8, 4) if args.tiny else (args.server_prompt, args.server_new_tokens)
        vocab = TINY["vocab_size"] if args.tiny else LLAMA8B["vocab_size"]
        gen = torch.Generator().manual_seed(3)
        prompts = [torch.randint(0, vocab, (prompt,), generator=gen).tolist() for _ in range(args.requests)]
        url = f"http://127.0.0.1:{port}/predict"
        for p in prompts[: args.clients]:  # warm-up: one request per client
            _post(url, {"input_ids": p, "max_new_tokens": new, "logits": False})
        latencies: list[float] = []
        lock = threading.Lock()
        queue = list(prompts)

        def client() -> None:
            while True:
                with lock:
                    if not queue:
                        return
                    p = queue.pop()
                t = time.perf_counter()
                answer = _post(url, {"input_ids": p, "max_new_tokens": new, "logits": False})
                assert len(answer["tokens"]) == new
                with lock:
                    latencies.append((time.perf_counter() - t) * 1e3)

        wall = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - wall
        q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
        return dict(
            requests=len(latencies),
            clients=args.clients,
            prompt=prompt,
            new_tokens=new,
            requests_per_s=len(latencies) / wall,
            p50_ms=statistics.median(latencies),
            p99_ms=q[98],
            ready_s=ready_s,
        )
    except Exception as error:
        raise RuntimeError(f"{error}\n--- server log ---\n{log_path.read_text()[-3000:]}") from None
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


# --- guard -----------------------------------------------------------------------------------------


def run_guard(case: str, args: argparse.Namespace) -> dict[str, object]:
    """Host time of ``Variant.stale`` per call, on a toy-sized model with the case's count of DoRA modules."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import dora_fused

    torch.manual_seed(0)
    layers = 4 if case == "llama4" else 32
    base = LlamaForCausalLM(LlamaConfig(**TINY, num_hidden_layers=layers))
    lora = LoraConfig(r=4, target_modules="all-linear", use_dora=True, init_lora_weights=False)
    model = get_peft_model(base, lora).eval()
    captured: list[tuple[object, ...]] = []
    compiled = torch.compile(model, backend=dora_fused.backend(inner="eager", frozen=True))
    ids = torch.randint(0, TINY["vocab_size"], (1, 8))
    with torch.no_grad():
        compiled(input_ids=ids)
    folded = next(iter(dora_fused.frozen._live))
    variant = folded.current
    inner = variant.compiled
    variant.compiled = lambda *a: captured.append(a) or inner(*a)
    with torch.no_grad():
        compiled(input_ids=ids)
    call_args = captured[-1]
    assert not variant.stale(call_args)
    calls = 2000
    times = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(calls):
            variant.stale(call_args)
        times.append((time.perf_counter() - start) / calls * 1e6)
    tensors = len(variant.input_refs) + len(variant.attr_refs)
    us = statistics.median(times)
    return dict(us_per_call=us, ns_per_tensor=us / tensors * 1e3, tensors=tensors, modules=len(variant.values))


# --- orchestration -----------------------------------------------------------------------------------


def worker(spec: dict[str, object], args: argparse.Namespace) -> dict[str, object]:
    part, case, contender = spec["part"], spec["case"], spec["contender"]
    if part == "prefill":
        return run_prefill(case, contender, args)
    if part == "decode":
        return run_decode(case, contender, args)
    if part == "guard":
        return run_guard(case, args)
    if part == "save":
        base, adapter = save_server_model(str(spec["root"]), args.tiny)
        return dict(base=base, adapter=adapter)
    raise ValueError(part)


def _child_args(args: argparse.Namespace) -> list[str]:
    flags = ["--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    flags += ["--decode-repeats", str(args.decode_repeats), "--prompt", str(args.prompt)]
    flags += ["--new-tokens", str(args.new_tokens), "--batches", ",".join(map(str, args.batches))]
    flags += ["--tiny"] if args.tiny else []
    flags += ["--eager-prefill"] if args.eager_prefill else []
    flags += ["--profile"] if args.profile else []
    flags += ["--skip-guards"] if args.skip_guards else []
    return flags


def spawn(spec: dict[str, object], args: argparse.Namespace) -> dict[str, object]:
    """Run one (part, case, contender) in a process of its own; its result row, or the error."""
    return spawn_batch([spec], args)[0]


def spawn_batch(specs: list[dict[str, object]], args: argparse.Namespace) -> list[dict[str, object]]:
    """Run these (part, case, contender) processes at once, their timed parts one at a time (``turns``).

    Their compiles overlap; each times while every other waits, none compiling or running. Their
    result rows, or each one's error (the end of its output, stderr included).
    """
    commands = [[sys.executable, __file__, "--worker", json.dumps(s), "--turns", *_child_args(args)] for s in specs]
    outcomes = turns.run_batch(commands, time.monotonic() + args.timeout, keep=lambda line: line.startswith("RESULT "))
    rows = []
    for outcome in outcomes:
        if outcome.kept and outcome.returncode == 0:
            rows.append(dict(json.loads(outcome.kept[-1][7:]), wall_s=outcome.seconds))
        elif outcome.timed_out:
            rows.append(dict(error=f"timed out after {args.timeout} s"))
        else:
            rows.append(dict(error="\n".join(outcome.tail)[-2000:]))
    return rows


def append(path: str | None, row: dict[str, object]) -> None:
    if path is None:
        return
    rows = json.loads(Path(path).read_text()) if Path(path).exists() else {"meta": environment(), "rows": []}
    rows["rows"].append(row)
    Path(path).write_text(json.dumps(rows, indent=1))


def _fmt(value: object, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def tables(rows: list[dict[str, object]]) -> str:
    """Markdown tables: prefill ms (and ÷ merged, ÷ LoRA), decode tokens/s and TTFT, server req/s and latency."""
    out = []
    prefill = [r for r in rows if r["part"] == "prefill" and "ms" in r]
    for case in dict.fromkeys(r["case"] for r in prefill):
        by = {r["contender"]: r for r in prefill if r["case"] == case}
        floor, lora = by.get("merged", {}).get("ms"), by.get("lora", {}).get("ms")
        tokens = next(iter(by.values())).get("tokens", TOKENS)
        out += [f"\nprefill, {case} ({tokens} tokens): ms (q10-q90), peak MB above weights, ÷ merged, ÷ LoRA\n"]
        out += [
            "| contender | ms | q10-q90 | peak MB | ÷ merged | ÷ LoRA | frozen modules |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in by.items():
            frozen = r.get("frozen") or {}
            out.append(
                f"| {name} | {_fmt(r['ms'])} | {_fmt(r['q10'])}-{_fmt(r['q90'])} | {_fmt(r.get('peak_mb'))} "
                f"| {_fmt(r['ms'] / floor if floor else None)} | {_fmt(r['ms'] / lora if lora else None)} "
                f"| {', '.join(f'{k} {v}' for k, v in frozen.items() if v) or '-'} |"
            )
    decode = [r for r in rows if r["part"] == "decode" and "batches" in r]
    for case in dict.fromkeys(r["case"] for r in decode):
        by = {r["contender"]: r for r in decode if r["case"] == case}
        out += [f"\ndecode, {case}: decode tokens/s (÷ LoRA, ÷ merged), time to first token ms\n"]
        out += [
            "| contender | batch | decode tok/s | ÷ LoRA | ÷ merged | TTFT ms | tok/s overall |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in by.items():
            for b in r["batches"]:
                ref = {
                    k: next((x for x in by.get(k, {}).get("batches", []) if x["batch"] == b["batch"]), None)
                    for k in ("lora", "merged")
                }
                ratio = {
                    k: b["decode_tokens_per_s"] / v["decode_tokens_per_s"]
                    if v and v["decode_tokens_per_s"] and b["decode_tokens_per_s"]
                    else None
                    for k, v in ref.items()
                }
                out.append(
                    f"| {name} | {b['batch']} | {_fmt(b['decode_tokens_per_s'])} | {_fmt(ratio['lora'])} "
                    f"| {_fmt(ratio['merged'])} | {_fmt(b['ttft_ms'])} | {_fmt(b['tokens_per_s'])} |"
                )
    server = [r for r in rows if r["part"] == "server" and "requests_per_s" in r]
    if server:
        out += ["\nserver (LitServe example, loopback): requests/s, latency ms\n"]
        out += ["| contender | clients | requests/s | p50 ms | p99 ms |", "|---|---|---|---|---|"]
        for r in server:
            out.append(
                f"| {r['contender']} | {r['clients']} | {_fmt(r['requests_per_s'])} "
                f"| {_fmt(r['p50_ms'])} | {_fmt(r['p99_ms'])} |"
            )
    guard = [r for r in rows if r["part"] == "guard" and "us_per_call" in r]
    if guard:
        out += [
            "\nper-call check of a frozen graph (host time)\n",
            "| case | tensors checked | µs per call | ns per tensor |",
            "|---|---|---|---|",
        ]
        out += [
            f"| {r['case']} | {r['tensors']} | {_fmt(r['us_per_call'])} | {_fmt(r.get('ns_per_tensor'))} |"
            for r in guard
        ]
    errors = [r for r in rows if "error" in r]
    out += [
        f"\nfailed: {r['part']} {r['case']} {r['contender']}: {str(r['error']).splitlines()[-1][:200]}" for r in errors
    ]
    return "\n".join(out)


def plan(args: argparse.Namespace) -> list[dict[str, object]]:
    specs = []
    for part in args.parts:
        cases = args.cases or DEFAULT_CASES[part] or CASES[part]
        for case in (c for c in cases if c in CASES[part]):
            if part == "guard":
                specs.append(dict(part=part, case=case, contender="frozen_norm"))
                continue
            names = args.contenders or (SERVER_CONTENDERS if part == "server" else CONTENDERS)
            if part == "decode" and not args.contenders:
                names = [n for n in names if n != "dora_cached"]
            specs += [dict(part=part, case=case, contender=n) for n in names]
    return specs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--parts", type=lambda s: s.split(","), default=["prefill", "decode", "server"])
    parser.add_argument("--cases", type=lambda s: s.split(","), default=None, help="e.g. layer8192,llama4,llama32")
    parser.add_argument("--contenders", type=lambda s: s.split(","), default=None, help=",".join(CONTENDERS))
    parser.add_argument("--out", help="JSON file the rows are appended to")
    parser.add_argument("--quick", action="store_true", help="a reduced run: about 5 minutes on one H100")
    parser.add_argument("--tiny", action="store_true", help="toy sizes and aot_eager: a dry run on the CPU")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--decode-repeats", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 8])
    parser.add_argument("--eager-prefill", action="store_true", help="decode: the prefill as generate runs it")
    parser.add_argument(
        "--skip-guards",
        action="store_true",
        help="decode: time under torch.compiler.set_stance(skip_guard_eval_unsafe=True), Dynamo's guards skipped",
    )
    parser.add_argument(
        "--profile", action="store_true", help="decode: per token, host against GPU time (decode_profile.py)"
    )
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--server-prompt", type=int, default=128)
    parser.add_argument("--server-new-tokens", type=int, default=16)
    parser.add_argument(
        "--parallel",
        type=int,
        default=1,
        help="prefill/decode processes at once: their compiles overlap, each times while the others wait",
    )
    parser.add_argument(
        "--timeout", type=int, default=480, help="seconds per contender process (with --parallel: per batch)"
    )
    parser.add_argument("--turns", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--table", help="print the tables of a results file and exit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker), args)), flush=True)
        return
    if args.table:
        print(tables(json.loads(Path(args.table).read_text())["rows"]))
        return
    if args.quick:  # prefill of one layer (5 contenders), decode of llama4 at batch 1 (frozen and LoRA)
        args.parts = [p for p in args.parts if p in ("prefill", "decode")]
        args.cases = args.cases or ["layer8192", "llama4"]
        args.repeats, args.warmup, args.decode_repeats = 10, 3, 2
        args.batches, args.new_tokens, args.eager_prefill = [1], 32, True
    rows = []
    specs = [s for s in plan(args) if not (args.quick and not _in_quick(s))]
    timed = [s for s in specs if s["part"] not in ("server", "guard")]
    size = max(1, args.parallel)
    batches = [timed[i : i + size] for i in range(0, len(timed), size)]
    batches += [[s] for s in specs if s["part"] in ("server", "guard")]  # on their own
    for batch in batches:
        for spec in batch:
            print(f"running {spec['part']} {spec['case']} {spec['contender']} ...", flush=True)
        results = [_server_row(batch[0], args)] if batch[0]["part"] == "server" else spawn_batch(batch, args)
        for spec, result in zip(batch, results, strict=True):
            rows.append(dict(spec, **result))
            print("  " + json.dumps({k: v for k, v in rows[-1].items() if k not in spec})[:400], flush=True)
            append(args.out, rows[-1])
    print(json.dumps(environment()))
    print(tables(rows))


def _in_quick(spec: dict[str, object]) -> bool:
    if spec["part"] == "prefill":
        return spec["case"] == "layer8192" and spec["contender"] in QUICK_PREFILL
    return spec["case"] == "llama4" and spec["contender"] in QUICK_DECODE


QUICK_PREFILL = ("dora_fused", "frozen_norm", "frozen_merged", "lora", "merged")
QUICK_DECODE = ("frozen_norm", "lora")
_saved: dict[str, tuple[str, str]] = {}


def _server_row(spec: dict[str, object], args: argparse.Namespace) -> dict[str, object]:
    try:
        if "llama4" not in _saved:  # saved by a process of its own: this one keeps no GPU memory
            root = tempfile.mkdtemp(prefix="dora_fused_server_")
            saved = spawn(dict(part="save", case="llama4", contender="dora_fused", root=root), args)
            if "error" in saved:
                return saved
            _saved["llama4"] = (str(saved["base"]), str(saved["adapter"]))
        return run_server(str(spec["contender"]), *_saved["llama4"], args)
    except Exception as error:
        return dict(error=str(error))


if __name__ == "__main__":
    main()
