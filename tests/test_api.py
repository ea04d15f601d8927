"""The public adapter API: save/load round trips, SVFT canonical signs, target matching, parameter counts,
input validation (before anything is modified), merging, and the atomic writes they use (``lit_peft.files``).

Everything runs on tiny timm ViTs (2 blocks, width 64, 32×32 images) and small ``nn.Linear`` stacks; the
paper-scale parameter counts (DINOv2-L BOFT, ViT-B SVFT) use stand-in module trees with the same names and
``nn.Linear`` shapes built on the ``meta`` device (no memory, no real SVD).
"""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import lit_peft.adapters.io as adapter_io
import lit_peft.adapters.svft as svft_module
from lit_peft.adapters import (BOFT, OFT, SVFT, AdaptedLinear, DoRA, LoRA, VeRA, adapted_layers,
                               adapter_state_dict, count_parameters, find_strategy, get_strategy, load_adapter,
                               merge_adapters, resolve_targets, save_adapter)
from lit_peft.files import atomic_write, atomic_write_folder, atomic_write_text

TENSORS_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"
WIDTH = 64  # embed dim of the tiny ViT; qkv is 64 -> 192 (parts of 64 rows), fc1 64 -> 256, fc2 256 -> 64
ADAPTED_VIT_LINEARS = [f"blocks.{i}.{leaf}" for i in range(2)
                       for leaf in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]


# -- helpers -----------------------------------------------------------------------------------------------------
def make_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8,
                              embed_dim=WIDTH, depth=2, num_heads=2)
    return model.eval()


