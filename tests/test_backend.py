"""The backend around the pass: registration, graph properties, fallbacks, options, records."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
from helpers import TINY_LLAMA, HandWrittenDora, assert_close, dora_module_names, relative_error, tiny_llama_dora
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import dora_fused
from dora_fused.passes import DoraRewritePass, Form
from dora_fused.passes.graph_view import example_value, op_of
from dora_fused.passes.peft_linear import match_peft_linear
from dora_fused.passes.rewrite import TARGETS, rewrite_with_compose


def _embeds(dtype=torch.float32, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 5, TINY_LLAMA["hidden_size"], generator=gen).to(dtype)


def _capture(model, *args, ops="auto", **kwargs):
    """Run Dynamo with a backend that applies the pass and keeps (original code, graph module, outcome)."""
    graphs = []

    def keep(gm, example_inputs):
        before = gm.code
        outcome = DoraRewritePass(ops=ops)(gm)
        graphs.append((before, gm, outcome))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=keep)(*args, **kwargs)
    return graphs


# --- registration -------------------------------------------------------------------------------


@pytest.mark.slow
def test_backend_is_found_by_name_without_importing_dora_fused():
    script = textwrap.dedent(
        """
        import sys, torch
        assert "dora_fused" not in sys.modules
        f = torch.compile(lambda x: torch.sin(x) * 2, backend="dora_fused")
        x = torch.randn(5)
        assert torch.allclose(f(x), torch.sin(x) * 2)
        import dora_fused  # already imported by the entry point
        assert dora_fused.last_report() is not None and dora_fused.last_report().rewritten == []
        print("OK")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("OK")


def test_peft_tracing_registration_is_idempotent():
    import importlib

    from dora_fused import peft_tracing

    assert peft_tracing.enable_peft_tracing()
    assert peft_tracing.enable_peft_tracing()
    reloaded = importlib.reload(peft_tracing)  # a re-import must not register twice (Dynamo would raise)
    assert reloaded.enable_peft_tracing()


@pytest.mark.slow
def test_quantized_bases_keep_peft_path():
    """A module PEFT treats as quantized (HQQ's W_q) still goes through PEFT's own dequantize under Dynamo."""
    from peft.utils.integrations import dequantize_module_weight

    class HQQLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.W_q = nn.Parameter(torch.randn(3, 4), requires_grad=False)
            self.weight = nn.Parameter(torch.zeros(3, 4), requires_grad=False)

        def dequantize(self):
            return self.W_q * 2

    module = HQQLike()
    compiled = torch.compile(lambda: dequantize_module_weight(module) + 0, backend="eager", fullgraph=False)
    assert torch.equal(compiled(), module.W_q * 2)
    plain = nn.Linear(4, 3)
    assert torch.equal(torch.compile(lambda: dequantize_module_weight(plain) + 0, fullgraph=True)(), plain.weight)


# --- what the rewritten graph holds ----------------------------------------------------------------


@pytest.mark.parametrize("ops", ["triton", "torch"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_rewritten_graph_has_no_dense_product_and_no_eye(train, ops):
    model = tiny_llama_dora(torch.bfloat16, None).train(train)
    [(before, gm, outcome)] = _capture(model, inputs_embeds=_embeds(torch.bfloat16), ops=ops)
    assert outcome.error is None
    records = [r for r in outcome.records if r.status == "rewritten"]
    assert {r.name for r in records} == dora_module_names(model)
    dense_shapes = {(r.d_out, r.d_in) for r in records}
    assert "eye" in before and "linalg_norm" in before  # the original had them
    for node in gm.graph.nodes:
        assert op_of(node) not in ("eye", "linalg_norm"), node.format_node()
        value = example_value(node)
        is_weight = node.op == "placeholder" or (op_of(node) == "detach" and node.args[0].op == "placeholder")
        if not is_weight and value is not None and value.dim() == 2:  # a detach is an alias of the weight
            assert tuple(value.shape) not in dense_shapes, f"{node.format_node()} yields a dense {tuple(value.shape)}"
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(TARGETS["norm"][ops][0]) == len(records)
    # the parameters need gradients: the plain-torch compose is the one with the scale folded into B
    compose = TARGETS["compose"]["folded" if ops == "torch" else ops]
    assert targets.count(compose[0]) == len(records) and {r.ops[1] for r in records} == {compose[1]}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_norm_is_placed_right_after_the_base_output(train):
    """The norm reads parameters only; right after the base matmul its launches overlap that matmul's run."""
    model = tiny_llama_dora(torch.bfloat16, None).train(train)
    [(_, gm, outcome)] = _capture(model, inputs_embeds=_embeds(torch.bfloat16), ops="triton")
    nodes = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    norms = [n for n in nodes if n.target is TARGETS["norm"]["triton"][0]]
    assert len(norms) == len(dora_module_names(model)) and outcome.error is None
    for norm in norms:
        compose = next(u for u in norm.users if u.target is TARGETS["compose"]["triton"][0])
        result, lora = compose.args[0], compose.args[1]
        between = nodes[position[result] + 1 : position[norm]]
        assert between and all(op_of(n) == "detach" and n.users == {norm: None} for n in between), between
        assert position[norm] < position[lora.args[0]]  # before both LoRA matmuls
        after = norm.args[4]  # never read: Inductor keeps the norm's kernels after the base matmul
        assert op_of(after) == "detach" and after.args[0] is result


def _plain_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))


