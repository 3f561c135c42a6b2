"""Values of parameters alone that a graph returns are copied out of the CUDA graph pool.

PEFT's norm cache (``ENABLE_DORA_CACHING``) keeps the norm and ``B·A`` that the
first compiled call in eval returns; under CUDA graphs those outputs would be
overwritten by the next replay. CPU: which outputs are found, and that the copy
keeps everything else as it was; GPU (``-m gpu``): PEFT's cache under
``mode="reduce-overhead"``, as exact as PEFT eager, never stale.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close, relative_error, small_dora_mlp

import dora_fused
from dora_fused.cudagraph_outputs import copy_out, state_outputs

FP32_TOL = dict(rtol=2e-5, atol=2e-6)


def _captured(fn, *args):
    """Dynamo's graph of ``fn(*args)`` and its example inputs."""
    seen = []

    def capture(gm, example_inputs):
        seen.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=capture, fullgraph=True)(*args)
    return seen[0]


def test_outputs_of_parameters_alone_are_found_and_activations_and_views_of_parameters_are_not():
    lin = torch.nn.Linear(6, 4)
    kept = torch.randn(4)  # a plain tensor input: not module state

    def fn(x):
        norm = lin.weight.norm(dim=1)  # parameters alone: found
        mixed = lin.weight.sum(1) * kept  # depends on a plain tensor: not
        return lin(x) * norm, norm, mixed, lin.weight.t(), (lin.weight * 2).t()  # the last: a view of a new value

    gm, example_inputs = _captured(fn, torch.randn(3, 6))
    assert state_outputs(gm, example_inputs) == [1, 4]


@pytest.mark.parametrize("ops", ["torch", "triton"])
def test_peft_cache_filling_graph_returns_the_norm_and_later_graphs_return_nothing_to_copy(ops, monkeypatch):
    """The first call in eval under ENABLE_DORA_CACHING returns what PEFT caches, as the pass rewrote it.

    Per DoRA layer: the norm and ``B·A``. The Triton norm op also takes the base output, an order it
    keeps and never reads: its norm still counts as a value of parameters alone.
    """
    from peft.tuners.lora import dora

    monkeypatch.setattr(dora, "ENABLE_DORA_CACHING", True)
    model = small_dora_mlp().eval()
    x = torch.randn(5, 12)
    rewrite = dora_fused.backend(inner="eager", ops=ops)
    seen = []

    def capture(gm, example_inputs):
        compiled = rewrite(gm, example_inputs)  # rewrites gm in place
        seen.append(state_outputs(gm, list(example_inputs)))
        return compiled

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=capture)
    with torch.no_grad():
        for _ in range(2):
            compiled(x)
    assert {m.status for m in dora_fused.reports()[0].modules} == {"rewritten"}
    assert len(seen) == 2 and len(seen[0]) == 4 and seen[1] == []  # 2 layers × (the norm, B·A); then nothing


def test_copy_out_clones_only_the_given_outputs():
    a, b = torch.randn(3), torch.randn(3)
    for outputs in ((a, b), [a, b]):
        got = copy_out(lambda outputs=outputs: outputs, [1])()
        assert type(got) is type(outputs)
        assert got[0] is a and got[1] is not b and got[1].data_ptr() != b.data_ptr()
        assert torch.equal(got[1], b)

    def compiled():
        return (a,)

    assert copy_out(compiled, []) is compiled