class Stack(nn.Module):
    """A small stack of linears (``layers.0``, ``layers.1``, ...) with GELUs between them."""

    def __init__(self, widths, seed: int = 0, bias: bool = True):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(widths[:-1], widths[1:]))
        self.eval()

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == 0 else layer(F.gelu(x))
        return x


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1234))


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Random values for every adapter tensor (and the trainable modules), so a round trip is not trivial."""
    gen = torch.Generator().manual_seed(seed)
    for layer in adapted_layers(model).values():
        for name, p in layer.adapters.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype) * std
            leaf = name.rpartition(".")[2]
            if leaf in ("scale", "magnitude", "lambda_d"):  # multiplicative: stay near the initial value
                p.mul_(1 + noise)
            elif leaf == "bias":
                p.add_(noise)
            else:
                p.copy_(noise)
    strategy = find_strategy(model)
    if strategy is not None:
        for name in strategy.trainable_module_names(model):
            for p in model.get_submodule(name).parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


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


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


# -- strategies under test -----------------------------------------------------------------------------------------
ROUND_TRIP = {
    "boft_m2_bias_head": lambda: BOFT(block_size=4, n_butterfly_factors=2, train_bias=True,
                                      trainable_modules=["head"]),
    "boft_neumann": lambda: BOFT(block_size=8, n_butterfly_factors=3, cayley="neumann"),
    "oft": lambda: OFT(block_size=8),
    "svft_plain": lambda: SVFT(pattern="plain"),
    "svft_banded": lambda: SVFT(pattern="banded", off_diag=2),
    "svft_random": lambda: SVFT(pattern="random", off_diag=1, seed=3),
    "svft_top_k": lambda: SVFT(pattern="top_k", off_diag=1, target_modules=["qkv", "proj"]),
    "svft_gated": lambda: SVFT(pattern="banded", off_diag=1, init="gated", trainable_modules=["head"]),
    "lora_head": lambda: LoRA(rank=4, alpha=8.0, trainable_modules=["head"]),
    "lora_regex_qkv_v": lambda: LoRA(rank=2, target_modules=r"blocks\.[01]\.(attn\.qkv\.v|mlp\.fc2)"),
    "lora_joint": lambda: LoRA(rank=2, target_modules=["qkv"], fused_qkv="joint"),
    "dora": lambda: DoRA(rank=4, alpha=4.0),
    "vera": lambda: VeRA(rank=16, d_init=0.1, seed=7),
}


# == 1. save / load round trip =====================================================================================
@pytest.mark.parametrize("case", list(ROUND_TRIP))
def test_round_trip(case, tmp_path, images):
    strategy = ROUND_TRIP[case]()
    model = strategy.apply(make_vit(0))
    base_out = make_vit(0)(images)
    randomize(model, seed=1)
    with torch.no_grad():
        out = model(images)
    assert max_diff(out, base_out) > 1e-4, "random adapter values should change the function"

    folder = save_adapter(model, tmp_path / "adapter")
    assert folder == tmp_path / "adapter"
    assert sorted(os.listdir(folder)) == [TENSORS_FILE, CONFIG_FILE], "temporary files left behind"
    assert sorted(os.listdir(tmp_path)) == ["adapter"]

    config = json.loads((folder / CONFIG_FILE).read_text())
    cls = type(strategy)
    assert config["format"] == "lit_peft.adapter"
    assert config["strategy"] == f"{cls.__module__}.{cls.__qualname__}"
    assert config["strategy"].endswith("." + cls.__name__)
    assert config["init_args"] == json.loads(json.dumps(strategy.init_args()))
    assert config["parameter_count"] == count_parameters(model)["adapter"]
    assert sorted(config["layers"]) == sorted(adapted_layers(model))

    fresh = make_vit(0)
    assert load_adapter(fresh, folder) is fresh
    assert type(get_strategy(fresh)) is cls
    assert get_strategy(fresh).init_args() == strategy.init_args()
    with torch.no_grad():
        loaded_out = fresh(images)
    torch.testing.assert_close(loaded_out, out, atol=1e-6, rtol=0)
    saved = adapter_state_dict(model)
    assert_same_tensors(adapter_state_dict(fresh), saved)
    # the loaded model trains the same tensors as the original
    assert ({k for k, p in fresh.named_parameters() if p.requires_grad}
            == {k for k, p in model.named_parameters() if p.requires_grad})

    if cls is SVFT:  # values and support are saved, the SVD is not
        keys = set(saved)
        assert any(k.endswith(".rows") for k in keys) and any(k.endswith(".cols") for k in keys)
        assert not any(k.rsplit(".", 1)[1] in ("U", "S", "V") for k in keys)
    if strategy.trainable_modules:
        assert {"head.weight", "head.bias"} <= set(saved)

    # a base model with other weights: the same adapters are rebuilt and get the saved tensors
    other = make_vit(1)
    load_adapter(other, folder)
    assert_same_tensors(adapter_state_dict(other), saved)
    with torch.no_grad():
        assert torch.isfinite(other(images)).all()


def test_save_overwrites_and_leaves_no_temporary_files(tmp_path, images):
    model = LoRA(rank=2).apply(make_vit(0))
    randomize(model, seed=1)
    save_adapter(model, tmp_path / "a")
    randomize(model, seed=2)
    save_adapter(model, tmp_path / "a")  # overwrite in place
    assert sorted(os.listdir(tmp_path / "a")) == [TENSORS_FILE, CONFIG_FILE]
    fresh = load_adapter(make_vit(0), tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), model(images), atol=1e-6, rtol=0)


def test_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    model = LoRA(rank=2).apply(make_vit(0))

    def broken_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(adapter_io, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path / "a")
    assert os.listdir(tmp_path / "a") == []


@pytest.mark.parametrize("case", list(ROUND_TRIP))
def test_strategy_is_configuration_only(case, tmp_path, images):
    """``apply`` leaves the strategy as constructed (its attributes are its arguments, nothing is added at run
    time), so one strategy adapts several models, and each model's adapter saves from the model alone."""
    strategy = ROUND_TRIP[case]()
    before = copy.deepcopy(vars(strategy))
    first = strategy.apply(make_vit(0))
    second = strategy.apply(make_vit(1))
    assert vars(strategy) == before
    assert get_strategy(first) is strategy and get_strategy(second) is strategy
    randomize(first, seed=1)
    with torch.no_grad():
        out = first(images)
    fresh = load_adapter(make_vit(0), save_adapter(first, tmp_path / "a"))
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), out, atol=1e-6, rtol=0)


def test_save_without_adapters_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no adapters"):
        save_adapter(make_vit(0), tmp_path / "a")


def test_round_trip_on_linear_stack(tmp_path):
    model = Stack([12, 24, 24, 6], seed=5)
    x = torch.randn(4, 12)
    SVFT(pattern="banded", off_diag=3, trainable_modules=["layers.2"], target_modules=["layers.0", "layers.1"]
         ).apply(model)
    randomize(model, seed=3)
    with torch.no_grad():
        out = model(x)
    save_adapter(model, tmp_path / "s")
    fresh = load_adapter(Stack([12, 24, 24, 6], seed=5), tmp_path / "s")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), out, atol=1e-6, rtol=0)
    assert fresh.layers[2].weight.requires_grad and torch.equal(fresh.layers[2].weight, model.layers[2].weight)


