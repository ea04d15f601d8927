"""BOFT and OFT (``lit_peft.adapters.boft``): the paper-scale parameter count (DINOv2-L, on a stand-in module tree
built on the ``meta`` device) and the shapes and arguments they refuse, with a clear error before anything is
modified. The rotation's maths is checked against the dense reference in ``test_exactness.py``.
"""

from __future__ import annotations

import pytest
import torch

from helpers.adapters import SIX_LINEARS, StandInViT, boft_count, expect_apply_error
from helpers.models import Stack, make_vit
from lit_peft.adapters import BOFT, OFT, adapted_layers, count_parameters


def test_boft_dinov2_large_count_on_meta():
    with torch.device("meta"):
        model = StandInViT(depth=24, dim=1024, hidden=4096)
    BOFT(block_size=8, n_butterfly_factors=2, scale=True, train_bias=True, target_modules=SIX_LINEARS).apply(model)
    layers = adapted_layers(model)
    assert len(layers) == 24 * 4 and sum(len(layer.parts) for layer in layers.values()) == 24 * 6
    assert all(p.device.type == "meta" for layer in layers.values() for p in layer.adapters.parameters())
    per_block = (4 * boft_count(1024, 1024, 8, 2, train_bias=True) + boft_count(1024, 4096, 8, 2, train_bias=True)
                 + boft_count(4096, 1024, 8, 2, train_bias=True))
    assert count_parameters(model)["adapter"] == 24 * per_block == 1_990_656
    assert sum(layer.num_adapter_parameters() for layer in layers.values()) == 1_990_656


def test_boft_block_size_not_dividing():
    expect_apply_error(make_vit(0), BOFT(block_size=6, n_butterfly_factors=1), "blocks.0.attn.qkv",
                        "in_features=64", "block_size=6", "[2, 4, 8, 16, 32, 64]")
    # only one layer of a stack fails; nothing is adapted, not even the valid layers
    message = expect_apply_error(Stack([16, 16, 24, 8]), OFT(block_size=16), "layers.2", "in_features=24",
                                  "[2, 3, 4, 6, 8, 12, 24]")
    assert "layers.0" not in message and "layers.1" not in message


def test_boft_odd_block_size_with_several_factors():
    with pytest.raises(ValueError, match=r"block_size must be even.*block_size=5"):
        BOFT(block_size=5, n_butterfly_factors=2)
    model = OFT(block_size=5).apply(Stack([15, 10]))  # one factor: odd blocks are fine
    assert model.layers[0].num_adapter_parameters() == boft_count(15, 10, 5, 1)


def test_boft_odd_number_of_blocks_with_several_factors():
    expect_apply_error(Stack([24, 8]), BOFT(block_size=8, n_butterfly_factors=2), "layers.0", "odd")


def test_boft_too_many_factors():
    message = expect_apply_error(make_vit(0), BOFT(block_size=8, n_butterfly_factors=5), "blocks.0.attn.qkv",
                                  "n_butterfly_factors=5", "at most 4 factors")
    assert "blocks.0.mlp.fc2" not in message  # 256 = 8·2^5 allows five factors
    # the maximum named is really the maximum
    model = BOFT(block_size=8, n_butterfly_factors=4).apply(make_vit(0))
    assert adapted_layers(model)


@pytest.mark.parametrize("kwargs", [dict(block_size=1), dict(n_butterfly_factors=0), dict(dropout=1.0),
                                    dict(cayley="qr"), dict(side="both")])
def test_boft_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        BOFT(**kwargs)


@pytest.mark.parametrize("zero_scale", [False, True])
def test_scaled_frozen_linear_gradients_equal_plain_autograd(zero_scale):
    """BOFT's output-saving scale (``y`` kept instead of ``x Wᵀ``) gives plain autograd's gradients, also with
    an exact 0 in ``s`` (where it falls back to plain autograd) and under bf16 autocast."""
    from lit_peft.adapters.boft import _ScaledFrozenLinear, scaled_frozen_linear

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 12, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(7, 12, dtype=torch.float64, generator=gen)
    scale = (1 + 0.3 * torch.randn(7, dtype=torch.float64, generator=gen))
    if zero_scale:
        scale[2] = 0.0
    scale.requires_grad_(True)
    g = torch.randn(3, 5, 7, dtype=torch.float64, generator=gen)
    out = scaled_frozen_linear(x, weight, scale)
    assert (out.grad_fn.name() == "_ScaledFrozenLinearBackward") != zero_scale
    got = torch.autograd.grad(out, (x, scale), g)
    want = torch.autograd.grad(torch.nn.functional.linear(x, weight) * scale, (x, scale), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if not zero_scale:
        xf, sf = x.detach().float().requires_grad_(True), scale.detach().float().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = _ScaledFrozenLinear.apply(xf, weight.float(), sf)
        assert y.dtype == torch.bfloat16
        gx, gs = torch.autograd.grad(y.float(), (xf, sf), g.float())
        assert gx.dtype == torch.float32 and gs.dtype == torch.float32
        torch.testing.assert_close(gs, want[1].float(), rtol=3e-2, atol=3e-2)
