"""What a compiled DoRA training step keeps for its backward: a layer's output is recomputed, not saved twice.

The rewritten compose keeps the base output ``result`` for the magnitude's gradient.
Where a later op's backward needs the layer's output too (the MLP's ``silu(gate)·up``
keeps ``gate`` and ``up``), the output is recomputed from what the compose keeps
(``passes/rewrite.py``, ``recompute_in_backward``), so each of those layers keeps one
``[tokens, d_out]`` tensor, as LoRA's does. Counted with saved-tensor hooks around the
compiled call, on one Llama decoder layer.
"""

from __future__ import annotations

import collections

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import dora_fused
from dora_fused.passes import rewrite

TOKENS, HIDDEN, MLP = 64, 256, 1024
CONFIG = dict(
    hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=128,
)  # fmt: skip


def _layer(use_dora: bool, device: str, r: int = 8) -> torch.nn.Module:
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**CONFIG)).to(device, torch.bfloat16)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", use_dora=use_dora, init_lora_weights=False)
    return get_peft_model(base, config).base_model.model.model.layers[0]


def _step(layer: torch.nn.Module, backend: object, device: str) -> tuple[collections.Counter, list[torch.Tensor]]:
    """(shapes of the saved ``[tokens, MLP]`` tensors of a compiled call, the adapters' gradients)."""
    compiled = torch.compile(layer, backend=backend)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, TOKENS, HIDDEN, generator=gen).to(device, torch.bfloat16).requires_grad_()
    position = tuple(torch.randn(1, TOKENS, HIDDEN // 4, generator=gen).to(device, torch.bfloat16) for _ in range(2))

    def call() -> torch.Tensor:
        out = compiled(x, position_embeddings=position)
        return out[0] if isinstance(out, tuple) else out

    call().float().sum().backward()  # compiles, outside the hooks
    layer.zero_grad()
    shapes: list[tuple[int, ...]] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        out = call()
    out.float().sum().backward()
    wide = collections.Counter(s for s in shapes if TOKENS in s and MLP in s)  # activations, not weights
    grads = [p.grad.clone() for n, p in layer.named_parameters() if "lora_" in n]
    return wide, grads


@pytest.mark.parametrize(
    ("inner", "device"),
    [
        ("aot_eager", "cpu"),
        pytest.param("inductor", "cpu", marks=pytest.mark.slow),
        pytest.param("inductor", "cuda", marks=pytest.mark.gpu),
    ],
)
def test_the_mlp_keeps_as_many_wide_activations_as_lora(inner, device):
    """gate and up: LoRA keeps their outputs; the rewrite keeps their base outputs, and no output besides."""
    lora, _ = _step(_layer(False, device), inner if inner == "aot_eager" else "inductor", device)
    dora, _ = _step(_layer(True, device), dora_fused.backend(inner=inner), device)
    assert [m.status for m in dora_fused.last_report().modules] == ["rewritten"] * 7
    assert sum(dora.values()) == sum(lora.values()), (dora, lora)


def test_above_the_rank_bound_the_output_is_saved():
    """Where recomputing would repeat a large up-projection (r > RECOMPUTE_MAX_RANK), gate's and up's outputs stay."""
    r = rewrite.RECOMPUTE_MAX_RANK + 1
    lora, _ = _step(_layer(False, "cpu", r), "aot_eager", "cpu")
    dora, _ = _step(_layer(True, "cpu", r), dora_fused.backend(inner="aot_eager"), "cpu")
    assert sum(dora.values()) == sum(lora.values()) + 2, (dora, lora)


def test_recomputing_the_output_changes_no_gradient(monkeypatch):
    """The recomputed output is the forward's, op for op: the adapters' gradients are bit for bit those of saving it."""
    kept, recomputed_grads = _step(_layer(True, "cpu"), dora_fused.backend(inner="aot_eager"), "cpu")
    assert [m.status for m in dora_fused.last_report().modules] == ["rewritten"] * 7
    monkeypatch.setattr(rewrite, "recompute_in_backward", lambda *args: None)
    torch._dynamo.reset()
    saved, saved_grads = _step(_layer(True, "cpu"), dora_fused.backend(inner="aot_eager"), "cpu")
    assert [m.status for m in dora_fused.last_report().modules] == ["rewritten"] * 7
    assert sum(saved.values()) == sum(kept.values()) + 2, (saved, kept)  # gate's and up's outputs besides
    assert len(saved_grads) == len(recomputed_grads) == 21
    for a, b in zip(saved_grads, recomputed_grads, strict=True):
        assert torch.equal(a, b)
