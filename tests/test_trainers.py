"""Trainers that compile with Inductor, with the Inductor hook on: the HF Trainer, TRL, accelerate, Lightning.

Each test trains a one-layer tiny random-init Llama with PEFT DoRA (adapters off their identity init) for a
few steps twice, eagerly and compiled by the framework with its default backend (Inductor, real
C++ compiles on the CPU), and checks that the losses agree step by step and that every DoRA
module was rewritten (``dora_fused.reports()``). accelerate and Lightning call the model as the HF
Trainer does, on the same shapes, so they find the Trainer test's compiled graph in Inductor's
cache (and compile it when run alone).
docs/integrations.md shows the code each test exercises. The Axolotl plugin is in
test_axolotl_plugin.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import TINY_LLAMA, assert_all_rewritten, assert_close, tiny_llama_dora, token_ids
from peft import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

VOCAB = TINY_LLAMA["vocab_size"]
STEPS = 3
# Inductor reorders and fuses fp32 reductions: per-step losses agree to a few ulps, not bit for bit.
LOSS_RTOL = 1e-5


def _losses(trainer: Trainer) -> torch.Tensor:
    return torch.tensor([entry["loss"] for entry in trainer.state.log_history if "loss" in entry], dtype=torch.float64)


def _training_args(cls=TrainingArguments, **kwargs):
    return cls(
        max_steps=STEPS,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        **kwargs,
    )


# --- HF Trainer ------------------------------------------------------------------------------------


class _Tokens(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.ids = token_ids(VOCAB, 8, 12, seed=1)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_hf_trainer_torch_compile_true_trains_as_eager_and_saves_the_adapter(tmp_path, inductor_hook):
    """``TrainingArguments(torch_compile=True)``: eager's losses, every DoRA module rewritten, eager's adapter saved.

    The Trainer keeps the PeftModel as ``trainer.model`` and trains the compiled wrapper, so
    ``save_model`` writes the adapter's tensors under their usual names.
    """
    model = tiny_llama_dora(r=4, layers=1).train()
    initial = {name: p.detach().clone() for name, p in get_peft_model_state_dict(model).items()}

    eager_args = _training_args(output_dir=str(tmp_path / "eager"))
    eager = Trainer(model=copy.deepcopy(model), args=eager_args, train_dataset=_Tokens())
    eager.train()
    eager.save_model(str(tmp_path / "eager"))

    args = _training_args(output_dir=str(tmp_path / "compiled"), torch_compile=True)
    compiled = Trainer(model=model, args=args, train_dataset=_Tokens())
    compiled.train()
    compiled.save_model(str(tmp_path / "compiled"))

    assert isinstance(compiled.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)
    assert_all_rewritten(model)
    assert len(_losses(eager)) == STEPS
    assert_close(_losses(compiled), _losses(eager), rtol=LOSS_RTOL, atol=0, what="loss per step")

    saved = load_file(tmp_path / "compiled" / "adapter_model.safetensors")
    expected = load_file(tmp_path / "eager" / "adapter_model.safetensors")
    assert saved.keys() == expected.keys() and len(saved) == len(initial)
    moved = 0.0
    for key, value in expected.items():
        assert_close(saved[key], value, rtol=1e-4, atol=1e-6, what=key)
        moved = max(moved, (value - initial[key]).abs().max().item())
    assert moved > 1e-3  # the steps did train the adapters


# --- TRL -------------------------------------------------------------------------------------------


def _word_tokenizer():
    """A word-level tokenizer over the tiny Llama's vocabulary: ``<pad>`` 0, ``<eos>`` 1, ``t2`` … ``t96``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{f"t{i}": i for i in range(2, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")


