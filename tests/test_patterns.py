"""Pattern coverage: DoRA formulations real code traces to, each rewritten and matching eager."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from helpers import (
    TINY_LLAMA,
    HandWrittenDora,
    TorchtuneStyleDoRALinear,
    assert_close,
    dora_module_names,
    perturb_magnitudes,
    relative_error,
    tiny_llama_dora,
)
from peft import LoraConfig, get_peft_model

import dora_fused
from dora_fused import kernels
from dora_fused.passes import DoraRewritePass
from dora_fused.passes.graph_view import op_of
from dora_fused.passes.rewrite import TARGETS


def _grads(model) -> dict[str, torch.Tensor]:
    return {k.removeprefix("_orig_mod."): p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _assert_matches_eager(model, x: torch.Tensor, out: torch.Tensor, what: str) -> None:
    """``out = compiled(x)`` against eager: the output, and the gradients of ``Σ out²`` to every parameter and x."""
    out.square().sum().backward()
    got = {**_grads(model), "x": x.grad.clone()}
    model.zero_grad(set_to_none=True)
    x_eager = x.detach().clone().requires_grad_()
    want = model(x_eager)
    want.square().sum().backward()
    assert_close(out, want, rtol=1e-5, atol=1e-5, what=what)
    for name, grad in {**_grads(model), "x": x_eager.grad}.items():
        assert_close(got[name], grad, rtol=1e-4, atol=1e-5, what=f"d {name}")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("inner", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_dropout_in_training_keeps_peft_semantics(inner, device):
    """With dropout active PEFT runs the base layer again on the dropped input: kept, composed around."""
    model = tiny_llama_dora(torch.float32, torch.float32, lora_dropout=0.3).to(device).train()
    embeds = torch.randn(1, 6, TINY_LLAMA["hidden_size"], device=device)
    compiled = torch.compile(model, backend=dora_fused.backend(inner=inner))
    torch.manual_seed(11)
    out = compiled(inputs_embeds=embeds).logits
    report = dora_fused.last_report()
    assert set(report.rewritten) == dora_module_names(model)
    # training: the dropout form's compose with the scale folded into the LoRA up-projection
    assert all(m.ops[1] == "torch:lora_up_folded_compose_with_base_torch" for m in report.modules)
    if inner == "inductor":  # Inductor draws its own dropout masks: check it ran, not the values
        assert torch.isfinite(out).all()
        return
    out.square().mean().backward()
    got = _grads(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(11)  # aot_eager draws the same masks as eager, in the same order
    want = model(inputs_embeds=embeds).logits
    want.square().mean().backward()
    assert_close(out, want, rtol=2e-5, atol=2e-6, what="logits")
    for name, grad in _grads(model).items():
        assert_close(got[name], grad, rtol=1e-4, atol=1e-6, what=name)


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, None], ids=["bf16-adapters", "fp32-adapters"])
def test_inference_fuses_the_lora_up_projection_with_the_compose(device, adapter_dtype):
    """Under no_grad, 16-bit ``linear(h, B)`` and the compose become one op; with gradients, or fp32
    adapters, the compose stays apart. All match eager."""
    model = tiny_llama_dora(torch.bfloat16, adapter_dtype).to(device).eval()
    embeds = torch.randn(1, 7, TINY_LLAMA["hidden_size"], device=device).bfloat16()
    backend = dora_fused.backend(ops="triton")
    with torch.no_grad():
        inference = torch.compile(model, backend=backend)(inputs_embeds=embeds).logits
        want = model(inputs_embeds=embeds).logits
    report = dora_fused.last_report()
    assert set(report.rewritten) == dora_module_names(model)
    fused = "dora_fused.lora_up_compose" if adapter_dtype is not None else "dora_fused.compose"
    assert {m.ops[1] for m in report.modules} == {fused}
    assert ("compose: triton + LoRA up-projection" in str(report)) == (adapter_dtype is not None)
    torch._dynamo.reset()
    training = torch.compile(model, backend=backend)(inputs_embeds=embeds).logits
    assert {m.ops[1] for m in dora_fused.last_report().modules} == {"dora_fused.compose"}
    # bf16 logits: eager rounds n, g and the LoRA output to bf16; the fused op rounds once
    assert relative_error(inference, want) < 2e-2
    assert relative_error(inference, training.detach()) < 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("r", [1, 40])  # rank 1 and rank >= d_in / 2 (d_in = 48 or 88)
def test_extreme_ranks(r):
    model = tiny_llama_dora(torch.float32, torch.float32, r=r).eval()
    embeds = torch.randn(1, 5, TINY_LLAMA["hidden_size"])
    out = torch.compile(model, backend="dora_fused")(inputs_embeds=embeds).logits
    assert set(dora_fused.last_report().rewritten) == dora_module_names(model)
    assert_close(out, model(inputs_embeds=embeds).logits, rtol=2e-5, atol=2e-6, what="logits")


@pytest.mark.slow
def test_only_dora_layers_of_a_mixed_model_are_rewritten():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA))
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True, init_lora_weights=False)
    model = get_peft_model(model, config)
    model.add_adapter("plain", LoraConfig(r=4, target_modules=["k_proj", "o_proj"], init_lora_weights=False))
    model.base_model.set_adapter(["default", "plain"])
    perturb_magnitudes(model, 0.5)
    model.eval()
    embeds = torch.randn(1, 5, TINY_LLAMA["hidden_size"])
    out = torch.compile(model, backend="dora_fused")(inputs_embeds=embeds).logits
    report = dora_fused.last_report()
    assert set(report.rewritten) == {n for n in dora_module_names(model) if n.endswith(("q_proj", "v_proj"))}
    assert report.skipped == []
    assert_close(out, model(inputs_embeds=embeds).logits, rtol=2e-5, atol=2e-6, what="logits")


ARCHITECTURES = {
    "mistral": (
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        dict(num_key_value_heads=2, head_dim=12),
    ),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(num_key_value_heads=2)),
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, dict(num_key_value_heads=2, head_dim=12)),
    "bert": (transformers.BertConfig, transformers.BertModel, {}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_architectures_from_configs(name):
    config_class, model_class, extra = ARCHITECTURES[name]
    torch.manual_seed(0)
    config = config_class(
        hidden_size=48, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4, vocab_size=97, **extra
    )
    model = get_peft_model(
        model_class(config), LoraConfig(r=4, target_modules="all-linear", use_dora=True, init_lora_weights=False)
    )
    perturb_magnitudes(model, 0.5)
    model.eval()
    ids = torch.randint(0, 97, (2, 7))
    out = torch.compile(model, backend="dora_fused")(input_ids=ids)
    report = dora_fused.last_report()
    assert set(report.rewritten) == dora_module_names(model) and report.skipped == []
    key = "logits" if "logits" in out else "last_hidden_state"
    assert_close(out[key], model(input_ids=ids)[key], rtol=2e-5, atol=2e-5, what=f"{name} {key}")


@pytest.mark.slow
def test_vit_image_input():
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=48, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=8
    )
    model = get_peft_model(
        transformers.ViTModel(config),
        LoraConfig(r=4, target_modules="all-linear", use_dora=True, init_lora_weights=False),
    )
    perturb_magnitudes(model, 0.5)
    model.eval()
    pixels = torch.randn(1, 3, 16, 16)
    out = torch.compile(model, backend="dora_fused")(pixel_values=pixels).last_hidden_state
    report = dora_fused.last_report()
    assert len(report.rewritten) >= 12 and set(report.rewritten) == dora_module_names(model)
    assert_close(out, model(pixel_values=pixels).last_hidden_state, rtol=2e-5, atol=2e-5, what="vit")


@pytest.mark.slow
@pytest.mark.parametrize("train", [False, True])
def test_gpt2_fan_in_fan_out(train):
    """GPT-2's Conv1D stores W as [d_in, d_out]: PEFT's transpose traces (polyfill) and the norm reads W.T."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=97, n_positions=32)
    config.bos_token_id = config.eos_token_id = 0
    model = get_peft_model(
        transformers.GPT2LMHeadModel(config),
        LoraConfig(
            r=4,
            target_modules=["c_attn", "c_proj", "c_fc"],
            use_dora=True,
            fan_in_fan_out=True,
            init_lora_weights=False,
            lora_dropout=0.0,
        ),
    )
    perturb_magnitudes(model, 0.5)
    model.train(train)
    for module in model.modules():  # no dropout anywhere: eager and compiled must agree exactly
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    ids = torch.randint(0, 97, (2, 7))
    out = torch.compile(model, backend="dora_fused")(input_ids=ids).logits
    report = dora_fused.last_report()
    assert report.graph_breaks == [] and report.skipped == []
    assert set(report.rewritten) == dora_module_names(model) and len(report.rewritten) == 8
    if train:
        out.square().mean().backward()
    got = _grads(model)
    model.zero_grad(set_to_none=True)
    want = model(input_ids=ids).logits
    assert_close(out, want, rtol=2e-5, atol=2e-5, what="gpt2 logits")
    if train:
        want.square().mean().backward()
        for name, grad in _grads(model).items():
            assert_close(got[name], grad, rtol=1e-4, atol=1e-6, what=name)


