"""One rank of FSDP2 DoRA training on CPU (gloo), run by ``test_fsdp2.py``; also its single-process reference.

``python tests/fsdp2_worker.py --cases whole,per_layer --out DIR`` with ``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set (as ``torchrun`` sets
them) runs each case in turn: a tiny random-init Llama with PEFT DoRA on every
linear layer (adapters off their identity init), ``fully_shard`` on each
decoder layer and on the root, compiled with ``dora_fused``, ``STEPS`` AdamW
steps, each rank on its own micro-batch. Each rank writes
``DIR/<case>.rank<r>.pt``: the losses (averaged over ranks), the full adapter
after training, the rewrite records, for each compiled graph whether it held
an activation checkpoint, how many DoRA modules it rewrote and how often it ran,
and, for cases that save, what a sharded checkpoint gave back.

The single-process reference (``train_reference``) trains the same model eagerly
on the ranks' micro-batches concatenated: with equal token counts per rank, the
mean of the ranks' mean losses is the global batch's mean, and FSDP's averaged
gradients are its gradients.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from helpers import TINY_LLAMA, dora_module_names, tiny_llama_dora

import dora_fused
from dora_fused.passes.naming import unwrapped_name

WORLD_SIZE = 2
STEPS = 3
LR = 1e-2
RANK_BATCH, SEQ = 2, 12
RANK_R = 4
PG_TIMEOUT_S = 120  # a collective that waits longer fails instead of hanging


@dataclass(frozen=True)
class Case:
    """How the model is sharded, compiled and trained."""

    compile: str = "per-layer"  # "whole": torch.compile(model); "per-layer": layer.compile(); "none": eager
    base_dtype: str = "float32"  # adapters stay fp32 (PEFT's default) either way
    mixed_precision: bool = False  # MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)
    checkpointing: str = ""  # "transformers": gradient_checkpointing_enable; "wrapper": torch's checkpoint_wrapper
    inner: str = "aot_eager"  # what compiles the rewritten graph
    save_load: bool = False  # save the sharded adapter (DCP and PEFT's file) and load it back


CASES = {
    "whole": Case(compile="whole"),
    "per_layer": Case(save_load=True),
    "mixed_precision": Case(base_dtype="bfloat16", mixed_precision=True),
    "mixed_precision_eager": Case(compile="none", base_dtype="bfloat16", mixed_precision=True),
    "checkpointing": Case(checkpointing="transformers"),
    "checkpoint_wrapper": Case(checkpointing="wrapper"),
    "inductor": Case(inner="inductor"),
}


# --- the model, the data and the training loop, shared with the reference -----------------------


def build_model(case: Case) -> torch.nn.Module:
    """The same tiny PEFT DoRA Llama in every process: same seed, fp32 adapters, magnitudes off ‖W‖."""
    model = tiny_llama_dora(getattr(torch, case.base_dtype), r=RANK_R).train()
    model.config.use_cache = False  # training: no KV cache (it would also make each layer compile anew)
    return model


def batch(step: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s token ids at ``step``; the global batch is the ranks' concatenated in rank order."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, TINY_LLAMA["vocab_size"], (RANK_BATCH, SEQ), generator=gen)


def adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter's tensors (LoRA A/B and magnitudes) of a full state dict, as fp32 CPU copies."""
    return {k: v.detach().float().cpu().clone() for k, v in state.items() if "lora_" in k}


def adapter_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's gradients as fp32 CPU copies, gathered from the ranks' shards under FSDP2, by state-dict name."""
    grads = {}
    for name, param in model.named_parameters():
        if "lora_" in name and param.grad is not None:
            grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
            grads[unwrapped_name(name)] = grad.detach().float().cpu().clone()  # as the state dict names it
    return grads


def train_reference(case: Case) -> dict[str, object]:
    """Single-process eager PEFT on the global batches: losses and the adapter after ``STEPS`` AdamW steps."""
    model = build_model(case)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    initial = adapter_state(model.state_dict())
    losses, grads = [], {}
    for step in range(STEPS):
        ids = torch.cat([batch(step, rank) for rank in range(WORLD_SIZE)])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if step == 0:
            grads = adapter_grads(model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    adapters = adapter_state(model.state_dict())
    return dict(losses=losses, first_grads=grads, initial=initial, adapters=adapters, model=model)


# --- one rank ----------------------------------------------------------------------------------------


class GraphSpy:
    """The backend, noting for each graph it compiles whether it holds an activation checkpoint, how
    many DoRA modules it rewrote, and how often the compiled graph then ran.

    Layers that share a compiled graph are recorded once, under the layer compiled first; the calls
    count shows that the others ran the same rewritten code.
    """

    def __init__(self, inner: str) -> None:
        self.backend = dora_fused.backend(inner=inner)
        self.graphs: list[dict[str, object]] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs, **kwargs):
        hop = torch.ops.higher_order.tag_activation_checkpoint
        checkpointed = any(n.op == "call_function" and n.target is hop for n in gm.graph.nodes)
        compiled_fn = self.backend(gm, example_inputs, **kwargs)
        graph = dict(checkpointed=checkpointed, rewritten=len(dora_fused.last_report().rewritten), calls=0)
        self.graphs.append(graph)

        def run(*args):
            graph["calls"] += 1
            return compiled_fn(*args)

        run._boxed_call = getattr(compiled_fn, "_boxed_call", False)  # called as the inner function expects
        return run


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    return model.get_base_model().model.layers


def shard(model: torch.nn.Module, case: Case) -> None:
    """``fully_shard`` each decoder layer, then the root (FSDP2's recipe), with the case's precision policy."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if case.checkpointing == "transformers":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = decoder_layers(model)
    if case.checkpointing == "wrapper":
        for i, layer in enumerate(layers):
            layers[i] = checkpoint_wrapper(layer)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kwargs = dict(mp_policy=policy) if case.mixed_precision else {}
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)


