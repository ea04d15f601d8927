"""The digits demo (:class:`DigitsDataModule`).

The 1,797 real 8×8 handwritten digits that scikit-learn ships (no download), upsampled and replicated to three
channels, with a seeded stratified train/val/test split; a CPU-sized stand-in for a fine-tuning task (pretrain on
digits 0–4, adapt to 5–9).
"""

from __future__ import annotations

from typing import Literal

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .base import ImageDataModule, _check_int


class DigitsDataModule(ImageDataModule):
    """scikit-learn's real handwritten digits as a small image-classification task (CPU demo).

    ``sklearn.datasets.load_digits()``: 1,797 8×8 grayscale digits, values 0..16, shipped with scikit-learn (no
    download). The digits in ``classes`` are kept and relabelled ``0..len(classes)-1`` in the given order; the
    images are scaled to [0, 1], upsampled to ``img_size``×``img_size`` (bilinear), replicated to three channels
    and normalised. The split is stratified and seeded: ``test_fraction`` and ``val_fraction`` of the kept images
    (per class, up to rounding) go to test and validation, the rest to training. The demo pretrains a small ViT on
    digits 0–4 and fine-tunes it with an adapter on 5–9.

    Args:
        classes: the digits to keep, relabelled to their position in this list.
        img_size: side of the square network input.
        val_fraction: fraction of the kept images used for validation.
        test_fraction: fraction of the kept images used for testing.
        seed: seeds the split and the training-loader shuffle.
        last_batch: the epoch's last training batch when the batch size does not divide the training set:
            ``pad`` (default: filled up with the epoch's first examples), ``drop`` (left out) or ``partial``
            (short). ``pad`` and ``drop`` give N processes of batch B exactly the batches of one process of batch
            N·B (``lit_peft.data.sampling.EpochShuffleSampler``).
        batch_size: batch size of every loader.
        num_workers: DataLoader worker processes (0: load in the main process; the data are in memory).
        mean: per-channel normalisation mean; null: the connected model's (``data_config``), else ImageNet's.
        std: per-channel normalisation std; null: as for ``mean``.
    """

    #: The task's name (for the hand-over's error messages).
    task = "digits"

    def __init__(
        self,
        classes: list[int] = [5, 6, 7, 8, 9],  # noqa: B006 - copied below; a list default is the config schema
        img_size: int = 32,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        seed: int = 0,
        last_batch: Literal["pad", "drop", "partial"] = "pad",
        batch_size: int = 64,
        num_workers: int = 0,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, mean=mean, std=std, seed=seed,
                         last_batch=last_batch)
        classes = [int(c) for c in classes]
        if not classes:
            raise ValueError("classes must name at least one digit in 0..9")
        bad = [c for c in classes if not 0 <= c <= 9]
        if bad:
            raise ValueError(f"classes must be digits in 0..9, got {bad}")
        dup = sorted({c for c in classes if classes.count(c) > 1})
        if dup:
            raise ValueError(f"classes must not repeat a digit, got {dup} more than once in {classes}")
        _check_int("img_size", img_size)
        for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 < float(frac) < 1.0:
                raise ValueError(f"{name} must lie in (0, 1), got {frac!r}")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction must be < 1 to leave training data, got {val_fraction} + {test_fraction}"
            )
        self.save_hyperparameters()
        self.classes = classes
        self.img_size = img_size
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.split_indices: dict[str, np.ndarray] = {}

    @property
    def num_classes(self) -> int:
        """``len(classes)``."""
        return len(self.classes)

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(images ``(N, 8, 8)`` in [0, 1], remapped labels ``(N,)``, indices into ``load_digits()``) of ``classes``."""
        from sklearn.datasets import load_digits

        digits = load_digits()
        keep = np.flatnonzero(np.isin(digits.target, self.classes))
        remap = {c: i for i, c in enumerate(self.classes)}
        labels = np.array([remap[int(t)] for t in digits.target[keep]], dtype=np.int64)
        images = digits.images[keep].astype(np.float32) / 16.0
        return images, labels, keep

    def _to_tensor(self, images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
        x = torch.from_numpy(images).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
        x = torch.nn.functional.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear",
                                            align_corners=False)
        x = x.clamp_(0.0, 1.0).expand(-1, 3, -1, -1)
        m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
        s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
        return ((x - m) / s).contiguous()

    def setup(self, stage: str | None = None) -> None:
        """Build the (in-memory) split; every stage gets the same seeded split."""
        from sklearn.model_selection import train_test_split

        train, val, test = self._setup_stages(stage)
        images, labels, _ = self.load_arrays()
        idx = np.arange(len(labels))
        rest, test_idx = train_test_split(idx, test_size=self.test_fraction, stratify=labels,
                                          random_state=self.seed)
        val_share = self.val_fraction / (1.0 - self.test_fraction)
        train_idx, val_idx = train_test_split(rest, test_size=val_share, stratify=labels[rest],
                                              random_state=self.seed)
        self.split_indices = {"train": np.sort(train_idx), "val": np.sort(val_idx), "test": np.sort(test_idx)}
        mean, std = self.resolve_normalization()
        for split, wanted in (("train", train), ("val", val), ("test", test)):
            if wanted:
                sel = self.split_indices[split]
                ds = TensorDataset(self._to_tensor(images[sel], mean, std), torch.from_numpy(labels[sel]))
                setattr(self, f"{split}_set", ds)