def _lora_llama():
    config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(_plain_llama(), config)


@pytest.mark.slow
@pytest.mark.parametrize("build", [_plain_llama, _lora_llama], ids=["no-adapter", "plain-lora"])
def test_models_without_dora_compile_as_inductor_alone_would(build):
    model = build().eval()
    embeds = _embeds()
    [(before, gm, outcome)] = _capture(model, inputs_embeds=embeds)
    assert outcome.records == [] and outcome.error is None
    assert gm.code == before  # the graph handed on is exactly Dynamo's

    torch._dynamo.reset()
    ours = torch.compile(model, backend="dora_fused")(inputs_embeds=embeds).logits
    assert dora_fused.last_report().rewritten == [] and dora_fused.last_report().skipped == []
    torch._dynamo.reset()
    inductor = torch.compile(model)(inputs_embeds=embeds).logits
    assert torch.equal(ours, inductor)


# --- never broken ----------------------------------------------------------------------------------


def _raising_rewrite(graph, match, impl):
    rewrite_with_compose(graph, match, impl)  # mutate the graph half-way, then fail
    raise RuntimeError("injected failure")


def _uncompilable_rewrite(graph, match, impl):
    def broken(*args):
        raise RuntimeError("cannot be traced")

    ops = rewrite_with_compose(graph, match, impl)
    node = next(n for n in graph.nodes if n.target is TARGETS["compose"][impl[1]][0])
    with graph.inserting_after(node):
        bad = graph.call_function(broken, (node,))
    node.replace_all_uses_with(bad)
    bad.args = (node,)
    return ops


@pytest.mark.slow
@pytest.mark.parametrize("rewrite", [_raising_rewrite, _uncompilable_rewrite], ids=["pass-raises", "inner-fails"])
def test_failures_fall_back_to_the_original_graph(rewrite):
    model = tiny_llama_dora(torch.float32, torch.float32).eval()
    embeds = _embeds()
    expected = model(inputs_embeds=embeds).logits
    backend = dora_fused.backend(inner="aot_eager")
    faulty = Form("faulty", "PEFT Linear", "test form", match_peft_linear, rewrite)
    backend.rewrite_pass = DoraRewritePass(forms=(faulty,))
    out = torch.compile(model, backend=backend)(inputs_embeds=embeds).logits
    report = dora_fused.last_report()
    assert report.error is not None and ("injected failure" in report.error or "cannot be traced" in report.error)
    assert report.rewritten == []
    assert_close(out, expected, rtol=1e-5, atol=1e-6, what="fallback logits")


@pytest.mark.slow
def test_unrecognized_dora_like_subgraph_is_left_alone_with_a_reason():
    module = HandWrittenDora(adapter_dtype=torch.float64)  # fp64 adapters on an fp32 W: not a supported form
    x = torch.randn(3, 5, dtype=torch.float64)
    [(before, gm, outcome)] = _capture(module, x)
    assert gm.code == before
    [record] = outcome.records
    assert record.status == "skipped" and "mixed dtypes" in record.reason
    torch._dynamo.reset()
    out = torch.compile(module, backend="dora_fused")(x)
    assert dora_fused.last_report().skipped == [(record.name, record.reason)]
    assert_close(out, module(x), rtol=1e-5, atol=1e-6, what="hand-written")


# --- shapes that vary ----------------------------------------------------------------------------