def compiled(model: torch.nn.Module, case: Case, backend: GraphSpy):
    """The callable to train: the model compiled whole, each (sharded) layer compiled in place, or eager."""
    if case.compile == "whole":
        return torch.compile(model, backend=backend)
    if case.compile == "per-layer":
        for layer in decoder_layers(model):
            layer.compile(backend=backend)
    return model


def full_adapter(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter gathered from every rank's shards (each rank gets all of it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return adapter_state(get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)))


def save_and_load(model: torch.nn.Module, case: Case, directory: Path) -> dict[str, object]:
    """Save the trained adapter two ways and load each back.

    DCP: every rank writes its shards of the adapter (``get_model_state_dict``,
    adapter keys only); a fresh sharded model loads them (``dcp.load``, then
    ``set_model_state_dict``) and is gathered. PEFT's file: rank 0 gathers the full
    state dict and writes ``get_peft_model_state_dict`` of it with
    ``save_pretrained`` (``adapter_model.safetensors``, read by the parent).
    """
    import torch.distributed.checkpoint as dcp
    from peft import get_peft_model_state_dict
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )

    sharded = {k: v for k, v in get_model_state_dict(model).items() if "lora_" in k}
    dcp.save(sharded, checkpoint_id=str(directory / "dcp"))
    fresh = build_model(case)
    shard(fresh, case)
    into = {k: v for k, v in get_model_state_dict(fresh).items() if "lora_" in k}
    dcp.load(into, checkpoint_id=str(directory / "dcp"))
    set_model_state_dict(fresh, into, options=StateDictOptions(strict=False))

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        model.save_pretrained(str(directory / "peft"), state_dict=get_peft_model_state_dict(model, state_dict=full))
    dist.barrier()
    return dict(dcp_loaded=full_adapter(fresh), peft_dir=str(directory / "peft"))


@contextlib.contextmanager
def dynamo_setting(name: str, value: object) -> Iterator[None]:
    before = getattr(torch._dynamo.config, name)
    setattr(torch._dynamo.config, name, value)
    try:
        yield
    finally:
        setattr(torch._dynamo.config, name, before)


def run_case(name: str, case: Case, out: Path) -> dict[str, object]:
    """Train ``case`` on this rank; the result the parent compares (same on every rank but the records)."""
    torch._dynamo.reset()
    dora_fused.clear_reports()
    started = time.perf_counter()
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model(case)
    shard(model, case)
    # PEFT's DoRA forward clears its weight cache on every call: Dynamo's default refuses that side
    # effect inside an activation checkpoint and runs the whole layer eagerly, unrewritten.
    with dynamo_setting("skip_fwd_side_effects_in_bwd_under_checkpoint", bool(case.checkpointing)):
        backend = GraphSpy(case.inner)
        fn = compiled(model, case, backend)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
        losses, grads = [], {}
        for step in range(STEPS):
            ids = batch(step, rank)
            loss = fn(input_ids=ids, labels=ids).loss
            loss.backward()
            if step == 0:
                grads = adapter_grads(model)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            mean = loss.detach().float().clone()
            dist.all_reduce(mean)
            losses.append(mean.item() / world)
    result = dict(
        case=asdict(case),
        rank=rank,
        losses=losses,
        adapters=full_adapter(model),
        first_grads=grads,
        expected_names=sorted(unwrapped_name(name) for name in dora_module_names(model)),
        records=[report.to_json() for report in dora_fused.reports()],
        graphs=backend.graphs,
        sharded_adapter_dtypes=sorted({str(p.dtype)[6:] for n, p in model.named_parameters() if "lora_" in n}),
    )
    if case.save_load:
        directory = out / f"{name}.checkpoint"
        directory.mkdir(exist_ok=True)
        result.update(save_and_load(model, case, directory))
    result["seconds"] = time.perf_counter() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", required=True, help=f"comma-separated, of {sorted(CASES)}")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=PG_TIMEOUT_S))
    rank = dist.get_rank()
    for name in args.cases.split(","):
        try:
            result = run_case(name, CASES[name], args.out)
        except Exception as error:
            # the other ranks may wait in a collective of this case: leave at once, they fail on the closed socket
            traceback.print_exc()
            torch.save(dict(error=f"{type(error).__name__}: {error}"), args.out / f"{name}.rank{rank}.pt")
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        torch.save(result, args.out / f"{name}.rank{rank}.pt")
        print(f"rank {rank}: {name} done in {result['seconds']:.1f} s", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