def test_trl_sft_trainer_torch_compile_true_trains_as_eager(tmp_path, inductor_hook):
    """TRL's ``SFTTrainer`` on a tiny text dataset, ``SFTConfig(torch_compile=True)``: eager's losses, all rewritten.

    ``SFTConfig`` defaults to bf16 autocast and gradient checkpointing; both are off here, so the
    losses compare in fp32 and the compile stays small (checkpointed DoRA layers need
    ``torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True``, see
    docs/integrations.md). Every text has 11 words (12 tokens with ``<eos>``), so no batch is
    padded and one graph serves every step.
    """
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    gen = torch.Generator().manual_seed(5)
    texts = [" ".join(f"t{int(i)}" for i in torch.randint(2, VOCAB, (11,), generator=gen)) for _ in range(8)]
    dataset = Dataset.from_dict({"text": texts})
    model = tiny_llama_dora(r=4, layers=1).train()

    def train(peft_model, name: str, **kwargs) -> SFTTrainer:
        args = _training_args(
            SFTConfig, output_dir=str(tmp_path / name), bf16=False, gradient_checkpointing=False, **kwargs
        )
        trainer = SFTTrainer(model=peft_model, args=args, train_dataset=dataset, processing_class=_word_tokenizer())
        trainer.train()
        return trainer

    eager = train(copy.deepcopy(model), "eager")
    compiled = train(model, "compiled", torch_compile=True)

    assert_all_rewritten(model)
    assert len(_losses(eager)) == STEPS
    assert_close(_losses(compiled), _losses(eager), rtol=LOSS_RTOL, atol=0, what="loss per step")


# --- accelerate and Lightning: the same calls on the same shapes -----------------------------------


def _batches() -> list[torch.Tensor]:
    return list(token_ids(VOCAB, 2 * STEPS, 12, seed=4).split(2))


def _loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The causal-LM loss, with the model called as the HF Trainer calls it (``num_items_in_batch``).

    The compiled graph is then the HF Trainer test's, and Inductor's cache serves it.
    """
    return model(input_ids=batch, labels=batch, num_items_in_batch=batch[:, 1:].ne(-100).sum() / 1).loss


def _fit_by_hand(model: torch.nn.Module) -> torch.Tensor:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for batch in _batches():
        loss = _loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64)


def test_accelerate_dynamo_backend_inductor_trains_as_eager(inductor_hook):
    """``Accelerator(dynamo_backend="inductor")``: ``prepare`` compiles the model; eager's losses, all rewritten."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    model = tiny_llama_dora(r=4, layers=1).train()
    expected = _fit_by_hand(copy.deepcopy(model))

    AcceleratorState._reset_state(reset_partial_state=True)  # the state is shared per process: start afresh
    accelerator = Accelerator(cpu=True, dynamo_backend="inductor")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    losses = []
    for batch in _batches():
        loss = _loss(prepared, batch)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    AcceleratorState._reset_state(reset_partial_state=True)

    assert isinstance(prepared, torch._dynamo.eval_frame.OptimizedModule)
    assert accelerator.unwrap_model(prepared, keep_torch_compile=False) is model  # save with its save_pretrained
    assert_all_rewritten(model)
    assert_close(torch.tensor(losses, dtype=torch.float64), expected, rtol=LOSS_RTOL, atol=0, what="loss per step")


def _lightning():
    try:
        import lightning.pytorch as pl
    except ImportError:
        pl = pytest.importorskip("pytorch_lightning")
    return pl


def test_lightning_with_torch_compile_default_backend_trains_as_eager(tmp_path, inductor_hook):
    """A LightningModule holding ``torch.compile(peft_model)`` (Inductor): eager's losses, all rewritten."""
    pl = _lightning()

    class CausalLM(pl.LightningModule):
        def __init__(self, model: torch.nn.Module, compile: bool) -> None:
            super().__init__()
            self.model = torch.compile(model) if compile else model
            self.losses: list[float] = []

        def training_step(self, batch, batch_idx):
            loss = _loss(self.model, batch)
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    def fit(module: CausalLM) -> torch.Tensor:
        trainer = pl.Trainer(
            accelerator="cpu",
            max_steps=STEPS,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=str(tmp_path),
        )
        trainer.fit(module, torch.utils.data.DataLoader(torch.cat(_batches()), batch_size=2))
        return torch.tensor(module.losses, dtype=torch.float64)

    model = tiny_llama_dora(r=4, layers=1).train()
    expected = fit(CausalLM(copy.deepcopy(model), compile=False))
    got = fit(CausalLM(model, compile=True))

    assert_all_rewritten(model)
    assert len(expected) == STEPS
    assert_close(got, expected, rtol=LOSS_RTOL, atol=0, what="loss per step")
