"""Frozen inference and live adapters: results equal eager, and a changed parameter is never served stale.

Frozen inference (``dora_fused.backend(frozen=True)``, or Inductor's freezing) folds each
DoRA module's norm, or within the merge budget its whole weight, at compile time. The
tests compare with PEFT eager (and, in 16-bit, against an fp64 run of the same model),
check the records, then change parameters in every way a server does (in place, through
``load_state_dict``, by ``set_adapter``) and check that the next call gives eager's
result. PEFT's own norm cache (``ENABLE_DORA_CACHING``) is checked the same way.

Most tests compile with ``inner="aot_eager"`` (no C++ compile on the CPU); two compile
with Inductor's freezing, which bakes parameters into the compiled code.
"""

from __future__ import annotations

import copy
import logging
import weakref

import pytest
import torch
from helpers import (
    TINY_LLAMA,
    assert_close,
    dora_module_names,
    perturb_magnitudes,
    relative_error,
    small_dora_mlp,
    tiny_llama_dora,
)
from peft import LoraConfig, get_peft_model

import dora_fused

FP32_TOL = dict(rtol=2e-5, atol=2e-6)
RATIO, ATOL = 1.1, 1e-6  # 16-bit: our error against fp64 at most RATIO × the reference's, plus ATOL (test_peft_llama)


def _counters() -> dict[str, int]:
    return dict(torch._dynamo.utils.counters["dora_fused"])


def _frozen(**kwargs) -> dora_fused.DoraFusedBackend:
    return dora_fused.backend(inner="aot_eager", frozen=True, **kwargs)


def _embeds(dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 7, TINY_LLAMA["hidden_size"], generator=gen) * 0.5).to(dtype)


def _bytes(module: torch.nn.Module) -> int:
    weight = module.base_layer.weight
    return weight.numel() * weight.element_size()


# --- results ---------------------------------------------------------------------------------------


def test_frozen_fp32_matches_peft_with_some_modules_merged():
    """A budget of two q_proj-sized weights: the first modules that fit are merged, the rest fold their norm."""
    model = tiny_llama_dora(torch.float32, torch.float32).eval()
    embeds = _embeds(torch.float32)
    layers = model.base_model.model.model.layers
    budget = 2 * _bytes(layers[0].self_attn.q_proj)
    with torch.no_grad():
        expected = model(inputs_embeds=embeds).logits
        backend = _frozen(merge_budget_bytes=budget)
        out = torch.compile(model, backend=backend)(inputs_embeds=embeds).logits
    assert_close(out, expected, **FP32_TOL, what="logits")

    report = dora_fused.last_report()
    assert report.error is None and set(report.rewritten) == dora_module_names(model)
    kinds = {m.name.split("layers.")[1]: m.frozen for m in report.modules}
    # graph order: q (fits), k and v (half a q each: fit), o (over), gate/up/down (over), ...
    merged = [name for name, kind in kinds.items() if kind == "merged"]
    assert merged == ["0.self_attn.q_proj", "0.self_attn.k_proj", "0.self_attn.v_proj"], kinds
    assert all(kind == "norm" for name, kind in kinds.items() if name not in merged)
    assert backend.merge_budget.used == sum(
        _bytes(layers[0].self_attn.get_submodule(n)) for n in ("q_proj", "k_proj", "v_proj")
    )
    for m in report.modules:
        assert m.ops == (
            ("frozen:merged_weight",) if m.frozen == "merged" else ("frozen:row_norm", "torch:compose_torch")
        )
        assert m.ops_reason.startswith("frozen: " + ("merged" if m.frozen == "merged" else "norm folded"))


@pytest.mark.parametrize("adapters", [None, torch.bfloat16], ids=["bf16-base-fp32-adapters", "bf16"])
def test_frozen_bf16_is_as_exact_as_peft(adapters):
    """Against fp64: the folded norm as PEFT eager (or closer); merged weights as PEFT's own merge_and_unload."""
    model = tiny_llama_dora(torch.bfloat16, adapters).eval()
    embeds = _embeds(torch.bfloat16)
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(inputs_embeds=embeds.double()).logits
        eager = model(inputs_embeds=embeds).logits
        peft_merged = copy.deepcopy(model).merge_and_unload()(inputs_embeds=embeds).logits
        norm = torch.compile(model, backend=_frozen())(inputs_embeds=embeds).logits
        assert {m.frozen for m in dora_fused.last_report().modules} == {"norm"}
        torch._dynamo.reset()
        merged = torch.compile(model, backend=_frozen(merge_budget_bytes=2**40))(inputs_embeds=embeds).logits
        assert {m.frozen for m in dora_fused.last_report().modules} == {"merged"}
    errors = {name: relative_error(v, exact) for name, v in (("eager", eager), ("merge", peft_merged))}
    assert norm.dtype == merged.dtype == eager.dtype
    assert relative_error(norm, exact) <= RATIO * errors["eager"] + ATOL, (relative_error(norm, exact), errors)
    assert relative_error(merged, exact) <= RATIO * errors["merge"] + ATOL, (relative_error(merged, exact), errors)


