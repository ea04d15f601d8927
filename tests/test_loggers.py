"""``lit_peft.loggers.CSVTensorBoardLogger``: metrics.csv and TensorBoard events in one run folder per run."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from lit_peft.loggers import CSVTensorBoardLogger


class LossModel(BoringModel):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)["loss"]
        self.log("train_loss", loss)
        return loss


def fit(tmp_path, **logger_args) -> CSVTensorBoardLogger:
    logger = CSVTensorBoardLogger(tmp_path / "runs", name="demo", **logger_args)
    trainer = L.Trainer(max_steps=4, log_every_n_steps=1, logger=logger, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        accelerator="cpu", devices=1)
    torch.manual_seed(0)
    trainer.fit(LossModel())
    return logger


def scalars(folder, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_csv_and_tensorboard_write_the_same_losses_into_one_folder_per_run(tmp_path):
    first, second = fit(tmp_path), fit(tmp_path)
    for n, logger in enumerate((first, second)):
        folder = tmp_path / "runs" / "demo" / f"version_{n}"
        assert logger.log_dir == str(folder)
        assert (folder / "metrics.csv").is_file() and list(folder.glob("events.out.tfevents.*"))
        with open(folder / "metrics.csv") as f:
            from_csv = [(int(r["step"]), float(r["train_loss"])) for r in csv.DictReader(f) if r["train_loss"]]
        from_tb = scalars(folder, "train_loss")
        assert len(from_csv) == 4 and [s for s, _ in from_tb] == [s for s, _ in from_csv]
        assert [v for _, v in from_tb] == pytest.approx([v for _, v in from_csv], rel=1e-6)
    assert sorted(p.name for p in (tmp_path / "runs" / "demo").iterdir()) == ["version_0", "version_1"]


def test_tensorboard_false_is_a_plain_csv_logger(tmp_path):
    logger = fit(tmp_path, tensorboard=False)
    folder = tmp_path / "runs" / "demo" / "version_0"
    assert (folder / "metrics.csv").is_file() and not list(folder.glob("events.out.tfevents.*"))
    assert logger.tensorboard_logger is None
