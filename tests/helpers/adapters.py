"""What the adapter API tests share: snapshots and the "nothing was modified" check, the parameter-count formulas,
and stand-in ViT module trees (names and ``nn.Linear`` shapes of a timm ViT, cheap to build on ``meta``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_peft.adapters import AdaptedLinear, find_strategy

#: the linears a ``target_modules="all-linear"`` (or qkv, proj, fc1, fc2) adapter adapts in ``make_vit``'s ViT
ADAPTED_VIT_LINEARS = [f"blocks.{i}.{leaf}" for i in range(2)
                       for leaf in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]


def snapshot(model: nn.Module) -> dict:
    """Everything that ``apply`` or ``load_adapter`` would change."""
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "grad": {k: p.requires_grad for k, p in model.named_parameters()},
            "types": {k: type(m) for k, m in model.named_modules()}}


def assert_unmodified(model: nn.Module, before: dict) -> None:
    assert not any(isinstance(m, AdaptedLinear) for m in model.modules()), "model got adapted layers"
    assert find_strategy(model) is None
    after = snapshot(model)
    assert after["types"] == before["types"]
    assert after["grad"] == before["grad"], "requires_grad flags changed"
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k


def expect_apply_error(model, strategy, *needles):
    """``strategy.apply(model)`` raises a ValueError naming every needle, and leaves the model as it was."""
    before = snapshot(model)
    with pytest.raises(ValueError) as err:
        strategy.apply(model)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))
    assert_unmodified(model, before)
    return str(err.value)


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


# -- parameter counts ----------------------------------------------------------------------------------------------
def boft_count(in_f, out_f, b, m, scale=True, train_bias=False):
    return (b - 1) * in_f * m // 2 + out_f * (int(scale) + int(train_bias))


def svft_count(out_f, in_f, pattern, d, gated=False):
    r = min(out_f, in_f)
    k = r if pattern == "plain" else r * (2 * d + 1) - d * (d + 1)
    return k + int(gated)


def part_shapes(layer):
    return [(stop - start, layer.in_features) for start, stop in layer.parts.values()]


# -- stand-in ViT encoders -----------------------------------------------------------------------------------------
class _Attn(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)


class _Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)


class _Block(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attn(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, hidden)


class StandInViT(nn.Module):
    """Names and ``nn.Linear`` shapes of a timm ViT encoder (fused qkv), without the cost of building one."""

    def __init__(self, depth, dim, hidden):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, 14, 14)
        self.blocks = nn.ModuleList(_Block(dim, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)


SIX_LINEARS = ["qkv", "proj", "fc1", "fc2"]  # q, k, v via the split fused qkv, out proj, fc1, fc2
