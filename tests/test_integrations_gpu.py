"""transformers ``generate`` compiled with the backend on a CUDA GPU: static cache, CUDA graphs (run on an H100/H200).

transformers compiles generate's decoding step only on accelerators: with
``cache_implementation="static"`` and ``compile_config=CompileConfig(backend="dora_fused")``
it calls ``torch.compile(model.__call__, backend="dora_fused", mode="reduce-overhead")`` on the
transformers model inside the PeftModel, whose layers are PEFT's DoRA layers. The CPU
counterpart (``mode="default"``) is in test_integrations.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close, dora_module_names, layer_paths, perturb_magnitudes, tiny_llama_dora
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from transformers import CompileConfig

import dora_fused

pytestmark = pytest.mark.gpu


def _other_adapter(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Another adapter for the same base (same shapes and config): new A, B and magnitudes, on the CPU."""
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in other.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * param.std())
    perturb_magnitudes(other, 0.5, seed=1)
    return get_peft_model_state_dict(other)


@pytest.mark.parametrize(
    "backend",
    ["dora_fused", dora_fused.backend(ops="triton")],
    ids=["dora_fused", "ops=triton"],
)
def test_generate_reduce_overhead_matches_eager_and_swaps_in_place(backend):
    """Greedy tokens identical to eager generate, logits close, every DoRA module rewritten, CUDA graphs used;
    then an adapter loaded in place into the same tensors: its tokens at once, and no recompile."""
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_trees

    cpu_model = tiny_llama_dora(torch.float32, r=4).eval()
    other_weights = _other_adapter(cpu_model)
    model = cpu_model.cuda()
    eager_other = copy.deepcopy(model)
    set_peft_model_state_dict(eager_other, other_weights)

    input_ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(2)).cuda()
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=12,
        do_sample=False,
        cache_implementation="static",
        return_dict_in_generate=True,
        output_logits=True,
    )
    expected = model.generate(**kwargs, disable_compile=True)
    expected_other = eager_other.generate(**kwargs, disable_compile=True)
    assert not torch.equal(expected.sequences, expected_other.sequences)  # the swap is visible in the tokens

    config = CompileConfig(backend=backend)
    assert config.mode == "reduce-overhead"  # transformers' default: CUDA graphs
    dora_fused.clear_reports()
    counters.clear()
    got = model.generate(**kwargs, compile_config=config)

    reports = dora_fused.reports()
    assert len(reports) == 1, [r.summary() for r in reports]  # the decoding step; the prefill runs eagerly
    assert layer_paths(reports[0].rewritten) == layer_paths(dora_module_names(model)), reports[0].summary()
    assert reports[0].skipped == [] and reports[0].error is None
    assert counters["inductor"]["cudagraph_skips"] == 0
    manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    assert manager is not None and any(manager.roots.values()), "no CUDA graph was recorded"

    assert torch.equal(got.sequences, expected.sequences)
    for step, (a, e) in enumerate(zip(got.logits, expected.logits, strict=True)):
        assert_close(a, e, rtol=1e-4, atol=1e-4, what=f"logits at step {step}")

    # Another adapter copied into the same tensors: the CUDA graphs replay with the new weights.
    set_peft_model_state_dict(model, other_weights)
    swapped = model.generate(**kwargs, compile_config=config)
    assert len(dora_fused.reports()) == 1  # nothing recompiled
    assert torch.equal(swapped.sequences, expected_other.sequences)
    for step, (a, e) in enumerate(zip(swapped.logits, expected_other.logits, strict=True)):
        assert_close(a, e, rtol=1e-4, atol=1e-4, what=f"logits at step {step} after the swap")
