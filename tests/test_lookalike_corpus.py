"""A corpus of DoRA look-alikes and parameter edits: the classes of input that must never go wrong.

Look-alikes: modules whose graphs resemble DoRA's (a row norm of ``W + s·B·A``,
an ``m / n`` scale, PEFT's compose) but differ in one way that changes the value
or that the pass cannot prove. Each is compiled and must give eager's output and
gradients, and be either rewritten or left alone as the table says (with the
reason, where the pass records one).

Parameter edits: a compiled PEFT DoRA model whose parameters change between
calls in every way users change them (in place, new storage, new Parameter
objects, adapter switches, merges, a near-cancelling adapter). Every call after
an edit must equal eager on the edited model: no value may be served stale.

The pass runs exactly as with ``backend="dora_fused"``; ``inner="aot_eager"``
compiles the rewritten graph without Inductor's C++ compile, which keeps the
corpus fast on CPU. The look-alikes that go through Inductor are kept as they
were written (``backend="dora_fused"``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from helpers import (
    TINY_LLAMA,
    HandWrittenDora,
    TorchtuneStyleDoRALinear,
    assert_close,
    relative_error,
    tiny_llama_dora,
)
from peft import get_peft_model_state_dict, set_peft_model_state_dict

import dora_fused

AOT = dora_fused.backend(inner="aot_eager")
F = torch.nn.functional


# --- look-alikes -----------------------------------------------------------------------------------


class _LowRank(torch.nn.Module):
    """W [6, 5], A [2, 5], B [6, 2], m [6]: the parameters of a small DoRA layer, for look-alikes to misuse."""

    def __init__(self, d_out: int = 6, d_in: int = 5, r: int = 2, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(d_out, d_in, generator=gen))
        self.A = torch.nn.Parameter(torch.randn(r, d_in, generator=gen))
        self.B = torch.nn.Parameter(torch.randn(d_out, r, generator=gen))
        self.m = torch.nn.Parameter(torch.rand(d_out, generator=gen) + 0.5)
        self.s = 0.5

    def dora_weight(self) -> torch.Tensor:
        return self.weight + self.s * (self.B @ self.A)


class L1RowNorm(_LowRank):
    """An L1 row norm where DoRA has the L2 one."""

    def forward(self, x):
        w = self.dora_weight()
        n = torch.linalg.vector_norm(w, ord=1, dim=1).detach()
        return F.linear(x, (self.m / n).view(-1, 1) * w)


class FrobeniusNorm(_LowRank):
    """One norm over the whole matrix, not one per row."""

    def forward(self, x):
        w = self.dora_weight()
        n = torch.linalg.norm(w).detach()
        return F.linear(x, (self.m / n).view(-1, 1) * w)


class Difference(_LowRank):
    """``W - s·B·A``: the update subtracted."""

    def forward(self, x):
        w = self.weight - self.s * (self.B @ self.A)
        n = torch.linalg.norm(w, dim=1).detach()
        return F.linear(x, (self.m / n).view(-1, 1) * w)


class ColumnScaleOfASquareLayer(_LowRank):
    """A square layer whose ``m / n`` scales columns (broadcast over the last dim), not rows."""

    def __init__(self):
        super().__init__(d_out=5, d_in=5)

    def forward(self, x):
        w = self.dora_weight()
        n = torch.linalg.norm(w, dim=1).detach()
        return F.linear(x, (self.m / n) * w)


class NormWithDtype(_LowRank):
    """A row norm asked for in another dtype."""

    def forward(self, x):
        w = self.dora_weight()
        n = torch.linalg.vector_norm(w, dim=1, dtype=torch.float64).detach().float()
        return F.linear(x, (self.m / n).view(-1, 1) * w)


class DoraWeightAlsoReturned(_LowRank):
    """The DoRA weight's sum is read by something else as well (here: returned)."""

    def forward(self, x):
        w = self.dora_weight()
        n = torch.linalg.norm(w, dim=1).detach()
        return F.linear(x, (self.m / n).view(-1, 1) * w), w


class OtherAdapterInTheLoraPath(TorchtuneStyleDoRALinear):
    """torchtune-style DoRA whose LoRA output uses another A than its norm."""

    def __init__(self):
        super().__init__(7, 6, 3, 6.0)
        self.other_a = torch.nn.Linear(7, 3, bias=False)

    def forward(self, x):
        base_out = F.linear(x, self.weight, self.bias)
        lora_out = self.lora_b(self.other_a(x))
        eye = torch.eye(7, dtype=x.dtype)
        lora_weight = self.lora_b(self.lora_a(eye)).T
        weight_norm = torch.linalg.norm(self.weight + self.scaling * lora_weight.detach(), dim=1).detach()
        g = (self.magnitude / weight_norm).view(1, -1)
        return (g - 1) * base_out + g * lora_out * self.scaling + base_out