# == 2. SVFT canonical signs =======================================================================================
def _flip_pairs(U, Vh, gen):
    """Flip a random half of the singular pairs (u_i, v_i) together: still a valid SVD."""
    r = U.shape[-1]
    sign = torch.ones(r, dtype=U.dtype)
    flip = torch.randperm(r, generator=gen)[: max(1, r // 2)]
    sign[flip] = -1
    return U * sign, Vh * sign[:, None], int(len(flip))


@pytest.fixture()
def saved_svft(tmp_path, images):
    model = SVFT(pattern="banded", off_diag=2).apply(make_vit(0))
    randomize(model, seed=4, std=0.3)
    with torch.no_grad():
        out = model(images)
    return save_adapter(model, tmp_path / "svft"), out


def test_svft_signs_canonical_under_flipped_torch_svd(saved_svft, images, monkeypatch):
    folder, expected = saved_svft
    original_svd = torch.linalg.svd
    gen = torch.Generator().manual_seed(0)
    flipped = []

    def flipping_svd(A, *args, **kwargs):
        U, S, Vh = original_svd(A, *args, **kwargs)
        U, Vh, n = _flip_pairs(U, Vh, gen)
        flipped.append(n)
        return U, S, Vh

    monkeypatch.setattr(svft_module.torch.linalg, "svd", flipping_svd)
    fresh = load_adapter(make_vit(0), folder)
    assert len(flipped) == 2 * 6 and all(n > 0 for n in flipped), "the SVD was not recomputed through the patch"
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), expected, atol=1e-6, rtol=0)

    # negative control: without the canonical sign the same flips change the function
    monkeypatch.setattr(svft_module, "canonical_signs", lambda U, S, V: (U, S, V))
    uncanonical = load_adapter(make_vit(0), folder)
    with torch.no_grad():
        assert max_diff(uncanonical(images), expected) > 1e-3


def test_svft_signs_canonical_under_other_svd_library(saved_svft, images):
    """An ``svd_provider`` (as an SVD cache would be) computing the SVD with numpy, signs flipped at random, passed
    to ``load_adapter``; the strategy is not modified by it."""
    folder, expected = saved_svft
    gen = torch.Generator().manual_seed(1)
    calls = []

    def numpy_svd(name, weight, dtype):
        U, S, Vh = np.linalg.svd(weight.double().numpy(), full_matrices=False)
        U, Vh, _ = _flip_pairs(torch.from_numpy(U), torch.from_numpy(Vh), gen)
        calls.append(name)
        return U.to(dtype), torch.from_numpy(S).to(dtype), Vh.mT.to(dtype)

    fresh = load_adapter(make_vit(0), folder, svd_provider=numpy_svd)
    assert "blocks.0.attn.qkv.k" in calls and "blocks.1.mlp.fc2" in calls and len(calls) == 12
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), expected, atol=2e-5, rtol=0)
    assert vars(get_strategy(fresh)).keys() == get_strategy(fresh).init_args().keys()  # configuration only

    # the same provider through apply: the same SVDs, so the same adapters as load_adapter rebuilt
    calls.clear()
    applied = SVFT(pattern="banded", off_diag=2).apply(make_vit(0), svd_provider=numpy_svd)
    assert len(calls) == 12
    for name, layer in adapted_layers(applied).items():
        for key, tensor in layer.adapters.named_buffers():
            if key.rpartition(".")[2] in ("U", "S", "V"):
                assert torch.allclose(tensor, fresh.get_submodule(name).adapters.get_buffer(key), atol=1e-5), key


def _svft_reference(layer, x):
    """``x (W + U M Vᵀ)ᵀ + b`` per part, ``M`` built from the layer's current support and values."""
    weight = layer.weight.clone()
    for part, (start, stop) in layer.parts.items():
        a = layer.adapters[part]
        values = a.values * (torch.sigmoid(a.gate) if a.gate is not None else 1)
        M = torch.zeros(a.rank, a.rank).index_put((a.rows, a.cols), values)
        weight[start:stop] += a.U @ M @ a.V.mT
    return F.linear(x, weight, layer.bias)


