"""Test helpers: model builders and an error metric that says where and how much."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

# Odd sizes on purpose: no dimension is a multiple of another, so a [d_out, d_in]
# check on node meta cannot collide with an activation's shape.
TINY_LLAMA = dict(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=88,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=12,
    max_position_embeddings=64,
)


def is_dora_layer(module: torch.nn.Module) -> bool:
    """A PEFT LoRA layer carrying at least one DoRA magnitude."""
    magnitudes = getattr(module, "lora_magnitude_vector", None)
    return isinstance(magnitudes, torch.nn.ModuleDict) and len(magnitudes) > 0


def dora_module_names(model: torch.nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if is_dora_layer(module)}


def layer_paths(names) -> set[str]:
    """``…layers.0.self_attn.q_proj`` from any prefix: Dynamo names modules after what was compiled."""
    return {name[name.rindex("layers.") :] for name in names}


def assert_all_rewritten(model: torch.nn.Module) -> None:
    """A graph compiled since the reports were cleared rewrote every DoRA module of ``model``; none was left alone."""
    import dora_fused

    reports = dora_fused.reports()
    assert reports, "nothing was compiled"
    expected = layer_paths(dora_module_names(model))
    assert any(layer_paths(report.rewritten) == expected for report in reports), [r.summary() for r in reports]
    assert all(report.skipped == [] and report.error is None for report in reports), [r.summary() for r in reports]


def token_ids(vocab: int, batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def perturb_magnitudes(model: torch.nn.Module, spread: float, seed: int = 0) -> None:
    """Move each magnitude off ||W||: m ← m·(1 + spread·u), u ~ U(-1, 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                noise = (torch.rand(param.shape, generator=gen, dtype=torch.float64) * 2 - 1).to(param.device)
                param.copy_((param.double() * (1 + spread * noise)).to(param.dtype))


def tiny_llama_dora(
    base_dtype: torch.dtype = torch.float32,
    adapter_dtype: torch.dtype | None = None,
    *,
    r: int = 8,
    seed: int = 0,
    spread: float = 0.5,
    layers: int = TINY_LLAMA["num_hidden_layers"],
    **lora_kwargs,
) -> torch.nn.Module:
    """Random-init tiny Llama, PEFT DoRA on all linear layers, adapters not at their identity init.

    ``adapter_dtype=None`` keeps PEFT's default (fp32 adapters on a bf16/fp16 base). ``layers``:
    decoder layers (one compiles faster under Inductor).
    """
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, "num_hidden_layers": layers})).to(base_dtype)
    config = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules="all-linear",
        use_dora=True,
        init_lora_weights=False,
        **{"lora_dropout": 0.0, **lora_kwargs},
    )
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=adapter_dtype is None)
    if adapter_dtype is not None:
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(adapter_dtype)
    perturb_magnitudes(peft_model, spread, seed)
    return peft_model


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| (Frobenius), in fp64."""
    diff = torch.linalg.vector_norm(actual.double() - expected.double()).item()
    scale = torch.linalg.vector_norm(expected.double()).item()
    return diff / scale if scale > 0 else diff


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in fp64."""
    diff = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    return diff / scale if scale > 0 else diff


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float, what: str = "") -> None:
    """allclose that reports the worst element: where, and how far off."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.double(), expected.double()
    excess = (a - e).abs() - (atol + rtol * e.abs())
    if (excess > 0).any():
        index = tuple(int(i) for i in torch.unravel_index(excess.argmax(), excess.shape))
        raise AssertionError(
            f"{what}: {(excess > 0).sum().item()} of {excess.numel()} elements off; worst at {index}: "
            f"actual {a[index].item():.8g}, expected {e[index].item():.8g}, "
            f"|diff| {(a - e).abs()[index].item():.3g} > atol {atol:g} + rtol {rtol:g}·|expected|"
        )


class HandWrittenDora(torch.nn.Module):
    """DoRA written by hand in weight space: ``m·(W + s·B@A)/‖W + s·B@A‖_row``, then ``F.linear``.

    ``product``: "@", "mm" or "matmul"; ``norm``: "linalg", "vector" or "method"
    (``Tensor.norm(p=2)``); ``scale``: "m_over_n" (``(m / n).view(-1, 1)·w``),
    "w_over_n" (``m·(w / n)`` with a keepdim norm and ``m`` as ``[d_out, 1]``) or
    "mw_over_n" (``(m·w) / n``); ``detach``: the paper's detached norm;
    ``adapter_dtype``: a dtype for A and B other than W's makes the form unsupported.
    """

    def __init__(
        self,
        d_in: int = 5,
        d_out: int = 6,
        r: int = 2,
        *,
        product: str = "@",
        norm: str = "linalg",
        scale: str = "m_over_n",
        detach: bool = True,
        bias: bool = False,
        adapter_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(d_out, d_in, generator=gen))
        self.A = torch.nn.Parameter(torch.randn(r, d_in, generator=gen).to(adapter_dtype))
        self.B = torch.nn.Parameter(torch.randn(d_out, r, generator=gen).to(adapter_dtype))
        self.m = torch.nn.Parameter(torch.rand(d_out, generator=gen) + 1)
        self.bias = torch.nn.Parameter(torch.randn(d_out, generator=gen)) if bias else None
        self.product, self.norm, self.scale, self.detach = product, norm, scale, detach

    def _norm(self, w: torch.Tensor, keepdim: bool) -> torch.Tensor:
        if self.norm == "linalg":
            n = torch.linalg.norm(w, dim=1, keepdim=keepdim)
        elif self.norm == "vector":
            n = torch.linalg.vector_norm(w, ord=2, dim=1, keepdim=keepdim)
        else:
            n = w.norm(p=2, dim=1, keepdim=keepdim)
        return n.detach() if self.detach else n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ba = {
            "@": lambda: self.B @ self.A,
            "mm": lambda: torch.mm(self.B, self.A),
            "matmul": lambda: torch.matmul(self.B, self.A),
        }[self.product]()
        w = self.weight + 0.5 * ba
        if self.scale == "m_over_n":
            dora = (self.m / self._norm(w, keepdim=False)).view(-1, 1) * w
        elif self.scale == "w_over_n":
            dora = self.m.view(-1, 1) * (w / self._norm(w, keepdim=True))
        else:
            dora = (self.m.unsqueeze(1) * w) / self._norm(w, keepdim=True)
        return torch.nn.functional.linear(x, dora, self.bias)


def small_dora_mlp(r: int = 2) -> torch.nn.Module:
    """Linear(12→10) + ReLU + Linear(10→6, no bias), PEFT DoRA on both linears, fp32."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.ReLU(), torch.nn.Linear(10, 6, bias=False))
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0", "2"], use_dora=True, init_lora_weights=False)
    model = get_peft_model(base, config)
    perturb_magnitudes(model, 0.5)
    return model


