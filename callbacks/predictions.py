"""``PredictionWriter``: what ``python -m lit_peft predict`` produces, one JSON object per example.

Each row holds the example's position in the predicted dataset (``index``), its identifier where the dataset has
one (``id``: the image path of a VTAB/image-list dataset, the row of the eval data for prompts), and what the
module's ``predict_step`` returned for it: ``prediction`` and ``probabilities`` for classifiers, ``prompt`` and
``output`` (the generated text) for language models. The file is written under a temporary name and renamed into
place when prediction ends (one file per rank in a multi-process run), and its path is printed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from lit_peft.files import atomic_write_text


def item_id(dataset: Any, index: int) -> Any:
    """The identifier of item ``index`` of ``dataset`` (through ``Subset`` wrappers), or ``None``."""
    while isinstance(dataset, torch.utils.data.Subset):
        index = int(dataset.indices[index])
        dataset = dataset.dataset
    get = getattr(dataset, "item_id", None)
    return get(index) if callable(get) else None


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class PredictionWriter(BasePredictionWriter):
    """Write every prediction to ``<output_dir>/<filename>`` (``output_dir`` default: the run's log folder).

    Args:
        output_dir: the folder of the file; ``None``: ``trainer.log_dir`` (the run folder).
        filename: the file name; with several processes ``-rank<r>`` is inserted before the suffix.
    """

    def __init__(self, output_dir: str | None = None, filename: str = "predictions.jsonl"):
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.filename = filename
        self.rows: list[dict] = []
        self.written: Path | None = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.rows = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        loaders = trainer.predict_dataloaders
        loader = loaders[dataloader_idx] if isinstance(loaders, (list, tuple)) else loaders
        dataset = getattr(loader, "dataset", None)
        items = _plain(prediction)
        if not isinstance(items, list):
            items = [items]
        indices = list(batch_indices) if batch_indices is not None else [None] * len(items)
        for index, item in zip(indices, items):
            row: dict[str, Any] = {"index": index}
            identifier = item_id(dataset, index) if dataset is not None and index is not None else None
            if identifier is not None:
                row["id"] = identifier
            row.update(item if isinstance(item, dict) else {"prediction": item})
            if len(loaders if isinstance(loaders, (list, tuple)) else [loaders]) > 1:
                row["dataloader"] = dataloader_idx
            self.rows.append(row)

    def path(self, trainer: L.Trainer) -> Path:
        folder = Path(self.output_dir) if self.output_dir else Path(trainer.log_dir or trainer.default_root_dir)
        name = Path(self.filename)
        if trainer.world_size > 1:
            name = name.with_name(f"{name.stem}-rank{trainer.global_rank}{name.suffix}")
        return folder / name

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self.path(trainer)
        atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in self.rows))
        self.written = path
        rank_zero_info(f"PredictionWriter: {len(self.rows)} predictions written to {path}"
                       + (" (one file per rank)" if trainer.world_size > 1 else ""))


__all__ = ["PredictionWriter", "item_id"]