class _EmbeddingConvLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(30, 16)
        self.conv = torch.nn.Conv1d(16, 12, 3)
        self.lin = torch.nn.Linear(12, 5)

    def forward(self, ids):
        return self.lin(self.conv(self.emb(ids).transpose(1, 2)).mean(-1))


@pytest.mark.slow
@pytest.mark.parametrize("train", [False, True])
def test_embedding_conv_and_linear_dora_are_all_rewritten(train):
    torch.manual_seed(0)
    config = LoraConfig(r=2, target_modules=["emb", "conv", "lin"], use_dora=True, init_lora_weights=False)
    model = get_peft_model(_EmbeddingConvLinear(), config)
    perturb_magnitudes(model, 0.5)
    model.train(train)
    ids = torch.randint(0, 30, (2, 9))
    report = dora_fused.audit(model, ids)
    assert set(report.rewritten) == {"base_model.model.emb", "base_model.model.conv", "base_model.model.lin"}
    assert {m.kind for m in report.modules} == {"PEFT Embedding", "PEFT Conv", "PEFT Linear"}
    assert not report.skipped
    reference = copy.deepcopy(model).double()  # fp64: the mixed model's gradients cancel heavily in fp32
    out = torch.compile(model, backend="dora_fused")(ids)
    want = model(ids)
    want64 = reference(ids)
    assert_close(out, want, rtol=2e-5, atol=2e-6, what="embedding + conv + linear")
    if train:
        out.square().sum().backward()
        got = _grads(model)
        model.zero_grad(set_to_none=True)
        want.square().sum().backward()
        want64.square().sum().backward()
        eager, exact = _grads(model), _grads(reference)
        assert got.keys() == exact.keys()
        for key, grad in exact.items():
            # never less precise than eager: error against fp64 within 2x eager's (plus fp32 rounding)
            ours, theirs = (got[key].double() - grad).abs().max(), (eager[key].double() - grad).abs().max()
            assert ours <= 2 * theirs + 1e-6 * grad.abs().max(), f"{key}: {ours:.3g} vs eager {theirs:.3g}"


