"""``passes/heuristics.py``: which norm and compose each kind of layer gets, and the reason recorded."""

from __future__ import annotations

import pytest
import torch

from dora_fused.passes.heuristics import LayerFacts, choose_ops

CUDA, CPU = torch.device("cuda"), torch.device("cpu")
BF16 = (torch.bfloat16,) * 4


def _layer(device=CUDA, **facts) -> LayerFacts:
    return LayerFacts(device=device, d_out=4096, d_in=4096, dtypes=BF16, **facts)


@pytest.mark.parametrize(
    "preference,layer,expected",
    [
        ("auto", _layer(), ("triton", "torch")),
        ("auto", _layer(lora_up=True), ("triton", "lora_up")),  # no gradient, 16-bit: fused up-projection
        ("auto", _layer(folded_lora_up=True), ("triton", "folded")),  # training: the folded compose
        ("torch", _layer(folded_lora_up=True), ("torch", "folded")),
        ("triton", _layer(folded_lora_up=True), ("triton", "triton")),  # asked for the Triton compose
        ("auto", _layer(CPU, folded_lora_up=True), ("torch", "folded")),
        ("auto", _layer(CPU, lora_up=True), ("torch", "torch")),  # the fused up-projection needs the Triton norm
        ("auto", _layer(channel_dim=1), ("triton", "torch")),
        ("auto", _layer(symbolic_scaling=True), ("torch", "torch")),
        ("auto", _layer(packed_norm="int8"), ("quantized", "torch")),  # int8: the norm reads the packed rows
        ("triton", _layer(packed_norm="int8"), ("quantized", "triton")),
        ("auto", _layer(packed_norm="nf4"), ("triton", "torch")),  # 4-bit: the dense norm of the dequantized W
        ("auto", _layer(CPU, packed_norm="int8"), ("torch", "torch")),
    ],
)
def test_choice(preference, layer, expected):
    (ops, why) = choose_ops(preference, layer)
    assert ops == expected
    assert why and ("folded" in why) == (ops[1] == "folded")
    assert ("base:" in why) == (layer.packed_norm is not None and ops[0] != "torch")


def test_fp64_keeps_plain_torch():
    layer = LayerFacts(device=CUDA, d_out=8, d_in=8, dtypes=(torch.float64,) * 4)
    assert choose_ops("auto", layer)[0] == ("torch", "torch")