@pytest.mark.slow
def test_varying_sequence_length_recompiles_once_and_stays_rewritten():
    model = tiny_llama_dora(torch.float32, torch.float32).eval()
    compiled = torch.compile(model, backend="dora_fused")
    before = len(dora_fused.reports())
    for seq in (5, 9, 13):  # the second length makes Dynamo mark the dim dynamic; the third reuses that graph
        embeds = torch.randn(1, seq, TINY_LLAMA["hidden_size"])
        assert_close(compiled(inputs_embeds=embeds).logits, model(inputs_embeds=embeds).logits, rtol=2e-5, atol=2e-6)
        assert set(dora_fused.last_report().rewritten) == dora_module_names(model)
    assert len(dora_fused.reports()) == before + 2


@pytest.mark.slow
def test_inference_with_varying_sequence_length_keeps_the_fused_up_projection():
    """no_grad, bf16 adapters: the fused up-projection op traces with a symbolic token count."""
    model = tiny_llama_dora(torch.bfloat16, torch.bfloat16).eval()
    compiled = torch.compile(model, backend=dora_fused.backend(ops="triton"))
    before = len(dora_fused.reports())
    for seq in (5, 9, 13):
        embeds = torch.randn(1, seq, TINY_LLAMA["hidden_size"]).bfloat16()
        with torch.no_grad():
            got, want = compiled(inputs_embeds=embeds).logits, model(inputs_embeds=embeds).logits
        assert relative_error(got, want) < 2e-2
        assert {m.ops[1] for m in dora_fused.last_report().modules} == {"dora_fused.lora_up_compose"}
    assert len(dora_fused.reports()) == before + 2


@pytest.mark.slow
@pytest.mark.parametrize("train", [False, True])
def test_dynamic_true_is_rewritten_with_the_traced_scaling(train):
    """dynamic=True lifts s to a SymFloat: the plain-torch ops take it; one graph serves every length."""
    model = tiny_llama_dora(torch.float32, torch.float32).train(train)
    compiled = torch.compile(model, backend="dora_fused", dynamic=True)
    before = len(dora_fused.reports())
    for seq in (5, 8, 11):
        embeds = torch.randn(1, seq, TINY_LLAMA["hidden_size"], requires_grad=train)
        eager_embeds = embeds.detach().clone().requires_grad_(train)
        out, want = compiled(inputs_embeds=embeds).logits, model(inputs_embeds=eager_embeds).logits
        assert_close(out, want, rtol=2e-5, atol=2e-6, what=f"logits, {seq} tokens")
        if train:
            out.sum().backward()
            want.sum().backward()
            assert_close(embeds.grad, eager_embeds.grad, rtol=2e-5, atol=2e-6, what="input gradient")
    assert len(dora_fused.reports()) == before + 1
    report = dora_fused.last_report()
    assert set(report.rewritten) == dora_module_names(model)
    assert all("symbolic scaling" in m.ops_reason and m.ops[0].startswith("torch:") for m in report.modules)