@pytest.mark.parametrize("pattern, off_diag", [("top_k", 0), ("top_k", 1), ("random", 0), ("banded", 1)])
def test_svft_loaded_support_defines_the_update(tmp_path, pattern, off_diag):
    """On another base model the saved support Ω (not the one recomputed there) defines ``M``, in the forward
    pass and in the merge. With top_k the recomputed support can differ from the saved one: here the new base
    is symmetric (U = V), so its own top_k(d=0) support is the diagonal while the saved one is not."""
    source = SVFT(pattern=pattern, off_diag=off_diag).apply(Stack([16, 16, 16], seed=0))
    randomize(source, seed=2, std=0.3)
    save_adapter(source, tmp_path / "a")
    target = Stack([16, 16, 16], seed=1)
    with torch.no_grad():
        for layer in target.layers:
            A = torch.randn(16, 16)
            layer.weight.copy_(A @ A.T / 16)
    load_adapter(target, tmp_path / "a")
    x = torch.randn(5, 16)
    for src, layer in zip(source.layers, target.layers):
        a = layer.adapters["all"]
        assert torch.equal(a.rows, src.adapters["all"].rows) and torch.equal(a.cols, src.adapters["all"].cols)
        with torch.no_grad():
            expected = _svft_reference(layer, x)
            torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(layer.merged_linear()(x), expected, atol=1e-5, rtol=1e-5)


def test_canonical_sign_convention():
    torch.manual_seed(0)
    W = torch.randn(10, 6)
    U, S, V = svft_module.canonical_svd(W)
    torch.testing.assert_close(U @ torch.diag(S) @ V.mT, W, atol=1e-5, rtol=0)
    pivots = U.abs().argmax(dim=0)
    assert (U[pivots, torch.arange(U.shape[1])] > 0).all()


# == 3. target matching ============================================================================================
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


# == 4. parameter counts ===========================================================================================
def boft_count(in_f, out_f, b, m, scale=True, train_bias=False):
    return (b - 1) * in_f * m // 2 + out_f * (int(scale) + int(train_bias))


def svft_count(out_f, in_f, pattern, d, gated=False):
    r = min(out_f, in_f)
    k = r if pattern == "plain" else r * (2 * d + 1) - d * (d + 1)
    return k + int(gated)


def part_shapes(layer):
    return [(stop - start, layer.in_features) for start, stop in layer.parts.values()]


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


def test_svft_top_k_count_and_distinct_random_support():
    model = SVFT(pattern="top_k", off_diag=2, target_modules=["qkv", "proj"]).apply(make_vit(0))
    for layer in adapted_layers(model).values():
        for part, adapter in layer.adapters.items():
            assert len(adapter.rows) == svft_count(64, 64, "top_k", 2)
    model = SVFT(pattern="random", off_diag=2).apply(make_vit(0))
    for layer in adapted_layers(model).values():
        for adapter in layer.adapters.values():
            pairs = set(zip(adapter.rows.tolist(), adapter.cols.tolist()))
            assert len(pairs) == len(adapter.rows) == adapter.values.numel()


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


@pytest.mark.parametrize("init, expected", [("zero", 276_048), ("gated", 276_048 + 72)])
def test_svft_vit_base_count_on_meta(init, expected):
    with torch.device("meta"):
        model = StandInViT(depth=12, dim=768, hidden=3072)
    SVFT(pattern="banded", off_diag=2, init=init, target_modules=SIX_LINEARS).apply(model)
    layers = adapted_layers(model)
    assert sum(len(layer.parts) for layer in layers.values()) == 12 * 6
    per_layer = [sum(svft_count(o, i, "banded", 2, init == "gated") for o, i in part_shapes(layer))
                 for layer in layers.values()]
    assert [layer.num_adapter_parameters() for layer in layers.values()] == per_layer
    assert count_parameters(model)["adapter"] == sum(per_layer) == expected


def test_svft_banded_count_on_real_layers():
    """The per-layer formula ``r(2d+1) − d(d+1)`` with a real SVD, square and both rectangular orientations."""
    model = Stack([48, 48, 96, 40], seed=2)
    SVFT(pattern="banded", off_diag=2).apply(model)
    assert [layer.num_adapter_parameters() for layer in model.layers] == [48 * 5 - 6, 48 * 5 - 6, 40 * 5 - 6]
    gated = SVFT(pattern="banded", off_diag=2, init="gated").apply(Stack([48, 48, 96, 40], seed=2))
    assert count_parameters(gated)["adapter"] == 2 * (48 * 5 - 6) + (40 * 5 - 6) + 3


