"""``DigitsDataModule`` (:mod:`lit_peft.data.digits`) on scikit-learn's shipped digits (no download)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lit_peft.data import DigitsDataModule


def test_digits_counts_labels_and_values():
    from sklearn.datasets import load_digits

    n_expected = int(np.isin(load_digits().target, [5, 6, 7, 8, 9]).sum())
    dm = DigitsDataModule(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    assert dm.num_classes == 5
    dm.setup("fit")
    dm.setup("test")
    sizes = {s: len(getattr(dm, f"{s}_set")) for s in ("train", "val", "test")}
    assert sum(sizes.values()) == n_expected
    assert abs(sizes["test"] - 0.2 * n_expected) <= 1 and abs(sizes["val"] - 0.2 * n_expected) <= 2
    for split in ("train", "val", "test"):
        x, y = getattr(dm, f"{split}_set").tensors
        assert x.shape[1:] == (3, 32, 32) and y.dtype == torch.int64
        assert set(y.tolist()) == set(range(5))  # stratified: every class in every split
        assert x.min() >= 0.0 and x.max() <= 1.0 and torch.equal(x[:, 0], x[:, 2])
    all_idx = np.concatenate(list(dm.split_indices.values()))
    assert len(np.unique(all_idx)) == n_expected
    # labels follow the order of ``classes``
    images, labels, keep = dm.load_arrays()
    assert (load_digits().target[keep] == np.array([5, 6, 7, 8, 9])[labels]).all()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 3, 32, 32)


def test_digits_split_determinism_and_normalisation():
    a, b, c = DigitsDataModule(seed=0), DigitsDataModule(seed=0), DigitsDataModule(seed=1)
    for dm in (a, b, c):
        dm.setup(None)
    assert all(np.array_equal(a.split_indices[k], b.split_indices[k]) for k in ("train", "val", "test"))
    assert not np.array_equal(a.split_indices["test"], c.split_indices["test"])
    # ImageNet defaults without a trainer: a blank pixel normalises to -mean/std per channel
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    x, _ = a.train_set.tensors
    expected_min = torch.tensor([-m / s for m, s in zip(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
    assert torch.allclose(x.amin(dim=(0, 2, 3)), expected_min, atol=1e-5)
    small = DigitsDataModule(classes=[3, 0], img_size=8)
    small.setup("validate")
    assert small.num_classes == 2 and small.train_set is None and small.val_set.tensors[0].shape[1:] == (3, 8, 8)


def test_digits_errors():
    with pytest.raises(ValueError, match=r"classes must be digits in 0\.\.9, got \[10\]"):
        DigitsDataModule(classes=[1, 10])
    with pytest.raises(ValueError, match=r"must not repeat a digit, got \[1\]"):
        DigitsDataModule(classes=[1, 1, 2])
    with pytest.raises(ValueError, match="val_fraction \\+ test_fraction must be < 1"):
        DigitsDataModule(val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match="unknown stage 'train'"):
        DigitsDataModule().setup("train")