def _dora_caches(model: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors PEFT's DoRA layers keep in their norm cache."""
    return [
        value
        for module in model.modules()
        for value in getattr(module, "_dora_cache", {}).values()
        if isinstance(value, torch.Tensor)
    ]


def test_reduce_overhead_with_peft_cache_matches_eager_and_sees_a_change(monkeypatch):
    """CPU: the wrapped Inductor call (CUDA graphs do not apply off CUDA) returns PEFT's values and refreshes them.

    The graph that reads PEFT's cache takes each cached tensor as a static input, as AOTAutograd reads
    it off the traced placeholder: CUDA graphs then read it where it lies instead of copying it in at
    each replay. Dynamo marks the tensors that modules hold this way (PEFT's cache is a dict on a
    module), so the cached norm and ``B·A`` cost no copy per decoded token.
    """
    from peft.tuners.lora import dora

    monkeypatch.setattr(dora, "ENABLE_DORA_CACHING", True)
    model = small_dora_mlp().eval()
    reference = copy.deepcopy(model)
    static: list[set[int]] = []  # per compiled graph: the data pointers of inputs traced as static addresses
    compile_inner = dora_fused.DoraFusedBackend._compile_inner

    def recording(self, gm, example_inputs, mode, options):
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        static.append(
            {
                x.data_ptr()
                for n, x in zip(placeholders, example_inputs, strict=True)
                if n.meta.get("tensor_dict", {}).get("_dynamo_static_input_type")
            }
        )
        return compile_inner(self, gm, example_inputs, mode, options)

    monkeypatch.setattr(dora_fused.DoraFusedBackend, "_compile_inner", recording)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="dora_fused", mode="reduce-overhead")
    with torch.no_grad():
        for seed in range(3):
            x = torch.randn(5, 12, generator=torch.Generator().manual_seed(seed))
            assert_close(compiled(x), reference(x), **FP32_TOL, what=f"call {seed}")
        cached = {t.data_ptr() for t in _dora_caches(model)}
        assert len(static) == 2 and len(cached) == 4  # the graph that fills the cache, then the one reading it
        assert cached <= static[1], "a cached norm or B·A is not a static input of the graph that reads it"
        for target in (model, reference):
            target.base_model.model[0].lora_B.default.weight.mul_(1.5)
        reference.train()  # PEFT's way to empty its cache
        reference.eval()
        assert_close(compiled(x), reference(x), **FP32_TOL, what="after the change")


@pytest.mark.gpu
def test_gpu_peft_cache_under_cuda_graphs_is_exact_and_never_stale(monkeypatch):
    """A 2-layer Llama, PEFT's norm cache, ``mode="reduce-overhead"``: replays as exact as PEFT eager, a change seen."""
    from peft.tuners.lora import dora
    from test_frozen import _gpu_llama

    monkeypatch.setattr(dora, "ENABLE_DORA_CACHING", True)
    model = _gpu_llama(None)
    ids = torch.randint(0, 1000, (2, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    layer = model.base_model.model.model.layers[0]

    def uncached(dtype: torch.dtype | None = None) -> torch.Tensor:
        """PEFT eager's logits, its cache off (a copy of the model would carry the cached norms)."""
        monkeypatch.setattr(dora, "ENABLE_DORA_CACHING", False)
        try:
            reference = copy.deepcopy(model)
            return (reference.to(dtype) if dtype else reference)(input_ids=ids).logits
        finally:
            monkeypatch.setattr(dora, "ENABLE_DORA_CACHING", True)

    torch._dynamo.reset()
    with torch.no_grad():
        exact = uncached(torch.float64)
        bound = 1.1 * relative_error(uncached(), exact) + 1e-6  # PEFT eager's error, +10%
        compiled = torch.compile(model, backend="dora_fused", mode="reduce-overhead")
        for _ in range(4):  # fills PEFT's cache, compiles the cached graph, records, replays
            out = compiled(input_ids=ids).logits.clone()
        assert {m.form for m in dora_fused.last_report().modules} == {"peft_cached_norm"}
        assert relative_error(out, exact) <= bound, relative_error(out, exact)
        before = out
        layer.self_attn.q_proj.lora_B.default.weight.mul_(1.5)
        layer.mlp.up_proj.lora_A.default.weight.mul_(1.5)
        exact = uncached(torch.float64)
        for _ in range(2):
            out = compiled(input_ids=ids).logits.clone()
    assert relative_error(before, exact) > 2 * bound, "a stale output would pass: the change must move the logits more"
    assert relative_error(out, exact) <= bound, relative_error(out, exact)
