"""The tiny random-init Llama the examples share (CPU-sized), and a DoRA adapter moved off its identity init.

The examples import it as a sibling module (``python examples/<name>.py`` puts
this folder on ``sys.path``).
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig


def tiny_llama_config() -> LlamaConfig:
    """2 layers, hidden 64, MLP 176, 4 heads / 2 KV, vocabulary 128."""
    return LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )


def perturb_magnitudes(model: torch.nn.Module) -> None:
    """Move every DoRA magnitude off ‖W‖ (×U(0.5, 1.5)), so the DoRA scale is not 1."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(torch.empty_like(param).uniform_(0.5, 1.5))
