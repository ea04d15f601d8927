"""End to end through the user's path: ``python -m lit_peft fit --config X.yaml`` on a tiny ViT and generated
VTAB-layout images, then the files it wrote loaded back the way a user loads them."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from lit_peft.adapters import BOFT, SVFT, count_parameters
from lit_peft.data import VTABDataModule
from lit_peft.modules import ViTClassifier

BACKBONE = "vit_tiny_patch16_224"
TINY = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
TASK = "patch_camelyon"  # a 2-class VTAB task
REPO = Path(__file__).resolve().parent.parent


def make_vtab_task(root: Path, sizes=(("train800", 16), ("val200", 6), ("test", 8)), seed: int = 0) -> Path:
    """A VTAB-1k prepared folder for TASK: class 0 images are reddish, class 1 bluish, plus noise."""
    rng = np.random.default_rng(seed)
    folder = root / TASK
    (folder / "images").mkdir(parents=True)
    lines: dict[str, list[str]] = {}
    for split, n in sizes:
        lines[split] = []
        for i in range(n):
            label = i % 2
            pixels = rng.integers(0, 90, size=(32, 32, 3))
            pixels[..., 0 if label == 0 else 2] += 150
            name = f"images/{split}_{i}.png"
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / name)
            lines[split].append(f"{name} {label}")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, rows in lines.items():
        (folder / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return root


def model_args(adapter: dict) -> dict:
    return {"backbone": BACKBONE, "num_classes": 2, "img_size": 32, "model_kwargs": dict(TINY), "adapter": adapter,
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-2, "weight_decay": 0.0}},
            "head_lr": 1e-2, "lr_schedule": "cosine", "warmup_ratio": 0.1}


def write_config(tmp: Path, data_root: Path, adapter: dict, max_epochs: int = 2, callbacks: list | None = None,
                 name: str = "run", model: dict | None = None, data: dict | None = None) -> Path:
    """A fit config for the tiny ViT on the VTAB task under ``data_root``; ``model`` / ``data`` (``class_path`` +
    ``init_args``) replace those sections (then ``adapter`` / ``data_root`` are unused)."""
    config = {
        "seed_everything": 0,
        "test_after_fit": "final",
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": max_epochs, "log_every_n_steps": 1,
            "enable_progress_bar": False, "default_root_dir": str(tmp / "runs"),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(tmp / "runs"), "name": name}},
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"save_last": True, "save_top_k": 0}},
                          {"class_path": "lit_peft.callbacks.MergeAdapters"}] + (callbacks or []),
        },
        "model": {"class_path": "lit_peft.modules.ViTClassifier", "init_args": model_args(adapter)},
        "data": {"class_path": "lit_peft.data.VTABDataModule",
                 "init_args": {"task": TASK, "data_root": str(data_root), "img_size": 32, "batch_size": 4,
                               "num_workers": 0, "final": False, "seed": 0}},
    }
    config["model"] = model or config["model"]
    config["data"] = data or config["data"]
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def cli_env(**extra: str) -> dict:
    """The environment of a ``python -m lit_peft`` subprocess: this checkout importable, one thread, offline."""
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


def run_cli(*args: str, cwd: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "lit_peft", *args], cwd=cwd, env=cli_env(), capture_output=True,
                          text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return output


def read_metrics(version_dir: Path) -> list[dict]:
    with open(version_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def adapted_module(adapter, checkpoint: Path) -> ViTClassifier:
    """The adapted model rebuilt from the config's arguments and the adapter-only checkpoint. The frozen backbone
    is not in the checkpoint: it is rebuilt from its source, here a random init under the run's seed."""
    args = model_args(None)
    args.pop("optimizer")
    L.seed_everything(0)
    module = ViTClassifier(**{**args, "adapter": adapter})
    module.configure_model()
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    missing = module.load_state_dict(state, strict=False)
    assert not missing.unexpected_keys
    return module.eval()