class NormUsedTwice(TorchtuneStyleDoRALinear):
    """torchtune-style DoRA whose norm is also added to the output."""

    def __init__(self):
        super().__init__(7, 6, 3, 6.0)

    def forward(self, x):
        base_out = F.linear(x, self.weight, self.bias)
        lora_out = self.lora_b(self.lora_a(x))
        eye = torch.eye(7, dtype=x.dtype)
        lora_weight = self.lora_b(self.lora_a(eye)).T
        weight_norm = torch.linalg.norm(self.weight + self.scaling * lora_weight.detach(), dim=1).detach()
        g = (self.magnitude / weight_norm).view(1, -1)
        return (g - 1) * base_out + g * lora_out * self.scaling + base_out + weight_norm


class MixedDtypes(HandWrittenDora):
    def __init__(self):
        super().__init__(adapter_dtype=torch.float64)


class NotDetachedColumns(HandWrittenDora):
    """The paper's column convention with a norm that carries gradient: rewritten with the exact gradient."""

    def __init__(self):
        super().__init__()

    def forward(self, x):
        w = self.weight.T + 0.5 * (self.A.T @ self.B.T)  # [d_in, d_out]
        n = torch.linalg.norm(w, dim=0)
        return x @ (self.m.view(-1) * (w / n))


@dataclass(frozen=True)
class LookAlike:
    build: Callable[[], torch.nn.Module]
    rewritten: bool  # the table's verdict
    reason: str | None = None  # part of the recorded reason, where the pass records one (None: no record)
    d_in: int = 5
    dtype: torch.dtype = torch.float32


LOOKALIKES = {
    "l1-row-norm": LookAlike(L1RowNorm, rewritten=False),
    "frobenius-norm": LookAlike(FrobeniusNorm, rewritten=False),
    "w-minus-ba": LookAlike(Difference, rewritten=False),
    "column-scale-of-a-square-layer": LookAlike(
        ColumnScaleOfASquareLayer, rewritten=False, reason="do not scale W row by row"
    ),
    "norm-with-dtype": LookAlike(NormWithDtype, rewritten=False, reason="dtype argument"),
    "dora-weight-also-returned": LookAlike(DoraWeightAlsoReturned, rewritten=False, reason="used elsewhere"),
    "other-adapter-in-the-lora-path": LookAlike(
        OtherAdapterInTheLoraPath, rewritten=False, reason="not B(A(x)) with the norm's A and B", d_in=7
    ),
    "norm-used-twice": LookAlike(NormUsedTwice, rewritten=False, reason="users where DoRA has one", d_in=7),
    "mixed-dtypes": LookAlike(MixedDtypes, rewritten=False, reason="mixed dtypes", dtype=torch.float64),
    "hand-written": LookAlike(HandWrittenDora, rewritten=True),
    "torchtune-style": LookAlike(lambda: TorchtuneStyleDoRALinear(7, 6, 3, 6.0), rewritten=True, d_in=7),
    "columns-not-detached": LookAlike(NotDetachedColumns, rewritten=True),
}


def _outputs(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, tuple) else [out]


@pytest.mark.parametrize("case", list(LOOKALIKES))
def test_lookalike_is_exact_and_recorded_as_the_table_says(case):
    spec = LOOKALIKES[case]
    module = spec.build()
    x = torch.randn(4, spec.d_in, dtype=spec.dtype, generator=torch.Generator().manual_seed(1)).requires_grad_()
    out = _outputs(torch.compile(module, backend=AOT)(x))
    report = dora_fused.last_report()
    sum(o.square().sum() for o in out).backward()
    got = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    got_x = x.grad.clone()
    module.zero_grad(set_to_none=True)

    x_eager = x.detach().clone().requires_grad_()
    want = _outputs(module(x_eager))
    sum(o.square().sum() for o in want).backward()
    for i, (o, w) in enumerate(zip(out, want, strict=True)):
        assert_close(o, w, rtol=1e-5, atol=1e-6, what=f"{case} output {i}")
    assert_close(got_x, x_eager.grad, rtol=1e-4, atol=1e-6, what=f"{case} d x")
    for name, p in module.named_parameters():
        if p.grad is not None:
            assert_close(got[name], p.grad, rtol=1e-4, atol=1e-6, what=f"{case} d {name}")

    assert report.error is None
    assert (report.rewritten == ["(root)"]) == spec.rewritten, report
    if spec.reason is None:
        assert spec.rewritten or report.modules == [], report
    else:
        [(_, reason)] = report.skipped
        assert spec.reason in reason, reason


# --- parameter edits -------------------------------------------------------------------------------


def _embeds(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 5, TINY_LLAMA["hidden_size"], generator=torch.Generator().manual_seed(seed))


def _layer(model, i: int = 0):
    return model.base_model.model.model.layers[i].self_attn.q_proj


