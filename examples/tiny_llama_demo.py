"""Compile a tiny random-init Llama with PEFT DoRA on every linear layer with the dora_fused backend.

Runs on the CPU in under a minute: prints the rewritten modules and the max
difference to PEFT eager, for a forward pass and for the adapter gradients.

    python examples/tiny_llama_demo.py
"""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig, get_peft_model
from tiny_llama import perturb_magnitudes, tiny_llama_config
from transformers import LlamaForCausalLM

import dora_fused  # optional: backend="dora_fused" is found by name; imported here for last_report()


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    config = tiny_llama_config()
    model = LlamaForCausalLM(config)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", use_dora=True, init_lora_weights=False)
    model = get_peft_model(model, lora)
    perturb_magnitudes(model)
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
