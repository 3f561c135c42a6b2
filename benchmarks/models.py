"""Whole models: PEFT DoRA eager vs torch.compile vs backend="dora_fused" vs plain LoRA vs merged weights.

Question: what does DoRA cost in a real model, per inference prefill and per
training step, in time and in memory above the resident weights, under each way
of running it, and how far is each from an fp64 run of PEFT's math? The price
to match is plain LoRA of the same rank under torch.compile; the floor for
inference is the merged model.

    python benchmarks/models.py --out results.json                       # every case, every contender
    python benchmarks/models.py --out r.json --cases 'llama8b-r384-*' --contenders dora_fused,inductor
    python benchmarks/models.py --out r.json --priority 2 --time-budget 540 --resume
    python benchmarks/models.py --out r.json --parallel 4           # 4 processes compile at once, time one by one
    python benchmarks/models.py --out r.json --cases 'llama8b-full-*' --compile-scope block   # 32 layers
    python benchmarks/models.py --list                                  # the case matrix
    python benchmarks/models.py --tiny --inner aot_eager --out /tmp/t.json   # CPU, seconds
    python benchmarks/models_table.py results.json                       # markdown tables

Contenders (each in its own process, on the same model, weights and inputs):
    peft_eager         PEFT as is
    inductor           torch.compile(model): the default backend, dora_fused not imported
                       (PEFT's DoRA then breaks the graph in every layer, as for any user)
    dora_fused         torch.compile(model, backend="dora_fused")
    lora_inductor      the same model with use_dora=False, torch.compile(model)
    merged             merge_and_unload() of the DoRA model, torch.compile(model); inference only
    inductor_polyfill  dora_fused.backend(rewrite=False): Inductor on the one-graph trace that
                       dora_fused's PEFT polyfill gives, without the rewrite (what the rewrite
                       itself buys, apart from the graph breaks it removes)
and ``fp64_ref``: PEFT eager with every parameter, buffer and input in float64, run once per
model (its own process, before the contenders) for the error columns.

Method (docs/benchmarks.md, "Model-level", says more):
- Model: random init from a transformers config on the GPU (``torch.manual_seed`` before
  construction), bf16 base, PEFT DoRA on every linear layer of the language model,
  ``init_lora_weights=False`` (so B·A ≠ 0) and magnitudes moved off ‖W + s·B·A‖ by a
  seeded ±50%: the DoRA scale is not 1. Same seeds and device in every process, so the same
  weights. Inputs from a seeded CPU generator.
- Modes: ``infer`` (prefill of batch × seq tokens under no_grad, logits of the last
  position only, as generation does); ``train`` (forward with random labels,
  cross-entropy inside the model, backward, AdamW step on the adapter parameters);
  ``train-gc`` (the same with non-reentrant gradient checkpointing); ``train-accum4``
  (4 micro-batches forward+backward, then one optimizer step).
- Time: median (and 10/90% quantiles) of --repeats calls after the compile call and --warmup
  calls; CUDA events on a GPU, ``time.perf_counter`` on the CPU; one call = one step.
- Peak memory: ``max_memory_allocated`` during the timed calls minus what was allocated before
  them (weights, optimizer state, inputs).
- Compile: wall time of the first call and the warm-up calls minus their steady-state time.
- Error: ‖logits − ref‖ / ‖ref‖ over the last position's logits of micro-batch 0 (computed
  before any optimizer step), and the same over the gradients of every magnitude vector and of
  the first layer's q_proj and down_proj adapters, against ``fp64_ref``.
- Results: one JSON row per (case, contender), appended to --out as soon as it is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import fnmatch
import gc
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

import torch

import turns  # benchmarks/turns.py: the worker processes' turns on the device
from timing import PeakMemory, environment, summarize, time_calls

# --- what is measured -------------------------------------------------------------------------------

# Decoder shapes of the released models; vocabulary 32000 (not Llama-3's 128256 or Qwen2's 152064):
# the LM head is not adapted, costs every contender the same, and at 128k it would dominate the
# peak memory of a 4-layer model and of its fp64 reference. The full-model cases use every layer.
MODELS = {
    "llama8b": dict(  # Llama-3-8B
        family="llama",
        full_layers=32,
        text=dict(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=14336,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        ),
    ),
    "qwen2vl7b": dict(  # Qwen2-VL-7B: language model as released, vision tower with as many blocks as LM layers
        family="qwen2vl",
        full_layers=28,
        text=dict(
            vocab_size=32000,
            hidden_size=3584,
            intermediate_size=18944,
            num_attention_heads=28,
            num_key_value_heads=4,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
            bos_token_id=None,  # the released ids lie outside the 32000-token vocabulary
            eos_token_id=None,
        ),
        vision=dict(embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14),
        image_size=672,  # 48 × 48 patches of 14 pixels, 2 × 2 merged: 576 image tokens
    ),
}
TINY_MODELS = {  # --tiny: the same families at toy sizes (odd dimensions, as in tests/helpers.py)
    "llama8b": dict(
        family="llama",
        full_layers=3,
        text=dict(
            vocab_size=97,
            hidden_size=48,
            intermediate_size=88,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=12,
            max_position_embeddings=64,
        ),
    ),
    "qwen2vl7b": dict(
        family="qwen2vl",
        full_layers=3,
        text=dict(
            vocab_size=97,
            hidden_size=48,
            intermediate_size=88,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 2, 2]},
            bos_token_id=None,
            eos_token_id=None,
        ),
        vision=dict(embed_dim=32, hidden_size=48, num_heads=2, mlp_ratio=2, patch_size=4),
        image_size=16,  # 4 × 4 patches, 2 × 2 merged: 4 image tokens
    ),
}
TINY_RANKS = {16: 2, 64: 4, 384: 8}

MODES = ("infer", "train", "train-accum4", "train-gc")  # the order a process runs them in
ADAPTERS = {"fp32ad": torch.float32, "bf16": torch.bfloat16}  # fp32ad: PEFT's default on a bf16 base
BASE_DTYPE = torch.bfloat16


@dataclass(frozen=True)
class Case:
    model: str  # key of MODELS
    r: int
    adapters: str  # key of ADAPTERS
    mode: str  # one of MODES
    priority: int  # run order, 1 first; --priority N runs 1..N
    full: bool = False  # every layer of the model instead of --layers

    @property
    def name(self) -> str:
        return f"{self.model}{'-full' if self.full else ''}-r{self.r}-{self.adapters}-{self.mode}"

    @property
    def group(self) -> tuple:
        """Cases of one group share a model: one process per contender runs them all."""
        return (self.model, self.full, self.r, self.adapters)


# (model, r, adapters, mode, priority[, full])
CASES = [
    Case(*row)
    for row in [
        # 1: the headline: 8B-shaped Llama, r = 384, PEFT's default fp32 adapters on a bf16 base
        ("llama8b", 384, "fp32ad", "infer", 1),
        ("llama8b", 384, "fp32ad", "train", 1),
        # 2: all-bf16
        ("llama8b", 384, "bf16", "infer", 2),
        ("llama8b", 384, "bf16", "train", 2),
        # 3: a small rank
        ("llama8b", 16, "fp32ad", "infer", 3),
        ("llama8b", 16, "fp32ad", "train", 3),
        # 4: training variants (accum4 reuses train's compiled graph in the same process)
        ("llama8b", 384, "fp32ad", "train-accum4", 4),
        ("llama8b", 384, "fp32ad", "train-gc", 4),
        # 5: a vision-language model, image + text
        ("qwen2vl7b", 384, "fp32ad", "infer", 5),
        ("qwen2vl7b", 384, "fp32ad", "train", 5),
        # 6: the remaining ranks and dtypes
        ("llama8b", 64, "fp32ad", "infer", 6),
        ("llama8b", 64, "fp32ad", "train", 6),
        ("llama8b", 16, "bf16", "infer", 6),
        ("llama8b", 16, "bf16", "train", 6),
        ("llama8b", 64, "bf16", "infer", 6),
        ("llama8b", 64, "bf16", "train", 6),
        # 7: all 32 layers once, for full-model memory (no fp64 reference: it would not fit)
        ("llama8b", 384, "fp32ad", "infer", 7, True),
        ("llama8b", 384, "fp32ad", "train-gc", 7, True),
    ]
]
CASES_BY_NAME = {case.name: case for case in CASES}

CONTENDERS = ("dora_fused", "inductor", "peft_eager", "lora_inductor", "merged", "inductor_polyfill")  # run order
REFERENCE = "fp64_ref"
DORA_MATH = {"peft_eager", "inductor", "dora_fused", "merged", "inductor_polyfill"}  # compared with fp64_ref
INFER_ONLY = {"merged"}

SEED = 0
INPUT_SEED = 1234
MAGNITUDE_SPREAD = 0.5  # m ← m·(1 + spread·u), u ~ U(-1, 1)
LR = 1e-5
# gradients compared with fp64: every magnitude vector, and these adapters of the first decoder layer
GRAD_CHECK = (".layers.0.self_attn.q_proj.lora_", ".layers.0.mlp.down_proj.lora_")


# --- building the same model in every process -------------------------------------------------------


def model_spec(case: Case, args) -> dict:
    spec = dict((TINY_MODELS if args.tiny else MODELS)[case.model])
    spec["layers"] = spec["full_layers"] if case.full else args.layers
    spec["r"] = TINY_RANKS.get(case.r, 4) if args.tiny else case.r
    return spec


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def build_base(spec: dict, device: torch.device) -> torch.nn.Module:
    import transformers

    text = dict(spec["text"], num_hidden_layers=spec["layers"], tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(SEED)
    with torch.device(device), default_dtype(BASE_DTYPE):
        if spec["family"] == "llama":
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**text))
        else:
            vocab = text["vocab_size"]
            vision = dict(spec["vision"], depth=spec["layers"], spatial_merge_size=2, temporal_patch_size=2)
            config = transformers.Qwen2VLConfig(
                text_config=text,
                vision_config=vision,
                image_token_id=vocab - 1,
                video_token_id=vocab - 2,
                vision_start_token_id=vocab - 3,
                vision_end_token_id=vocab - 4,
                tie_word_embeddings=False,
            )
            model = transformers.Qwen2VLForConditionalGeneration(config)
    # bf16 parameters; rotary frequencies stay fp32, as from_pretrained(dtype=torch.bfloat16) leaves them
    return model.to(device)


def target_modules(spec: dict) -> str:
    """Every linear layer of the language model (the vision tower keeps its weights)."""
    prefix = r".*language_model" if spec["family"] == "qwen2vl" else r".*model\.layers"
    return prefix + r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def build_peft(spec: dict, adapters: str, device: torch.device, dora: bool = True) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    base = build_base(spec, device)
    config = LoraConfig(
        r=spec["r"],
        lora_alpha=spec["r"],
        target_modules=target_modules(spec),
        use_dora=dora,
        init_lora_weights=False,
        lora_dropout=0.0,
    )
    with torch.device(device):
        model = get_peft_model(base, config, autocast_adapter_dtype=adapters == "fp32ad")
    gen = torch.Generator(device).manual_seed(SEED + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(ADAPTERS[adapters])
            if "lora_magnitude_vector" in name:
                u = torch.rand(param.shape, generator=gen, device=device, dtype=torch.float32) * 2 - 1
                param.copy_((param.float() * (1 + MAGNITUDE_SPREAD * u)).to(param.dtype))
    return model


def make_inputs(spec: dict, args, count: int, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """``count`` micro-batches of model kwargs (labels included), from a seeded CPU generator."""
    vocab = spec["text"]["vocab_size"]
    batches = []
    for i in range(count):
        gen = torch.Generator().manual_seed(INPUT_SEED + i)
        text_vocab = vocab - 4 if spec["family"] == "qwen2vl" else vocab  # the last 4 ids are vision tokens
        ids = torch.randint(0, text_vocab, (args.batch, args.seq), generator=gen)
        labels = torch.randint(0, text_vocab, (args.batch, args.seq), generator=gen)
        batch = dict(input_ids=ids, labels=labels)
        if spec["family"] == "qwen2vl":
            patch, merge = spec["vision"]["patch_size"], 2
            side = spec["image_size"] // patch  # patches per side
            image_tokens = (side // merge) ** 2
            start = min(8, args.seq - image_tokens - 2)
            if start < 0:
                raise ValueError(f"--seq {args.seq} is shorter than the image ({image_tokens} tokens)")
            ids[:, start] = vocab - 3  # vision start
            ids[:, start + 1 : start + 1 + image_tokens] = vocab - 1  # image
            ids[:, start + 1 + image_tokens] = vocab - 4  # vision end
            labels[:, start : start + 2 + image_tokens] = -100
            pixels = torch.randn(args.batch * side * side, 3 * 2 * patch * patch, generator=gen)
            batch.update(
                pixel_values=pixels.to(dtype),
                image_grid_thw=torch.tensor([[1, side, side]] * args.batch),
                mm_token_type_ids=(ids == vocab - 1).long(),
            )
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


def grad_check_names(model: torch.nn.Module) -> list[str]:
    return [
        name
        for name, p in model.named_parameters()
        if p.requires_grad and ("lora_magnitude_vector" in name or any(key in name for key in GRAD_CHECK))
    ]


def dora_module_count(model: torch.nn.Module) -> int:
    return sum(
        isinstance(getattr(m, "lora_magnitude_vector", None), torch.nn.ModuleDict) and len(m.lora_magnitude_vector) > 0
        for m in model.modules()
    )


# --- the worker: one contender, the cases of one model ----------------------------------------------


def reference_path(case: Case, args) -> str:
    key = f"{case.model}{'-full' if case.full else ''}-r{case.r}-{case.adapters}-L{args.layers}-s{args.seq}"
    return os.path.join(args.work_dir, f"{key}-b{args.batch}{'-tiny' if args.tiny else ''}-{args.device_kind}.fp64.pt")


def run_reference(cases: list[Case], args, device: torch.device) -> None:
    """PEFT eager in float64: the last position's logits and the checked gradients of micro-batch 0."""
    spec = model_spec(cases[0], args)
    started = time.perf_counter()
    row = base_row(cases[0], spec, args, REFERENCE)
    if os.path.exists(reference_path(cases[0], args)):  # never compare with an earlier run's file
        os.remove(reference_path(cases[0], args))
    try:
        model = build_peft(spec, cases[0].adapters, device).double()
        inputs = make_inputs(spec, args, 1, device, torch.float64)[0]
        # Always forward and backward (a later --resume may add training cases of this model).
        # Checkpointing: the same math, holding one layer's fp64 activations at a time instead of all.
        enable_checkpointing(model)
        model.train()
        out = model(**inputs)
        out.loss.backward()
        checked = set(grad_check_names(model))
        saved = dict(
            logits=out.logits[:, -1].detach().cpu(),
            grads={name: p.grad.cpu() for name, p in model.named_parameters() if name in checked},
        )
        os.makedirs(os.path.dirname(reference_path(cases[0], args)), exist_ok=True)
        torch.save(saved, reference_path(cases[0], args))
        row.update(status="ok", seconds=time.perf_counter() - started, path=reference_path(cases[0], args))
    except Exception as error:  # recorded, never raised: the contenders run without error columns
        row.update(status="error", error=f"{type(error).__name__}: {error}"[:2000])
    for case in cases:
        append_row(args.out, dict(row, case=case.name, mode=case.mode))


