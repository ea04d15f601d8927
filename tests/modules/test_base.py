"""What every lit_peft module shares (:mod:`lit_peft.modules.base`): a non-finite training loss stops the run
before its backward pass with an error naming the step (the user's CLI path, a diverging learning rate), or with
``skip_nonfinite: N`` is skipped, at most ``N`` times."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from helpers.callbacks import IMG_SIZE, NUM_CLASSES, make_module, trainer
from helpers.cli import cli_env, make_vtab_task, write_config
from lit_peft.adapters import LoRA


def test_diverging_run_stops_at_the_nonfinite_step_and_saves_nothing(tmp_path):
    data = make_vtab_task(tmp_path / "data")
    config = write_config(tmp_path, data, {"class_path": "lit_peft.adapters.LoRA", "init_args": {"rank": 2}},
                          max_epochs=3)
    proc = subprocess.run([sys.executable, "-m", "lit_peft", "fit", "--config", str(config),
                           "--model.init_args.optimizer.init_args.lr", "1e6", "--model.init_args.head_lr", "1e6"],
                          cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "FloatingPointError: train_loss is" in out and "at optimiser step" in out, out[-3000:]
    assert "model.init_args.optimizer.init_args.lr: 1e+06" in out and "skip_nonfinite" in out
    saved = [p for p in (tmp_path / "runs").rglob("*") if p.suffix in (".ckpt", ".safetensors")]
    assert not saved, f"a diverged run wrote {saved}"


def _loader(nan_batches: set[int], n_batches: int = 6):
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(n_batches * 2, 3, IMG_SIZE, IMG_SIZE, generator=gen)
    for b in nan_batches:
        images[2 * b] = float("nan")
    labels = torch.arange(n_batches * 2) % NUM_CLASSES
    return DataLoader(TensorDataset(images, labels), batch_size=2)


def test_skip_nonfinite_skips_at_most_n_steps(tmp_path):
    module = make_module(LoRA(rank=2), skip_nonfinite=2)
    with pytest.warns(UserWarning, match=r"train_loss is nan at optimiser step 1 \(epoch 0, batch 1\): step "
                                         r"skipped \(1 of at most 2"):
        trainer(tmp_path, [], max_steps=4).fit(module, _loader({1, 3}))
    assert module.global_step == 4          # Lightning counts a skipped step too
    assert all(torch.isfinite(p).all() for p in module.parameters())
    module = make_module(LoRA(rank=2), skip_nonfinite=1)
    with pytest.warns(UserWarning, match="step skipped"), \
            pytest.raises(FloatingPointError, match=r"at optimiser step 3 \(epoch 0, batch 3\) after skipping 1"):
        trainer(tmp_path, [], max_steps=6).fit(module, _loader({1, 3}))
    with pytest.raises(ValueError, match=r"skip_nonfinite must be an integer >= 0"):
        make_module(LoRA(rank=2), skip_nonfinite=-1)
