"""``FewShotDataModule`` (:mod:`lit_peft.data.fewshot`) over a generated ImageFolder layout."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from helpers.data import HALF, write_image
from lit_peft.data import FewShotDataModule


def make_imagefolder(root: Path, dataset: str, n_classes: int, n_train: int, n_test: int) -> Path:
    base = root / dataset
    for c in range(n_classes):
        for split, n in (("train", n_train), ("test", n_test)):
            for i in range(n):
                write_image(base / split / f"class_{c:03d}" / f"{i}.png", (c * 5 % 256, i * 40 % 256, 0), size=(6, 6))
    return base


def test_fewshot_imagefolder(tmp_path):
    make_imagefolder(tmp_path, "resisc45", 45, n_train=5, n_test=2)
    kw = dict(dataset="resisc45", data_root=str(tmp_path), shots=3, val_shots=1, img_size=16, batch_size=32,
              num_workers=0, mean=HALF, std=HALF)
    dm = FewShotDataModule(**kw)
    assert dm.num_classes == 45 and dm.data_source() == "imagefolder"
    dm.setup("fit")
    assert len(dm.train_set) == 45 * 3 and len(dm.val_set) == 45
    train_labels = [dm.train_set.dataset.targets[i] for i in dm.train_set.indices]
    assert Counter(train_labels) == {c: 3 for c in range(45)}
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 3, 16, 16) and y.max() < 45 and x.min() >= -1.0 - 1e-4 and x.max() <= 1.0 + 1e-4
    dm.setup("test")
    assert len(dm.test_set) == 90
    # deterministic per seed, different across seeds
    dm2 = FewShotDataModule(**kw)
    dm2.setup("fit")
    assert dm2.split_indices == dm.split_indices
    dm3 = FewShotDataModule(**{**kw, "seed": 123})
    dm3.setup("fit")
    assert dm3.split_indices["train"] != dm.split_indices["train"]
    # too few images per class: names the class folder
    with pytest.raises(ValueError, match=r"class 0 \('class_000'\) has 5"):
        FewShotDataModule(**{**kw, "shots": 5}).setup("fit")


def test_fewshot_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown few-shot dataset 'food100' \(did you mean 'food101'\?\)"):
        FewShotDataModule(dataset="food100", data_root=str(tmp_path))
    make_imagefolder(tmp_path, "cifar100", 3, n_train=4, n_test=1)
    dm = FewShotDataModule(dataset="cifar100", data_root=str(tmp_path), shots=2, val_shots=1, num_workers=0)
    with pytest.raises(ValueError, match=r"has 3 class folders, but cifar100 has 100 classes"):
        dm.setup("fit")
    (tmp_path / "flowers102" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"lacks its test/ folder"):
        FewShotDataModule(dataset="flowers102", data_root=str(tmp_path)).setup("fit")
    with pytest.raises(FileNotFoundError, match=r"food101 \(train split\) not found .*Set download: true"):
        FewShotDataModule(dataset="food101", data_root=str(tmp_path / "none")).setup("fit")