_COMPOSES = {
    TARGETS["compose"]["triton"][0],
    TARGETS["compose"]["lora_up"][0],
    kernels.compose_torch,
    kernels.compose_with_base_torch,
}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_every_form_launches_its_triton_norm_after_the_base_output(train):
    """The Triton norm takes the output its compose scales as ``after``, detached: Inductor then
    launches the norm's kernels after that output's matmul (a GPU test checks the generated code)."""
    torch.manual_seed(0)
    config = LoraConfig(r=2, target_modules=["emb", "conv", "lin"], use_dora=True, init_lora_weights=False)
    peft_model = get_peft_model(_EmbeddingConvLinear(), config).train(train)
    cases = [
        (peft_model, (torch.randint(0, 30, (2, 9)),), 3),
        (HandWrittenDora(13, 11, 3).train(train), (torch.randn(4, 13),), 1),
        (PaperConventionDora(13, 11, 3, detach=True, flat_magnitude=True).train(train), (torch.randn(4, 13),), 1),
    ]
    for model, args, expected in cases:
        graphs = []

        def keep(gm, example_inputs, graphs=graphs):
            assert DoraRewritePass(ops="triton")(gm).error is None
            graphs.append(gm)
            return gm.forward

        torch._dynamo.reset()
        torch.compile(model, backend=keep)(*args)
        norms = [n for gm in graphs for n in gm.graph.nodes if n.target is TARGETS["norm"]["triton"][0]]
        assert len(norms) == expected, type(model).__name__
        for norm in norms:
            after = norm.args[4]
            assert op_of(after) == "detach" and after.users == {norm: None}, norm.format_node()
            assert any(user.target in _COMPOSES for user in after.args[0].users), after.args[0].format_node()


