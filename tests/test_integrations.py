"""Integrations on CPU: HF Trainer, transformers generate, a LitServe server, adapter hot-swap, Lightning.

Each test runs a tiny random-init Llama with PEFT DoRA (adapters off their identity init)
compiled with ``dora_fused.backend(inner="aot_eager")`` (no C++ compile on the CPU) and
compares it with the same model in eager mode. The CUDA-graph ``generate`` test is in
``test_integrations_gpu.py``. docs/integrations.md shows the code each test exercises.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from helpers import (
    TINY_LLAMA,
    assert_all_rewritten,
    assert_close,
    perturb_magnitudes,
    tiny_llama_dora,
    token_ids,
)
from peft import (
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    load_peft_weights,
    set_peft_model_state_dict,
)
from safetensors.torch import load_file
from transformers import CompileConfig, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import dora_fused

REPO = Path(__file__).resolve().parent.parent
VOCAB = TINY_LLAMA["vocab_size"]


class CountingBackend:
    """``dora_fused.backend(inner="aot_eager")``, counting the graphs it is handed (one per compile here)."""

    def __init__(self) -> None:
        self.inner = dora_fused.backend(inner="aot_eager")
        self.compiles = 0

    def __call__(self, gm, example_inputs, **kwargs):
        self.compiles += 1
        return self.inner(gm, example_inputs, **kwargs)


# --- HF Trainer ------------------------------------------------------------------------------------


class _Tokens(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.ids = token_ids(VOCAB, 8, 12, seed=1)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer(model, out_dir, **kwargs) -> Trainer:
    args = TrainingArguments(
        output_dir=str(out_dir),
        max_steps=4,
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
    return Trainer(model=model, args=args, train_dataset=_Tokens())


def _losses(trainer: Trainer) -> torch.Tensor:
    return torch.tensor([entry["loss"] for entry in trainer.state.log_history if "loss" in entry], dtype=torch.float64)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["model.compile", "torch.compile"])
def test_trainer_losses_match_eager_step_by_step(tmp_path, how):
    """A model compiled before it is handed to the Trainer trains as eager does, and the same adapter is saved.

    ``model.compile`` compiles in place: class, forward signature and state_dict keys stay, and
    ``trainer.save_model`` works as without compile. ``torch.compile`` returns an OptimizedModule:
    its forward is ``(*args, **kwargs)``, so the Trainer must keep the dataset's columns
    (``remove_unused_columns=False``), and ``trainer.save_model`` saves an adapter file with no
    tensors in it (transformers hands the ``_orig_mod.``-prefixed state_dict to
    ``PeftModel.save_pretrained``, which matches none of its keys): save the PeftModel itself.
    """
    model = tiny_llama_dora(r=4).train()
    initial = {name: p.detach().clone() for name, p in get_peft_model_state_dict(model).items()}

    eager = _trainer(copy.deepcopy(model), tmp_path / "eager")
    eager.train()
    eager.save_model(str(tmp_path / "eager"))

    dora_fused.clear_reports()
    backend = CountingBackend()
    if how == "model.compile":
        model.compile(backend=backend)
        compiled = _trainer(model, tmp_path / "compiled")
    else:
        compiled = _trainer(torch.compile(model, backend=backend), tmp_path / "compiled", remove_unused_columns=False)
    compiled.train()
    if how == "model.compile":
        compiled.save_model(str(tmp_path / "compiled"))
    else:
        compiled.save_model(str(tmp_path / "trainer_save"))
        assert load_file(tmp_path / "trainer_save" / "adapter_model.safetensors") == {}  # see the docstring
        model.save_pretrained(str(tmp_path / "compiled"))

    assert backend.compiles == 1
    assert_all_rewritten(model)
    assert len(_losses(eager)) == 4
    assert_close(_losses(compiled), _losses(eager), rtol=1e-5, atol=0, what="loss per step")

    saved = load_file(tmp_path / "compiled" / "adapter_model.safetensors")
    expected = load_file(tmp_path / "eager" / "adapter_model.safetensors")
    assert saved.keys() == expected.keys()
    moved = 0.0
    for key, value in expected.items():
        assert_close(saved[key], value, rtol=1e-4, atol=1e-6, what=key)
        moved = max(moved, (value - initial[key]).abs().max().item())
    assert moved > 1e-3  # the steps did train the adapters


def test_trainer_backend_name_is_rejected_by_accelerate(tmp_path):
    """Documents the limitation in docs/integrations.md: accelerate 1.x checks the name against a closed list.

    If this starts to fail, accelerate accepts the name: update the docs.
    """
    args = TrainingArguments(output_dir=str(tmp_path), torch_compile_backend="dora_fused", use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="not a valid DynamoBackend"):
        Trainer(model=tiny_llama_dora(r=4), args=args, train_dataset=_Tokens())


# --- transformers generate -------------------------------------------------------------------------


@pytest.mark.slow
def test_generate_static_cache_matches_eager_on_cpu():
    """``generate(cache_implementation="static", compile_config=...)``: the same greedy tokens and logits as eager.

    transformers compiles generate's decoding steps only on accelerators, unless the (private)
    ``_compile_all_devices`` flag is set; the CUDA-graph default mode runs in test_integrations_gpu.py.
    """
    model = tiny_llama_dora(r=4).eval()
    input_ids = token_ids(VOCAB, 2, 6, seed=2)
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=6,
        do_sample=False,
        cache_implementation="static",
        return_dict_in_generate=True,
        output_logits=True,
    )
    expected = model.generate(**kwargs, disable_compile=True)

    dora_fused.clear_reports()
    # generate deep-copies the config, backend included: the backend's records count the compiles
    config = CompileConfig(backend=dora_fused.backend(inner="aot_eager"), mode="default")
    config._compile_all_devices = True
    got = model.generate(**kwargs, compile_config=config)

    assert len(dora_fused.reports()) == 1  # one graph: the decoding step (the prefill runs eagerly)
    assert_all_rewritten(model)
    assert torch.equal(got.sequences, expected.sequences)
    for step, (a, e) in enumerate(zip(got.logits, expected.logits, strict=True)):
        assert_close(a, e, rtol=1e-5, atol=1e-5, what=f"logits at step {step}")

    # A second call reuses the compiled step: the copied backend compares equal to the first
    again = model.generate(**kwargs, compile_config=config)
    assert len(dora_fused.reports()) == 1 and torch.equal(again.sequences, expected.sequences)


# --- adapter hot-swap ------------------------------------------------------------------------------


def _base() -> torch.nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).eval()


DORA = dict(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True, init_lora_weights=False)


def _save_adapter(path: Path, seed: int) -> Path:
    """A DoRA adapter off its identity init (random A, B; magnitudes moved off ‖W‖), saved."""
    model = _base()
    torch.manual_seed(seed)
    model = get_peft_model(model, LoraConfig(**DORA))
    perturb_magnitudes(model, 0.5, seed)
    model.save_pretrained(str(path))
    return path


@pytest.fixture
def adapters(tmp_path) -> dict[str, Path]:
    return {name: _save_adapter(tmp_path / name, seed) for seed, name in enumerate("abc", start=1)}


@pytest.mark.slow
@pytest.mark.parametrize(
    "set_before_compile,expected_compiles",
    [(False, [1, 2, 3, 3, 3]), (True, [1, 2, 2, 2, 2])],
    ids=["as-loaded", "set_adapter-before-compile"],
)
def test_set_adapter_swaps_at_once_and_compiles_each_adapter_once(adapters, set_before_compile, expected_compiles):
    """``set_adapter`` between two loaded DoRA adapters gives each one's eager outputs from the next call.

    Dynamo guards on the active adapter's name: each adapter is compiled once, then swapping back
    and forth compiles nothing. PEFT's first ``set_adapter`` also changes state that the first
    compile guarded on (``from_pretrained`` loads adapters frozen and ``set_adapter`` makes the
    active one trainable; after ``get_peft_model`` every layer shares one adapter-name object that
    ``set_adapter`` replaces by a list per layer), so the first swap back compiles once more.
    A ``set_adapter`` before compiling avoids that compile.
    """
    input_ids = token_ids(VOCAB, 2, 7, seed=3)
    model = PeftModel.from_pretrained(_base(), str(adapters["a"]), adapter_name="a").eval()
    model.load_adapter(str(adapters["b"]), adapter_name="b")
    if set_before_compile:
        model.set_adapter("a")
    eager = copy.deepcopy(model)
    expected = {}
    with torch.no_grad():
        for name in "ab":
            eager.set_adapter(name)
            expected[name] = eager(input_ids=input_ids).logits
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)

    compiles = []
    with torch.no_grad():
        for step, name in enumerate("ababa"):
            if step > 0:
                model.set_adapter(name)
            got = compiled(input_ids=input_ids).logits
            assert_close(got, expected[name], rtol=1e-5, atol=1e-5, what=f"adapter {name}")
            compiles.append(backend.compiles)
    assert compiles == expected_compiles
    assert (expected["a"] - expected["b"]).abs().max() > 0.1  # the swap changes the outputs


@pytest.mark.slow
def test_in_place_swaps_are_seen_at_once_and_compile_nothing(adapters):
    """Weights copied into the compiled model's tensors reach the next call, norms included; no recompile.

    Three swaps, each compared with eager: another adapter's state dict loaded into the active
    adapter (``set_peft_model_state_dict``: A, B and magnitudes); then only ``lora_B`` (the row
    norm changes, the magnitudes do not); then one base weight (a cached ‖W‖ would be stale).
    """
    input_ids = token_ids(VOCAB, 2, 7, seed=3)
    model = PeftModel.from_pretrained(_base(), str(adapters["a"])).eval()
    eager = copy.deepcopy(model)
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)

    def check(what: str) -> torch.Tensor:
        with torch.no_grad():
            got, want = compiled(input_ids=input_ids).logits, eager(input_ids=input_ids).logits
        assert_close(got, want, rtol=1e-5, atol=1e-5, what=what)
        return got

    before = check("adapter a")
    weights_b, weights_c = load_peft_weights(str(adapters["b"])), load_peft_weights(str(adapters["c"]))
    for target in (model, eager):
        result = set_peft_model_state_dict(target, weights_b)
        assert result.unexpected_keys == []
    after_b = check("adapter b loaded in place")
    assert (after_b - before).abs().max() > 0.1

    only_b = {key: value for key, value in weights_c.items() if "lora_B" in key}
    for target in (model, eager):
        set_peft_model_state_dict(target, only_b)
    after_lora_b = check("lora_B of adapter c loaded in place")
    assert (after_lora_b - after_b).abs().max() > 0.1

    with torch.no_grad():
        for target in (model, eager):
            target.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.mul_(1.5)
    after_base = check("base q_proj weight scaled in place")
    assert (after_base - after_lora_b).abs().max() > 1e-3
    assert backend.compiles == 1


def test_peft_hotswap_adapter_does_not_support_dora(adapters):
    """Documents the limitation in docs/integrations.md: PEFT 0.21's hotswap_adapter fails on DoRA's magnitudes.

    If this starts to fail, PEFT supports it: test it with the backend and update the docs.
    """
    from peft.utils.hotswap import hotswap_adapter

    model = PeftModel.from_pretrained(_base(), str(adapters["a"])).eval()
    with pytest.raises(KeyError, match="lora_magnitude_vector"):
        hotswap_adapter(model, str(adapters["b"]), adapter_name="default")


# --- an inference server: LitServe -----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(url: str, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the server exited with {server.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"the server was not ready after {timeout:.0f} s")


def _post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def _eager_greedy(model: torch.nn.Module, input_ids: list[int], max_new_tokens: int):
    ids = torch.tensor([input_ids])
    steps = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=ids).logits[0, -1]
            steps.append(logits)
            ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
    return ids[0, len(input_ids) :].tolist(), torch.stack(steps)


@pytest.mark.slow
def test_litserve_server_answers_equal_eager(tmp_path, adapters):
    """examples/serve_litserve.py serves a saved base + DoRA adapter on 127.0.0.1; its answers equal eager's."""
    pytest.importorskip("litserve")
    _base().save_pretrained(str(tmp_path / "base"))
    port = _free_port()
    log_path = tmp_path / "server.log"
    command = [sys.executable, str(REPO / "examples" / "serve_litserve.py"), "--port", str(port)]
    command += ["--model", str(tmp_path / "base"), "--adapter", str(adapters["a"]), "--inner", "aot_eager"]
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
    try:
        try:
            _wait_ready(f"http://127.0.0.1:{port}/health", server, timeout=300)
            eager = PeftModel.from_pretrained(_base(), str(adapters["a"])).eval()
            for length, new_tokens in ((9, 4), (3, 2)):  # two prompt lengths: the server compiled dynamic shapes
                prompt = token_ids(VOCAB, 1, length, seed=length)[0].tolist()
                answer = _post(f"http://127.0.0.1:{port}/predict", {"input_ids": prompt, "max_new_tokens": new_tokens})
                tokens, logits = _eager_greedy(eager, prompt, new_tokens)
                assert answer["tokens"] == tokens
                assert_close(torch.tensor(answer["logits"]), logits, rtol=1e-5, atol=1e-5, what="served logits")
        except AssertionError as error:
            raise AssertionError(f"{error}\n--- server log ---\n{log_path.read_text()[-4000:]}") from None
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


