"""The adapter strategies' shared template (``lit_peft.adapters.base``): ``apply`` freezes the base model and makes
the adapters (and ``trainable_modules``) trainable, applying twice is an error, every method's adapter parameters
follow its formula, and invalid arguments are all reported at once, by name, with their valid values.

Everything runs on tiny timm ViTs (2 blocks, width 64, 32×32 images) and small ``nn.Linear`` stacks.
"""

from __future__ import annotations

import pytest
import torch

from helpers.adapters import assert_unmodified, boft_count, part_shapes, snapshot, svft_count
from helpers.models import Stack, make_vit
from lit_peft.adapters import BOFT, OFT, SVFT, DoRA, LoRA, VeRA, adapted_layers, count_parameters, get_strategy


# == applying ======================================================================================================
def test_applying_twice_is_an_error():
    model = LoRA(rank=2).apply(make_vit(0))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="already has adapters"):
        BOFT(block_size=8).apply(model)
    assert type(get_strategy(model)) is LoRA
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("head", [False, True])
def test_frozen_and_trainable_after_apply(head):
    model = make_vit(0)
    strategy = BOFT(block_size=8, n_butterfly_factors=2, trainable_modules=["head"] if head else [])
    strategy.apply(model)
    adapter_params = {f"{name}.adapters.{k}" for name, layer in adapted_layers(model).items()
                      for k, _ in layer.adapters.named_parameters()}
    assert adapter_params
    for name, param in model.named_parameters():
        if name in adapter_params:
            assert param.requires_grad, name
        elif name.startswith("head."):
            assert param.requires_grad == head, name
        else:
            assert not param.requires_grad, name
    counts = count_parameters(model)
    head_count = sum(p.numel() for p in model.head.parameters())
    assert counts["trainable"] == counts["adapter"] + (head_count if head else 0)
    # gradients reach the adapters only
    model.train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in adapter_params)
    assert model.blocks[0].attn.qkv.weight.grad is None


def test_trainable_module_matching_nothing_is_an_error():
    model = make_vit(0)
    before = snapshot(model)
    with pytest.raises(ValueError, match="classifier"):
        LoRA(trainable_modules=["classifier"]).apply(model)
    assert_unmodified(model, before)


# == parameter counts ==============================================================================================
FORMULAS = {
    "boft": (lambda: BOFT(block_size=4, n_butterfly_factors=3, train_bias=True),
             lambda o, i: boft_count(i, o, 4, 3, train_bias=True)),
    "boft_no_scale": (lambda: BOFT(block_size=8, n_butterfly_factors=2, scale=False),
                      lambda o, i: boft_count(i, o, 8, 2, scale=False)),
    "oft": (lambda: OFT(block_size=16), lambda o, i: (16 - 1) * i // 2 + o),
    "svft_plain": (lambda: SVFT(pattern="plain"), lambda o, i: svft_count(o, i, "plain", 0)),
    "svft_banded": (lambda: SVFT(pattern="banded", off_diag=3), lambda o, i: svft_count(o, i, "banded", 3)),
    "svft_random": (lambda: SVFT(pattern="random", off_diag=2), lambda o, i: svft_count(o, i, "random", 2)),
    "svft_gated": (lambda: SVFT(pattern="banded", off_diag=2, init="gated"),
                   lambda o, i: svft_count(o, i, "banded", 2, gated=True)),
    "lora": (lambda: LoRA(rank=4), lambda o, i: 4 * (i + o)),
    "dora": (lambda: DoRA(rank=4), lambda o, i: 4 * (i + o) + o),
    "vera": (lambda: VeRA(rank=16), lambda o, i: 16 + o),
}


@pytest.mark.parametrize("method", list(FORMULAS))
def test_parameter_count_formulas(method):
    make, formula = FORMULAS[method]
    for model in (make_vit(0), Stack([32, 48, 16, 32])):
        make().apply(model)
        layers = adapted_layers(model)
        assert layers
        total = 0
        for name, layer in layers.items():
            expected = sum(formula(o, i) for o, i in part_shapes(layer))
            assert layer.num_adapter_parameters() == expected, name
            total += expected
        assert count_parameters(model)["adapter"] == total


# == bad arguments =================================================================================================
@pytest.mark.parametrize("make, needles", [
    (lambda: BOFT(cayley="qr", side="both"), ["invalid BOFT arguments", "cayley must be 'exact' or 'neumann', got 'qr'",
                                              "side must be 'auto', 'activation' or 'weight', got 'both'"]),
    (lambda: SVFT(pattern="diagonal"), ["pattern must be 'plain', 'banded', 'random' or 'top_k', got 'diagonal'"]),
    (lambda: LoRA(rank=0, dropout=1.0), ["invalid LoRA arguments", "rank must be an integer >= 1, got 0",
                                         "dropout must be in [0, 1), got 1.0"]),
    (lambda: DoRA(rank=2.5), ["invalid DoRA arguments", "rank must be an integer >= 1, got 2.5"]),
    (lambda: VeRA(rank=-1, dropout=-0.1), ["rank must be an integer >= 1", "dropout must be in [0, 1), got -0.1"]),
    (lambda: OFT(block_size=1), ["invalid OFT arguments", "block_size must be an integer >= 2, got 1"]),
    (lambda: LoRA(fused_qkv="both"), ["fused_qkv must be 'split' or 'joint', got 'both'"]),
    # arguments that made training a no-op or NaN, or failed later with a bare TypeError
    (lambda: LoRA(alpha=0.0), ["alpha must be a finite number > 0, got 0.0"]),
    (lambda: DoRA(alpha=-16), ["invalid DoRA arguments", "alpha must be a finite number > 0, got -16"]),
    (lambda: LoRA(alpha=float("nan"), rank="8"), ["alpha must be a finite number > 0, got nan",
                                                  "rank must be an integer >= 1, got '8'"]),
    (lambda: LoRA(alpha="16", dropout="0.1"), ["alpha must be a finite number > 0, got '16'",
                                              "dropout must be in [0, 1), got '0.1'"]),
    (lambda: VeRA(d_init=float("inf"), seed="0"), ["d_init must be a finite number, got inf",
                                                   "seed must be an integer >= 0, got '0'"]),
    (lambda: BOFT(block_size=True), ["block_size must be an integer >= 2, got True"]),
])
def test_bad_arguments_name_argument_and_valid_values(make, needles):
    """Every invalid argument is reported at once, by name, with its valid values."""
    with pytest.raises(ValueError) as err:
        make()
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))
