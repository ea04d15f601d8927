"""Image classification data for the vision experiments: VTAB-1k, SVFT few-shot, and the sklearn-digits demo.

Every datamodule yields ``(images, labels)`` batches: ``images`` a float tensor ``(B, 3, img_size, img_size)``
normalised with the backbone's mean/std, ``labels`` int64 class indices in ``[0, num_classes)``.

Protocols (see ``docs``/``experiments.md``):

* **VTAB-1k** (:class:`VTABDataModule`, BOFT paper Table 4): 19 tasks, 800 training + 200 validation images per
  task; hyperparameters are chosen on train800 → val200, the reported number trains on all 1000 images
  (``train800val200``) and is scored on the task's original test set. Images are resized to 224×224 (bicubic)
  with **no augmentation**. Data come in the widely used *prepared VTAB-1k layout*: one folder per task holding
  ``train800.txt``, ``val200.txt``, ``train800val200.txt`` and ``test.txt``, each line
  ``<image path relative to the task folder> <label>``. For the tasks torchvision ships, the 800/200 split can
  instead be drawn (seeded) from the torchvision train split (``source: torchvision``).
* **Few-shot** (:class:`FewShotDataModule`, SVFT paper): CIFAR-100, Food101, Flowers102, RESISC45; ``shots``
  (10) training and ``val_shots`` (2) validation images **per class**, sampled with a seeded generator from the
  train split (:func:`sample_per_class`), the full test split for testing; resize to 224, no augmentation.
* **Digits demo** (:class:`DigitsDataModule`): the 1,797 real 8×8 handwritten digits that scikit-learn ships
  (no download), upsampled and replicated to three channels, with a seeded stratified train/val/test split; a
  CPU-sized stand-in for a fine-tuning task (pretrain on digits 0–4, adapt to 5–9).

Mean/std: when ``mean``/``std`` are left ``None`` they are taken from the LightningModule being trained
(``trainer.lightning_module.data_config["mean"/"std"]``, timm's resolved data config), else ImageNet defaults.
"""

from __future__ import annotations

import difflib
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset, TensorDataset
from torchvision import transforms as T

from .sampling import make_loader

__all__ = [
    "VTAB_TASKS",
    "VTAB_LIST_FILES",
    "VTAB_TORCHVISION_TASKS",
    "FEWSHOT_DATASETS",
    "ImageListDataset",
    "HFImageDataset",
    "VTABDataModule",
    "FewShotDataModule",
    "DigitsDataModule",
    "sample_per_class",
    "resolve_normalization",
    "eval_transform",
]

# --------------------------------------------------------------------------------------------------------------
# Task tables
# --------------------------------------------------------------------------------------------------------------

#: The 19 VTAB-1k tasks in the order of the papers' tables (natural | specialized | structured) → #classes.
VTAB_TASKS: OrderedDict[str, int] = OrderedDict(
    [
        # natural
        ("cifar100", 100),
        ("caltech101", 102),  # 101 object categories + the background class, as in tfds / VTAB
        ("dtd", 47),
        ("oxford_flowers102", 102),
        ("oxford_iiit_pet", 37),
        ("svhn", 10),
        ("sun397", 397),
        # specialized
        ("patch_camelyon", 2),
        ("eurosat", 10),
        ("resisc45", 45),
        ("diabetic_retinopathy", 5),
        # structured
        ("clevr_count", 8),
        ("clevr_dist", 6),
        ("dmlab", 6),
        ("kitti_dist", 4),
        ("dsprites_loc", 16),
        ("dsprites_ori", 16),
        ("smallnorb_azi", 18),
        ("smallnorb_ele", 9),
    ]
)

#: The list files of one task folder in the prepared VTAB-1k layout.
VTAB_LIST_FILES: tuple[str, ...] = ("train800.txt", "val200.txt", "train800val200.txt", "test.txt")

#: Folder names used by the common prepared VTAB-1k release (NOAH / ``vtab-1k.zip``) where they differ from ours.
VTAB_FOLDER_ALIASES: dict[str, tuple[str, ...]] = {"cifar100": ("cifar",), "kitti_dist": ("kitti",)}

#: Few-shot datasets of the SVFT paper → #classes.
FEWSHOT_DATASETS: dict[str, int] = {"cifar100": 100, "food101": 101, "flowers102": 102, "resisc45": 45}

#: Hugging Face hub id used for RESISC45 (columns ``image``, ``label``; splits ``train``/``validation``/``test``).
RESISC45_HUB_ID = "timm/resisc45"