def base_row(case: Case, spec: dict, args, contender: str) -> dict:
    return dict(
        run_id=args.run_id,
        case=case.name,
        contender=contender,
        model=case.model,
        full=case.full,
        layers=spec["layers"],
        r=spec["r"],
        adapters=case.adapters,
        mode=case.mode,
        batch=args.batch,
        seq=args.seq,
        tiny=args.tiny,
        device=args.device_kind,
        inner=args.inner,
        compile_scope=args.compile_scope,
        parallel=args.parallel,
        status="running",
    )


def make_contender(contender: str, spec: dict, adapters: str, args, device: torch.device):
    """(the module to configure: train/eval, checkpointing; the callable to time)."""
    model = build_peft(spec, adapters, device, dora=contender != "lora_inductor")
    if contender == "merged":
        model = model.merge_and_unload()
    if contender == "peft_eager":
        return model, model
    if contender in ("inductor", "lora_inductor", "merged"):
        backend = args.inner
    else:
        import dora_fused

        if contender == "dora_fused":
            backend = "dora_fused" if args.inner == "inductor" else dora_fused.backend(inner=args.inner)
        else:  # inductor_polyfill
            backend = dora_fused.backend(inner=args.inner, rewrite=False)
    if args.compile_scope == "block":
        compile_blocks(model, backend)
        return model, model
    return model, torch.compile(model, backend=backend)


