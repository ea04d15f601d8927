"""``MergeAdapters`` (:mod:`lit_peft.callbacks.merge`): at the end of fit, a plain model that reproduces the adapted
one (checked before anything is written) plus its adapter folder; the best checkpoint's weights on request. A real
``lightning.Trainer`` runs a few steps on scikit-learn's digits, on the tiny ViT of ``helpers.callbacks``.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
from safetensors.torch import load_file

import lit_peft.callbacks.merge as merge_module
from helpers.callbacks import (BACKBONE, IMG_SIZE, MODEL_KWARGS, NUM_CLASSES, SVFT_TARGETS, make_module, outputs,
                               trainer)
from lit_peft.adapters import BOFT, SVFT, BOFTLinear, adapted_layers, load_adapter, read_adapter_config
from lit_peft.callbacks import MergeAdapters, MergeCheckError


MERGE_ADAPTERS = {
    "BOFT": lambda: BOFT(block_size=8, n_butterfly_factors=2),
    "SVFT": lambda: SVFT(pattern="banded", off_diag=1, target_modules=SVFT_TARGETS),
}


def no_temp_files(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.name.startswith(".") or ".tmp" in p.name]


@pytest.mark.parametrize("method", list(MERGE_ADAPTERS))
def test_merge_adapters_writes_a_plain_model(method, tmp_path, digits, images):
    module = make_module(MERGE_ADAPTERS[method](), optimizer=lambda p: torch.optim.AdamW(p, lr=2e-2),
                         lr_schedule="constant")
    out = tmp_path / "merged"
    merge = MergeAdapters(output_dir=str(out))
    trainer(tmp_path, [merge], max_steps=3).fit(module, datamodule=digits)

    assert merge.written == out
    assert merge.last_difference is not None and merge.last_difference <= 1e-4
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["adapter/adapter.safetensors", "adapter/adapter_config.json", "config.json",
                     "model.safetensors", "model_config.json"]
    assert no_temp_files(out) == []
    # The adapters trained, so the merged model is not the base model.
    trained = [p for layer in adapted_layers(module.model).values()
               for n, p in layer.adapters.named_parameters() if n.endswith(("skew", "values"))]
    assert trained and all(p.abs().max() > 0 for p in trained)  # both start at zero

    # A user's load: timm.create_model from model_config.json, strict load of model.safetensors.
    config = json.loads((out / "model_config.json").read_text())
    assert config["backbone"] == BACKBONE
    assert config["create_model_kwargs"] == {"num_classes": NUM_CLASSES, **MODEL_KWARGS, "img_size": IMG_SIZE}
    plain = timm.create_model(config["backbone"], pretrained=False, **config["create_model_kwargs"])
    plain.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    assert not any(isinstance(m, BOFTLinear) for m in plain.modules())
    adapted = outputs(module, images)
    with torch.no_grad():
        merged = plain.eval()(images)
    assert (merged - adapted).abs().max() <= 1e-4 * adapted.abs().max()
    assert torch.equal(merged.argmax(-1), adapted.argmax(-1))
    x, _ = next(iter(digits.val_dataloader()))
    with torch.no_grad():
        assert torch.equal(plain(x).argmax(-1), module.model.eval()(x).argmax(-1))

    # The adapter folder loads onto a fresh copy of the same base model and gives the same function.
    assert read_adapter_config(out / "adapter")["strategy"].endswith(method)
    torch.manual_seed(0)
    fresh = timm.create_model(BACKBONE, pretrained=False, num_classes=NUM_CLASSES, img_size=IMG_SIZE, **MODEL_KWARGS)
    load_adapter(fresh, out / "adapter")
    with torch.no_grad():
        reloaded = fresh.eval()(images)
    assert torch.allclose(reloaded, adapted, rtol=0, atol=1e-5 * float(adapted.abs().max()))


def test_merge_adapters_planted_mismatch_writes_nothing(tmp_path, digits, monkeypatch):
    real = merge_module.merged_state_dict

    def perturbed(model, **kwargs):
        state = real(model, **kwargs)
        # Random, not a constant shift: fc1 reads LayerNorm outputs (zero mean over features), so adding a constant
        # to every entry of its weight would change nothing.
        weight = state["blocks.0.mlp.fc1.weight"]
        state["blocks.0.mlp.fc1.weight"] = weight + 0.5 * torch.randn(weight.shape, generator=torch.Generator())
        return state

    monkeypatch.setattr(merge_module, "merged_state_dict", perturbed)
    module = make_module(BOFT(block_size=8, n_butterfly_factors=2))
    out = tmp_path / "merged"
    merge = MergeAdapters(output_dir=str(out))
    with pytest.raises(MergeCheckError, match="differ"):
        trainer(tmp_path / "root", [merge], max_steps=1).fit(module, datamodule=digits)
    assert merge.last_difference is not None and merge.last_difference > 1e-4
    assert merge.written is None
    assert not out.exists()
    assert not any(p.name.endswith(".safetensors") for p in tmp_path.rglob("*"))


def test_merge_adapters_default_folder(tmp_path, digits):
    module = make_module(BOFT(block_size=8, n_butterfly_factors=1))
    merge = MergeAdapters()
    trainer(tmp_path, [merge], max_steps=1).fit(module, datamodule=digits)
    assert merge.written == tmp_path / "merged"
    assert (tmp_path / "merged" / "model.safetensors").is_file()


class SnapshotAtFitEnd(L.Callback):
    """The module's (adapter-only) state dict when fit ends, before the callbacks after it run."""

    def on_fit_end(self, trainer, pl_module):
        self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}


