"""``lit_peft.callbacks.RichProgress``: the rich bar plus one metric line per epoch (and per mid-epoch validation)."""

from __future__ import annotations

import re

import lightning as L
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from lit_peft.callbacks.progress import RichProgress, metrics_line


class LoggingModel(BoringModel):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)["loss"]
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        loss = super().validation_step(batch, batch_idx)["x"]
        self.log("val_loss", loss)
        self.log("val_acc", torch.tensor(0.5))


def fit(tmp_path, **trainer_args) -> None:
    trainer = L.Trainer(callbacks=[RichProgress()], logger=False, enable_checkpointing=False,
                        enable_model_summary=False, accelerator="cpu", devices=1, default_root_dir=tmp_path,
                        limit_train_batches=4, limit_val_batches=2, num_sanity_val_steps=1, **trainer_args)
    trainer.fit(LoggingModel())


def test_one_line_per_epoch_with_its_validation_metrics(tmp_path, capsys):
    fit(tmp_path, max_epochs=2)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2, lines
    for n, line in enumerate(lines, 1):
        assert re.match(rf"epoch {n}/2 · step {4 * n} · [0-9.]+ s · train_loss \S+ · val_acc 0\.5 · "
                        r"val_loss \S+$", line), line


def test_mid_epoch_validation_gets_its_own_line(tmp_path, capsys):
    fit(tmp_path, max_epochs=1, val_check_interval=2)
    out = capsys.readouterr().out
    assert re.search(r"^step 2 \(epoch 1\) · validation · .*val_loss \S+", out, re.M), out
    assert len(re.findall(r"^epoch 1/1 · step 4 ", out, re.M)) == 1  # the end-of-epoch validation: one line


def test_metrics_line_orders_groups_and_drops_step_copies():
    line = metrics_line({"val_acc": torch.tensor(0.91234), "train_loss_step": 1.0, "train_loss_epoch": 0.5,
                         "lr": 3e-5, "name": "text", "vector": torch.ones(2)})
    assert line == "train_loss_epoch 0.5 · val_acc 0.9123 · lr 3.000e-05"
