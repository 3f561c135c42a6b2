"""Test helpers: tiny PEFT DoRA Llamas on quantized bases (bitsandbytes, torchao), and their fp64 dequantized twins."""

from __future__ import annotations

import importlib.util

import torch
from helpers import TINY_LLAMA, perturb_magnitudes
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
HAS_TORCHAO = importlib.util.find_spec("torchao") is not None

# scheme -> (quant_type, double quantization) for bitsandbytes 4-bit
BNB_4BIT = {
    "bnb-nf4": ("nf4", False),
    "bnb-nf4-dq": ("nf4", True),
    "bnb-fp4": ("fp4", False),
    "bnb-fp4-dq": ("fp4", True),
}


def _quantize_bnb(model: torch.nn.Module, scheme: str, compute_dtype: torch.dtype, device: str) -> None:
    """Every Linear of the decoder layers as bitsandbytes' ``Linear4bit`` / ``Linear8bitLt`` (CPU quantization)."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if not isinstance(child, torch.nn.Linear):
                    continue
                dims = (child.in_features, child.out_features)
                if scheme == "bnb-int8":  # LLM.int8() with transformers' default outlier threshold
                    module = bnb.nn.Linear8bitLt(
                        *dims, bias=child.bias is not None, has_fp16_weights=False, threshold=6.0
                    )
                    module.weight = bnb.nn.Int8Params(child.weight.data.clone(), requires_grad=False)
                else:
                    quant_type, nested = BNB_4BIT[scheme]
                    module = bnb.nn.Linear4bit(
                        *dims, bias=child.bias is not None, compute_dtype=compute_dtype,
                        compress_statistics=nested, quant_type=quant_type,
                    )  # fmt: skip
                    # bitsandbytes repacks 4-bit weights for its AVX512-BF16 CPU inference kernel on
                    # CPUs that have it, and that layout needs out_features % 32 == 0 (not the tiny
                    # model's): off, so every machine runs the same eager path (the pass leaves a
                    # repacked weight alone, tested on its own)
                    module.support_avx512bf16_for_cpu = False
                    module.weight = bnb.nn.Params4bit(
                        child.weight.data.clone(), requires_grad=False, compress_statistics=nested,
                        quant_type=quant_type, module=module,
                    )  # fmt: skip
                setattr(parent, name, module.to(device))  # quantizes
    if scheme == "bnb-int8":
        model.is_loaded_in_8bit = True
    else:
        model.is_loaded_in_4bit = True


def _quantize_torchao(model: torch.nn.Module, scheme: str) -> None:
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_

    config = Int8WeightOnlyConfig() if scheme == "torchao-int8" else IntxWeightOnlyConfig(weight_dtype=torch.int4)
    quantize_(model.model.layers, config)


def quantized_llama_dora(
    scheme: str, *, r: int = 8, seed: int = 0, layers: int = 1, device: str = "cpu"
) -> torch.nn.Module:
    """Tiny random Llama (bf16) with its decoder Linears quantized by ``scheme``; PEFT DoRA (fp32 adapters) on them."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, "num_hidden_layers": layers})).to(torch.bfloat16)
    if scheme.startswith("bnb-"):
        _quantize_bnb(model, scheme, torch.bfloat16, device)
        model.to(device)
    else:
        _quantize_torchao(model.to(device), scheme)
    config = LoraConfig(
        r=r, lora_alpha=2 * r, target_modules="all-linear", use_dora=True, init_lora_weights=False, lora_dropout=0.0
    )
    peft_model = get_peft_model(model, config)
    perturb_magnitudes(peft_model, 0.5, seed)
    return peft_model


def dequantized_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The base layer's weight as its own library dequantizes it (eager, no reassignment)."""
    weight = layer.weight
    if type(weight).__module__.startswith("torchao."):
        return weight.dequantize()
    import bitsandbytes.functional as bnbf

    if type(weight).__name__ == "Params4bit":
        return bnbf.dequantize_4bit(weight.data, weight.quant_state)
    scales = layer.state.SCB if layer.state.SCB is not None else weight.SCB
    return bnbf.int8_vectorwise_dequant(weight.data, scales)