@pytest.mark.parametrize("method", ["boft", "svft"])
def test_fit_writes_everything_and_merged_model_reproduces(tmp_path, method):
    data_root = make_vtab_task(tmp_path / "vtab")
    if method == "boft":
        adapter_cfg = {"class_path": "lit_peft.adapters.BOFT",
                       "init_args": {"block_size": 8, "n_butterfly_factors": 2, "dropout": 0.1, "train_bias": True,
                                     "target_modules": ["qkv", "proj", "fc1", "fc2"]}}
        strategy = BOFT(block_size=8, n_butterfly_factors=2, dropout=0.1, train_bias=True,
                        target_modules=["qkv", "proj", "fc1", "fc2"])
        callbacks = [{"class_path": "lit_peft.callbacks.OrthogonalityCheck",
                      "init_args": {"every_n_steps": 1, "tolerance": 1e-4, "action": "raise"}}]
    else:
        adapter_cfg = {"class_path": "lit_peft.adapters.SVFT",
                       "init_args": {"pattern": "banded", "off_diag": 1, "target_modules": ["qkv", "proj", "fc1", "fc2"]}}
        strategy = SVFT(pattern="banded", off_diag=1, target_modules=["qkv", "proj", "fc1", "fc2"])
        callbacks = [{"class_path": "lit_peft.callbacks.SVDCache", "init_args": {"cache_dir": str(tmp_path / "svd")}}]
    config = write_config(tmp_path, data_root, adapter_cfg, callbacks=callbacks)
    output = run_cli("fit", "--config", str(config), cwd=tmp_path)

    # the start-up line with the adapter's own count
    expected = timm.create_model(BACKBONE, pretrained=False, num_classes=2, img_size=32, **TINY)
    type(strategy)(**{**strategy.init_args(), "trainable_modules": ["head"]}).apply(expected)
    counts = count_parameters(expected)
    line = re.search(r"lit_peft: adapter parameters: ([\d,]+) \| trainable parameters: ([\d,]+) \| total "
                     r"parameters: ([\d,]+)", output)
    assert line, output[-3000:]
    assert [int(g.replace(",", "")) for g in line.groups()] == [counts["adapter"], counts["trainable"], counts["total"]]

    version = tmp_path / "runs" / "run" / "version_0"
    rows = read_metrics(version)
    assert any(r.get("train_loss") for r in rows) and any(r.get("val_acc") for r in rows)
    assert any(r.get("test_acc") for r in rows), "test_after_fit: final must log test_acc"

    # adapter-only checkpoint: trainable tensors (+ adapter buffers), no frozen backbone weights
    checkpoint = version / "checkpoints" / "last.ckpt"
    keys = set(torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"])
    assert keys and all(".adapters." in k or k.startswith("model.head.") for k in keys), sorted(keys)[:10]
    assert "model.blocks.0.attn.qkv.weight" not in keys
    trainable = {f"model.{n}" for n, p in expected.named_parameters() if p.requires_grad}
    assert trainable <= keys

    # the merged model in a plain timm model reproduces the adapted model's predictions
    merged_dir = version / "merged"
    assert {p.name for p in merged_dir.iterdir()} == {"model.safetensors", "model_config.json", "adapter"}
    plain = timm.create_model(BACKBONE, pretrained=False, num_classes=2, img_size=32, **TINY)
    plain.load_state_dict(load_file(merged_dir / "model.safetensors"), strict=True)
    plain.eval()
    module = adapted_module(strategy, checkpoint)
    data = VTABDataModule(task=TASK, data_root=str(data_root), img_size=32, batch_size=8, num_workers=0,
                          mean=module.data_config["mean"], std=module.data_config["std"])
    data.setup("test")
    images, _ = next(iter(data.test_dataloader()))
    with torch.no_grad():
        adapted_logits, merged_logits = module(images), plain(images)
    torch.testing.assert_close(merged_logits, adapted_logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(merged_logits.argmax(-1), adapted_logits.argmax(-1))
    if method == "svft":
        assert len(list((tmp_path / "svd").glob("*.safetensors"))) == 2 * 6  # q, k, v, proj, fc1, fc2 per block


STOP_CALLBACK = '''
import lightning as L


class StopAfterEpochs(L.Callback):
    """Ends fit after `epochs` epochs, as a job killed at an epoch boundary would."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True
'''


def test_resume_continues_with_the_same_losses(tmp_path, monkeypatch):
    """Uninterrupted 3 epochs vs 2 epochs + ``--ckpt_path last.ckpt`` for the third: identical train losses.
    BOFT with multiplicative dropout, so the random stream must be restored too."""
    from lit_peft.cli import main

    (tmp_path / "stopper.py").write_text(STOP_CALLBACK)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    data_root = make_vtab_task(tmp_path / "vtab")
    adapter = {"class_path": "lit_peft.adapters.BOFT",
               "init_args": {"block_size": 8, "n_butterfly_factors": 2, "dropout": 0.25,
                             "target_modules": ["qkv", "fc1"]}}
    full = write_config(tmp_path, data_root, adapter, max_epochs=3, name="full")
    main(["fit", "--config", str(full), "--test_after_fit=null"])
    stop = [{"class_path": "stopper.StopAfterEpochs", "init_args": {"epochs": 2}}]
    first = write_config(tmp_path, data_root, adapter, max_epochs=3, callbacks=stop, name="part1")
    main(["fit", "--config", str(first), "--test_after_fit=null"])
    checkpoint = tmp_path / "runs" / "part1" / "version_0" / "checkpoints" / "last.ckpt"
    second = write_config(tmp_path, data_root, adapter, max_epochs=3, name="part2")
    main(["fit", "--config", str(second), "--test_after_fit=null", "--ckpt_path", str(checkpoint)])

    def losses(name):
        rows = read_metrics(tmp_path / "runs" / name / "version_0")
        return {int(r["step"]): float(r["train_loss"]) for r in rows if r.get("train_loss")}

    uninterrupted, part1, part2 = losses("full"), losses("part1"), losses("part2")
    assert part1 and part2 and set(part1).isdisjoint(part2)
    assert set(part1) | set(part2) == set(uninterrupted)
    resumed = {**part1, **part2}
    for step, loss in uninterrupted.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-6, abs=1e-7), f"step {step}"