def compile_blocks(model: torch.nn.Module, backend) -> None:
    """Regional compilation: compile the call of each repeated block (the classes transformers lists
    in ``_no_split_modules``: decoder layers, vision blocks); the rest of the model runs eagerly.

    The block's own ``__call__`` is what gets compiled, not its ``forward``: with gradient
    checkpointing that call is where transformers checkpoints the block, and Dynamo runs a frame
    eagerly when it starts under a checkpoint's saved-tensor hooks (``module.compile()`` would be
    silently eager there). Each block class is swapped for a subclass whose ``__call__`` is the
    compiled one; its blocks share one compiled graph, so 32 layers compile about as fast as one.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(inner._no_split_modules or ())
    swapped: dict[type, type] = {}
    for module in list(inner.modules()):
        cls = type(module)
        if cls.__name__ not in names:
            continue
        if cls not in swapped:
            compiled = torch.compile(cls.__call__, backend=backend)

            def call(self, *args, _compiled=compiled, **kwargs):
                return _compiled(self, *args, **kwargs)

            swapped[cls] = type(cls.__name__, (cls,), {"__call__": call})
        module.__class__ = swapped[cls]
    if not swapped:
        raise RuntimeError(f"no repeated blocks ({sorted(names)}) found to compile")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    diff = torch.linalg.vector_norm(actual.double() - expected.double())
    return (diff / torch.linalg.vector_norm(expected.double())).item()


def grad_error(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> float | None:
    params = dict(model.named_parameters())
    names = [n for n in expected if n in params and params[n].grad is not None]
    if not names:
        return None
    diff = sum(torch.linalg.vector_norm(params[n].grad.double().cpu() - expected[n].double()) ** 2 for n in names)
    scale = sum(torch.linalg.vector_norm(expected[n].double()) ** 2 for n in names)
    return (diff / scale).sqrt().item()


class _RecompileLimitLog(logging.Handler):
    """Counts Dynamo's "hit config.recompile_limit" warnings: the frame then runs eagerly."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.hits = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "hit config." in str(record.msg):
            self.hits += 1


