"""What the callback tests share: a ``ViTClassifier`` on a tiny timm ViT (2 blocks, width 64, 8×8 patches of 32×32
images, 5 classes), short runs of a real ``lightning.Trainer``, and a handler that collects Lightning's log."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch

from lit_peft.modules.vision import ViTClassifier

BACKBONE = "vit_tiny_patch16_224"
NUM_CLASSES = 5
IMG_SIZE = 32
MODEL_KWARGS = {"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}
SVFT_TARGETS = ["qkv", "proj", "fc1", "fc2"]


def make_module(adapter, seed: int = 0, **kwargs) -> ViTClassifier:
    torch.manual_seed(seed)
    return ViTClassifier(BACKBONE, num_classes=NUM_CLASSES, img_size=IMG_SIZE, model_kwargs=MODEL_KWARGS,
                         adapter=adapter, **kwargs)


@torch.no_grad()
def outputs(module: ViTClassifier, images: torch.Tensor) -> torch.Tensor:
    return module.model.eval()(images)


def trainer(tmp_path: Path, callbacks, max_steps: int = 2, **kwargs) -> L.Trainer:
    args = {"logger": False, "enable_progress_bar": False, "enable_checkpointing": False,
            "enable_model_summary": False, "limit_val_batches": 0, "num_sanity_val_steps": 0, **kwargs}
    return L.Trainer(max_steps=max_steps, callbacks=callbacks, default_root_dir=str(tmp_path), accelerator="cpu",
                     devices=1, **args)


class LightningLogRecords(logging.Handler):
    """Collects what ``rank_zero_info`` logs (the ``lightning.pytorch`` logger does not propagate to caplog)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def messages(self, needle: str) -> list[str]:
        return [r.getMessage() for r in self.records if needle in r.getMessage()]
