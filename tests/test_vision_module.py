"""ViTClassifier and the CLI's small promises: bundled configs by bare name, local weights files, optimiser
groups and schedules, adapter-only state dicts, and the demo end to end (shortened)."""

from __future__ import annotations

import csv
import math

import pytest
import timm
import torch
from safetensors.torch import save_file

from lit_peft.adapters import BOFT, LoRA
from lit_peft.cli import bundled_configs_dir, resolve_config_args
from lit_peft.modules import ViTClassifier
from lit_peft.modules.base import warmup_lambda

TINY = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def test_bare_config_name_resolves_to_bundled_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config_args(["fit", "--config", "demo.yaml"])[2] == str(bundled_configs_dir() / "demo.yaml")
    assert resolve_config_args(["fit", "--config=configs/demo.yaml"])[1] == f"--config={bundled_configs_dir() / 'demo.yaml'}"
    (tmp_path / "demo.yaml").write_text("seed_everything: 1\n")  # a file here wins over the bundled one
    assert resolve_config_args(["fit", "--config", "demo.yaml"])[2] == "demo.yaml"
    with pytest.raises(SystemExit, match="vtab_boft.yaml"):  # the error lists what is bundled
        resolve_config_args(["fit", "--config", "no_such.yaml"])


def test_local_checkpoint_path_loads_backbone_and_reinitialises_head(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7, img_size=32, **TINY)
    path = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    module = ViTClassifier(backbone="vit_tiny_patch16_224", num_classes=3, checkpoint_path=str(path), img_size=32,
                           model_kwargs=TINY)
    for name, tensor in module.model.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(tensor, source.state_dict()[name]), name
    assert module.model.head.out_features == 3
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        ViTClassifier(backbone="vit_tiny_patch16_224", checkpoint_path=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="not a timm model"):
        ViTClassifier(backbone="no_such_vit")


def test_parameter_groups_state_dict_and_head_only():
    module = ViTClassifier(backbone="vit_tiny_patch16_224", num_classes=3, img_size=32, model_kwargs=TINY,
                           adapter=LoRA(rank=2, target_modules=["qkv"]), head_lr=4e-3, head_weight_decay=0.0)
    module.configure_model()
    module.configure_model()  # idempotent: applying twice would raise
    groups = {g["name"]: g for g in module.parameter_groups()}
    assert groups["head"]["lr"] == 4e-3 and groups["head"]["weight_decay"] == 0.0
    assert "lr" not in groups["adapter"]  # the optimiser's own lr applies
    head_ids = {id(p) for p in module.model.head.parameters()}
    assert {id(p) for p in groups["head"]["params"]} == head_ids
    assert all(".adapters." in n for n, p in module.named_parameters() if p.requires_grad and id(p) not in head_ids)
    keys = set(module.state_dict())
    assert keys == {n for n, p in module.named_parameters() if p.requires_grad}

    head_only = ViTClassifier(backbone="vit_tiny_patch16_224", num_classes=3, img_size=32, model_kwargs=TINY)
    head_only.configure_model()
    assert {n for n, p in head_only.named_parameters() if p.requires_grad} == {"model.head.weight", "model.head.bias"}


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_warmup_schedules(schedule):
    factor = warmup_lambda(schedule, total_steps=100, warmup_steps=10)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    end = {"cosine": 0.0, "linear": 0.0, "constant": 1.0}[schedule]
    assert factor(100) == pytest.approx(end, abs=1e-12)
    middle = {"cosine": 0.5 * (1 + math.cos(math.pi * 45 / 90)), "linear": 1 - 45 / 90, "constant": 1.0}[schedule]
    assert factor(55) == pytest.approx(middle)


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="lr_schedule"):
        ViTClassifier(backbone="vit_tiny_patch16_224", img_size=32, model_kwargs=TINY, lr_schedule="step")
    module = ViTClassifier(backbone="vit_tiny_patch16_224", num_classes=3, img_size=32, model_kwargs=TINY,
                           adapter=BOFT(block_size=5, n_butterfly_factors=1, target_modules=["qkv"]))
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv: in_features=32 is not divisible by block_size=5"):
        module.configure_model()


def test_demo_runs_end_to_end_shortened(tmp_path, monkeypatch):
    """The README's main job with fewer epochs: pretrain on digits 0-4 (cached), BOFT on 5-9, test, merge."""
    from lit_peft.cli import main

    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    args = ["fit", "--config", "demo.yaml", "--trainer.max_epochs=1", "--model.init_args.pretrain_epochs=2",
            f"--model.init_args.cache_dir={cache}"]
    main(args)
    assert len(list(cache.glob("digits-backbone-*.safetensors"))) == 1
    version = tmp_path / "runs" / "demo" / "boft" / "version_0"
    with open(version / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    accuracy = [float(r["test_acc"]) for r in rows if r.get("test_acc")]
    assert len(accuracy) == 1 and 0.0 <= accuracy[0] <= 1.0
    assert (version / "merged" / "model.safetensors").is_file()
    assert (version / "merged" / "adapter" / "adapter_config.json").is_file()