class Counters:
    """Dynamo graph counts, recompile-limit hits and dora_fused rewrite records since ``mark()``."""

    def __init__(self) -> None:
        self.limit_log = _RecompileLimitLog()
        logging.getLogger("torch._dynamo").addHandler(self.limit_log)
        self.mark()

    def mark(self) -> None:
        stats = torch._dynamo.utils.counters
        self.graphs = stats["stats"]["unique_graphs"]
        self.breaks = sum(stats["graph_break"].values())
        self.limit_hits = self.limit_log.hits
        self.reports = len(sys.modules["dora_fused"].reports()) if "dora_fused" in sys.modules else 0

    def since(self) -> dict:
        stats = torch._dynamo.utils.counters
        out = dict(
            graphs_compiled=stats["stats"]["unique_graphs"] - self.graphs,
            graph_breaks=sum(stats["graph_break"].values()) - self.breaks,
            recompile_limit_hits=self.limit_log.hits - self.limit_hits,
        )
        if "dora_fused" in sys.modules:
            reports = sys.modules["dora_fused"].reports()[self.reports :]
            out["rewritten"] = len({name for r in reports for name in r.rewritten})
            out["left_alone"] = len({name for r in reports for name, _ in r.skipped})
        return out


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant activation checkpointing of every decoder layer, usable under torch.compile.

    transformers also registers a hook that makes the embeddings' output require grad (needed by
    reentrant checkpointing only); Dynamo falls back to eager for the whole forward on it, so it is
    removed. transformers' output capturing mutates a dict inside each checkpointed layer: Dynamo
    breaks the graph there unless told not to replay forward side effects in the backward.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.disable_input_require_grads()
    if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True