def test_outputs_that_need_a_gradient_stay_live():
    model = small_dora_mlp().eval()  # trainable adapters, called with grad enabled
    x = torch.randn(3, 12)
    out = torch.compile(model, backend=_frozen(merge_budget_bytes=2**40))(x)
    assert_close(out, model(x), **FP32_TOL, what="output")
    records = dora_fused.last_report().modules
    assert len(records) == 2 and all(m.frozen == "" and m.status == "rewritten" for m in records)
    assert all(m.ops_reason.startswith("frozen: not folded (the output needs a gradient)") for m in records)


# --- never stale -----------------------------------------------------------------------------------


def _two_adapter_mlp() -> torch.nn.Module:
    model = small_dora_mlp()
    config = LoraConfig(r=3, lora_alpha=4, target_modules=["0", "2"], use_dora=True, init_lora_weights=False)
    model.add_adapter("other", config)
    perturb_magnitudes(model, 0.5, seed=3)
    model.set_adapter("default")
    return model.eval()


def test_changed_parameters_are_seen_at_once_without_recompiling():
    """In-place writes to A, B, m and W, and ``load_state_dict``: each call after one equals eager."""
    model = _two_adapter_mlp()
    first = model.base_model.model[0]
    x = torch.randn(5, 12)
    backend = _frozen(merge_budget_bytes=_bytes(first))  # layer 0 merged, layer 2 its norm folded
    compiled = torch.compile(model, backend=backend)

    def check(what: str) -> None:
        with torch.no_grad():
            assert_close(compiled(x), model(x), **FP32_TOL, what=what)

    check("as compiled")
    assert [m.frozen for m in dora_fused.last_report().modules] == ["merged", "norm"]
    graphs, refreshes = len(dora_fused.reports()), _counters().get("refresh", 0)
    edits = {
        "lora_A of the merged layer": lambda: first.lora_A.default.weight.mul_(1.5),
        "lora_B of the norm-folded layer": lambda: model.base_model.model[2].lora_B.default.weight.add_(0.1),
        "magnitude of the merged layer": lambda: first.lora_magnitude_vector.default.weight.mul_(0.8),
        "base weight of the norm-folded layer": lambda: model.base_model.model[2].base_layer.weight.mul_(1.2),
    }
    for what, edit in edits.items():
        before = model(x).detach()
        with torch.no_grad():
            edit()
        assert (model(x) - before).abs().max() > 1e-3, what  # the edit changes the output
        check(what)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.9)
    model.load_state_dict(other.state_dict())
    check("load_state_dict")
    assert len(dora_fused.reports()) == graphs  # refreshed in place, nothing compiled
    assert _counters()["refresh"] == refreshes + len(edits) + 1


def test_every_parameter_edit_of_the_corpus_is_seen_by_the_next_frozen_call():
    """The live path's edit corpus (in place, new storage through ``.data``, new Parameter objects, ``B = 0``,
    cancelling rows, another adapter loaded), on a frozen graph with some modules merged."""
    from test_lookalike_corpus import EDITS, _check

    model = tiny_llama_dora(torch.float32, torch.float32).eval()
    budget = 4 * _bytes(model.base_model.model.model.layers[0].self_attn.q_proj)
    compiled = torch.compile(model, backend=_frozen(merge_budget_bytes=budget))
    _check(compiled, model, "before any edit")
    assert {m.frozen for m in dora_fused.last_report().modules} == {"norm", "merged"}
    for what, edit in EDITS.items():
        with torch.no_grad():
            edit(model)
        _check(compiled, model, what)