# == 5. bad input: a clear error before anything is modified =======================================================
def _expect_apply_error(model, strategy, *needles):
    before = snapshot(model)
    with pytest.raises(ValueError) as err:
        strategy.apply(model)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))
    assert_unmodified(model, before)
    return str(err.value)


def test_boft_block_size_not_dividing():
    _expect_apply_error(make_vit(0), BOFT(block_size=6, n_butterfly_factors=1), "blocks.0.attn.qkv",
                        "in_features=64", "block_size=6", "[2, 4, 8, 16, 32, 64]")
    # only one layer of a stack fails; nothing is adapted, not even the valid layers
    message = _expect_apply_error(Stack([16, 16, 24, 8]), OFT(block_size=16), "layers.2", "in_features=24",
                                  "[2, 3, 4, 6, 8, 12, 24]")
    assert "layers.0" not in message and "layers.1" not in message


def test_boft_odd_block_size_with_several_factors():
    with pytest.raises(ValueError, match=r"block_size must be even.*block_size=5"):
        BOFT(block_size=5, n_butterfly_factors=2)
    model = OFT(block_size=5).apply(Stack([15, 10]))  # one factor: odd blocks are fine
    assert model.layers[0].num_adapter_parameters() == boft_count(15, 10, 5, 1)


def test_boft_odd_number_of_blocks_with_several_factors():
    _expect_apply_error(Stack([24, 8]), BOFT(block_size=8, n_butterfly_factors=2), "layers.0", "odd")


def test_boft_too_many_factors():
    message = _expect_apply_error(make_vit(0), BOFT(block_size=8, n_butterfly_factors=5), "blocks.0.attn.qkv",
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


@pytest.mark.parametrize("kwargs", [dict(pattern="diagonal"), dict(off_diag=-1), dict(init="random"),
                                    dict(svd_dtype="float16")])
def test_svft_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SVFT(**kwargs)


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
])
def test_bad_arguments_name_argument_and_valid_values(make, needles):
    """Every invalid argument is reported at once, by name, with its valid values."""
    with pytest.raises(ValueError) as err:
        make()
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


def test_svft_top_k_needs_square():
    message = _expect_apply_error(make_vit(0), SVFT(pattern="top_k", off_diag=1), "blocks.0.mlp.fc1",
                                  "(256, 64)", "blocks.0.mlp.fc2", "(64, 256)", "top_k")
    assert "attn.qkv" not in message  # the split q, k, v parts are square


def test_svft_off_diag_at_least_rank():
    _expect_apply_error(Stack([8, 4, 8]), SVFT(pattern="banded", off_diag=4), "layers.0", "off_diag=4", "rank 4",
                        "layers.1")
    model = SVFT(pattern="banded", off_diag=3).apply(Stack([8, 4, 8]))
    assert model.layers[0].num_adapter_parameters() == svft_count(4, 8, "banded", 3)
    SVFT(pattern="plain", off_diag=40).apply(Stack([8, 4]))  # plain ignores off_diag


def test_non_linear_target_leaves_model_unmodified():
    _expect_apply_error(make_vit(0), SVFT(target_modules=["qkv", "blocks.0.norm1"]), "blocks.0.norm1", "LayerNorm")


def test_load_onto_other_shapes(tmp_path):
    source = LoRA(rank=2, target_modules=["layers.0", "layers.1"]).apply(Stack([16, 32, 8]))
    randomize(source)
    save_adapter(source, tmp_path / "a")
    target = Stack([16, 24, 8])
    before = snapshot(target)
    with pytest.raises(ValueError) as err:
        load_adapter(target, tmp_path / "a")
    message = str(err.value)
    assert "layers.0" in message and "(24, 16)" in message and "(32, 16)" in message
    assert "layers.1" in message and "(8, 24)" in message and "(8, 32)" in message
    assert_unmodified(target, before)
    # a model lacking a saved layer
    short = Stack([16, 32])
    before = snapshot(short)
    with pytest.raises(ValueError, match="layers.1"):
        load_adapter(short, tmp_path / "a")
    assert_unmodified(short, before)