class ConvNet(torch.nn.Module):
    """One Conv{1,2,3}d with odd channels, kernel, stride and padding."""

    def __init__(self, dims: int, bias: bool):
        super().__init__()
        conv = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[dims]
        self.conv = conv(5, 7, 3, stride=2, padding=1, bias=bias)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize(
    ("dims", "bias", "dropout", "adapter_dtype"),
    [
        (1, True, 0.0, torch.float32),
        (2, True, 0.0, torch.float32),
        (2, False, 0.0, torch.float32),
        (3, True, 0.0, torch.float32),
        (2, True, 0.25, torch.float32),
        (2, True, 0.0, torch.float64),
    ],
)
def test_peft_conv_dora_is_rewritten_with_exact_gradients(dims, bias, dropout, adapter_dtype):
    """Conv DoRA: the norm over all but dim 0 is the factored row norm of W.reshape(C_out, -1)."""
    torch.manual_seed(0)
    model = get_peft_model(
        ConvNet(dims, bias),
        LoraConfig(r=3, target_modules=["conv"], use_dora=True, init_lora_weights=False, lora_dropout=dropout),
    )
    model = model.to(adapter_dtype).train()
    perturb_magnitudes(model, 0.5)
    x = torch.randn(2, 5, *[9, 6, 5][:dims], dtype=adapter_dtype, requires_grad=True)
    torch.manual_seed(3)
    out = torch.compile(model, backend=dora_fused.backend(inner="aot_eager"))(x)
    [record] = dora_fused.last_report().modules
    assert (record.name, record.status, record.kind) == ("base_model.model.conv", "rewritten", "PEFT Conv")
    assert (record.d_out, record.d_in, record.rank) == (7, 5 * 3**dims, 3)
    expected_compose = "torch:compose_with_base_torch" if dropout else "torch:compose_torch"
    assert record.ops == ("torch:factored_row_norm_torch", expected_compose)
    torch.manual_seed(3)  # aot_eager draws the same dropout mask as eager
    _assert_matches_eager(model, x, out, f"conv{dims}d")


def test_peft_conv_dora_on_a_bf16_base_with_fp32_adapters():
    torch.manual_seed(0)
    model = get_peft_model(
        ConvNet(2, True), LoraConfig(r=4, target_modules=["conv"], use_dora=True, init_lora_weights=False)
    )
    perturb_magnitudes(model, 0.5)
    model.base_model.model.conv.base_layer.to(torch.bfloat16)
    x = torch.randn(3, 5, 11, 8, dtype=torch.bfloat16)
    out = torch.compile(model, backend=dora_fused.backend(inner="aot_eager"))(x)
    assert dora_fused.last_report().rewritten == ["base_model.model.conv"]
    want = model(x)
    assert out.dtype == want.dtype
    assert_close(out.float(), want.float(), rtol=2e-2, atol=2e-2, what="bf16 conv output")


