"""Target matching (``lit_peft.adapters.targets``): suffix lists and full-match regexes, fused qkv split into q, k, v
parts (or kept joint), ``all-linear`` without the head, and a clear error, before anything is modified, for a target
that matches nothing or is not an ``nn.Linear``.

Everything runs on tiny timm ViTs (2 blocks, width 64: qkv is 64 -> 192 in parts of 64 rows) and small ``nn.Linear``
stacks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers.adapters import ADAPTED_VIT_LINEARS, assert_unmodified, expect_apply_error, max_diff, snapshot
from helpers.models import WIDTH, Stack, make_vit, randomize
from lit_peft.adapters import BOFT, OFT, SVFT, DoRA, LoRA, VeRA, adapted_layers, resolve_targets


def test_list_suffix_matching():
    model = make_vit(0)
    targets = resolve_targets(model, ["fc1", "attn.proj"])
    assert sorted(targets) == ["blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.1.attn.proj", "blocks.1.mlp.fc1"]
    assert all(parts == {"all": (0, layer_out)} for parts, layer_out in
               ((targets[n], model.get_submodule(n).out_features) for n in targets))
    # a full dotted name, and a suffix that must match at a dot boundary ("c1" is not a suffix entry of "fc1")
    assert sorted(resolve_targets(model, ["blocks.1.mlp.fc2"])) == ["blocks.1.mlp.fc2"]
    with pytest.raises(ValueError, match="'c1'"):
        resolve_targets(model, ["c1"])
    # a fused qkv is split into q, k, v by default
    assert resolve_targets(model, ["qkv"])["blocks.0.attn.qkv"] == {"q": (0, 64), "k": (64, 128), "v": (128, 192)}


@pytest.mark.parametrize("method", ["boft", "oft", "svft", "lora", "dora", "vera"])
@pytest.mark.parametrize("part", ["q", "v"])
def test_partial_qkv_leaves_other_rows_frozen(method, part):
    factory = {"boft": lambda t: BOFT(block_size=4, n_butterfly_factors=2, train_bias=True, target_modules=t),
               "oft": lambda t: OFT(block_size=8, train_bias=True, target_modules=t),
               "svft": lambda t: SVFT(pattern="banded", off_diag=1, target_modules=t),
               "lora": lambda t: LoRA(rank=2, target_modules=t),
               "dora": lambda t: DoRA(rank=2, target_modules=t),
               "vera": lambda t: VeRA(rank=4, target_modules=t)}[method]
    model = factory([f"qkv.{part}"]).apply(make_vit(0))
    assert sorted(adapted_layers(model)) == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    layer = model.blocks[0].attn.qkv
    start, stop = {"q": (0, 64), "v": (128, 192)}[part]
    assert layer.parts == {part: (start, stop)}
    assert list(layer.adapters) == [part]
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    randomize(model, seed=5, std=0.3)
    x = torch.randn(3, 7, WIDTH)
    frozen = torch.ones(192, dtype=torch.bool)
    frozen[start:stop] = False
    with torch.no_grad():
        out = layer(x)
        base = F.linear(x, layer.weight, layer.bias)
        assert torch.equal(out[..., frozen], base[..., frozen]), "rows outside the targeted part changed"
        assert max_diff(out[..., start:stop], base[..., start:stop]) > 1e-4
        merged = layer.merged_linear()
        assert torch.equal(merged.weight[frozen], layer.weight[frozen])
        assert torch.equal(merged.bias[frozen], layer.bias[frozen])


def test_regex_full_match_including_parts():
    model = make_vit(0)
    assert resolve_targets(model, r"blocks\.0\.attn\.qkv\.v") == {"blocks.0.attn.qkv": {"v": (128, 192)}}
    assert resolve_targets(model, r"blocks\.\d+\.attn\.qkv\.[qk]") == {
        f"blocks.{i}.attn.qkv": {"q": (0, 64), "k": (64, 128)} for i in range(2)}
    assert resolve_targets(model, r"blocks\.1\.attn\.qkv") == {
        "blocks.1.attn.qkv": {"q": (0, 64), "k": (64, 128), "v": (128, 192)}}
    assert sorted(resolve_targets(model, r".*mlp\.fc\d")) == [f"blocks.{i}.mlp.fc{j}" for i in range(2)
                                                              for j in (1, 2)]
    with pytest.raises(ValueError, match=r"regex 'fc1' matches no module"):
        resolve_targets(model, "fc1")  # a regex must match the whole name
    model = LoRA(rank=2, target_modules=r"blocks\.0\.attn\.qkv\.v").apply(model)
    assert list(adapted_layers(model)) == ["blocks.0.attn.qkv"]
    assert model.blocks[0].attn.qkv.parts == {"v": (128, 192)}


def test_all_linear_excludes_head():
    model = LoRA(rank=2, target_modules="all-linear").apply(make_vit(0))
    assert sorted(adapted_layers(model)) == sorted(ADAPTED_VIT_LINEARS)
    assert type(model.head) is nn.Linear and not model.head.weight.requires_grad
    # the same on a plain stack: its "head"-less stack has no head, every linear is adapted
    stack = LoRA(rank=2, target_modules="all-linear").apply(Stack([8, 8, 4]))
    assert sorted(adapted_layers(stack)) == ["layers.0", "layers.1"]


def test_proj_suffix_skips_patch_embed_conv():
    model = make_vit(0)
    assert isinstance(model.patch_embed.proj, nn.Conv2d)
    assert sorted(resolve_targets(model, ["proj"])) == ["blocks.0.attn.proj", "blocks.1.attn.proj"]
    model = BOFT(block_size=8, n_butterfly_factors=2, target_modules=["qkv", "proj", "fc1", "fc2"]).apply(model)
    assert sorted(adapted_layers(model)) == sorted(ADAPTED_VIT_LINEARS)
    assert isinstance(model.patch_embed.proj, nn.Conv2d)


@pytest.mark.parametrize("entry, kind", [("patch_embed.proj", "Conv2d"), ("blocks.0.norm1", "LayerNorm")])
def test_exact_non_linear_target_is_an_error(entry, kind):
    model = make_vit(0)
    before = snapshot(model)
    with pytest.raises(ValueError) as err:
        LoRA(rank=2, target_modules=["fc1", entry]).apply(model)
    assert repr(entry) in str(err.value) and kind in str(err.value) and "not an nn.Linear" in str(err.value)
    assert_unmodified(model, before)


def test_target_matching_nothing_lists_linears():
    model = make_vit(0)
    before = snapshot(model)
    with pytest.raises(ValueError) as err:
        SVFT(target_modules=["fc1", "query"]).apply(model)
    message = str(err.value)
    assert "'query'" in message and "matches no module" in message
    for leaf in ("qkv", "proj", "fc1", "fc2", "head"):
        assert leaf in message
    assert "qkv.q" in message  # the fused parts are offered too
    assert_unmodified(model, before)
    with pytest.raises(ValueError, match="empty"):
        LoRA(target_modules=[]).apply(model)
    assert_unmodified(model, before)


def test_fused_qkv_joint():
    model = make_vit(0)
    assert resolve_targets(model, ["qkv"], fused_qkv="joint")["blocks.0.attn.qkv"] == {"all": (0, 192)}
    before = snapshot(model)
    with pytest.raises(ValueError) as err:
        LoRA(rank=2, target_modules=["qkv.q"], fused_qkv="joint").apply(model)
    assert "'qkv.q'" in str(err.value) and "joint" in str(err.value)
    assert_unmodified(model, before)
    with pytest.raises(ValueError, match="fused_qkv"):
        LoRA(fused_qkv="together")


def test_non_linear_target_leaves_model_unmodified():
    expect_apply_error(make_vit(0), SVFT(target_modules=["qkv", "blocks.0.norm1"]), "blocks.0.norm1", "LayerNorm")