@dataclass(frozen=True)
class _TVSource:
    """How to get one VTAB task from torchvision."""

    cls_name: str
    train_kwargs: dict[str, Any]
    #: kwargs of the official test split; ``None``: torchvision has no split, hold out ``holdout`` of the data.
    test_kwargs: dict[str, Any] | None
    holdout: float = 0.0
    label_offset: int = 0  # subtracted from torchvision's label


#: VTAB tasks that ``source: torchvision`` can build (test split: official where torchvision has one).
VTAB_TORCHVISION_TASKS: dict[str, _TVSource] = {
    "cifar100": _TVSource("CIFAR100", {"train": True}, {"train": False}),
    "dtd": _TVSource("DTD", {"split": "train", "partition": 1}, {"split": "test", "partition": 1}),
    "oxford_flowers102": _TVSource("Flowers102", {"split": "train"}, {"split": "test"}),
    "oxford_iiit_pet": _TVSource("OxfordIIITPet", {"split": "trainval"}, {"split": "test"}),
    "svhn": _TVSource("SVHN", {"split": "train"}, {"split": "test"}),
    "patch_camelyon": _TVSource("PCAM", {"split": "train"}, {"split": "test"}),
    # CLEVR's test split is unlabelled; VTAB tests on CLEVR val. Label = #objects - 3 (3..10 → 0..7).
    "clevr_count": _TVSource("CLEVRClassification", {"split": "train"}, {"split": "val"}, label_offset=3),
    # No official split in torchvision: a fixed 20% hold-out (VTAB: EuroSAT train[80%:], SUN397 ~20% test).
    "eurosat": _TVSource("EuroSAT", {}, None, holdout=0.2),
    "sun397": _TVSource("SUN397", {}, None, holdout=0.2),
}

#: Why the other VTAB tasks cannot come from torchvision.
_TV_UNSUPPORTED_REASON: dict[str, str] = {
    "caltech101": "torchvision's Caltech101 drops the background class (101 classes, VTAB has 102) and has no "
    "train/test split",
}

#: Seed of the fixed test hold-out for torchvision datasets without a test split (independent of ``seed`` so
#: every run is scored on the same images).
_HOLDOUT_SEED = 0


# --------------------------------------------------------------------------------------------------------------
# Transforms and normalisation
# --------------------------------------------------------------------------------------------------------------


class ToRGB:
    """PIL image → RGB PIL image (grayscale, palette, RGBA, CMYK inputs all become 3-channel)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == "RGB" else img.convert("RGB")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class _SubtractLabel:
    """Target transform ``y -> y - offset`` (picklable, for worker processes)."""

    def __init__(self, offset: int) -> None:
        self.offset = offset

    def __call__(self, y: int) -> int:
        return int(y) - self.offset


def eval_transform(img_size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """The VTAB / few-shot transform: RGB, resize to ``img_size``×``img_size`` (bicubic), tensor, normalise.

    No augmentation, no crop: the protocols of both papers resize the whole image.
    """
    return T.Compose(
        [
            ToRGB(),
            T.Resize((img_size, img_size), interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.ToTensor(),
            T.Normalize(mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std)),
        ]
    )


def _check_norm_arg(name: str, value: Sequence[float] | None) -> tuple[float, float, float] | None:
    if value is None:
        return None
    try:
        vals = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be three floats (one per RGB channel) or null, got {value!r}") from None
    if len(vals) != 3:
        raise ValueError(f"{name} must be three floats (one per RGB channel) or null, got {len(vals)}: {value!r}")
    if name == "std" and any(v <= 0 for v in vals):
        raise ValueError(f"std must be positive in every channel, got {vals}")
    return vals  # type: ignore[return-value]


def _check_positive(name: str, value: int, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def resolve_normalization(
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    trainer: Any = None,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) to normalise with.

    Explicit values win; a ``None`` is filled from ``trainer.lightning_module.data_config`` (timm's resolved data
    config of the backbone being trained) when a trainer with such a module is attached, else from timm's
    ImageNet defaults.
    """
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    cfg: Mapping[str, Any] | None = None
    if (mean is None or std is None) and trainer is not None:
        try:
            module = trainer.lightning_module
        except Exception:  # a trainer without a model attached yet
            module = None
        candidate = getattr(module, "data_config", None) if module is not None else None
        if isinstance(candidate, Mapping):
            cfg = candidate
    if mean is None:
        mean = cfg["mean"] if cfg is not None and cfg.get("mean") is not None else IMAGENET_DEFAULT_MEAN
    if std is None:
        std = cfg["std"] if cfg is not None and cfg.get("std") is not None else IMAGENET_DEFAULT_STD
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