@pytest.mark.slow
def test_new_adapter_weights_loaded_in_place_show_at_once_without_recompiling():
    """An adapter swap by loading weights into the same adapter (PEFT's set_peft_model_state_dict)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    model = tiny_llama_dora(torch.float32, torch.float32).eval()
    other = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in other.named_parameters():
            if "lora_" in name:
                param.mul_(1.5).add_(0.01)
    compiled = torch.compile(model, backend="dora_fused")
    embeds = _embeds()
    before_swap = compiled(inputs_embeds=embeds).logits
    graphs = len(dora_fused.reports())
    set_peft_model_state_dict(model, get_peft_model_state_dict(other))
    after_swap = compiled(inputs_embeds=embeds).logits
    assert len(dora_fused.reports()) == graphs  # same shapes: no recompilation
    assert not torch.allclose(before_swap, after_swap)
    assert_close(after_swap, other(inputs_embeds=embeds).logits, rtol=2e-5, atol=2e-6, what="swapped adapter")


# --- options and records ---------------------------------------------------------------------------


@pytest.mark.slow
def test_inductor_options_are_honoured():
    model = tiny_llama_dora(torch.float32, torch.float32).eval()
    embeds = _embeds()
    out = torch.compile(model, backend="dora_fused", options={"epilogue_fusion": False})(inputs_embeds=embeds)
    assert_close(out.logits, model(inputs_embeds=embeds).logits, rtol=2e-5, atol=2e-6, what="logits")
    assert dora_fused.last_report().rewritten
    torch._dynamo.reset()
    with pytest.raises(Exception, match="not_an_inductor_option"):
        torch.compile(model, backend="dora_fused", options={"not_an_inductor_option": 1})(inputs_embeds=embeds)


@pytest.mark.slow
def test_record_gives_names_shapes_rank_and_dtypes():
    model = tiny_llama_dora(torch.bfloat16, None, r=5).eval()
    torch.compile(model, backend="dora_fused")(inputs_embeds=_embeds(torch.bfloat16))
    report = dora_fused.last_report()
    modules = dict(model.named_modules())
    assert set(report.rewritten) == dora_module_names(model)
    for record in report.modules:
        layer = modules[record.name]
        assert record.adapter == "default" and record.form == "peft_linear"
        assert (record.d_out, record.d_in) == tuple(layer.base_layer.weight.shape)
        assert record.rank == 5
        assert (record.weight_dtype, record.adapter_dtype, record.magnitude_dtype) == ("bfloat16", "float32", "float32")
        # called with gradients enabled: the training compose, the scale folded into the LoRA up-projection
        assert record.ops == ("torch:factored_row_norm_torch", "torch:lora_up_folded_compose_torch")
        assert record.ops_reason.startswith("auto:")
    assert "rewritten" in str(report) and "base_model.model.model.layers.0.self_attn.q_proj" in str(report)


class _TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(12, 20)
        self.down = nn.Linear(20, 9, bias=False)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


@pytest.mark.slow
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_several_active_adapters_compose_in_peft_order(train):
    torch.manual_seed(0)
    config = dict(target_modules=["up", "down"], use_dora=True, init_lora_weights=False)
    model = get_peft_model(_TwoLayers(), LoraConfig(r=3, lora_alpha=6, **config), adapter_name="first")
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=8, use_rslora=True, **config))
    model.base_model.set_adapter(["first", "second"])
    from helpers import perturb_magnitudes

    perturb_magnitudes(model, 0.5)
    model.train(train)
    x = torch.randn(4, 12, requires_grad=train)
    reference = copy.deepcopy(model)

    expected = reference(x)
    out = torch.compile(model, backend="dora_fused")(x)
    report = dora_fused.last_report()
    assert sorted((m.name.rsplit(".", 1)[-1], m.adapter) for m in report.modules if m.status == "rewritten") == [
        ("down", "first"),
        ("down", "second"),
        ("up", "first"),
        ("up", "second"),
    ]
    assert_close(out, expected, rtol=2e-5, atol=2e-6, what="output")
    if train:
        out.square().sum().backward()
        expected.square().sum().backward()
        got = dict(model.named_parameters())
        for name, param in reference.named_parameters():
            if param.grad is not None:
                scale = param.grad.abs().max().item()  # fp32 sums that cancel: tolerance relative to the tensor
                assert_close(got[name].grad, param.grad, rtol=2e-5, atol=2e-6 * scale, what=name)


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_bf16_backward_keeps_the_output_gradient_in_bf16(dropout, device):
    """The rewritten compose's backward reads dy in bf16: Inductor materializes no fp32
    [tokens, d_out] tensor in a bf16 MLP's backward (torch.compile of PEFT keeps it bf16 too),
    with or without dropout (the compose with a separate base output)."""
    from torch._inductor.utils import run_and_get_code

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate_proj, self.up_proj = nn.Linear(48, 88, bias=False), nn.Linear(48, 88, bias=False)
            self.down_proj = nn.Linear(88, 48, bias=False)

        def forward(self, x):
            return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))

    torch.manual_seed(0)
    targets = ["gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(
        r=4, lora_alpha=4, target_modules=targets, use_dora=True, init_lora_weights=False, lora_dropout=dropout
    )
    model = get_peft_model(MLP().to(device, torch.bfloat16), config, autocast_adapter_dtype=False)
    compiled = torch.compile(model, backend="dora_fused")
    x = torch.randn(1, 64, 48, dtype=torch.bfloat16, device=device, requires_grad=True)
    _, code = run_and_get_code(lambda: compiled(x).float().sum().backward())
    text = "\n".join(code)
    assert "(1, 64, 88), (5632, 88, 1), torch.bfloat16" in text  # the token-sized buffers, found
    assert "(1, 64, 88), (5632, 88, 1), torch.float32" not in text
    assert "(64, 88), (88, 1), torch.float32" not in text
