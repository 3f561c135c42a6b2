"""DoRA on quantized bases (bitsandbytes 4-bit and 8-bit, torchao int8 and int-x), CPU, with the real libraries.

Each case: the whole model traces as one graph, every DoRA module is rewritten
and its record names the scheme, and outputs (eval) or the adapters' gradients
(training) are no farther from fp64 of the dequantized model than PEFT eager's
(``quantized_models.check_against_fp64``), with the core tests' criterion (``test_peft_llama``): each group's error (the
logits; all lora_A, all lora_B, all magnitude gradients) at most ``RATIO`` times
PEFT eager's plus ``ATOL`` (one bf16 model's errors move by ±15% with any
change of rounding order; a group's is stable).
The fp64 reference is the same PEFT model on plain Linear bases holding each
layer's weight as its library dequantizes it. ``inner="aot_eager"`` keeps the
cases fast (the pass is the same; Inductor's C++ compile is what would cost).
"""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_LLAMA, relative_error
from quantized_models import (
    ATOL,
    HAS_BNB,
    HAS_TORCHAO,
    RATIO,
    check_against_fp64,
    dequantized_weight,
    fp64_twin,
    quantized_llama_dora,
)

import dora_fused
from dora_fused.quantized_bases import bnb_dequantize

BACKEND = dora_fused.backend(inner="aot_eager")
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed")
needs_torchao = pytest.mark.skipif(not HAS_TORCHAO, reason="torchao is not installed")


def _check(scheme: str, train: bool) -> None:
    check_against_fp64(scheme, train, BACKEND)


CASES = [
    pytest.param("bnb-nf4-dq", False, marks=needs_bnb),
    pytest.param("bnb-fp4", True, marks=needs_bnb),
    pytest.param("bnb-int8", False, marks=needs_bnb),
    pytest.param("bnb-int8", True, marks=needs_bnb),
    pytest.param("torchao-int8", False, marks=needs_torchao),
    pytest.param("torchao-intx", True, marks=needs_torchao),
]
SLOW_CASES = [  # the remaining combinations of note, about 40 s each on 2 cores
    pytest.param("bnb-nf4", True, marks=[needs_bnb, pytest.mark.slow]),
    pytest.param("bnb-fp4-dq", False, marks=[needs_bnb, pytest.mark.slow]),
    pytest.param("torchao-int8", True, marks=[needs_torchao, pytest.mark.slow]),
]


@pytest.mark.parametrize(("scheme", "train"), CASES + SLOW_CASES)
def test_one_graph_every_module_rewritten_and_closer_to_fp64(scheme, train):
    _check(scheme, train)


@needs_bnb
@pytest.mark.parametrize(("scheme", "train"), [("bnb-nf4-dq", True), ("bnb-int8", False)])
def test_triton_norms_per_format(scheme, train):
    """The Triton ops (the interpreter here): int8's norm reads the packed rows, 4-bit's the dequantized weight."""
    records = check_against_fp64(scheme, train, dora_fused.backend(ops="triton", inner="aot_eager"))
    packed = scheme == "bnb-int8"
    norm = "dora_fused.quantized_row_norm" if packed else "dora_fused.factored_row_norm"
    assert all(r.ops[0] == norm for r in records), [r.ops for r in records]
    assert all(("packed rows" if packed else "dequantized weight") in r.ops_reason for r in records)


FROZEN_CASES = [
    *(pytest.param(scheme, "cpu", marks=needs_bnb) for scheme in ("bnb-nf4-dq", "bnb-fp4", "bnb-int8")),
    *(pytest.param(scheme, "cuda", marks=[needs_bnb, pytest.mark.gpu]) for scheme in ("bnb-nf4", "bnb-int8")),
]


@pytest.mark.parametrize(("scheme", "device"), FROZEN_CASES)
def test_frozen_folds_the_norm_of_a_quantized_base_and_sees_a_change(scheme, device):
    """``frozen=True``: each norm computed once from the dequantized weight, as exact as PEFT eager, never stale.

    A quantized base's layer keeps its quantized matmul (no merged form, whatever the budget). On
    CUDA the model compiles with Inductor, the folded recipe replaying bitsandbytes' CUDA dequantize.
    """
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1)).to(device)

    def change(model: torch.nn.Module) -> None:
        layer = model.base_model.model.model.layers[0]
        layer.mlp.down_proj.lora_B.default.weight.mul_(1.5)
        layer.self_attn.q_proj.lora_magnitude_vector.default.weight.mul_(0.5)

    def reference(changed: bool) -> tuple[torch.Tensor, float]:
        """fp64 logits and the error bound, from PEFT eager on a fresh model (8-bit eager breaks its layers on CPU)."""
        eager = quantized_llama_dora(scheme, device=device).eval()
        if changed:
            change(eager)
        exact = fp64_twin(eager, scheme)(input_ids=ids).logits
        return exact, RATIO * relative_error(eager(input_ids=ids).logits, exact) + ATOL

    model = quantized_llama_dora(scheme, device=device).eval()
    inner = "inductor" if device == "cuda" else "aot_eager"
    backend = dora_fused.backend(inner=inner, frozen=True, merge_budget_bytes=2**40)
    compiled = torch.compile(model, backend=backend)
    patch = {"capture_dynamic_output_shape_ops": scheme == "bnb-int8"}  # LLM.int8()'s outlier columns
    with torch.no_grad(), torch._dynamo.config.patch(patch):
        exact, bound = reference(changed=False)
        for _ in range(2):
            out = compiled(input_ids=ids).logits
        records = dora_fused.last_report().modules
        assert [m.frozen for m in records] == ["norm"] * 7, [m.ops_reason for m in records]
        assert relative_error(out, exact) <= bound
        before = out.clone()
        change(model)
        exact, bound = reference(changed=True)
        out = compiled(input_ids=ids).logits
    assert relative_error(before, exact) > 2 * bound, "a stale output would pass: the change must move the logits more"
    assert relative_error(out, exact) <= bound