@pytest.mark.slow
@pytest.mark.parametrize("train", [False, True])
def test_torchtune_style_dora_linear(train):
    """Identity-trick norm, bias inside the base output (scaled by the magnitude), outside PEFT."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        TorchtuneStyleDoRALinear(12, 10, 3, 6.0), torch.nn.GELU(), TorchtuneStyleDoRALinear(10, 7, 2, 4.0, bias=False)
    ).train(train)
    x = torch.randn(4, 12)
    out = torch.compile(model, backend="dora_fused")(x)
    report = dora_fused.last_report()
    assert report.rewritten == ["0", "2"] and {m.kind for m in report.modules} == {"torchtune-style"}
    if train:
        out.square().sum().backward()
    got = _grads(model)
    model.zero_grad(set_to_none=True)
    want = model(x)
    assert_close(out, want, rtol=2e-5, atol=2e-6, what="torchtune-style")
    if train:
        want.square().sum().backward()
        assert got.keys() == _grads(model).keys() and len(got) == 6  # lora_a, lora_b, magnitude per layer
        for name, grad in _grads(model).items():
            assert_close(got[name], grad, rtol=1e-4, atol=1e-6, what=name)


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant",
    [
        dict(product="@", norm="linalg", scale="m_over_n", detach=True),
        dict(product="mm", norm="vector", scale="w_over_n", detach=True, bias=True),
        dict(product="matmul", norm="method", scale="mw_over_n", detach=True),
        dict(product="@", norm="method", scale="w_over_n", detach=False),
        dict(product="mm", norm="linalg", scale="m_over_n", detach=False, bias=True),
        dict(product="matmul", norm="vector", scale="mw_over_n", detach=False),
    ],
    ids=lambda v: "-".join(str(x) for x in v.values()),
)
def test_hand_written_dora_in_weight_space(variant):
    """Rewritten in activation space; a norm that is not detached keeps its exact gradient."""
    model = HandWrittenDora(13, 11, 3, **variant)
    x = torch.randn(4, 13, requires_grad=True)
    out = torch.compile(model, backend="dora_fused")(x)
    report = dora_fused.last_report()
    assert report.rewritten == ["(root)"] and report.modules[0].kind == "hand-written"
    assert report.modules[0].ops[0] == (
        "torch:factored_row_norm_torch" if variant["detach"] else "torch:factored_row_norm_differentiable"
    )
    _assert_matches_eager(model, x, out, "hand-written output")


class PaperConventionDora(torch.nn.Module):
    """The DoRA paper's convention: W is [d_in, d_out], the norm runs over dim 0, out = x @ W'."""

    def __init__(self, d_in: int, d_out: int, r: int, *, detach: bool, flat_magnitude: bool):
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.W = torch.nn.Parameter(torch.randn(d_in, d_out, generator=gen))
        self.B = torch.nn.Parameter(torch.randn(d_in, r, generator=gen))
        self.A = torch.nn.Parameter(torch.randn(r, d_out, generator=gen))
        magnitude = torch.rand(d_out, generator=gen) + 1
        self.m = torch.nn.Parameter(magnitude if flat_magnitude else magnitude.view(1, -1))
        self.detach, self.flat = detach, flat_magnitude

    def forward(self, x):
        w = self.W + 0.25 * (self.B @ self.A)
        n = torch.linalg.vector_norm(w, dim=0, keepdim=not self.flat)
        n = n.detach() if self.detach else n
        return x @ (self.m * (w / n))


@pytest.mark.slow
@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("flat_magnitude", [True, False])
def test_hand_written_dora_in_the_papers_column_convention(detach, flat_magnitude):
    model = PaperConventionDora(13, 11, 3, detach=detach, flat_magnitude=flat_magnitude)
    x = torch.randn(4, 13, requires_grad=True)
    out = torch.compile(model, backend="dora_fused")(x)
    [record] = dora_fused.last_report().modules
    assert record.status == "rewritten" and (record.d_out, record.d_in, record.rank) == (11, 13, 3)
    _assert_matches_eager(model, x, out, "column convention output")


@pytest.mark.slow
def test_vision_language_model_llava():
    """Image + text through a tiny LLaVA (CLIP tower, Llama LM); DoRA on the language model.

    transformers' own code breaks the graph here (7 graphs); every DoRA module is
    rewritten in whichever graph holds it, and the audit maps resumed frames' names back.
    """
    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8
    )
    text = transformers.LlamaConfig(**{**TINY_LLAMA, "vocab_size": 120})
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=100)
    lm_linears = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    model = get_peft_model(
        transformers.LlavaForConditionalGeneration(config),
        LoraConfig(r=4, target_modules=lm_linears, use_dora=True, init_lora_weights=False),
    )
    perturb_magnitudes(model, 0.5)
    model.eval()
    ids = torch.cat([torch.tensor([[1]]), torch.full((1, 4), 100), torch.randint(2, 99, (1, 5))], 1)  # 4 image tokens
    pixels = torch.randn(1, 3, 16, 16)
    report = dora_fused.audit(model, input_ids=ids, pixel_values=pixels)
    assert set(report.rewritten) == dora_module_names(model) and len(report.rewritten) == 14
    assert report.skipped == []
    before = len(dora_fused.reports())
    out = torch.compile(model, backend="dora_fused")(input_ids=ids, pixel_values=pixels).logits
    assert sum(len(r.rewritten) for r in dora_fused.reports()[before:]) == 14
    assert_close(out, model(input_ids=ids, pixel_values=pixels).logits, rtol=2e-5, atol=2e-5, what="llava logits")


# --- must not be rewritten -------------------------------------------------------------------------


@pytest.mark.slow
def test_weight_norm_parametrization_is_not_dora():
    layer = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(8, 6))
    x = torch.randn(3, 8)
    out = torch.compile(layer, backend="dora_fused")(x)
    report = dora_fused.last_report()
    assert report.modules == []
    assert_close(out, layer(x), rtol=1e-6, atol=1e-6, what="weight_norm")


@pytest.mark.slow
def test_a_row_norm_of_w_plus_ba_that_is_not_a_magnitude_scale_is_left_alone():
    class NotDora(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(6, 5))
            self.A = torch.nn.Parameter(torch.randn(2, 5))
            self.B = torch.nn.Parameter(torch.randn(6, 2))

        def forward(self, x):
            eye = torch.eye(5)
            delta = torch.nn.functional.linear(torch.nn.functional.linear(eye, self.A), self.B).T
            n = torch.linalg.norm(self.weight + 0.5 * delta.detach(), dim=1)
            return x @ self.weight.T + n  # the norm is used, but not as m / n

    module = NotDora()
    x = torch.randn(3, 5)
    out = torch.compile(module, backend="dora_fused")(x)
    assert dora_fused.last_report().rewritten == []
    assert_close(out, module(x), rtol=1e-5, atol=1e-5, what="not dora")


@pytest.mark.slow
def test_an_input_mutated_between_the_norm_and_its_use_is_left_alone():
    """The replacement reads its inputs at the output: a write in between would change what it reads."""

    class MutatesA(HandWrittenDora):
        def forward(self, x):
            w = self.weight + 0.5 * (self.B @ self.A)
            n = torch.linalg.norm(w, dim=1).detach()
            self.A.mul_(2.0)  # after the norm, before F.linear uses w
            return torch.nn.functional.linear(x, (self.m / n).view(-1, 1) * w)

    module, reference = MutatesA().requires_grad_(False), MutatesA().requires_grad_(False)
    x = torch.randn(3, 5)
    out = torch.compile(module, backend="dora_fused")(x)
    report = dora_fused.last_report()
    assert report.rewritten == []
    [(_, reason)] = report.skipped
    assert "modified in place between the norm and its use" in reason
    assert_close(out, reference(x), rtol=0, atol=0, what="mutating module")
    assert torch.equal(module.A, reference.A)


@pytest.mark.slow
def test_a_write_to_an_adapter_after_the_base_output_is_left_alone(monkeypatch):
    """The rewrite reads W, A and B right after the base output; PEFT's DoRA writing A after it blocks it."""
    from peft.tuners.lora.dora import DoraLinearLayer

    original = DoraLinearLayer.forward

    def scales_a_first(self, x, *, lora_A, **kwargs):
        lora_A.weight.mul_(1.5)  # after `result = base_layer(x)`, before the norm
        return original(self, x, lora_A=lora_A, **kwargs)

    monkeypatch.setattr(DoraLinearLayer, "forward", scales_a_first)
    model = tiny_llama_dora(torch.float32, torch.float32).eval()
    reference = copy.deepcopy(model)
    embeds = torch.randn(1, 5, TINY_LLAMA["hidden_size"])
    with torch.no_grad():
        out = torch.compile(model, backend="dora_fused")(inputs_embeds=embeds).logits
        want = reference(inputs_embeds=embeds).logits
    report = dora_fused.last_report()
    assert report.rewritten == [] and len(report.skipped) == len(dora_module_names(model))
    assert all("modified in place" in reason for _, reason in report.skipped)
    assert_close(out, want, rtol=1e-5, atol=1e-6, what="logits")