def test_set_adapter_switches_frozen_graphs():
    """Each adapter gets its own graph and folded values; switching back and forth serves each one's outputs."""
    model = _two_adapter_mlp()
    x = torch.randn(5, 12)
    expected = {}
    graphs = len(dora_fused.reports())
    with torch.no_grad():
        for name in ("other", "default"):
            model.set_adapter(name)
            expected[name] = model(x)
        compiled = torch.compile(model, backend=_frozen())
        for name in ("default", "other", "default", "other"):
            model.set_adapter(name)
            assert_close(compiled(x), expected[name], **FP32_TOL, what=name)
    assert (expected["default"] - expected["other"]).abs().max() > 1e-2
    assert len(dora_fused.reports()) == graphs + 2


def test_writes_through_data_are_seen_after_refresh_frozen():
    """``p.data`` has a version counter of its own: such writes need ``dora_fused.refresh_frozen()``."""
    model = small_dora_mlp().eval()
    x = torch.randn(5, 12)
    compiled = torch.compile(model, backend=_frozen())
    with torch.no_grad():
        compiled(x)
        model.base_model.model[0].lora_B.default.weight.data.mul_(2.0)
        assert (compiled(x) - model(x)).abs().max() > 1e-3  # not seen: the documented limitation
        assert dora_fused.refresh_frozen() >= 1
        assert_close(compiled(x), model(x), **FP32_TOL, what="after refresh_frozen")


@pytest.mark.parametrize("variants", [64, 1], ids=["a-variant-each", "no-more-variants"])
def test_a_graph_shared_by_modules_serves_each_its_own_values(variants, monkeypatch, caplog):
    """One graph called with two models' parameters (as per-layer compiles of identical layers can be): each call
    gets its own model's values, from a variant compiled for its parameters, or, past ``MAX_VARIANTS``,
    recomputed on every switch (with one warning)."""
    from dora_fused import frozen

    monkeypatch.setattr(frozen, "MAX_VARIANTS", variants)
    models = [small_dora_mlp().eval() for _ in range(2)]
    with torch.no_grad():
        for p in models[1].parameters():
            p.mul_(1.3)
    x = torch.randn(5, 12)
    run = torch.compile(lambda model, x: model(x), backend=_frozen())
    graphs, before = len(dora_fused.reports()), _counters()
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="dora_fused"):
        for model in (*models, *models):
            assert_close(run(model, x), model(x), **FP32_TOL, what="output")
    assert {m.frozen for m in dora_fused.last_report().modules} == {"norm"}
    counts = {k: _counters().get(k, 0) - before.get(k, 0) for k in ("variant", "refresh")}
    warned = sum("more parameter sets than MAX_VARIANTS" in r.message for r in caplog.records)
    if variants > 1:
        assert (len(dora_fused.reports()) - graphs, counts, warned) == (2, {"variant": 1, "refresh": 0}, 0)
    else:
        assert (len(dora_fused.reports()) - graphs, counts, warned) == (1, {"variant": 0, "refresh": 3}, 1)


def test_peft_cached_norm_is_refreshed_when_the_adapter_changes(monkeypatch):
    """PEFT's ``ENABLE_DORA_CACHING`` keeps a norm that PEFT eager serves stale after an in-place load; ours is not."""
    from peft.tuners.lora import dora

    monkeypatch.setattr(dora, "ENABLE_DORA_CACHING", True)
    model = small_dora_mlp().eval()
    reference = copy.deepcopy(model)  # PEFT eager, caching too
    x = torch.randn(5, 12)
    compiled = torch.compile(model, backend=dora_fused.backend(inner="aot_eager"))
    with torch.no_grad():
        for _ in range(3):  # fills PEFT's cache, then reads it back
            assert_close(compiled(x), reference(x), **FP32_TOL, what="cached")
        assert dora_fused.last_report().modules[0].form == "peft_cached_norm"
        for target in (model, reference):
            target.base_model.model[0].lora_B.default.weight.mul_(1.5)
        stale = reference(x)
        got = compiled(x)
        reference.train()  # PEFT's documented way to empty its cache
        reference.eval()
        fresh = reference(x)
    assert (stale - fresh).abs().max() > 1e-3  # PEFT eager: stale until train()
    assert_close(got, fresh, **FP32_TOL, what="after the in-place change")
    assert _counters()["refresh"] >= 1
    variants = _counters().get("variant", 0)
    model.train()  # PEFT refills its cache with new tensors: recomputed in place, nothing compiled for them
    model.eval()
    with torch.no_grad():
        for _ in range(2):
            assert_close(compiled(x), fresh, **FP32_TOL, what="after PEFT refilled its cache")
    assert _counters().get("variant", 0) == variants


