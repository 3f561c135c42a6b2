"""Records carry the model's fully qualified module names, whatever frame Dynamo compiled.

Dynamo hands the backend one frame at a time: the whole model, a submodule it
resumed in after a graph break, or each layer compiled on its own (FSDP2's
usual recipe). Every record must still name the module as the user's PEFT model
does (``named_modules()``), so no two layers' records share a name.
"""

from __future__ import annotations

import pytest
import torch
from helpers import dora_module_names, tiny_llama_dora

import dora_fused
from dora_fused.passes.naming import FrameNames, calling_modules, unwrapped_name

EAGER = dora_fused.backend(inner="eager")  # names only: nothing needs compiling


def _ids() -> torch.Tensor:
    return torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(0))


def _names_seen() -> list[str]:
    return [m.name for report in dora_fused.reports() for m in report.modules]


def _assert_each_dora_module_rewritten_once(model: torch.nn.Module) -> None:
    names = _names_seen()
    assert sorted(names) == sorted(dora_module_names(model)), names
    assert all(m.status == "rewritten" for r in dora_fused.reports() for m in r.modules)


@pytest.fixture(autouse=True)
def _clear():
    dora_fused.clear_reports()
    yield
    dora_fused.clear_reports()


def test_each_layer_compiled_on_its_own_in_place():
    model = tiny_llama_dora()
    for layer in model.base_model.model.model.layers:
        layer.compile(backend=EAGER)
    model(input_ids=_ids())
    assert len(dora_fused.reports()) == 2
    _assert_each_dora_module_rewritten_once(model)


def test_each_layer_replaced_by_its_compiled_wrapper():
    """``layers[i] = torch.compile(layer)``: the wrapper's ``_orig_mod`` is not part of the name."""
    model = tiny_llama_dora()
    layers = model.base_model.model.model.layers
    expected = dora_module_names(model)
    for i, layer in enumerate(layers):
        layers[i] = torch.compile(layer, backend=EAGER)
    model(input_ids=_ids())
    assert sorted(_names_seen()) == sorted(expected)


def test_a_single_peft_layer_compiled_inside_the_model():
    model = tiny_llama_dora()
    q_proj = model.base_model.model.model.layers[1].self_attn.q_proj
    q_proj.compile(backend=EAGER)
    model(input_ids=_ids())
    [report] = dora_fused.reports()
    assert report.rewritten == ["base_model.model.model.layers.1.self_attn.q_proj"]
    assert report.modules[0].adapter == "default" and report.modules[0].kind == "PEFT Linear"


def test_a_peft_layer_compiled_alone_is_the_root():
    model = tiny_llama_dora()
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    torch.compile(q_proj, backend=EAGER)(torch.randn(3, 48))
    assert dora_fused.last_report().rewritten == ["(root)"]


def test_graph_breaks_resume_inside_layers():
    """A graph break in each decoder layer: Dynamo compiles the layers' own frames, their paths relative to them."""
    model = tiny_llama_dora()
    for layer in model.base_model.model.model.layers:
        layer.register_forward_pre_hook(lambda module, args: torch._dynamo.graph_break())
    torch.compile(model, backend=EAGER)(input_ids=_ids())
    assert len(dora_fused.reports()) > 1
    _assert_each_dora_module_rewritten_once(model)


def test_a_wrapper_around_the_peft_model_does_not_prefix_the_names():
    """DDP, Lightning and the like hold the PEFT model as an attribute: names stay those of the PEFT model."""

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, **kwargs):
            return self.module(**kwargs)

    model = tiny_llama_dora()
    for layer in model.base_model.model.model.layers:
        layer.compile(backend=EAGER)
    Wrapper(model)(input_ids=_ids())
    _assert_each_dora_module_rewritten_once(model)


@torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True)
def test_checkpoint_wrapped_layers_compiled_on_their_own():
    """``layer.compile()`` of torch's ``checkpoint_wrapper``: the wrapper's frame, its attribute not in the names."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = tiny_llama_dora()
    expected = dora_module_names(model)
    layers = model.base_model.model.model.layers
    for i, layer in enumerate(layers):
        layers[i] = checkpoint_wrapper(layer)
        layers[i].compile(backend=EAGER)
    model(input_ids=_ids()).logits.sum().backward()
    assert len(dora_fused.reports()) == 2
    assert sorted(_names_seen()) == sorted(expected)


def test_audit_names_modules_after_graph_breaks():
    model = tiny_llama_dora()
    for layer in model.base_model.model.model.layers:
        layer.register_forward_pre_hook(lambda module, args: torch._dynamo.graph_break())
    report = dora_fused.audit(model, input_ids=_ids())
    assert sorted(report.rewritten) == sorted(dora_module_names(model))
    assert report.skipped == []


def test_unknown_frames_keep_relative_names():
    """No root owns the lifted parameters (or they disagree): names stay as the frame gives them."""
    model = tiny_llama_dora()
    gm = torch.fx.symbolic_trace(torch.nn.Linear(3, 3))
    assert FrameNames.of(gm, [], [model]).qualify("mlp.up_proj") == "mlp.up_proj"
    assert FrameNames(None).qualify("(root)") == "(root)"
    assert FrameNames("layers.0.").qualify("(root)") == "layers.0"
    assert FrameNames("layers.0.").qualify("mlp.up_proj") == "layers.0.mlp.up_proj"
    assert unwrapped_name("layers.0._orig_mod.mlp._checkpoint_wrapped_module.up_proj") == "layers.0.mlp.up_proj"
    assert calling_modules() == []


def test_without_example_inputs_names_come_from_dynamos_kept_values():
    """The Inductor hook gets the graph alone: the values Dynamo keeps for its placeholders name the frame."""
    from dora_fused.graph_rewrite import rewrite_graph
    from dora_fused.passes import DoraRewritePass

    reports = []

    def graph_only(gm, example_inputs):
        reports.append(rewrite_graph(gm, DoraRewritePass(ops="torch")).report)
        return gm.forward

    model = tiny_llama_dora()
    for layer in model.base_model.model.model.layers:
        layer.compile(backend=graph_only)
    model(input_ids=_ids())
    names = [m.name for report in reports for m in report.modules]
    assert sorted(names) == sorted(dora_module_names(model)), names