@pytest.mark.slow
def test_an_in_place_write_before_the_dora_computation_does_not_block_the_rewrite():
    """A write the original and the replacement both see (it comes before every matched node)."""

    class ScalesInputFirst(HandWrittenDora):
        def forward(self, x):
            x = x.clone()
            x.mul_(2.0)
            return super().forward(x)

    module = ScalesInputFirst()
    x = torch.randn(3, 5)
    out = torch.compile(module, backend="dora_fused")(x)
    assert dora_fused.last_report().rewritten == ["(root)"]
    assert_close(out, module(x), rtol=1e-5, atol=1e-5, what="input scaled in place first")


class EmbedLinearConv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(11, 6)
        self.lin = torch.nn.Linear(6, 10)
        self.conv = torch.nn.Conv1d(10, 4, 3)

    def forward(self, ids):
        return self.conv(self.lin(self.emb(ids)).transpose(1, 2))


@pytest.mark.parametrize("ops", ["auto", "triton"])
def test_peft_dora_caching_in_eval_is_rewritten_on_the_filling_call_and_after(monkeypatch, ops):
    """ENABLE_DORA_CACHING: the first call computes and stores the norm, later calls read it back.

    The filling graph gets the factored norm (stored in PEFT's cache in the norm's place) while
    the dense B·A PEFT also stores stays; the reading graphs have only the compose left to rewrite.
    """
    from peft.tuners.lora import dora

    monkeypatch.setattr(dora, "ENABLE_DORA_CACHING", True)
    torch.manual_seed(0)
    config = LoraConfig(r=2, target_modules=["emb", "lin", "conv"], use_dora=True, init_lora_weights=False)
    model = get_peft_model(EmbedLinearConv(), config).eval()
    perturb_magnitudes(model, 0.5)
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend=dora_fused.backend(inner="aot_eager", ops=ops))
    ids = torch.randint(0, 11, (3, 7))

    out = compiled(ids)
    fill = dora_fused.last_report()
    assert set(fill.rewritten) == {"base_model.model.emb", "base_model.model.lin", "base_model.model.conv"}
    assert {m.form for m in fill.modules} == {"peft_embedding", "peft_linear", "peft_conv"}
    assert_close(out, reference(ids), rtol=1e-4, atol=1e-5, what="the filling call")
    for name in ("lin", "conv", "emb"):  # the norm we stored is the norm PEFT stored
        ours = getattr(model.base_model.model, name).lora_magnitude_vector["default"]._dora_cache
        theirs = getattr(reference.base_model.model, name).lora_magnitude_vector["default"]._dora_cache
        assert ours.keys() == theirs.keys() == {"weight-norm-default", "lora-weight-default"}
        for key in ours:
            assert ours[key].shape == theirs[key].shape and ours[key].dtype == theirs[key].dtype
            assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-5, what=f"{name} {key}")

    dora_fused.clear_reports()
    for _ in range(2):
        assert_close(compiled(ids), reference(ids), rtol=1e-4, atol=1e-5, what="a call that reads the cache")
    [cached] = dora_fused.reports()
    assert {(m.name, m.form, m.kind, m.d_out, m.d_in) for m in cached.modules} == {
        ("base_model.model.lin", "peft_cached_norm", "PEFT Linear", 10, 6),
        ("base_model.model.conv", "peft_cached_norm", "PEFT Conv", 4, 30),  # C_in · k
    }
    # called with gradients enabled (eval() keeps them): the training compose, the scale folded into B
    linear_compose = "dora_fused.compose" if ops == "triton" else "torch:lora_up_folded_compose_torch"
    assert {m.kind: m.ops for m in cached.modules} == {
        "PEFT Linear": (linear_compose,),
        "PEFT Conv": ("torch:compose_torch",),  # channels-first: the plain-torch compose
    }

    # PEFT empties its cache on train(); back in eval the norm is computed again from the new weights
    with torch.no_grad():
        for module in (model, reference):
            module.base_model.model.lin.lora_B["default"].weight.mul_(-2.0)
    for module in (model, reference):
        module.train().eval()
    assert_close(compiled(ids), reference(ids), rtol=1e-4, atol=1e-5, what="after train().eval()")


