"""Compile a tiny random-init Llama with PEFT DoRA on every linear layer with the dora_fused backend.

Runs on the CPU in under a minute: prints the rewritten modules and the max
difference to PEFT eager, for a forward pass and for the adapter gradients.

    python examples/tiny_llama_demo.py
"""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import dora_fused  # optional: backend="dora_fused" is found by name; imported here for last_report()


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    model = LlamaForCausalLM(config)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", use_dora=True, init_lora_weights=False)
    model = get_peft_model(model, lora)
    with torch.no_grad():  # move magnitudes off ||W|| so the DoRA scale is not 1
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(torch.empty_like(param).uniform_(0.5, 1.5))
    return model


def main() -> None:
    model = build()
    eager = copy.deepcopy(model)
    input_ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))

    compiled = torch.compile(model, backend="dora_fused")
    logits = compiled(input_ids=input_ids).logits
    expected = eager(input_ids=input_ids).logits

    report = dora_fused.last_report()
    print(report)
    print(f"\nforward: max |compiled - eager| = {(logits - expected).abs().max().item():.3g}")

    logits.float().square().mean().backward()
    expected.float().square().mean().backward()
    reference = dict(eager.named_parameters())
    worst = max(
        (param.grad - reference[name.removeprefix("_orig_mod.")].grad).abs().max().item()
        for name, param in compiled.named_parameters()
        if param.grad is not None
    )
    print(f"backward: max |grad difference| over lora_A, lora_B, magnitude = {worst:.3g}")


if __name__ == "__main__":
    main()