def test_load_onto_model_with_adapters_is_an_error(tmp_path):
    model = LoRA(rank=2).apply(make_vit(0))
    save_adapter(model, tmp_path / "a")
    with pytest.raises(ValueError, match=r"(?s)blocks\.0\.attn\.qkv.*LoRALinear|already has adapters"):
        load_adapter(model, tmp_path / "a")


@pytest.fixture()
def lora_folder(tmp_path):
    model = LoRA(rank=2, trainable_modules=["head"]).apply(make_vit(0))
    randomize(model)
    return save_adapter(model, tmp_path / "adapter")


def _expect_load_error(folder, needle, exc=ValueError):
    model = make_vit(0)
    before = snapshot(model)
    with pytest.raises(exc) as err:
        load_adapter(model, folder)
    assert str(needle) in str(err.value), str(err.value)
    assert_unmodified(model, before)
    return str(err.value)


def test_load_truncated_safetensors(lora_folder):
    file = lora_folder / TENSORS_FILE
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    _expect_load_error(lora_folder, file)


def test_load_truncated_safetensors_header(lora_folder):
    file = lora_folder / TENSORS_FILE
    file.write_bytes(file.read_bytes()[:5])
    _expect_load_error(lora_folder, file)


def test_load_garbage_safetensors(lora_folder):
    file = lora_folder / TENSORS_FILE
    file.write_bytes(os.urandom(4096))
    _expect_load_error(lora_folder, file)


def test_load_empty_safetensors(lora_folder):
    (lora_folder / TENSORS_FILE).write_bytes(b"")
    _expect_load_error(lora_folder, lora_folder / TENSORS_FILE)


def test_load_foreign_safetensors(lora_folder):
    """A valid safetensors file not written by save_adapter (no lit_peft format metadata)."""
    file = lora_folder / TENSORS_FILE
    save_file({"base_model.model.blocks.0.attn.qkv.lora_A.weight": torch.zeros(2, 64)}, str(file))
    _expect_load_error(lora_folder, file)


def test_load_invalid_json(lora_folder):
    file = lora_folder / CONFIG_FILE
    file.write_text(file.read_text()[:-20])
    _expect_load_error(lora_folder, file)


def test_load_binary_config(lora_folder):
    file = lora_folder / CONFIG_FILE
    file.write_bytes(b"\xff\xfe\x00garbage\x80")
    _expect_load_error(lora_folder, file)


def test_load_peft_adapter_config(lora_folder):
    file = lora_folder / CONFIG_FILE
    file.write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["qkv"],
                                "base_model_name_or_path": "vit_tiny", "task_type": None}))
    message = _expect_load_error(lora_folder, file)
    assert "format" in message


@pytest.mark.parametrize("content", ["[1, 2, 3]", "null", '"lit_peft.adapter"'])
def test_load_non_object_json(lora_folder, content):
    file = lora_folder / CONFIG_FILE
    file.write_text(content)
    _expect_load_error(lora_folder, file)


def test_load_config_missing_keys_or_newer_version(lora_folder):
    file = lora_folder / CONFIG_FILE
    config = json.loads(file.read_text())
    file.write_text(json.dumps({k: v for k, v in config.items() if k != "layers"}))
    assert "layers" in _expect_load_error(lora_folder, file)
    file.write_text(json.dumps({**config, "format_version": 99}))
    assert "99" in _expect_load_error(lora_folder, file)


def test_load_config_unknown_strategy(lora_folder):
    file = lora_folder / CONFIG_FILE
    config = json.loads(file.read_text())
    file.write_text(json.dumps({**config, "strategy": "lit_peft.adapters.lora.NoSuchAdapter"}))
    _expect_load_error(lora_folder, "NoSuchAdapter")
    file.write_text(json.dumps({**config, "strategy": "os.path.join"}))
    _expect_load_error(lora_folder, "os.path.join")


@pytest.mark.parametrize("missing", [TENSORS_FILE, CONFIG_FILE])
def test_load_missing_file(lora_folder, missing):
    (lora_folder / missing).unlink()
    _expect_load_error(lora_folder, lora_folder / missing, FileNotFoundError)


def test_load_missing_folder(tmp_path):
    _expect_load_error(tmp_path / "nowhere", tmp_path / "nowhere", FileNotFoundError)