def test_gradient_checkpointing_under_dynamos_defaults_says_what_to_set():
    """PEFT's DoRA forward clears its cache on every call: a side effect that Dynamo's default config
    refuses inside a checkpoint. The audit says so, naming the setting that lets it through."""
    model = tiny_llama_dora(torch.float32, torch.float32).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    embeds = torch.randn(1, 5, TINY_LLAMA["hidden_size"], requires_grad=True)
    report = dora_fused.audit(model, inputs_embeds=embeds)
    assert report.rewritten == []
    assert {name for name, _ in report.skipped} == dora_module_names(model)
    assert all("skip_fwd_side_effects_in_bwd_under_checkpoint = True" in reason for _, reason in report.skipped)


@pytest.mark.slow
@torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True)
def test_gradient_checkpointing_bodies_are_rewritten():
    """With activation checkpointing the layers sit in checkpoint subgraphs (a higher-order op): rewritten there."""
    model = tiny_llama_dora(torch.float32, torch.float32).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    embeds = torch.randn(1, 5, TINY_LLAMA["hidden_size"], requires_grad=True)
    assert set(dora_fused.audit(model, inputs_embeds=embeds).rewritten) == dora_module_names(model)
    dora_fused.clear_reports()
    out = torch.compile(model, backend=dora_fused.backend(inner="aot_eager"))(inputs_embeds=embeds).logits
    assert sum(len(r.rewritten) for r in dora_fused.reports()) == len(dora_module_names(model))
    out.square().mean().backward()
    got = _grads(model)
    model.zero_grad(set_to_none=True)
    want = model(inputs_embeds=embeds).logits
    want.square().mean().backward()
    assert_close(out, want, rtol=1e-5, atol=1e-6, what="logits")
    for name, grad in _grads(model).items():
        assert_close(got[name], grad, rtol=1e-4, atol=1e-6, what=name)