class StepScore(L.Callback):
    """Logs ``step_score = global_step`` at each validation."""

    def on_validation_epoch_end(self, trainer, pl_module):
        pl_module.log("step_score", float(trainer.global_step))


def test_merge_adapters_best_weights(tmp_path, digits, images):
    """``weights="best"``: the merged model is the best checkpoint's, not the final weights."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = make_module(BOFT(block_size=8, n_butterfly_factors=2), optimizer=lambda p: torch.optim.AdamW(p, lr=2e-2),
                         lr_schedule="constant")
    # A monitored score that is best at the first validation (step 2 of 4), so best != final for sure.
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="step_score", mode="min", save_top_k=1)
    final = SnapshotAtFitEnd()
    merge = MergeAdapters(output_dir=str(tmp_path / "merged"), weights="best")
    run = trainer(tmp_path, [StepScore(), checkpoint, final, merge], max_steps=4, enable_checkpointing=True,
                  val_check_interval=2, limit_val_batches=2)
    run.fit(module, datamodule=digits)

    best = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=False)
    now = module.state_dict()
    assert best["state_dict"].keys() == now.keys()
    assert all(torch.equal(now[k], v) for k, v in best["state_dict"].items())  # the module holds the best weights
    assert (best["global_step"], run.global_step) == (2, 4)
    assert any(not torch.equal(final.state[k], v) for k, v in best["state_dict"].items())  # not the final weights
    plain = timm.create_model(BACKBONE, pretrained=False, num_classes=NUM_CLASSES, img_size=IMG_SIZE,
                              **MODEL_KWARGS)
    plain.load_state_dict(load_file(str(tmp_path / "merged" / "model.safetensors")), strict=True)
    adapted = outputs(module, images)
    with torch.no_grad():
        assert (plain.eval()(images) - adapted).abs().max() <= 1e-4 * adapted.abs().max()


def test_merge_adapters_best_without_checkpoint_raises(tmp_path, digits):
    """Found at setup, before any training step (it used to surface only after the whole fit)."""
    merge = MergeAdapters(output_dir=str(tmp_path / "merged"), weights="best")
    run = trainer(tmp_path, [merge], max_steps=1)
    with pytest.raises(ValueError, match="needs a ModelCheckpoint callback"):
        run.fit(make_module(BOFT(block_size=8)), datamodule=digits)
    assert run.global_step == 0
    assert not (tmp_path / "merged").exists()
    (tmp_path / "a-file").write_text("not a folder")
    run = trainer(tmp_path, [MergeAdapters(output_dir=str(tmp_path / "a-file"))], max_steps=1)
    with pytest.raises(ValueError, match=r"output_dir .*a-file is a file, not a folder"):
        run.fit(make_module(BOFT(block_size=8)), datamodule=digits)
    assert run.global_step == 0


def test_merge_adapters_full_disk_fails_at_setup(tmp_path, digits, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 4096, 4096))
    run = trainer(tmp_path, [MergeAdapters(output_dir=str(tmp_path / "merged"))], max_steps=1)
    with pytest.raises(ValueError, match=r"has 0 MiB free, but the merged model needs about .* MiB"):
        run.fit(make_module(BOFT(block_size=8)), datamodule=digits)
    assert run.global_step == 0
    with pytest.raises(ValueError, match="weights"):
        MergeAdapters(weights="last")


class _PoisonAdapters(L.Callback):
    """Puts a NaN into one adapter tensor when training ends (a diverged run that got past the loss check)."""

    def on_train_end(self, trainer, pl_module):
        with torch.no_grad():
            next(iter(adapted_layers(pl_module.model).values())).adapters["q"].skew[0, 0, 0] = float("nan")


@pytest.mark.parametrize("check", [True, False])
def test_merge_adapters_refuses_nonfinite_adapters(tmp_path, digits, check):
    out = tmp_path / "merged"
    merge = MergeAdapters(output_dir=str(out), check=check)
    with pytest.raises(ValueError, match=r"MergeAdapters: refusing to merge: adapter tensors hold NaN or infinite "
                                         r"values \(blocks\.0\.attn\.qkv\.adapters\.q\.skew\).*allow_nonfinite"):
        trainer(tmp_path / "root", [_PoisonAdapters(), merge], max_steps=1).fit(
            make_module(BOFT(block_size=8, n_butterfly_factors=2)), datamodule=digits)
    assert merge.written is None and not out.exists()
    merge = MergeAdapters(output_dir=str(out), check=False, allow_nonfinite=True)
    trainer(tmp_path / "root", [_PoisonAdapters(), merge], max_steps=1).fit(
        make_module(BOFT(block_size=8, n_butterfly_factors=2)), datamodule=digits)
    assert merge.written == out and (out / "adapter" / "adapter.safetensors").is_file()


def test_merge_adapters_replaces_the_output_folder_as_a_whole(tmp_path, digits):
    """A previous run's files never survive beside the new ones (a merge writes a temporary folder that replaces
    the old one); no temporary file is left behind."""
    out = tmp_path / "merged"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "stale.txt").write_text("from a previous run")
    (out / "model.safetensors").write_bytes(b"old")
    trainer(tmp_path / "root", [MergeAdapters(output_dir=str(out))], max_steps=1).fit(
        make_module(BOFT(block_size=8, n_butterfly_factors=2)), datamodule=digits)
    assert not (out / "adapter" / "stale.txt").exists()
    assert (out / "model.safetensors").read_bytes() != b"old"
    assert no_temp_files(tmp_path) == []


@pytest.mark.parametrize("method", ["BOFT", "SVFT"])
def test_merge_adapters_exports_the_adapter_as_a_lora_that_peft_serves(method, tmp_path, digits, images):
    """``lora_tolerance``: ``lora/`` holds a peft LoRA (per-layer ranks, the head as ``modules_to_save``) that
    ``peft.PeftModel.from_pretrained`` on a fresh copy of the base model turns into the adapted model's function
    (within the reported output difference); ``lora_rank: 2`` gives a coarser LoRA whose served outputs differ by
    exactly the difference the callback reports."""
    peft = pytest.importorskip("peft")
    module = make_module(MERGE_ADAPTERS[method](), optimizer=lambda p: torch.optim.AdamW(p, lr=2e-2),
                         lr_schedule="constant")
    fine = MergeAdapters(output_dir=str(tmp_path / "fine"), lora_tolerance=1e-6)
    coarse = MergeAdapters(output_dir=str(tmp_path / "coarse"), lora_rank=2)
    trainer(tmp_path, [fine, coarse], max_steps=3).fit(module, datamodule=digits)
    adapted = outputs(module, images)
    assert fine.lora_export.output_relative_error < 1e-5
    assert coarse.lora_export.output_relative_error > 1e-4
    assert {layer.rank for layer in coarse.lora_export.layers.values()} == {2}

    for merge, tolerance in ((fine, 1e-5), (coarse, None)):
        folder = merge.written / "lora"
        assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                           "lora_export.json"]
        assert json.loads((folder / "adapter_config.json").read_text())["modules_to_save"] == ["head"]
        torch.manual_seed(0)
        fresh = timm.create_model(BACKBONE, pretrained=False, num_classes=NUM_CLASSES, img_size=IMG_SIZE,
                                  **MODEL_KWARGS)
        with torch.no_grad():
            served = peft.PeftModel.from_pretrained(fresh, folder).eval()(images)
        difference = float((served - adapted).abs().max() / adapted.abs().max())
        if tolerance is not None:
            assert difference < tolerance
        else:  # the check batch is not these images: same order of magnitude as the reported difference
            reported = merge.lora_export.output_relative_error
            assert reported / 10 < difference < reported * 10


def test_merge_adapters_refuses_bad_lora_arguments():
    with pytest.raises(ValueError, match=r"MergeAdapters: lora_rank / lora_tolerance: tolerance must be a number in "
                                         r"\(0, 1\), got 2"):
        MergeAdapters(lora_tolerance=2)
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        MergeAdapters(lora_rank=0)
