"""Train a PEFT DoRA model with the Hugging Face ``Trainer``, compiled with the dora_fused backend.

``TrainingArguments(torch_compile_backend="dora_fused")`` does not work: accelerate
checks the name against its own closed list of backends and raises
``ValueError: 'DORA_FUSED' is not a valid DynamoBackend`` when the Trainer is built.
Compile the model yourself instead, before handing it to the Trainer.
``model.compile(...)`` compiles in place: the model keeps its class, its forward
signature (the Trainer reads it to drop unused dataset columns) and its
``state_dict`` keys (``save_model`` writes the usual adapter files). Or let the
Trainer compile it (``torch_compile=True``, Inductor) after
``dora_fused.enable_inductor_hook()``: docs/integrations.md.

Runs on the CPU in well under a minute (a tiny random-init Llama, a few steps):

    python examples/train_hf_trainer.py
"""

from __future__ import annotations

import tempfile

import torch
from peft import LoraConfig, get_peft_model
from tiny_llama import tiny_llama_config
from transformers import LlamaForCausalLM, Trainer, TrainingArguments

import dora_fused  # optional: backend="dora_fused" is found by name; imported here for last_report()


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = tiny_llama_config()
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", use_dora=True, lora_dropout=0.0)
    return get_peft_model(LlamaForCausalLM(config), lora)


class RandomTokens(torch.utils.data.Dataset):
    """Causal-LM examples of random tokens: the labels are the inputs (the model shifts them)."""

    def __init__(self, n: int = 32, length: int = 24, vocab_size: int = 128):
        self.ids = torch.randint(0, vocab_size, (n, length), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    model = build_model()
    model.compile(backend="dora_fused")  # in place (torch.compile(model) breaks save_model: docs/integrations.md)

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=6,
            per_device_train_batch_size=4,
            learning_rate=1e-3,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(),
        )
        trainer = Trainer(model=model, args=args, train_dataset=RandomTokens())
        trainer.train()
        trainer.save_model(out)  # adapter_config.json + adapter_model.safetensors, as without compile

    losses = [round(entry["loss"], 4) for entry in trainer.state.log_history if "loss" in entry]
    print(f"losses per step: {losses}")
    print(dora_fused.last_report().summary())


if __name__ == "__main__":
    main()
