"""The user's path through the CLI: ``python -m lit_peft`` subprocesses on generated VTAB-layout images and fit
configs for the tiny ViT, their ``metrics.csv``, and ``fit --print_config`` in-process."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from helpers.models import TINY

REPO = Path(__file__).resolve().parents[2]  # tests/helpers/cli.py -> the repository root
BACKBONE = "vit_tiny_patch16_224"
TASK = "patch_camelyon"  # a 2-class VTAB task


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


def print_config(*args: str) -> dict:
    """``lit_peft fit <args> --print_config`` in-process; the printed (complete) config."""
    from lit_peft.cli import main as cli_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exc:
        cli_main(["fit", *args, "--print_config"])
    assert exc.value.code in (0, None), f"{args}: exit {exc.value.code}\n{out.getvalue()[-2000:]}"
    return yaml.safe_load(out.getvalue())