def test_graphs_sharing_peft_cache_do_not_recompute_it_for_each_other(monkeypatch):
    """Two graphs (two input shapes, as a prefill and a decode step) read the same PEFT cache tensors.

    Called in turn with nothing changed, neither recomputes the norm (the other's refresh is no
    change); after an in-place change of the adapter each serves the new value.
    """
    from peft.tuners.lora import dora

    monkeypatch.setattr(dora, "ENABLE_DORA_CACHING", True)
    model = small_dora_mlp().eval()
    compiled = torch.compile(model, backend=dora_fused.backend(inner="aot_eager"), dynamic=False)
    inputs = [torch.randn(5, 12), torch.randn(3, 12)]
    with torch.no_grad():
        for x in inputs * 2:  # fills PEFT's cache, then compiles a graph per shape that reads it
            compiled(x)
        refreshes = _counters().get("refresh", 0)
        for x in inputs * 3:
            compiled(x)
        assert _counters().get("refresh", 0) == refreshes, "a graph recomputed the cached norm with nothing changed"
        model.base_model.model[0].lora_B.default.weight.mul_(1.5)
        got = [compiled(x) for x in inputs * 2]
        assert _counters().get("refresh", 0) - refreshes <= 2  # once per graph at most
    reference = small_dora_mlp().eval()  # no cache: the truth after the change
    with torch.no_grad():
        reference.base_model.model[0].lora_B.default.weight.mul_(1.5)
        for x, out in zip(inputs * 2, got, strict=True):
            assert_close(out, reference(x), **FP32_TOL, what=f"shape {tuple(x.shape)} after the change")
    assert {m.form for m in dora_fused.last_report().modules} == {"peft_cached_norm"}


@pytest.mark.parametrize("cached", [False, True], ids=["frozen", "peft-cached-norm"])
def test_under_inference_mode_a_change_is_seen_at_once(cached, monkeypatch):
    """Compiled and called under ``torch.inference_mode()`` (PEFT's cached norm is then an inference tensor)."""
    from peft.tuners.lora import dora

    monkeypatch.setattr(dora, "ENABLE_DORA_CACHING", cached)
    model = small_dora_mlp().eval()
    x = torch.randn(5, 12)
    compiled = torch.compile(model, backend=dora_fused.backend(inner="aot_eager", frozen=not cached))
    with torch.inference_mode():
        for _ in range(3):
            compiled(x)
        assert dora_fused.last_report().error is None
        model.base_model.model[0].lora_B.default.weight.mul_(1.5)
        got = compiled(x)
    reference = small_dora_mlp().eval()  # no cache: the truth after the change
    with torch.no_grad():
        reference.base_model.model[0].lora_B.default.weight.mul_(1.5)
        assert_close(got, reference(x), **FP32_TOL, what="after the change")


# --- Inductor's freezing -------------------------------------------------------------------------


def test_inductor_freezing_folds_and_compiles_again_when_a_parameter_changes():
    """Under Inductor's freezing the parameters are constants of the compiled code: a change recompiles."""
    model = small_dora_mlp().eval()
    x = torch.randn(5, 12)
    compiled = torch.compile(model, backend="dora_fused")
    with torch.no_grad(), torch._inductor.config.patch(freezing=True):
        assert_close(compiled(x), model(x), **FP32_TOL, what="as compiled")
        assert {m.frozen for m in dora_fused.last_report().modules} == {"norm"}  # default budget: no merge
        recompiles = _counters().get("recompile", 0)
        model.base_model.model[2].lora_A.default.weight.mul_(1.5)
        assert_close(compiled(x), model(x), **FP32_TOL, what="after an in-place change")
        assert_close(compiled(x), model(x), **FP32_TOL, what="the call after")
    assert _counters()["recompile"] == recompiles + 1


def test_inductor_freezing_discard_merges_and_frees_the_originals():
    """With ``freezing_discard_parameters`` the original weights go: merging costs no memory, whatever the budget."""
    model = small_dora_mlp().eval()
    x = torch.randn(5, 12)
    with torch.no_grad():
        expected = model(x)
    original = weakref.ref(model.base_model.model[0].base_layer.weight)
    compiled = torch.compile(model, backend="dora_fused")
    with torch.no_grad(), torch._inductor.config.patch(freezing=True, freezing_discard_parameters=True):
        assert_close(compiled(x), expected, **FP32_TOL, what="output")
        assert {m.frozen for m in dora_fused.last_report().modules} == {"merged"}
        assert original() is None  # freed: nothing of dora_fused holds it
        assert_close(compiled(x), expected, **FP32_TOL, what="second call")