# --------------------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------------------


class ImageListDataset(Dataset):
    """Images listed in a text file, one ``<relative/image/path> <label>`` per line (the VTAB-1k list files).

    Args:
        root: the folder image paths are relative to (a VTAB-1k task folder).
        list_file: the list file, relative to ``root`` (or absolute).
        transform: applied to the RGB PIL image; ``None`` returns the PIL image.
        num_classes: if given, every label must lie in ``[0, num_classes)``.

    The list is parsed and checked when the dataset is built (missing folder/file, malformed line, label out of
    range: errors name the file and line); images are opened lazily, and an unreadable image raises naming the
    image file and the list line that refers to it. Blank lines are skipped; paths may contain spaces (the label
    is the last field).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        list_file: str | os.PathLike,
        transform: Callable | None = None,
        num_classes: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.list_file = self.root / list_file
        self.transform = transform
        self.num_classes = num_classes
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root} (needed for list file {list_file})")
        if not self.list_file.is_file():
            present = sorted(p.name for p in self.root.glob("*.txt"))
            raise FileNotFoundError(
                f"list file not found: {self.list_file}; expected one of {list(VTAB_LIST_FILES)} in {self.root} "
                f"(list files present there: {present or 'none'})"
            )
        self.samples: list[tuple[str, int]] = []
        self._line_numbers: list[int] = []
        with open(self.list_file, encoding="utf-8") as f:
            for lineno, raw in enumerate(f, start=1):
                line = raw.strip()
                if not line:
                    continue
                parts = line.rsplit(maxsplit=1)
                if len(parts) != 2:
                    raise ValueError(
                        f"{self.list_file}:{lineno}: malformed line {line!r}; expected '<relative image path> <label>'"
                    )
                rel, label_str = parts
                try:
                    label = int(label_str)
                except ValueError:
                    raise ValueError(
                        f"{self.list_file}:{lineno}: malformed line {line!r}; the label {label_str!r} is not an "
                        "integer (expected '<relative image path> <label>')"
                    ) from None
                if label < 0 or (num_classes is not None and label >= num_classes):
                    valid = f"[0, {num_classes})" if num_classes is not None else ">= 0"
                    raise ValueError(
                        f"{self.list_file}:{lineno}: label {label} out of range; valid labels are {valid}"
                        + (f" for {num_classes} classes" if num_classes is not None else "")
                    )
                self.samples.append((rel, label))
                self._line_numbers.append(lineno)

    @property
    def targets(self) -> list[int]:
        """All labels, in list order."""
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, index: int) -> Image.Image:
        """The RGB PIL image of sample ``index``; errors name the image file and its list line."""
        rel, _ = self.samples[index]
        path = self.root / rel
        where = f"{self.list_file}:{self._line_numbers[index]}"
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path} (listed at {where})")
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise OSError(f"cannot read image file {path} (listed at {where}): {e}") from e

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = self.load_image(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.samples[index][1]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(list_file={str(self.list_file)!r}, n={len(self)})"


class HFImageDataset(Dataset):
    """A Hugging Face ``datasets`` split with an image and a label column, as ``(transform(image), label)``."""

    def __init__(self, hf_dataset: Any, transform: Callable | None = None, image_key: str = "image",
                 label_key: str = "label") -> None:
        missing = [k for k in (image_key, label_key) if k not in hf_dataset.column_names]
        if missing:
            raise KeyError(f"dataset lacks column(s) {missing}; its columns are {hf_dataset.column_names}")
        self.ds = hf_dataset
        self.transform = transform
        self.image_key = image_key
        self.label_key = label_key

    @property
    def targets(self) -> list[int]:
        return [int(y) for y in self.ds[self.label_key]]

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        ex = self.ds[int(index)]
        img = ex[self.image_key]
        if not isinstance(img, Image.Image):
            img = Image.fromarray(np.asarray(img))
        img = img.convert("RGB")
        if self.transform is not None:
            img = self.transform(img)
        return img, int(ex[self.label_key])


def _labels_of(ds: Dataset) -> np.ndarray:
    """Labels of a dataset without loading images (``targets`` / ``_labels`` / concatenations / subsets)."""
    if isinstance(ds, ConcatDataset):
        return np.concatenate([_labels_of(d) for d in ds.datasets])
    if isinstance(ds, Subset):
        return _labels_of(ds.dataset)[np.asarray(ds.indices, dtype=np.int64)]
    for attr in ("targets", "_labels", "labels"):
        labels = getattr(ds, attr, None)
        if labels is not None:
            return np.asarray(labels, dtype=np.int64)
    raise TypeError(f"cannot read the labels of {type(ds).__name__} without loading every image")


# --------------------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------------------


def sample_per_class(
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    shots: int,
    val_shots: int,
    seed: int,
    *,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
) -> tuple[list[int], list[int]]:
    """Few-shot split (SVFT protocol): ``shots`` training and ``val_shots`` validation indices per class.

    Each class's indices are shuffled with a generator seeded by ``seed`` (numpy ``default_rng``); its first
    ``shots`` go to training, the next ``val_shots`` to validation, so the two never overlap. Deterministic for a
    seed; results are class-major (all of class 0, then class 1, ...).

    Args:
        labels: the class index of every example of the train split.
        num_classes: if given, every class in ``[0, num_classes)`` must be present (a missing class is an error
            rather than silently absent from training).
        class_names: used in error messages.

    Raises:
        ValueError: a class with fewer than ``shots + val_shots`` examples (naming the class and its count).
    """
    _check_positive("shots", shots)
    _check_positive("val_shots", val_shots, minimum=0)
    y = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {y.shape}")
    y = y.astype(np.int64, copy=False)
    need = shots + val_shots
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) and (classes[0] < 0 or (num_classes is not None and classes[-1] >= num_classes)):
        bad = [int(c) for c in classes if c < 0 or (num_classes is not None and c >= num_classes)]
        valid = f"[0, {num_classes})" if num_classes is not None else ">= 0"
        raise ValueError(f"labels {bad[:10]} out of range; valid labels are {valid}")
    present = dict(zip(classes.tolist(), counts.tolist()))
    all_classes = list(range(num_classes)) if num_classes is not None else classes.tolist()

    def name(c: int) -> str:
        known = class_names is not None and 0 <= c < len(class_names)
        return f"class {c}" + (f" ({class_names[c]!r})" if known else "")  # type: ignore[index]

    short = [(c, present.get(c, 0)) for c in all_classes if present.get(c, 0) < need]
    if short:
        listed = ", ".join(f"{name(c)} has {n}" for c, n in short[:10])
        more = f" (and {len(short) - 10} more classes)" if len(short) > 10 else ""
        raise ValueError(
            f"too few images for shots={shots} + val_shots={val_shots} = {need} per class: {listed}{more}"
        )
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    order = perm[np.argsort(y[perm], kind="stable")]  # grouped by class, shuffled within each class
    train_idx: list[int] = []
    val_idx: list[int] = []
    start = 0
    for c, n in zip(classes.tolist(), counts.tolist()):
        block = order[start : start + n]
        start += n
        train_idx.extend(int(i) for i in block[:shots])
        val_idx.extend(int(i) for i in block[shots:need])
    return train_idx, val_idx


# --------------------------------------------------------------------------------------------------------------
# Datamodules
# --------------------------------------------------------------------------------------------------------------


class _ImageDataModule(L.LightningDataModule):
    """Shared loader and normalisation logic."""

    train_set: Dataset | None
    val_set: Dataset | None
    test_set: Dataset | None

    def __init__(self, *, batch_size: int, num_workers: int, mean: Any, std: Any, seed: int) -> None:
        super().__init__()
        _check_positive("batch_size", batch_size)
        _check_positive("num_workers", num_workers, minimum=0)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.mean = _check_norm_arg("mean", mean)
        self.std = _check_norm_arg("std", std)
        self.seed = int(seed)
        self.train_set = self.val_set = self.test_set = None

    @property
    def num_classes(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    def resolve_normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Mean/std in effect: explicit args, else the trained module's ``data_config``, else ImageNet's."""
        return resolve_normalization(self.mean, self.std, self.trainer)

    def _loader(self, ds: Dataset | None, split: str, shuffle: bool = False) -> DataLoader:
        if ds is None:
            raise RuntimeError(
                f"{type(self).__name__}: the {split} set is not built; call setup() for the matching stage first "
                "(the Trainer does this)"
            )
        return make_loader(ds, self.batch_size, shuffle, self.seed, self.num_workers)

    def train_dataloader(self) -> DataLoader:
        """Training loader, shuffled per epoch from ``(seed, epoch)`` (resumable, see ``EpochShuffleSampler``)."""
        return self._loader(self.train_set, "train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, "validation")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, "test")

    def predict_dataloader(self) -> DataLoader:
        """The test set (with labels)."""
        return self._loader(self.test_set, "test")


def _stages(stage: str | None) -> tuple[bool, bool, bool]:
    """(train, val, test) needed for a Lightning stage; ``None`` builds everything."""
    valid = (None, "fit", "validate", "test", "predict")
    if stage not in valid:
        raise ValueError(f"unknown stage {stage!r}; valid stages are {valid}")
    return stage in (None, "fit"), stage in (None, "fit", "validate"), stage in (None, "test", "predict")


def _unknown(kind: str, value: str, valid: Sequence[str]) -> ValueError:
    close = difflib.get_close_matches(value, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"unknown {kind} {value!r}{hint}; valid: {', '.join(valid)}")


class VTABDataModule(_ImageDataModule):
    """VTAB-1k (BOFT paper Table 4 protocol): 800 train + 200 val images per task, original test set.

    ``final: false`` trains on ``train800`` and validates on ``val200`` (for choosing hyperparameters);
    ``final: true`` trains on all 1000 (``train800val200``) and validates on the test set, which is how the
    published numbers are produced. ``test`` always scores the test set; ``predict`` runs over it too.
    Images are resized to ``img_size``×``img_size`` (bicubic) and normalised, with no augmentation.

    Args:
        task: one of the 19 VTAB-1k tasks (:data:`VTAB_TASKS`), e.g. ``cifar100``, ``dmlab``, ``smallnorb_ele``.
        data_root: with ``source: folder``, the folder holding one sub-folder per task in the prepared VTAB-1k
            layout (``<data_root>/<task>/{train800,val200,train800val200,test}.txt``; the folder names ``cifar``
            and ``kitti`` of the common release are accepted for ``cifar100`` and ``kitti_dist``). With
            ``source: torchvision``, torchvision's dataset root.
        source: ``folder`` (the prepared layout; all 19 tasks) or ``torchvision`` (800/200 drawn with ``seed``
            from torchvision's train split, its test split for test; only the tasks in
            :data:`VTAB_TORCHVISION_TASKS`). The torchvision split is *not* the official VTAB-1k one, so its
            numbers are not comparable to the papers' to the last digit.
        final: train on train800val200 and validate on test (true), or train on train800 and validate on
            val200 (false).
        img_size: side of the square network input (224 in the protocol).
        batch_size: batch size of every loader (64 in the protocol).
        num_workers: DataLoader worker processes.
        mean: per-channel normalisation mean; null: the backbone's (``data_config``), else ImageNet's.
        std: per-channel normalisation std; null: as for ``mean``.
        seed: seeds the training-loader shuffle and, with ``source: torchvision``, the 800/200 draw. Keep it
            fixed across repeated runs to keep the split fixed, as in VTAB-1k.
        download: with ``source: torchvision``, let torchvision download the data in ``prepare_data``.
    """

    def __init__(
        self,
        task: str,
        data_root: str,
        source: Literal["folder", "torchvision"] = "folder",
        final: bool = False,
        img_size: int = 224,
        batch_size: int = 64,
        num_workers: int = 4,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        seed: int = 42,
        download: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, mean=mean, std=std, seed=seed)
        if task not in VTAB_TASKS:
            raise _unknown("VTAB task", task, list(VTAB_TASKS))
        if source not in ("folder", "torchvision"):
            raise ValueError(f"unknown source {source!r}; valid: 'folder' (prepared VTAB-1k layout), 'torchvision'")
        if source == "torchvision" and task not in VTAB_TORCHVISION_TASKS:
            reason = _TV_UNSUPPORTED_REASON.get(task, "torchvision does not provide this task")
            raise ValueError(
                f"VTAB task {task!r} cannot be built from torchvision ({reason}); use source: folder with the "
                f"prepared VTAB-1k layout (<data_root>/{task}/{{{','.join(VTAB_LIST_FILES)}}}). "
                f"Tasks available from torchvision: {', '.join(VTAB_TORCHVISION_TASKS)}"
            )
        _check_positive("img_size", img_size)
        self.save_hyperparameters()
        self.task = task
        self.data_root = data_root
        self.source = source
        self.final = bool(final)
        self.img_size = img_size
        self.download = bool(download)

    @property
    def num_classes(self) -> int:
        """Number of classes of the task (:data:`VTAB_TASKS`)."""
        return VTAB_TASKS[self.task]

    # -- folder layout -------------------------------------------------------------------------------------------

    def task_dir(self) -> Path:
        """The task's folder in the prepared layout; raises ``FileNotFoundError`` saying what was expected."""
        root = Path(self.data_root)
        names = (self.task, *VTAB_FOLDER_ALIASES.get(self.task, ()))
        for n in names:
            if (root / n).is_dir():
                return root / n
        looked = " or ".join(str(root / n) for n in names)
        where = "" if root.is_dir() else f" (data_root {root} itself does not exist)"
        raise FileNotFoundError(
            f"VTAB-1k data for task {self.task!r} not found: no folder {looked}{where}. Expected the prepared "
            f"VTAB-1k layout <data_root>/<task>/ holding {', '.join(VTAB_LIST_FILES)} (lines "
            "'<image path relative to the task folder> <label>'), or use source: torchvision for "
            f"{', '.join(VTAB_TORCHVISION_TASKS)}"
        )

    def _list_files(self, train: bool, val: bool, test: bool) -> dict[str, str]:
        files = {}
        if train:
            files["train"] = "train800val200.txt" if self.final else "train800.txt"
        if val:
            files["val"] = "test.txt" if self.final else "val200.txt"
        if test:
            files["test"] = "test.txt"
        return files

    def _setup_folder(self, train: bool, val: bool, test: bool) -> None:
        folder = self.task_dir()
        files = self._list_files(train, val, test)
        missing = sorted({f for f in files.values() if not (folder / f).is_file()})
        if missing:
            raise FileNotFoundError(
                f"VTAB-1k task folder {folder} lacks {', '.join(missing)} (needed with final={self.final}); a "
                f"task folder must hold {', '.join(VTAB_LIST_FILES)}"
            )
        mean, std = self.resolve_normalization()
        tf = eval_transform(self.img_size, mean, std)
        for split, name in files.items():
            setattr(self, f"{split}_set", ImageListDataset(folder, name, tf, num_classes=self.num_classes))

    # -- torchvision ---------------------------------------------------------------------------------------------

    def _tv_dataset(self, kwargs: dict[str, Any], transform: Callable | None, download: bool) -> Dataset:
        import torchvision.datasets as tvd

        spec = VTAB_TORCHVISION_TASKS[self.task]
        cls = getattr(tvd, spec.cls_name, None)
        if cls is None:
            raise RuntimeError(
                f"this torchvision lacks datasets.{spec.cls_name} (needed for VTAB task {self.task!r}); upgrade "
                "torchvision or use source: folder"
            )
        target_tf = _SubtractLabel(spec.label_offset) if spec.label_offset else None
        try:
            return cls(self.data_root, transform=transform, target_transform=target_tf, download=download,
                       **kwargs)
        except (RuntimeError, OSError) as e:  # torchvision: "Dataset not found or corrupted ..."
            raise FileNotFoundError(
                f"torchvision {spec.cls_name} (VTAB task {self.task!r}, split {kwargs or 'all'}) could not be "
                f"loaded from {self.data_root}: {e}. Set download: true (data.init_args.download) to fetch it, "
                "point data_root at an existing copy, or use source: folder with the prepared VTAB-1k layout"
            ) from e

    def _setup_torchvision(self, train: bool, val: bool, test: bool) -> None:
        spec = VTAB_TORCHVISION_TASKS[self.task]
        mean, std = self.resolve_normalization()
        tf = eval_transform(self.img_size, mean, std)
        full = self._tv_dataset(spec.train_kwargs, tf, download=False)
        pool = np.arange(len(full))
        test_idx = None
        if spec.test_kwargs is None:  # hold out a fixed test split
            perm = np.random.default_rng(_HOLDOUT_SEED).permutation(len(full))
            n_test = int(round(spec.holdout * len(full)))
            test_idx, pool = np.sort(perm[:n_test]), np.sort(perm[n_test:])
        if len(pool) < 1000:
            raise ValueError(
                f"torchvision {spec.cls_name} train split has {len(pool)} images under {self.data_root}; VTAB-1k "
                "needs 1000 (800 train + 200 val)"
            )
        chosen = pool[np.random.default_rng(self.seed).permutation(len(pool))[:1000]]
        train800, val200 = chosen[:800].tolist(), chosen[800:].tolist()
        if test or (val and self.final):
            if spec.test_kwargs is None:
                test_set: Dataset = Subset(full, test_idx.tolist())  # type: ignore[union-attr]
            else:
                test_set = self._tv_dataset(spec.test_kwargs, tf, download=False)
            if test:
                self.test_set = test_set
        if train:
            self.train_set = Subset(full, train800 + val200 if self.final else train800)
        if val:
            self.val_set = test_set if self.final else Subset(full, val200)
        self.split_indices = {"train800": train800, "val200": val200}

    # -- Lightning hooks -----------------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """With ``source: torchvision`` and ``download: true``, download train and test splits (rank 0 only)."""
        if self.source == "torchvision" and self.download:
            spec = VTAB_TORCHVISION_TASKS[self.task]
            self._tv_dataset(spec.train_kwargs, None, download=True)
            if spec.test_kwargs is not None:
                self._tv_dataset(spec.test_kwargs, None, download=True)

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets the stage needs (``fit``: train+val, ``validate``: val, ``test``/``predict``: test)."""
        train, val, test = _stages(stage)
        if self.source == "folder":
            self._setup_folder(train, val, test)
        else:
            self._setup_torchvision(train, val, test)


class FewShotDataModule(_ImageDataModule):
    """Few-shot image classification (SVFT paper protocol): ``shots`` train + ``val_shots`` val images per class.

    Both are sampled per class from the train split with a generator seeded by ``seed``
    (:func:`sample_per_class`; the paper uses seeds 42, 123, 3076); the full test split is the test set. Images
    are resized to ``img_size`` (bicubic), normalised, not augmented.

    Where the data come from (first match wins):

    1. a local ImageFolder layout ``<data_root>/<dataset>/{train,test}/<class>/<image>`` (any dataset; class
       folders sorted by name give the labels, their number must equal the dataset's);
    2. torchvision for ``cifar100`` (CIFAR100), ``food101`` (Food101), ``flowers102`` (Flowers102; its train and
       val splits pooled, 20 images per class, as its train split alone has only 10), with ``data_root`` as
       torchvision's root;
    3. ``resisc45``: ``datasets.load_dataset("timm/resisc45", cache_dir=data_root)`` (read from the cache when
       present, else downloaded by ``datasets``).

    Args:
        dataset: ``cifar100``, ``food101``, ``flowers102`` or ``resisc45``.
        data_root: root of the data (see above).
        shots: training images per class (10 in the paper).
        val_shots: validation images per class (2 in the paper).
        seed: seeds the per-class sampling and the training-loader shuffle.
        img_size: side of the square network input (224).
        batch_size: batch size of every loader (64).
        num_workers: DataLoader worker processes.
        mean: per-channel normalisation mean; null: the backbone's (``data_config``), else ImageNet's.
        std: per-channel normalisation std; null: as for ``mean``.
        download: let torchvision (cifar100/food101/flowers102) or ``datasets`` (resisc45) download the data in
            ``prepare_data`` when no local copy is found.
    """

    def __init__(
        self,
        dataset: Literal["cifar100", "food101", "flowers102", "resisc45"],
        data_root: str,
        shots: int = 10,
        val_shots: int = 2,
        seed: int = 42,
        img_size: int = 224,
        batch_size: int = 64,
        num_workers: int = 4,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        download: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, mean=mean, std=std, seed=seed)
        if dataset not in FEWSHOT_DATASETS:
            raise _unknown("few-shot dataset", dataset, list(FEWSHOT_DATASETS))
        _check_positive("shots", shots)
        _check_positive("val_shots", val_shots, minimum=0)
        _check_positive("img_size", img_size)
        self.save_hyperparameters()
        self.dataset = dataset
        self.data_root = data_root
        self.shots = shots
        self.val_shots = val_shots
        self.img_size = img_size
        self.download = bool(download)
        self.class_names: list[str] | None = None
        self.split_indices: dict[str, list[int]] = {}

    @property
    def num_classes(self) -> int:
        """Number of classes of the dataset (:data:`FEWSHOT_DATASETS`)."""
        return FEWSHOT_DATASETS[self.dataset]

    def local_dir(self) -> Path:
        """``<data_root>/<dataset>``, where a local ImageFolder copy is looked for."""
        return Path(self.data_root) / self.dataset

    def data_source(self) -> str:
        """``imagefolder``, ``torchvision`` or ``hub``: where :meth:`setup` will read the data from."""
        local = self.local_dir()
        has = [(local / s).is_dir() for s in ("train", "test")]
        if any(has):
            if not all(has):
                missing = "train" if not has[0] else "test"
                raise FileNotFoundError(
                    f"local ImageFolder copy of {self.dataset} at {local} lacks its {missing}/ folder; expected "
                    f"{local}/train/<class>/<image> and {local}/test/<class>/<image>"
                )
            return "imagefolder"
        return "hub" if self.dataset == "resisc45" else "torchvision"

    # -- sources -------------------------------------------------------------------------------------------------

    def _imagefolder(self, split: str, transform: Callable | None) -> Dataset:
        from torchvision.datasets import ImageFolder

        folder = self.local_dir() / split
        try:
            ds = ImageFolder(str(folder), transform=transform)
        except (FileNotFoundError, RuntimeError) as e:
            raise FileNotFoundError(f"cannot read ImageFolder {folder}: {e}") from e
        if len(ds.classes) != self.num_classes:
            raise ValueError(
                f"{folder} has {len(ds.classes)} class folders, but {self.dataset} has {self.num_classes} classes; "
                f"expected {folder}/<class>/<image> with one folder per class"
            )
        return ds

    def _torchvision(self, split: str, transform: Callable | None, download: bool) -> Dataset:
        import torchvision.datasets as tvd

        root = self.data_root
        try:
            if self.dataset == "cifar100":
                return tvd.CIFAR100(root, train=split == "train", transform=transform, download=download)
            if self.dataset == "food101":
                return tvd.Food101(root, split=split, transform=transform, download=download)
            if self.dataset == "flowers102":
                if split == "train":
                    return ConcatDataset(
                        [tvd.Flowers102(root, split=s, transform=transform, download=download)
                         for s in ("train", "val")]
                    )
                return tvd.Flowers102(root, split="test", transform=transform, download=download)
        except (RuntimeError, OSError) as e:
            raise FileNotFoundError(
                f"{self.dataset} ({split} split) not found under {root}: {e}. Set download: true "
                f"(data.init_args.download) to fetch it with torchvision, or provide a local ImageFolder copy at "
                f"{self.local_dir()}/{{train,test}}/<class>/<image>"
            ) from e
        raise AssertionError(self.dataset)  # pragma: no cover

    def _hub(self, split: str, transform: Callable | None) -> Dataset:
        try:
            from datasets import load_dataset

            hf = load_dataset(RESISC45_HUB_ID, split=split, cache_dir=self.data_root)
        except Exception as e:
            raise FileNotFoundError(
                f"could not load {RESISC45_HUB_ID} ({split} split, cache_dir={self.data_root}): {e}. Run once with "
                f"internet access (download: true) to fill the cache, or provide a local ImageFolder copy at "
                f"{self.local_dir()}/{{train,test}}/<class>/<image>"
            ) from e
        return HFImageDataset(hf, transform)

    def _split(self, split: str, transform: Callable | None) -> Dataset:
        src = self.data_source()
        if src == "imagefolder":
            return self._imagefolder(split, transform)
        if src == "hub":
            return self._hub(split, transform)
        return self._torchvision(split, transform, download=False)

    # -- Lightning hooks -----------------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """With ``download: true`` and no local ImageFolder copy, download the train and test splits."""
        if not self.download:
            return
        src = self.data_source()
        if src == "torchvision":
            for split in ("train", "test"):
                self._torchvision(split, None, download=True)
        elif src == "hub":
            for split in ("train", "test"):
                self._hub(split, None)

    def setup(self, stage: str | None = None) -> None:
        """Sample the per-class train/val subsets (``fit``/``validate``) and load the test split (``test``)."""
        train, val, test = _stages(stage)
        mean, std = self.resolve_normalization()
        tf = eval_transform(self.img_size, mean, std)
        if train or val:
            full = self._split("train", tf)
            labels = _labels_of(full)
            names = getattr(full, "classes", None)
            self.class_names = list(names) if names is not None else None
            train_idx, val_idx = sample_per_class(
                labels, self.shots, self.val_shots, self.seed, num_classes=self.num_classes,
                class_names=self.class_names,
            )
            self.split_indices = {"train": train_idx, "val": val_idx}
            if train:
                self.train_set = Subset(full, train_idx)
            if val:
                self.val_set = Subset(full, val_idx)
        if test:
            self.test_set = self._split("test", tf)


class DigitsDataModule(_ImageDataModule):
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
        batch_size: batch size of every loader.
        num_workers: DataLoader worker processes (0: load in the main process; the data are in memory).
        mean: per-channel normalisation mean; null: the backbone's (``data_config``), else ImageNet's.
        std: per-channel normalisation std; null: as for ``mean``.
    """

    def __init__(
        self,
        classes: list[int] = [5, 6, 7, 8, 9],  # noqa: B006 - copied below; a list default is the config schema
        img_size: int = 32,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, mean=mean, std=std, seed=seed)
        classes = [int(c) for c in classes]
        if not classes:
            raise ValueError("classes must name at least one digit in 0..9")
        bad = [c for c in classes if not 0 <= c <= 9]
        if bad:
            raise ValueError(f"classes must be digits in 0..9, got {bad}")
        dup = sorted({c for c in classes if classes.count(c) > 1})
        if dup:
            raise ValueError(f"classes must not repeat a digit, got {dup} more than once in {classes}")
        _check_positive("img_size", img_size)
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

        train, val, test = _stages(stage)
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
