"""Rows where the adapter nearly cancels the base row: never less exact than PEFT's dense norm.

Adversarial rows ``W_i ≈ -s·(B·A)_i`` at cancellations of 1e-2 … 1e-6 (the
base row is copied into a row of ``A`` and ``B_i`` scales it by ``-(1 - c)/s``),
zero rows, and ordinary random rows, in every dtype combination. Each norm is
compared with fp64 of the same (rounded) inputs, and with PEFT's own dense
computation (``‖W.to(adapter dtype) + s·(B·A)‖`` in the adapter dtype).
"""

from __future__ import annotations

import zlib

import pytest
import torch
from peft import LoraConfig, get_peft_model

import dora_fused
from dora_fused.kernels import factored_row_norm_differentiable
from dora_fused.kernels.factored_norm import (
    dense_row_norm_reference,
    factored_row_norm,
    factored_row_norm_reference,
    factored_row_norm_torch,
    factored_row_norm_triton,
)
from dora_fused.kernels.ill_conditioned_rows import (
    ill_conditioned,
    refine_ill_conditioned_rows_torch,
    refine_ill_conditioned_rows_triton,
)

CANCELLATIONS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
DTYPES = [  # (W, adapters)
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.float64, torch.float64),
]
SCALING = 1.75


def _seed(*key: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def adversarial(d_out, d_in, r, dtype, adapter_dtype, cancellations=CANCELLATIONS, zero_rows=1, seed=0):
    """``(W, A, B)`` whose first rows cancel to the given relative sizes, then ``zero_rows`` zero rows, then random."""
    gen = _seed(d_out, d_in, r, dtype, adapter_dtype, seed)
    w = torch.randn(d_out, d_in, generator=gen).to(dtype)
    a = torch.randn(r, d_in, generator=gen) / d_in**0.5
    b = torch.randn(d_out, r, generator=gen) / r**0.5
    q = len(cancellations)
    assert q + zero_rows < d_out and q <= r
    a[:q] = w[:q].double().float()
    b[:q] = 0.0
    for i, c in enumerate(cancellations):
        b[i, i] = -(1.0 - c) / SCALING
    w[q : q + zero_rows] = 0.0
    b[q : q + zero_rows] = 0.0
    return w, a.to(adapter_dtype), b.to(adapter_dtype)


def _row_errors(norm: torch.Tensor, w, a, b) -> torch.Tensor:
    """Relative error of each row against fp64 of the same inputs (0 where both are 0)."""
    exact = dense_row_norm_reference(w.double(), a.double(), b.double(), SCALING)
    error = (norm.double() - exact).abs()
    return torch.where(exact > 0, error / exact.clamp_min(1e-300), error)


def _peft_dense(w, a, b) -> torch.Tensor:
    """PEFT's norm: the dense product in the adapter dtype, added to W cast to it."""
    return torch.linalg.vector_norm(w.to(a.dtype) + SCALING * (b @ a), dim=1)


def _unit(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


@pytest.mark.parametrize("dtype,adapter_dtype", DTYPES)
def test_no_row_less_exact_than_peft_dense(dtype, adapter_dtype):
    w, a, b = adversarial(29, 67, 7, dtype, adapter_dtype)
    ours = _row_errors(factored_row_norm(w, a, b, SCALING), w, a, b)
    peft = _row_errors(_peft_dense(w, a, b), w, a, b)
    # Per row, up to a few roundings of the accumulation dtype: both are rounded results of the same rows.
    slack = 8 * _unit(torch.float64 if dtype == torch.float64 else torch.float32)
    assert (ours <= peft + slack).all(), (ours - peft).max()
    assert torch.isfinite(ours).all()


@pytest.mark.parametrize("dtype,adapter_dtype", DTYPES)
def test_the_unrefined_sum_fails_where_the_rule_flags_and_nowhere_else(dtype, adapter_dtype):
    """The flagged rows are those the plain factored sum gets wrong; ordinary rows are left to it."""
    w, a, b = adversarial(29, 67, 7, dtype, adapter_dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w_, a_, b_ = w.to(acc), a.to(acc), b.to(acc)
    w_squared = (w_ * w_).sum(1)
    lora_squared = SCALING**2 * ((b_ @ (a_ @ a_.T)) * b_).sum(1)
    flagged = ill_conditioned(factored_row_norm_reference(w, a, b, SCALING), w_squared, lora_squared)
    q = len(CANCELLATIONS)
    expected = torch.zeros_like(flagged)
    exact = dense_row_norm_reference(w.double(), a.double(), b.double(), SCALING)
    cancelled = exact[:q] / torch.linalg.vector_norm(w[:q].double(), dim=1)
    expected[:q] = cancelled < 0.2  # these rows lost more than two bits to cancellation
    assert torch.equal(flagged, expected), (flagged, cancelled)


@pytest.mark.parametrize("shape", [(40, 64, 63), (64, 33, 16), (17, 200, 4)])
def test_random_adapters_flag_no_row(shape):
    """Random W, A and B (W_i and (B·A)_i nearly orthogonal): nothing cancels, no dense work."""
    gen = _seed(shape)
    d_out, d_in, r = shape
    for scale in (1e-3, 1.0, 30.0):  # the adapter small, comparable and dominant
        w = torch.randn(d_out, d_in, generator=gen)
        a = torch.randn(r, d_in, generator=gen) * scale
        b = torch.randn(d_out, r, generator=gen)
        norm = factored_row_norm_reference(w, a, b, SCALING)
        w_squared = (w * w).sum(1)
        lora_squared = SCALING**2 * ((b @ a) ** 2).sum(1)
        assert not ill_conditioned(norm, w_squared, lora_squared).any()


def test_rows_that_add_are_never_flagged():
    gen = _seed("adding")
    w = torch.randn(12, 30, generator=gen)
    a = torch.randn(12, 30, generator=gen)
    a[:] = w  # (B·A)_i = B_ii·W_i with B_ii > 0: T1 > 0
    b = torch.diag(torch.rand(12, generator=gen) + 0.1)
    norm = factored_row_norm_reference(w, a, b, SCALING)
    assert not ill_conditioned(norm, (w * w).sum(1), SCALING**2 * ((b @ a) ** 2).sum(1)).any()


@pytest.mark.parametrize("dtype,adapter_dtype", [d for d in DTYPES if d[0] in (torch.bfloat16, torch.float16)])
def test_triton_norm_refines_the_same_rows(dtype, adapter_dtype):
    """The Triton norm (interpreter on CPU) and the torch one agree on the refined rows, and are as exact."""
    w, a, b = adversarial(37, 150, 9, dtype, adapter_dtype)
    triton_norm = factored_row_norm_triton(w, a, b, SCALING)
    torch_norm = factored_row_norm_torch(w, a, b, SCALING)
    peft = _row_errors(_peft_dense(w, a, b), w, a, b)
    assert (_row_errors(triton_norm, w, a, b) <= peft + 8 * _unit(torch.float32)).all()
    torch.testing.assert_close(triton_norm, torch_norm, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_triton_refine_kernel_equals_the_torch_refinement(dtype):
    adapter_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    w, a, b = adversarial(45, 300, 6, dtype, adapter_dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w_, a_, b_ = w.to(acc), a.to(acc), b.to(acc)
    w_squared = (w_ * w_).sum(1)
    lora_squared = SCALING**2 * ((b_ @ (a_ @ a_.T)) * b_).sum(1)
    norm = factored_row_norm_reference(w, a, b, SCALING)
    expected = refine_ill_conditioned_rows_torch(norm, w_squared, lora_squared, w, a, b, SCALING)
    got = norm.clone()
    refine_ill_conditioned_rows_triton(got, w_squared, lora_squared, w, a, b, SCALING)
    assert not torch.equal(norm, expected)  # some rows were refined
    torch.testing.assert_close(got, expected, rtol=4 * _unit(acc), atol=0)


def test_differentiable_norm_has_the_exact_value_and_gradient():
    """The hand-written form's norm: refined value, gradient of n = ‖W + s·B·A‖ with the accurate n."""
    w, a, b = adversarial(21, 40, 6, torch.float32, torch.float32, zero_rows=0)
    params = [t.clone().requires_grad_() for t in (w, a, b)]
    params64 = [t.double().requires_grad_() for t in (w, a, b)]
    weights = torch.randn(w.shape[0], generator=_seed("dn"), dtype=torch.float64)
    (factored_row_norm_differentiable(*params, SCALING).double() * weights).sum().backward()
    (dense_row_norm_reference(*params64, SCALING) * weights).sum().backward()
    dense = [t.clone().requires_grad_() for t in (w, a, b)]
    (torch.linalg.vector_norm(dense[0] + SCALING * dense[2] @ dense[1], dim=1).double() * weights).sum().backward()
    for ours, exact, peft in zip(params, params64, dense, strict=True):
        our_error = (ours.grad.double() - exact.grad).abs().max()
        peft_error = (peft.grad.double() - exact.grad).abs().max()
        assert our_error <= 2 * peft_error + 1e-6 * exact.grad.abs().max(), (our_error, peft_error)


# --- end to end: a PEFT DoRA layer whose rows cancel ---------------------------------------------


def _cancelling_peft_layer(dtype, adapter_dtype):
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(67, 29)).to(dtype)
    model = get_peft_model(
        base,
        LoraConfig(r=7, lora_alpha=7 * SCALING, target_modules=["0"], use_dora=True, init_lora_weights=False),
        autocast_adapter_dtype=adapter_dtype == torch.float32 and dtype != torch.float32,
    )
    layer = model.base_model.model[0]
    w, a, b = adversarial(29, 67, 7, dtype, adapter_dtype, zero_rows=0)
    with torch.no_grad():
        layer.base_layer.weight.copy_(w)
        layer.lora_A["default"].weight.data = a.clone()
        layer.lora_B["default"].weight.data = b.clone()
        # magnitudes near the rows' norms, as trained ones are (g ≈ 1: the output is not itself cancelled away)
        exact = dense_row_norm_reference(w.double(), a.double(), b.double(), SCALING)
        spread = 1.0 + 0.5 * (torch.rand(29, generator=_seed("m"), dtype=torch.float64) - 0.5)
        layer.lora_magnitude_vector["default"].weight.data = (exact * spread).to(adapter_dtype)
    assert layer.scaling["default"] == SCALING
    return model


def _run(model, x, upstream):
    out = model(x)
    out.backward(upstream.to(out.dtype))
    grads = {n.split("model.0.")[-1]: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}
    return out.double(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compiled_peft_layer_with_cancelling_rows_is_finite_and_as_exact_as_the_math_allows(dtype):
    """PEFT's default fp32 adapters on a ``dtype`` base; before the refinement these were inf/NaN.

    The cancelled rows' outputs ``g·e_i·x`` and magnitude gradients ``Σ dy·e_i·x / n_i`` are
    themselves ill-conditioned: both PEFT and the rewrite form ``e_i·x`` as ``W_i·x + s·B_i·(A·x)``
    in the same matmuls, so their errors are bounded by the sizes of those products (checked
    per row for both), not by each other. The adapters' gradients are well conditioned: equal to
    PEFT eager's accuracy.
    """
    gen = _seed("e2e", dtype)
    x = torch.randn(5, 67, generator=gen).to(dtype)
    upstream = torch.randn(5, 29, generator=gen, dtype=torch.float64)
    exact_out, exact = _run(_cancelling_peft_layer(dtype, torch.float32).double(), x.double(), upstream)
    peft_out, peft = _run(_cancelling_peft_layer(dtype, torch.float32), x, upstream)
    model = _cancelling_peft_layer(dtype, torch.float32)
    ours_out, ours = _run(torch.compile(model, backend=dora_fused.backend(inner="eager")), x, upstream)
    assert len(dora_fused.last_report().rewritten) == 1

    layer = model.base_model.model[0]
    w, b = layer.base_layer.weight.double(), layer.lora_B["default"].weight.double()
    a = layer.lora_A["default"].weight.double()
    m = layer.lora_magnitude_vector["default"].weight.double()
    n = dense_row_norm_reference(w, a, b, SCALING)
    # |W_i|·|x_t| + |s|·|B_i|·|A|·|x_t|: what e_i·x_t is rounded against, [tokens, d_out]
    size = x.double().abs() @ w.abs().T + SCALING * (x.double().abs() @ a.abs().T) @ b.abs().T
    unit = 8 * torch.finfo(dtype).eps
    bounds = {
        "out": unit * (size * (m / n) + exact_out.abs()),
        "lora_magnitude_vector.default.weight": unit * (upstream.abs() * size).sum(0) / n,
    }
    for key, bound in bounds.items():
        ours_value, peft_value, exact_value = (
            (ours_out, peft_out, exact_out) if key == "out" else (ours[key], peft[key], exact[key])
        )
        assert torch.isfinite(ours_value).all()
        assert ((peft_value - exact_value).abs() <= bound).all(), key  # the bound holds for PEFT too
        assert ((ours_value - exact_value).abs() <= bound).all(), key
    for key in ("lora_A.default.weight", "lora_B.default.weight"):
        ours_error = (ours[key] - exact[key]).abs().max()
        peft_error = (peft[key] - exact[key]).abs().max()
        assert ours_error <= 1.01 * peft_error + unit * exact[key].abs().max(), (key, ours_error, peft_error)


# --- on a GPU, at layer size -------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 4096, 16), (4096, 4096, 384), (14336, 4096, 64), (4096, 14336, 8)])
@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16])
def test_triton_norm_at_layer_size_is_never_less_exact_than_peft(shape, adapter_dtype):
    d_out, d_in, r = shape
    w, a, b = (t.cuda() for t in adversarial(d_out, d_in, r, torch.bfloat16, adapter_dtype))
    ours = _row_errors(factored_row_norm(w, a, b, SCALING), w, a, b)
    peft = _row_errors(_peft_dense(w, a, b), w, a, b)
    assert torch.isfinite(ours).all()
    assert (ours <= peft + 8 * _unit(torch.float32)).all(), (ours - peft).max()


@pytest.mark.gpu
def test_refinement_runs_inside_a_cuda_graph():
    w, a, b = (t.cuda() for t in adversarial(1024, 2048, 32, torch.bfloat16, torch.float32))
    factored_row_norm(w, a, b, SCALING)  # compile the kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = factored_row_norm(w, a, b, SCALING)
    graph.replay()
    torch.testing.assert_close(captured, factored_row_norm(w, a, b, SCALING), rtol=0, atol=0)
    peft = _row_errors(_peft_dense(w, a, b), w, a, b)
    assert (_row_errors(captured, w, a, b) <= peft + 8 * _unit(torch.float32)).all()