@needs_bnb
@pytest.mark.parametrize("scheme", ["bnb-nf4", "bnb-fp4-dq", "bnb-int8"])
def test_bnb_dequantize_is_bitsandbytes_own_and_leaves_the_weight_in_place(scheme):
    """The polyfill's dequantize: bitsandbytes' values exactly, the module's Parameter object untouched."""
    model = quantized_llama_dora(scheme)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    with torch.no_grad():
        layer(torch.randn(1, 3, TINY_LLAMA["hidden_size"], dtype=torch.bfloat16))  # 8-bit: moves SCB to its state
    weight = layer.weight
    assert torch.equal(bnb_dequantize(layer), dequantized_weight(layer))
    compiled = torch.compile(bnb_dequantize, backend="eager", fullgraph=True)
    assert torch.equal(compiled(layer), dequantized_weight(layer))
    assert layer.weight is weight


@needs_bnb
def test_unknown_layouts_keep_peft_path():
    """A 4-bit weight in bitsandbytes' CPU inference layout is not one the polyfill reads: None (PEFT's path)."""
    model = quantized_llama_dora("bnb-nf4")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    layer.weight.quant_state.packing_format_for_cpu = True
    assert bnb_dequantize(layer) is None
    assert bnb_dequantize(torch.nn.Linear(3, 2)) is None


def test_a_weight_computed_by_unknown_ops_is_left_alone():
    """W computed in the graph by ops no quantized base matches: the module is left alone, with the reason."""

    class ScaledWeight(torch.nn.Module):
        def __init__(self):
            super().__init__()
            gen = torch.Generator().manual_seed(0)
            self.q = torch.nn.Parameter(torch.randn(6, 5, generator=gen), requires_grad=False)
            self.A = torch.nn.Parameter(torch.randn(2, 5, generator=gen))
            self.B = torch.nn.Parameter(torch.randn(6, 2, generator=gen))
            self.m = torch.nn.Parameter(torch.rand(6, generator=gen) + 1)

        def forward(self, x):
            weight = self.q.abs()  # an unknown "dequantize"
            w = weight + 0.5 * (self.B @ self.A)
            return torch.nn.functional.linear(x, (self.m / torch.linalg.norm(w, dim=1).detach()).view(-1, 1) * w)

    model = ScaledWeight()
    x = torch.randn(3, 5)
    torch._dynamo.reset()
    out = torch.compile(model, backend=BACKEND)(x)
    torch.testing.assert_close(out, model(x))
    [(_, reason)] = dora_fused.last_report().skipped
    assert "not a parameter or a recognized dequantize" in reason, reason


# --- GPU: the compiled model with Inductor; int8's norm reads the packed rows, 4-bit's the dequantized weight ------


@needs_bnb
@pytest.mark.gpu
@pytest.mark.parametrize(("scheme", "train"), [("bnb-nf4-dq", False), ("bnb-nf4-dq", True), ("bnb-int8", True)])
def test_gpu_compiled_model_norms(scheme, train):
    records = check_against_fp64(scheme, train, "dora_fused", device="cuda", layers=2)
    norm = "dora_fused.quantized_row_norm" if scheme == "bnb-int8" else "dora_fused.factored_row_norm"
    assert all(norm in r.ops for r in records), [r.ops for r in records]


def test_memory_estimates_count_the_dequantized_weight():
    """Dense: the dequantized copy on top of PEFT's norm; rewritten: none where the norm reads the packed weight."""
    from dora_fused.passes.memory import dense_norm_bytes, rewritten_norm_bytes

    bf16, fp32 = torch.bfloat16, torch.float32
    plain = dense_norm_bytes(4096, 14336, 16, bf16, fp32)
    assert dense_norm_bytes(4096, 14336, 16, bf16, fp32, quantized=True) == plain + 4096 * 14336 * 2
    on_copy = rewritten_norm_bytes(4096, 14336, 16, bf16, fp32, "triton", quantized=True)
    assert on_copy == rewritten_norm_bytes(4096, 14336, 16, bf16, fp32, "triton") + 4096 * 14336 * 2
    packed = rewritten_norm_bytes(4096, 14336, 16, bf16, fp32, "quantized", quantized=True)
    assert packed < 4096 * 14336 // 4 < on_copy  # well under the packed weight's own size
    assert rewritten_norm_bytes(4096, 14336, 8, fp32, fp32, "quantized", quantized=True) < 4096 * 14336


def test_a_data_dependent_shape_break_names_the_setting():
    """LLM.int8()'s outlier split breaks the graph unless Dynamo traces dynamic output shapes: the audit says how."""
    from dora_fused.logs import short_reason

    message = (
        "Dynamic shape operator\n  Explanation: Operator `bitsandbytes.int8_vectorwise_quant.default`'s output shape"
        " depends on input Tensor data.\n  Hint: Enable tracing of dynamic shape operators with"
        " `torch._dynamo.config.capture_dynamic_output_shape_ops = True`\n"
    )
    assert short_reason(message) == (
        "Dynamic shape operator: bitsandbytes.int8_vectorwise_quant.default"
        " (set torch._dynamo.config.capture_dynamic_output_shape_ops = True to trace it)"
    )