def run_mode(case: Case, spec: dict, model, fn, args, device, reference, counters: Counters) -> dict:
    row = base_row(case, spec, args, args.worker)
    training = case.mode != "infer"
    micro = 4 if case.mode == "train-accum4" else 1
    inputs = make_inputs(spec, args, micro, device, BASE_DTYPE)
    row.update(micro_batches=micro, tokens=micro * args.batch * args.seq)
    if case.mode == "train-gc":
        enable_checkpointing(model)
    model.train(training)
    counters.mark()
    check = reference is not None and args.worker in DORA_MATH

    # the first call: compiles; gives the logits (and gradients) compared with fp64
    start = time.perf_counter()
    if training:
        out = fn(**inputs[0])
        out.loss.backward()
    else:
        with torch.no_grad():
            out = fn(**{k: v for k, v in inputs[0].items() if k != "labels"}, logits_to_keep=1)
    logits = out.logits[:, -1].detach()
    del out
    if device.type == "cuda":
        torch.cuda.synchronize()
    first_call_s = time.perf_counter() - start
    row.update(first_call_s=first_call_s, **counters.since())
    if check:
        row["rel_err"] = relative_error(logits.cpu(), reference["logits"])
        if training and reference["grads"]:
            row["grad_rel_err"] = grad_error(model, reference["grads"])
    del logits
    model.zero_grad(set_to_none=True)

    optimizer = None
    marks: dict[str, object] = {}
    if training:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)

        def call(lap):
            for batch in inputs:
                loss = fn(**batch).loss
                (loss / micro if micro > 1 else loss).backward()
            lap()
            if marks.get("timed") and "fwd_bwd" not in marks and device.type == "cuda":
                marks["fwd_bwd"] = torch.cuda.max_memory_allocated()  # the first timed call's, before its step
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    else:
        infer_inputs = {k: v for k, v in inputs[0].items() if k != "labels"}

        def call(lap):
            with torch.no_grad():
                fn(**infer_inputs, logits_to_keep=1)

    with turns.device_turn(args.turns, case.name) as window:  # with --parallel: nobody else compiles or runs
        warmup_s = []
        for _ in range(args.warmup):
            start = time.perf_counter()
            call(lambda: None)
            if device.type == "cuda":
                torch.cuda.synchronize()
            warmup_s.append(time.perf_counter() - start)
        row.update(warmup_s=warmup_s, **counters.since())  # graphs and rewrites of the first call and the warm-up

        counters.mark()
        marks["timed"] = True
        with PeakMemory() as mem:
            times, splits = time_calls(call, args.repeats, laps=True)
    row["turn_start"], row["turn_end"] = window
    stats = summarize(times)
    row.update(stats, times=times, graphs_compiled_timed=counters.since()["graphs_compiled"])
    if training:
        row["fwd_bwd_ms"] = summarize([s[0] for s in splits])["ms"]
        row["opt_ms"] = stats["ms"] - row["fwd_bwd_ms"]
        first_ms = row["fwd_bwd_ms"] / micro  # the first call was one micro-batch's forward+backward
    else:
        first_ms = stats["ms"]
    overhead = first_call_s - first_ms / 1e3 + sum(w - stats["ms"] / 1e3 for w in warmup_s)
    row["compile_s"] = max(0.0, overhead)
    row["tokens_per_s"] = row["tokens"] / (stats["ms"] / 1e3)
    if mem.peak is not None:
        row.update(peak_gb=mem.peak / 2**30, resident_gb=mem.resident / 2**30)
        if "fwd_bwd" in marks:  # the step's peak without the optimizer's (gradients included)
            row["peak_fwd_bwd_gb"] = (marks["fwd_bwd"] - mem.resident) / 2**30
    row["status"] = "ok"
    return row


