"""The image datasets of :mod:`lit_peft.data.datasets` on generated files: ``ImageListDataset`` reading VTAB-1k list
files (and every kind of broken line or image), and ``sample_per_class``."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from helpers.data import write_image
from lit_peft.data import ImageListDataset, sample_per_class


# ------------------------------------------------------------------------------------------------------------------
# ImageListDataset
# ------------------------------------------------------------------------------------------------------------------
def test_image_list_dataset_reads_layout(vtab_root):
    folder = vtab_root / "dmlab"
    ds = ImageListDataset(folder, "train800.txt", transform=None, num_classes=6)
    assert len(ds) == 6
    assert Counter(ds.targets) == {0: 2, 1: 2, 2: 2}
    img, label = ds[2]  # the grayscale one (class 1, index 0)
    assert label == 1 and img.mode == "RGB" and len(set(img.getpixel((0, 0)))) == 1  # grey
    img0, _ = ds[0]
    assert img0.mode == "RGB" and img0.getpixel((0, 0)) == (255, 0, 0)


def test_image_list_dataset_paths_with_spaces_and_blank_lines(tmp_path):
    write_image(tmp_path / "my images" / "a b.png", (0, 0, 0))
    (tmp_path / "list.txt").write_text("\nmy images/a b.png 1\n\n")
    ds = ImageListDataset(tmp_path, "list.txt", num_classes=2)
    assert ds.samples == [("my images/a b.png", 1)]


def test_image_list_dataset_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found: .*nope"):
        ImageListDataset(tmp_path / "nope", "train800.txt")


def test_image_list_dataset_missing_list_file(vtab_root):
    with pytest.raises(FileNotFoundError, match=r"list file not found: .*train900\.txt.*train800\.txt"):
        ImageListDataset(vtab_root / "dmlab", "train900.txt")


@pytest.mark.parametrize(
    "line, pattern",
    [
        ("just_a_path.png", r"train800\.txt:3: malformed line 'just_a_path\.png'"),
        ("images/x.png cat", r"train800\.txt:3: malformed line .*label 'cat' is not an integer"),
    ],
)
def test_image_list_dataset_malformed_line(vtab_root, line, pattern):
    f = vtab_root / "dmlab" / "train800.txt"
    lines = f.read_text().splitlines()
    lines.insert(2, line)
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=pattern):
        ImageListDataset(vtab_root / "dmlab", "train800.txt", num_classes=6)


@pytest.mark.parametrize("label", [6, -1])
def test_image_list_dataset_bad_label(vtab_root, label):
    f = vtab_root / "dmlab" / "val200.txt"
    lines = f.read_text().splitlines()
    lines[1] = f"images/val200/c1_0.png {label}"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"val200\.txt:2: label {label} out of range; valid labels are \[0, 6\)"):
        ImageListDataset(vtab_root / "dmlab", "val200.txt", num_classes=6)


def test_image_list_dataset_unreadable_and_missing_image(vtab_root):
    folder = vtab_root / "dmlab"
    (folder / "images/test/c2_1.png").write_bytes(b"this is not an image")
    ds = ImageListDataset(folder, "test.txt", num_classes=6)  # listing is fine; images decode lazily
    with pytest.raises(OSError, match=r"cannot read image file .*c2_1\.png \(listed at .*test\.txt:6\)"):
        ds[5]
    with pytest.raises(OSError, match=r"cannot read image file .*c2_1\.png"):
        ImageListDataset(folder, "test.txt", num_classes=6, verify=True)
    (folder / "images/test/c0_0.png").unlink()  # a listed file that does not exist: found when building
    with pytest.raises(FileNotFoundError, match=r"1 of the 6 images listed in .*test\.txt do not exist: "
                                                r".*c0_0\.png \(line 1\)"):
        ImageListDataset(folder, "test.txt", num_classes=6)


# ------------------------------------------------------------------------------------------------------------------
# sample_per_class
# ------------------------------------------------------------------------------------------------------------------
def test_sample_per_class_counts_and_disjoint():
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(5), [20, 13, 12, 30, 15]))
    tr, va = sample_per_class(labels, shots=10, val_shots=2, seed=42)
    assert Counter(labels[tr].tolist()) == {c: 10 for c in range(5)}
    assert Counter(labels[va].tolist()) == {c: 2 for c in range(5)}
    assert not set(tr) & set(va) and len(set(tr)) == 50
    # accepts a tensor and a list
    assert sample_per_class(torch.as_tensor(labels), 10, 2, 42) == (tr, va)
    assert sample_per_class(labels.tolist(), 10, 2, 42) == (tr, va)


def test_sample_per_class_seeds():
    labels = np.repeat(np.arange(4), 50)
    a = sample_per_class(labels, 10, 2, seed=42)
    assert a == sample_per_class(labels, 10, 2, seed=42)
    b = sample_per_class(labels, 10, 2, seed=123)
    assert a[0] != b[0] and a[1] != b[1]


def test_sample_per_class_too_few():
    labels = np.array([0] * 12 + [1] * 5 + [2] * 12)
    with pytest.raises(ValueError, match=r"class 1 \('dog'\) has 5"):
        sample_per_class(labels, 10, 2, 0, class_names=["cat", "dog", "emu"])
    with pytest.raises(ValueError, match=r"class 3 has 0"):
        sample_per_class(np.array([0] * 12 + [1] * 12 + [2] * 12), 10, 2, 0, num_classes=4)
    with pytest.raises(ValueError, match=r"out of range; valid labels are \[0, 2\)"):
        sample_per_class(np.array([0] * 12 + [1] * 12 + [2] * 12), 10, 2, 0, num_classes=2)
    with pytest.raises(ValueError, match="shots must be an integer >= 1"):
        sample_per_class(labels, 0, 2, 0)
