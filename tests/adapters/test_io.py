"""Adapter files and merging (``lit_peft.adapters.io``): save/load round trips of every method, atomic saves, loading
onto other models and every kind of broken file (a clear error before the model is touched), and merging into a
plain model.

Everything runs on tiny timm ViTs (2 blocks, width 64, 32×32 images) and small ``nn.Linear`` stacks.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import lit_peft.adapters.io as adapter_io
from helpers.adapters import ADAPTED_VIT_LINEARS, assert_unmodified, max_diff, snapshot
from helpers.models import Stack, make_vit, randomize
from lit_peft.adapters import (BOFT, OFT, SVFT, DoRA, LoRA, VeRA, adapted_layers, adapter_state_dict,
                               count_parameters, find_strategy, get_strategy, load_adapter, merge_adapters,
                               save_adapter)


TENSORS_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"


# -- helpers -----------------------------------------------------------------------------------------------------
def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


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


# == save / load round trip ========================================================================================
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


# == loading: a clear error before anything is modified =============================================================
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
    """Replace the folder's tensors by ``edit``ed ones as a consistent save would (digests updated in both files),
    so that the checks after the checksum's are what a test reaches."""
    from safetensors.torch import load_file
    file = folder / TENSORS_FILE
    tensors = load_file(str(file))
    edit(tensors)
    digest = adapter_io.tensor_digest(tensors)
    save_file(tensors, str(file), metadata={"format": "lit_peft.adapter", "sha256": digest})
    config = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps({**config, "tensors_sha256": digest}))
    return file


def test_bit_flip_in_tensor_data_is_refused(lora_folder):
    """A flipped bit in the tensor bytes (the safetensors header intact) loads silently without a checksum: refused."""
    file = lora_folder / TENSORS_FILE
    data = bytearray(file.read_bytes())
    data[-3] ^= 0x40  # inside the last tensor's data
    file.write_bytes(bytes(data))
    message = _expect_load_error(lora_folder, "does not match the checksum written with it")
    assert str(file) in message and "damaged" in message


def test_tensors_of_another_save_beside_the_config_are_refused(lora_folder, tmp_path):
    """A save interrupted between its two files leaves new tensors beside the old config (whose init_args, e.g.
    alpha, no longer match): the config's digest names the tensors it belongs to."""
    other = LoRA(rank=2).apply(make_vit(0))
    randomize(other, seed=9)
    save_adapter(other, tmp_path / "other")
    (lora_folder / TENSORS_FILE).write_bytes((tmp_path / "other" / TENSORS_FILE).read_bytes())
    _expect_load_error(lora_folder, "does not belong to the adapter_config.json beside it")


def test_nonfinite_tensors_are_refused_when_saving_and_merging(tmp_path, images):
    model = LoRA(rank=2).apply(make_vit(0))
    randomize(model, seed=3)
    with torch.no_grad():
        model.blocks[1].mlp.fc2.adapters["all"].lora_B[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"refusing to write the adapter .*: 1 adapter tensor\(s\) hold NaN or "
                                         r"infinite values \(blocks\.1\.mlp\.fc2\.adapters\.all\.lora_B\).*"
                                         r"allow_nonfinite=True"):
        save_adapter(model, tmp_path / "nan")
    assert not (tmp_path / "nan").exists()
    with pytest.raises(ValueError, match=r"refusing to merge the adapters: .*lora_B"):
        merge_adapters(model)
    assert adapted_layers(model), "a refused merge must leave the adapters in place"
    save_adapter(model, tmp_path / "nan", allow_nonfinite=True)
    assert not torch.isfinite(merge_adapters(model, allow_nonfinite=True)(images)).all()


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


# == merging =======================================================================================================
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


def test_meta_device_models_are_refused_where_values_would_be_lost(tmp_path, images):
    """``apply`` on the meta device is a dry run (shapes, counts); after materialising, its never-initialised adapter
    tensors must not compute silently; ``load_adapter`` onto a meta model would drop the saved values."""
    model = LoRA(rank=2).apply(make_vit(0))
    randomize(model, seed=4)
    save_adapter(model, tmp_path / "a")
    with torch.device("meta"):
        meta = make_vit(None)
    with pytest.raises(ValueError, match=r"onto a model on the meta device .*the saved values would be dropped"):
        load_adapter(meta, tmp_path / "a")
    assert count_parameters(LoRA(rank=2).apply(meta))["adapter"] == count_parameters(model)["adapter"]
    meta.to_empty(device="cpu")
    with pytest.raises(RuntimeError, match="built on the meta device .* never initialised"):
        meta(images)
    with pytest.raises(RuntimeError, match="built on the meta device"):
        merge_adapters(meta)