def run_worker(args) -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny and device.type == "cpu":
        torch.set_num_threads(1)  # toy tensors gain nothing from intra-op threads, and stall on a busy machine
    record_environment(args)
    cases = sorted((CASES_BY_NAME[n] for n in args.cases.split(",")), key=lambda c: MODES.index(c.mode))
    if args.worker == REFERENCE:
        run_reference(cases, args, device)
        return
    spec = model_spec(cases[0], args)
    path = reference_path(cases[0], args)
    reference = torch.load(path) if os.path.exists(path) and not args.no_reference else None
    counters = Counters()
    start = time.perf_counter()
    model, fn = make_contender(args.worker, spec, cases[0].adapters, args, device)
    build_s = time.perf_counter() - start
    # every mode starts from the same adapter values (a training mode's optimizer steps change them)
    initial = {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    extra = dict(
        build_s=build_s,
        weights_gb=weights / 2**30,
        dora_modules=dora_module_count(model),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        attn_implementation=getattr(model.config, "_attn_implementation", None),
        dora_fused_imported="dora_fused" in sys.modules,
    )
    previous = None
    for case in cases:
        # Each case compiles as in a fresh process (Dynamo's recompile limit counts every variant a
        # process compiled), except train-accum4 right after train: the same graph, reused.
        if previous is not None and (previous.mode, case.mode) != ("train", "train-accum4"):
            torch._dynamo.reset()
        previous = case
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in initial:
                    p.copy_(initial[name])
        try:
            row = run_mode(case, spec, model, fn, args, device, reference, counters)
        except Exception as error:  # e.g. out of memory: recorded, and the next mode still runs
            row = base_row(case, spec, args, args.worker)
            row.update(status="error", error=f"{type(error).__name__}: {error}"[:2000])
        row.update(extra)
        append_row(args.out, row)
        print(f"[{args.worker}] {case.name}: {summary_line(row)}", flush=True)
        model.zero_grad(set_to_none=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def summary_line(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row.get('error', '')[:300]}"
    parts = [f"{row['ms']:.2f} ms"]
    if row.get("peak_gb") is not None:
        parts.append(f"peak {row['peak_gb']:.2f} GB")
    parts.append(f"compile {row['compile_s']:.1f} s")
    if row.get("rel_err") is not None:
        parts.append(f"err {row['rel_err']:.2e}")
    if "rewritten" in row:
        parts.append(f"rewritten {row['rewritten']}/{row.get('dora_modules')}")
    return ", ".join(parts)


# --- results file --------------------------------------------------------------------------------


def load_results(path: str) -> dict:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return dict(meta=dict(runs={}), rows=[])


def _write(path: str, data: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


@contextlib.contextmanager
def locked(path: str):
    """Exclusive access to the results file among the processes that write it at once."""
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def append_row(path: str, row: dict) -> None:
    with locked(path):
        data = load_results(path)
        data["rows"].append(row)
        _write(path, data)


def record_environment(args) -> None:
    with locked(args.out):
        data = load_results(args.out)
        if args.run_id not in data["meta"]["runs"]:
            data["meta"]["runs"][args.run_id] = dict(environment(), argv=args.argv, tiny=args.tiny)
            _write(args.out, data)


# --- the parent: one process per (model, contender) -------------------------------------------------


def select_cases(args) -> list[Case]:
    patterns = args.cases.split(",") if args.cases else ["*"]
    cases = [c for c in CASES if c.priority <= args.priority and any(fnmatch.fnmatch(c.name, p) for p in patterns)]
    done = done_pairs(args)
    return [c for c in cases if any((c.name, k) not in done for k in args.contender_list)]


def done_pairs(args) -> set[tuple[str, str]]:
    """With --resume: the (case, contender) pairs --out already holds a good row for, at these settings."""
    if not args.resume:
        return set()
    done = set()
    for row in load_results(args.out)["rows"]:
        case = CASES_BY_NAME.get(row["case"])
        if case is None or row.get("status") != "ok":
            continue
        same = dict(tiny=args.tiny, device=args.device_kind, seq=args.seq, batch=args.batch, inner=args.inner)
        same["compile_scope"] = args.compile_scope
        same["layers"] = model_spec(case, args)["layers"]
        if all(row.get(k, "model" if k == "compile_scope" else None) == v for k, v in same.items()):
            done.add((row["case"], row["contender"]))
    return done


def plan(args) -> list[list[tuple[str, list[Case]]]]:
    """Batches of (contender, cases) processes, run one batch after the other: first the fp64
    references the selected groups need, then every contender process, --parallel per batch,
    groups in priority order. One process per (model group, contender)."""
    groups: dict[tuple, list[Case]] = {}
    for case in sorted(select_cases(args), key=lambda c: (c.priority, CASES.index(c))):
        groups.setdefault(case.group, []).append(case)
    done = done_pairs(args)
    references, steps = [], []
    for cases in groups.values():
        group_steps = []
        for contender in args.contender_list:
            todo = [c for c in cases if (c.name, contender) not in done]
            if contender in INFER_ONLY:
                todo = [c for c in todo if c.mode == "infer"]
            if todo:
                group_steps.append((contender, todo))
        needs_reference = not cases[0].full and not args.no_reference and DORA_MATH & {k for k, _ in group_steps}
        if needs_reference and not (args.resume and os.path.exists(reference_path(cases[0], args))):
            references.append((REFERENCE, cases))
        steps += group_steps
    # the fp64 references one at a time (each holds a float64 copy of the model: about 30 GB for two
    # 8B-shaped layers at r = 384), the contenders --parallel at a time
    chunk = max(1, args.parallel)
    return [[step] for step in references] + [steps[i : i + chunk] for i in range(0, len(steps), chunk)]


def worker_command(args, contender: str, cases: list[Case]) -> list[str]:
    command = [sys.executable, os.path.abspath(__file__), "--worker", contender, "--run-id", args.run_id]
    command += ["--cases", ",".join(c.name for c in cases), "--out", args.out, "--work-dir", args.work_dir]
    command += ["--layers", str(args.layers), "--seq", str(args.seq), "--batch", str(args.batch)]
    command += ["--repeats", str(args.repeats), "--warmup", str(args.warmup), "--inner", args.inner]
    command += ["--compile-scope", args.compile_scope, "--parallel", str(args.parallel), "--argv", args.argv]
    command += ["--turns"]
    return command + (["--tiny"] if args.tiny else []) + (["--no-reference"] if args.no_reference else [])


def run_batch(args, steps: list[tuple[str, list[Case]]], deadline: float | None) -> None:
    """Run these workers at once, their timed parts one at a time while nobody else compiles or runs
    (benchmarks/turns.py); then a row for each case a worker left without one: why."""
    commands = [worker_command(args, contender, cases) for contender, cases in steps]
    outcomes = turns.run_batch(commands, deadline, echo=sys.stdout)
    for (contender, cases), outcome in zip(steps, outcomes, strict=True):
        if outcome.timed_out:
            status = "timeout"
        elif outcome.returncode != 0:
            status = f"crashed: exit code {outcome.returncode}"
        else:
            status = "crashed: no row"  # a clean exit: only the cases it has no row for get this one
        record_missing(args, contender, cases, status, outcome.tail)


def record_missing(args, contender: str, cases: list[Case], status: str, tail: list[str]) -> None:
    """A row per case this run has no row for: why it did not finish."""
    rows = load_results(args.out)["rows"] if os.path.exists(args.out) else []
    got = {r["case"] for r in rows if r.get("run_id") == args.run_id and r["contender"] == contender}
    for case in cases:
        if case.name not in got:
            row = base_row(case, model_spec(case, args), args, contender)
            row.update(status=status, error="\n".join(tail[-15:]))
            append_row(args.out, row)
            print(f"[{contender}] {case.name}: {status}", flush=True)


def run_all(args) -> None:
    batches = plan(args)
    start = time.monotonic()
    listing = "; ".join(" + ".join(f"{k} × {len(c)}" for k, c in batch) for batch in batches)
    print(f"{sum(map(len, batches))} processes in {len(batches)} batches: {listing}", flush=True)
    for batch in batches:
        left = None if args.time_budget is None else args.time_budget - (time.monotonic() - start)
        print("== " + "; ".join(f"{k}: {', '.join(c.name for c in cases)}" for k, cases in batch), flush=True)
        if left is not None and left < args.min_start:
            for contender, cases in batch:
                record_missing(args, contender, cases, "skipped: time budget", [])
            continue
        run_batch(args, batch, None if left is None else time.monotonic() + left)
    print(f"done in {time.monotonic() - start:.0f} s; results in {args.out}", flush=True)


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="results JSON (rows are appended)")
    parser.add_argument("--cases", default=None, help="comma-separated globs over case names (--list)")
    parser.add_argument("--priority", type=int, default=99, help="only cases of priority ≤ this")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help=f"any of {CONTENDERS}")
    parser.add_argument("--no-reference", action="store_true", help="skip the fp64 run (no error columns)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (4; --tiny 2); full cases: all")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (4096; --tiny 32)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (10; --tiny 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls after the compile call (2; --tiny 1)")
    parser.add_argument("--inner", default="inductor", help="compiler of the compiled contenders: inductor, aot_eager")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds; no process starts after it")
    parser.add_argument("--min-start", type=float, default=20.0, help="no process starts with fewer seconds left")
    parser.add_argument("--resume", action="store_true", help="skip (case, contender) pairs already ok in --out")
    parser.add_argument(
        "--parallel", type=int, default=1, help="processes at once: their compiles overlap, their timed calls never do"
    )
    parser.add_argument(
        "--compile-scope",
        choices=("model", "block"),
        default="model",
        help="torch.compile the whole model, or each repeated block (decoder layer, vision block) in place",
    )
    parser.add_argument("--turns", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help="toy sizes: the whole harness in seconds on a CPU")
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "dora_fused_models_bench"))
    parser.add_argument("--list", action="store_true", help="print the case matrix and exit")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--run-id", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--argv", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.layers = args.layers or (2 if args.tiny else 4)
    args.seq = args.seq or (32 if args.tiny else 4096)
    args.repeats = args.repeats or (3 if args.tiny else 10)
    args.warmup = 1 if args.tiny and args.warmup is None else 2 if args.warmup is None else args.warmup
    args.contender_list = [c for c in args.contenders.split(",") if c]
    unknown = set(args.contender_list) - set(CONTENDERS)
    if unknown:
        parser.error(f"unknown contenders {sorted(unknown)}")
    args.device_kind = "cuda" if torch.cuda.is_available() else "cpu"
    args.run_id = args.run_id or time.strftime("%Y%m%d-%H%M%S")
    args.argv = args.argv or " ".join(sys.argv)
    if not args.list and not args.out:
        parser.error("--out is required")
    if args.out:
        args.out = os.path.abspath(args.out)
    return args


def main() -> None:
    args = parse_args()
    if args.list:
        for case in CASES:
            print(f"{case.priority}  {case.name}")
        return
    if args.worker:
        run_worker(args)
        return
    run_all(args)


if __name__ == "__main__":
    main()