# --- GPU, larger -------------------------------------------------------------------------------


def _gpu_llama(adapters: torch.dtype | None) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
    )
    base = LlamaForCausalLM(config).to("cuda", torch.bfloat16)
    lora = LoraConfig(r=64, lora_alpha=128, target_modules="all-linear", use_dora=True, init_lora_weights=False)
    model = get_peft_model(base, lora, autocast_adapter_dtype=adapters is None)
    if adapters is not None:
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(adapters)
    perturb_magnitudes(model, 0.5)
    return model.eval()


def _frozen_bound(model, ids: torch.Tensor, exact: torch.Tensor) -> float:
    """RATIO × the larger of PEFT eager's and PEFT's merged model's error against fp64, plus ATOL."""
    merged = copy.deepcopy(model).merge_and_unload()
    with torch.no_grad():
        errors = relative_error(model(input_ids=ids).logits, exact), relative_error(merged(input_ids=ids).logits, exact)
    return RATIO * max(errors) + ATOL


@pytest.mark.gpu
@pytest.mark.parametrize("adapters", [None, torch.bfloat16], ids=["bf16-base-fp32-adapters", "bf16"])
def test_gpu_frozen_is_as_exact_as_peft_and_never_stale(adapters):
    """Inductor with CUDA graphs: half the modules merged; equal to eager's accuracy; an in-place swap seen at once."""
    model = _gpu_llama(adapters)
    ids = torch.randint(0, 1000, (2, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    attention = model.base_model.model.model.layers[0].self_attn
    budget = sum(_bytes(attention.get_submodule(n)) for n in ("q_proj", "k_proj", "v_proj"))  # merged; the rest not
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(input_ids=ids).logits
        backend = dora_fused.backend(frozen=True, merge_budget_bytes=budget)
        compiled = torch.compile(model, backend=backend, mode="reduce-overhead")
        for _ in range(3):  # record, then replay
            out = compiled(input_ids=ids).logits.clone()
    kinds = {m.name.split("layers.")[1]: m.frozen for m in dora_fused.last_report().modules}
    assert [n for n, kind in kinds.items() if kind == "merged"] == [
        "0.self_attn.q_proj",
        "0.self_attn.k_proj",
        "0.self_attn.v_proj",
    ]
    bound = _frozen_bound(model, ids, exact)
    assert relative_error(out, exact) <= bound, relative_error(out, exact)

    before = out
    with torch.no_grad():
        attention.q_proj.lora_B.default.weight.mul_(1.5)  # a merged module
        model.base_model.model.model.layers[0].mlp.up_proj.lora_A.default.weight.mul_(1.5)  # a norm-folded one
        exact = copy.deepcopy(model).double()(input_ids=ids).logits
        out = compiled(input_ids=ids).logits.clone()
    bound = _frozen_bound(model, ids, exact)
    assert relative_error(before, exact) > 2 * bound, "a stale output would pass: the swap must move the logits more"
    assert relative_error(out, exact) <= bound, relative_error(out, exact)
    assert _counters()["refresh"] >= 1


def test_a_graph_whose_only_inputs_checked_are_peft_cache_tensors_checks_their_identity():
    """A variant whose inputs are PEFT's cache tensors alone (its parameters graph attributes) still checks them."""
    from dora_fused.frozen import Variant
    from dora_fused.passes.folding import FoldedValue, StateRef

    cache = torch.ones(3)
    gm = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())
    gm.register_buffer("weight", torch.ones(3, 2))
    value = FoldedValue(
        kind="peft_norm",
        module="layer",
        adapter="default",
        roots=(StateRef("attr", "weight"),),
        recipe=gm,  # not run: nothing here is stale until a check says so
        scaling=1.0,
        storage=StateRef("input", 0),
        shape=(3,),
        dtype=torch.float32,
        owned=False,
    )
    variant = Variant(lambda *a: None, gm, [value], [cache])
    assert not variant.stale([cache])
    cache.mul_(2)  # a write into PEFT's cache (another graph's refresh): not a change
    assert not variant.stale([cache])
    assert variant.stale([cache.clone()])  # PEFT refilled its cache: a new tensor
    gm.weight.add_(1)  # the parameter it came from was written
    assert variant.stale([cache])