def _scale_base_weight(model):
    _layer(model).base_layer.weight.mul_(1.5)


def _step_adapters(model):
    """An optimizer-like in-place update of every A, B and magnitude."""
    gen = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _new_storage(model):
    layer = _layer(model, 1)
    layer.lora_B["default"].weight.data = torch.randn_like(layer.lora_B["default"].weight) * 0.1
    layer.lora_magnitude_vector["default"].weight.data = layer.lora_magnitude_vector["default"].weight.data * 0.7


def _new_parameter_objects(model):
    layer = _layer(model, 1)
    layer.lora_A["default"].weight = torch.nn.Parameter(layer.lora_A["default"].weight * -1.0)


def _zero_b(model):
    """PEFT's default init: ``B = 0``, so ``g = m / ‖W‖`` and the LoRA term vanishes."""
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.zero_()


def _cancelling_rows(model):
    """Rows where ``s·B·A`` nearly cancels ``W`` (``‖W_i + s·B_i·A‖ ≈ 1e-4·‖W_i‖``): the ill-conditioned sums."""
    layer = _layer(model)
    w = layer.base_layer.weight
    a = layer.lora_A["default"].weight
    b = layer.lora_B["default"].weight
    s = layer.scaling["default"]
    rows = slice(0, a.shape[0])  # r rows: B[:r] is square, so A = -B[:r]⁻¹·W[:r] / s cancels them exactly
    r = a.shape[0]
    b[rows] = torch.eye(r) + 0.1 * torch.randn(r, r, generator=torch.Generator().manual_seed(5))  # invertible
    a.copy_((-torch.linalg.solve(b[rows].double(), w[rows].double()) / s).float())
    w[rows].mul_(1 + 1e-4)  # then W moves off by 1e-4 of itself: that residue is the rows' norm


def _load_other_adapter(model):
    other = copy.deepcopy(model)
    for name, p in other.named_parameters():
        if "lora_" in name:
            p.mul_(1.3).add_(0.01)
    set_peft_model_state_dict(model, get_peft_model_state_dict(other))


EDITS: dict[str, Callable[[torch.nn.Module], None]] = {
    "base weight scaled in place": _scale_base_weight,
    "adapters stepped in place": _step_adapters,
    "new storage through .data": _new_storage,
    "new Parameter objects": _new_parameter_objects,
    "B zeroed (PEFT's default init)": _zero_b,
    "rows that nearly cancel": _cancelling_rows,
    "another adapter's weights loaded": _load_other_adapter,
}


def _check(compiled, model, what: str) -> None:
    """The compiled call equals eager; where eager's own fp32 error is large (cancelling rows), fp64 judges."""
    embeds = _embeds()
    with torch.no_grad():
        got = compiled(inputs_embeds=embeds).logits
        want = model(inputs_embeds=embeds).logits
    assert torch.isfinite(got).all(), what
    if what != "rows that nearly cancel":
        assert_close(got, want, rtol=2e-5, atol=2e-5, what=what)
        return
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(inputs_embeds=embeds.double()).logits
    ours, peft = relative_error(got, exact), relative_error(want, exact)
    assert ours <= 2 * peft + 1e-6, f"{what}: {ours:.3g} against fp64, eager {peft:.3g}"


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_every_parameter_edit_is_seen_by_the_next_call(train):
    """One compiled model, edited in turn: each call after an edit equals eager on the edited model."""
    model = tiny_llama_dora(torch.float32, torch.float32).train(train)
    compiled = torch.compile(model, backend=AOT)
    _check(compiled, model, "before any edit")
    assert dora_fused.last_report().rewritten
    for what, edit in EDITS.items():
        with torch.no_grad():
            edit(model)
        _check(compiled, model, what)


def test_adapter_switches_merges_and_disabling_are_seen():
    """``set_adapter``, ``disable_adapter()``, ``merge_adapter``/``unmerge_adapter``: each call equals eager."""
    from peft import LoraConfig

    model = tiny_llama_dora(torch.float32, torch.float32).eval()
    second = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True, init_lora_weights=False)
    model.add_adapter("second", second)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".second." in name and "magnitude" in name:
                p.mul_(1.2)
    dora_fused.clear_reports()
    compiled = torch.compile(model, backend=AOT)
    _check(compiled, model, "adapter default")
    model.set_adapter("second")
    _check(compiled, model, "adapter second")
    with model.disable_adapter():
        _check(compiled, model, "adapters disabled")
    model.merge_adapter()
    _check(compiled, model, "adapter second merged")
    model.unmerge_adapter()
    _check(compiled, model, "adapter second unmerged")
    model.set_adapter("default")
    _check(compiled, model, "back to default")
    rewritten = {m.adapter for r in dora_fused.reports() for m in r.modules if m.status == "rewritten"}
    assert rewritten == {"default", "second"}
