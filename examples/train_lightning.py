"""Train a PEFT DoRA model inside a Lightning ``LightningModule``, compiled with the dora_fused backend.

Compile the wrapped model (not the LightningModule) when the module is built:
Lightning then moves, trains and checkpoints it like any other submodule.

Runs on the CPU in well under a minute (a tiny random-init Llama, a few steps):

    pip install lightning
    python examples/train_lightning.py
"""

from __future__ import annotations

import tempfile

import torch
from peft import LoraConfig, get_peft_model
from tiny_llama import tiny_llama_config
from transformers import LlamaForCausalLM

import dora_fused  # optional: backend="dora_fused" is found by name; imported here for last_report()

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package
    import pytorch_lightning as pl


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = tiny_llama_config()
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", use_dora=True, lora_dropout=0.0)
    return get_peft_model(LlamaForCausalLM(config), lora)


class CausalLM(pl.LightningModule):
    def __init__(self, model: torch.nn.Module, backend="dora_fused", lr: float = 1e-3):
        super().__init__()
        self.model = torch.compile(model, backend=backend) if backend is not None else model
        self.lr = lr
        self.losses: list[float] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.model(input_ids=batch, labels=batch).loss
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def train(module: pl.LightningModule, steps: int, root_dir: str) -> None:
    ids = torch.randint(0, 128, (4 * steps, 24), generator=torch.Generator().manual_seed(1))
    loader = torch.utils.data.DataLoader(ids, batch_size=4)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root_dir,
    )
    trainer.fit(module, loader)


def main() -> None:
    module = CausalLM(build_model())
    with tempfile.TemporaryDirectory() as root_dir:
        train(module, steps=6, root_dir=root_dir)
    print(f"losses per step: {[round(loss, 4) for loss in module.losses]}")
    print(dora_fused.last_report().summary())


if __name__ == "__main__":
    main()
