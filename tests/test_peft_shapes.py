"""PEFT DoRA layer shapes beyond the plain ones: grouped convolutions, ranks above the layer's dims,
scaled embeddings. Each is rewritten and matches PEFT eager and fp64 (outputs and gradients)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import perturb_magnitudes, relative_error
from peft import LoraConfig, get_peft_model

import dora_fused


class ConvNet(torch.nn.Module):
    def __init__(self, dims: int, groups: int, kernel: int, channels=(8, 12)) -> None:
        super().__init__()
        conv = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[dims]
        self.conv = conv(channels[0], channels[1], kernel, groups=groups, padding=kernel // 2)
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _dora(model: torch.nn.Module, r: int, targets: list[str], seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, use_dora=True, init_lora_weights=False, **kwargs)
    peft_model = get_peft_model(model, config)
    perturb_magnitudes(peft_model, 0.5, seed)
    return peft_model


def _check_against_eager_and_fp64(model: torch.nn.Module, x: torch.Tensor, train: bool) -> None:
    """Compiled vs PEFT eager vs an fp64 copy: outputs and (in training) every adapter gradient."""
    model = model.train(train)
    compiled_model = copy.deepcopy(model)
    model64 = copy.deepcopy(model).double()
    compiled = torch.compile(compiled_model, backend=dora_fused.backend(inner="aot_eager"))
    with torch.set_grad_enabled(train):
        exact_input = x.double() if x.is_floating_point() else x
        out, want, exact = compiled(x), model(x), model64(exact_input)
    report = dora_fused.last_report()
    assert len(report.rewritten) == 1, report
    tolerance = 1e-5
    assert relative_error(out, exact) <= relative_error(want, exact) + tolerance
    if not train:
        return
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for result in (out, want, exact):
        result.backward(upstream.to(result.dtype))
    for (name, p), p_eager, p64 in zip(
        compiled_model.named_parameters(), model.parameters(), model64.parameters(), strict=True
    ):
        if p.grad is None:
            continue
        assert relative_error(p.grad, p64.grad) <= relative_error(p_eager.grad, p64.grad) + tolerance, name


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize(
    "dims,groups,kernel,r",
    [(2, 2, 3, 4), (2, 4, 1, 4), (1, 2, 3, 6), (3, 2, 1, 4)],
)
def test_grouped_conv_dora_is_rewritten(dims, groups, kernel, r, train):
    model = _dora(ConvNet(dims, groups, kernel), r, ["conv"])
    x = torch.randn(2, 8, *([5] * dims), generator=torch.Generator().manual_seed(dims))
    _check_against_eager_and_fp64(model, x, train)


@pytest.mark.parametrize("train", [False, True])
def test_rank_above_the_layer_dims_is_rewritten(train):
    """r = 16 over a 1x1 Conv of 8 input channels: B·A is [12, 8] of rank 8, the identity still holds."""
    model = _dora(ConvNet(2, 1, 1), 16, ["conv"])
    x = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(3))
    _check_against_eager_and_fp64(model, x, train)


@pytest.mark.parametrize("train", [False, True])
def test_rank_above_a_linear_layers_dims_is_rewritten(train):
    model = _dora(torch.nn.Sequential(torch.nn.Linear(6, 5)), 9, ["0"])
    _check_against_eager_and_fp64(model, torch.randn(3, 6, generator=torch.Generator().manual_seed(4)), train)


class ScaledEmbeddingNet(torch.nn.Module):
    """Gemma's scaled word embedding (transformers' ``Gemma3TextScaledWordEmbedding``) and a head."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

        self.embed = Gemma3TextScaledWordEmbedding(23, 10, padding_idx=0, embed_scale=10**0.5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids)


@pytest.mark.parametrize("train", [False, True])
def test_scaled_embedding_dora_is_rewritten(train):
    model = _dora(ScaledEmbeddingNet(), 4, ["embed"])
    ids = torch.randint(0, 23, (3, 7), generator=torch.Generator().manual_seed(5))
    _check_against_eager_and_fp64(model, ids, train)