class TorchtuneStyleDoRALinear(torch.nn.Module):
    """A DoRA linear in torchtune's formulation, written from the public math (not torchtune's code).

    The norm uses the identity trick on the LoRA modules and is detached; the base
    output includes the bias, so the bias is scaled by the magnitude as well:
    ``out = g ⊙ (x·Wᵀ + b) + g·s·(x·Aᵀ·Bᵀ) = (g - 1)·base + g·s·lora + base``.
    """

    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float, bias: bool = True):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5, requires_grad=False)
        self.bias = torch.nn.Parameter(torch.randn(d_out) * 0.1, requires_grad=False) if bias else None
        self.lora_a = torch.nn.Linear(d_in, rank, bias=False)
        self.lora_b = torch.nn.Linear(rank, d_out, bias=False)
        torch.nn.init.normal_(self.lora_b.weight, std=0.1)
        self.scaling = alpha / rank
        with torch.no_grad():
            norm = torch.linalg.norm(self.weight + self.scaling * (self.lora_b.weight @ self.lora_a.weight), dim=1)
        self.magnitude = torch.nn.Parameter(norm * (1 + 0.3 * torch.rand(d_out)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base_out = torch.nn.functional.linear(x, self.weight, self.bias)
        lora_out = self.lora_b(self.lora_a(x))
        eye = torch.eye(self.lora_a.weight.shape[1], device=x.device, dtype=x.dtype)
        lora_weight = self.lora_b(self.lora_a(eye)).T
        weight = self.weight.to(x.dtype)
        weight_norm = torch.linalg.norm(weight + self.scaling * lora_weight.detach(), dim=1).detach()
        g = (self.magnitude / weight_norm).view(1, -1)
        return (g - 1) * base_out + g * lora_out * self.scaling + base_out


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def import_benchmark(patch: pytest.MonkeyPatch, script: str, name: str) -> ModuleType:
    """``benchmarks/<script>.py`` imported in this process as ``name``, as ``python benchmarks/<script>.py`` sees it.

    The benchmarks folder goes on ``sys.path`` and the module into ``sys.modules``
    (dataclasses look their module up there); ``patch`` undoes both.
    """
    patch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    patch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module