def _rewrite_tensors(folder, edit):
    from safetensors.torch import load_file
    file = folder / TENSORS_FILE
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "lit_peft.adapter"})
    return file


def test_load_tensor_with_wrong_shape(lora_folder):
    """A well-formed file whose adapter tensor has another shape: refused before the model is touched."""
    key = "blocks.0.attn.qkv.adapters.k.lora_A"
    file = _rewrite_tensors(lora_folder, lambda t: t.__setitem__(key, torch.zeros(3, 64)))
    message = _expect_load_error(lora_folder, key)
    assert str(file) in message


def test_load_tensor_missing(lora_folder):
    """A well-formed file lacking one adapter tensor: refused before the model is touched."""
    key = "blocks.1.mlp.fc2.adapters.all.lora_B"
    file = _rewrite_tensors(lora_folder, lambda t: t.pop(key))
    message = _expect_load_error(lora_folder, key)
    assert str(file) in message


def test_load_head_with_wrong_shape(lora_folder):
    _rewrite_tensors(lora_folder, lambda t: t.__setitem__("head.weight", torch.zeros(7, 64)))
    _expect_load_error(lora_folder, "head.weight")


# == 6. merging ====================================================================================================
def test_merge_without_adapters_is_a_noop(images):
    model = make_vit(0)
    before = snapshot(model)
    with torch.no_grad():
        out = model(images)
    assert merge_adapters(model) is model
    assert_unmodified(model, before)
    with torch.no_grad():
        assert torch.equal(model(images), out)


MERGE = {k: ROUND_TRIP[k] for k in ("boft_m2_bias_head", "boft_neumann", "oft", "svft_banded", "svft_gated",
                                    "lora_head", "lora_regex_qkv_v", "lora_joint", "dora", "vera")}


@pytest.mark.parametrize("case", list(MERGE))
def test_merge_gives_plain_model(case, images):
    model = MERGE[case]().apply(make_vit(0))
    randomize(model, seed=6)
    with torch.no_grad():
        adapted_out = model(images)
    assert merge_adapters(model) is model
    assert not adapted_layers(model) and find_strategy(model) is None
    for name in ADAPTED_VIT_LINEARS:
        assert type(model.get_submodule(name)) is nn.Linear
    plain = make_vit(3)
    assert list(model.state_dict()) == list(plain.state_dict())
    with torch.no_grad():
        merged_out = model(images)
    torch.testing.assert_close(merged_out, adapted_out, atol=2e-5, rtol=1e-5)
    plain.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(images), merged_out, atol=1e-6, rtol=0)
    assert merge_adapters(model) is model  # merging again is a no-op


def test_merge_after_load(tmp_path, images):
    model = SVFT(pattern="random", off_diag=1, trainable_modules=["head"]).apply(make_vit(0))
    randomize(model, seed=8)
    with torch.no_grad():
        out = model(images)
    save_adapter(model, tmp_path / "a")
    merged = merge_adapters(load_adapter(make_vit(0), tmp_path / "a"))
    plain = make_vit(9)
    plain.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(images), out, atol=2e-5, rtol=1e-5)


# == 7. atomic writes (lit_peft.files) =============================================================================
def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "old\n")

    def broken(tmp):
        tmp.write_text("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["f.txt"]
    atomic_write_text(tmp_path / "new" / "g.txt", "x")  # parents are created
    assert (tmp_path / "new" / "g.txt").read_text() == "x"


@pytest.mark.parametrize("merge", [False, True])
def test_atomic_write_folder(tmp_path, merge):
    folder = tmp_path / "out"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "old").write_text("old")
    (folder / "keep.txt").write_text("keep")

    def write(tmp):
        (tmp / "sub").mkdir()
        (tmp / "sub" / "new").write_text("new")
        (tmp / "a.txt").write_text("a")

    assert atomic_write_folder(folder, write, merge=merge) == folder
    expected = {"sub", "a.txt"} | ({"keep.txt"} if merge else set())
    assert set(os.listdir(folder)) == expected
    assert os.listdir(folder / "sub") == ["new"]  # a folder of the same name is replaced, not merged into
    assert os.listdir(tmp_path) == ["out"]  # no temporary left

    def broken(tmp):
        (tmp / "a.txt").write_text("changed")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_folder(folder, broken, merge=merge)
    assert (folder / "a.txt").read_text() == "a" and os.listdir(tmp_path) == ["out"]