# --- Lightning -------------------------------------------------------------------------------------


def _lightning():
    try:
        import lightning.pytorch as pl
    except ImportError:
        pl = pytest.importorskip("pytorch_lightning")
    return pl


@pytest.mark.slow
def test_lightning_module_with_compiled_model_trains_as_eager(tmp_path):
    """A LightningModule holding the compiled PEFT model: the same loss at every step as the eager module."""
    pl = _lightning()

    class CausalLM(pl.LightningModule):
        def __init__(self, model, backend):
            super().__init__()
            self.model = torch.compile(model, backend=backend) if backend is not None else model
            self.losses = []

        def training_step(self, batch, batch_idx):
            loss = self.model(input_ids=batch, labels=batch).loss
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    def fit(module):
        loader = torch.utils.data.DataLoader(token_ids(VOCAB, 8, 12, seed=4), batch_size=2)
        trainer = pl.Trainer(
            accelerator="cpu",
            max_steps=4,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=str(tmp_path),
        )
        trainer.fit(module, loader)
        return torch.tensor(module.losses, dtype=torch.float64)

    model = tiny_llama_dora(r=4).train()
    expected = fit(CausalLM(copy.deepcopy(model), None))
    dora_fused.clear_reports()
    backend = CountingBackend()
    got = fit(CausalLM(model, backend))

    assert backend.compiles == 1
    assert_all_rewritten(model)
    assert len(expected) == 4 and len(set(expected.tolist())) == 4
    assert_close(got, expected, rtol=1e-5, atol=0, what="loss per step")