def fp64_twin(model: torch.nn.Module, scheme: str, *, layers: int = 1) -> torch.nn.Module:
    """The same PEFT DoRA model in fp64 on plain Linear bases holding the dequantized weights (the reference)."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, "num_hidden_layers": layers}))
    lora = next(m for m in model.modules() if hasattr(m, "lora_A"))
    adapter = "default"
    config = LoraConfig(
        r=lora.r[adapter], lora_alpha=lora.lora_alpha[adapter], target_modules="all-linear", use_dora=True,
        init_lora_weights=False, lora_dropout=0.0,
    )  # fmt: skip
    twin = get_peft_model(base, config).double().to(next(model.parameters()).device)
    quantized = dict(model.named_modules())
    with torch.no_grad():
        for name, module in twin.named_modules():
            source = quantized[name]
            if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
                module.base_layer.weight.copy_(dequantized_weight(source.base_layer).double())
                for attr in ("lora_A", "lora_B"):
                    getattr(module, attr)[adapter].weight.copy_(getattr(source, attr)[adapter].weight.double())
                module.lora_magnitude_vector[adapter].weight.copy_(
                    source.lora_magnitude_vector[adapter].weight.double()
                )
            elif not name.endswith(".base_layer") and not hasattr(source, "base_layer"):
                for pname, param in module.named_parameters(recurse=False):
                    param.copy_(getattr(source, pname).double())
    return twin


def twin_models(scheme: str, **kwargs: object) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Two identical quantized models: PEFT eager 8-bit breaks its layer (on CPU it replaces ``module.weight``)."""
    return quantized_llama_dora(scheme, **kwargs), quantized_llama_dora(scheme, **kwargs)


RATIO, ATOL = 1.1, 1e-6  # as test_peft_llama: each group's error at most RATIO × PEFT eager's, plus ATOL
GROUPS = ("lora_A", "lora_B", "lora_magnitude_vector")


def _ids(device: str, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY_LLAMA["vocab_size"], (2, 9), generator=gen).to(device)


def _run(model: torch.nn.Module, ids: torch.Tensor, train: bool) -> dict[str, torch.Tensor]:
    """Logits (eval), or the adapters' gradients of a scalar loss by group (training)."""
    model.train(train)
    if not train:
        with torch.no_grad():
            return {"logits": model(input_ids=ids).logits.double()}
    logits = model(input_ids=ids).logits
    (logits.float().square().mean()).backward()
    return {group: adapter_grads(model, group) for group in GROUPS}


def check_against_fp64(scheme: str, train: bool, backend: object, device: str = "cpu", layers: int = 1) -> list:
    """One graph, every DoRA module rewritten with ``scheme`` recorded, each group no farther from fp64 than eager's.

    Returns the records. The fp64 twin is built before PEFT eager runs (8-bit
    eager replaces its layers' weights on CPU).
    """
    from helpers import dora_module_names, relative_error

    import dora_fused

    ids = _ids(device)
    eager_model, compiled_model = twin_models(scheme, device=device, layers=layers)
    reference = _run(fp64_twin(eager_model, scheme, layers=layers), ids, train)
    eager = _run(eager_model, ids, train)  # once: PEFT eager 8-bit breaks its layers on CPU after one call
    torch._dynamo.reset()
    dora_fused.clear_reports()
    patch = {"capture_dynamic_output_shape_ops": scheme == "bnb-int8"}  # LLM.int8()'s outlier columns
    with torch._dynamo.config.patch(**patch):
        ours = _run(torch.compile(compiled_model, backend=backend), ids, train)
    reports = dora_fused.reports()
    assert len(reports) == 1 and reports[0].graph_breaks == [], [str(r) for r in reports]
    records = reports[0].modules
    assert {r.name for r in records if r.status == "rewritten"} == dora_module_names(compiled_model), str(reports[0])
    assert {r.quantization for r in records} == {scheme}
    assert all(r.dense_bytes > r.rewritten_bytes for r in records)
    for group, exact in reference.items():
        ours_error, eager_error = relative_error(ours[group], exact), relative_error(eager[group], exact)
        print(f"{scheme} {'train' if train else 'eval'} {group}: ours {ours_error:.3g}, PEFT eager {eager_error:.3g}")
        assert ours_error <= RATIO * eager_error + ATOL, (group, ours_error, eager_error)
    return records


def adapter_grads(model: torch.nn.Module, group: str = "lora_") -> torch.Tensor:
    """The gradients of the parameters whose names hold ``group``, flattened in name order (fp64)."""
    grads = [p.grad.double().reshape(-1) for n, p in sorted(model.named_parameters()) if group in n]
    return torch.cat(grads)


__all__ = [
    "BNB_4BIT",
    "HAS_BNB",
    "HAS_TORCHAO",
    "adapter_grads",
    "check_against_fp64",
    "dequantized_weight",
    "fp64_twin",
    "quantized_llama_dora",
    "twin_models",
]
