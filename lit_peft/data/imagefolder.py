"""Your own images in torchvision's ImageFolder layout (:class:`ImageFolderDataModule`).

Layout: one folder per split under ``data_root``, one folder per class in each split, the images anywhere inside
it::

    <data_root>/train/<class>/<image>      required
    <data_root>/val/<class>/<image>        optional: else no validation, or val_fraction of train held out
    <data_root>/test/<class>/<image>       optional: needed by test, predict and test_after_fit

The class folders of ``train`` sorted by name are the classes (index = position in that order), and every split
uses that same class→index mapping: ``val``/``test`` may lack classes, but a class folder there that ``train``
lacks is an error. Images are files with one of :data:`IMAGE_EXTENSIONS` (any case); hidden files and folders
(names starting with ``.``, e.g. ``.ipynb_checkpoints``) are skipped. The transform is the VTAB / few-shot one
(:func:`~lit_peft.data.transforms.eval_transform`: RGB, resize to ``img_size``, normalise; no augmentation).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from lightning.pytorch.utilities import rank_zero_info
from PIL import UnidentifiedImageError
from torch.utils.data import DataLoader, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from .base import ImageDataModule, _check_int
from .transforms import eval_transform

#: The file suffixes read as images (torchvision's ``IMG_EXTENSIONS``), compared case-insensitively.
IMAGE_EXTENSIONS: tuple[str, ...] = tuple(IMG_EXTENSIONS)

_DEFAULT_DIRS = {"train_dir": "train", "val_dir": "val", "test_dir": "test"}


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _is_image_name(name: str) -> bool:
    return not _hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS)


class _ImageFile:
    """``is_valid_file`` of the split datasets: an image suffix and no hidden file or folder below the split folder
    (a class, not a lambda, so that DataLoader worker processes can pickle it)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def __call__(self, path: str) -> bool:
        parts = Path(os.path.relpath(path, self.folder)).parts
        return _is_image_name(parts[-1]) and not any(_hidden(p) for p in parts[:-1])


def class_folders(folder: Path) -> list[str]:
    """The class folders of a split folder: its sub-folders, hidden ones skipped, sorted by name."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not _hidden(e.name))


def has_image(folder: Path) -> bool:
    """Whether ``folder`` (or a non-hidden folder below it) holds at least one image file; stops at the first."""
    for _, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not _hidden(d)]
        if any(_is_image_name(f) for f in filenames):
            return True
    return False


class ImageFolderSplit(ImageFolder):
    """One split folder ``<folder>/<class>/<image>`` as ``(transform(image), class index)``, with a *given* class
    list (the train folder's) instead of the folder's own, so every split maps a class name to the same index.

    Args:
        data_root: the folder :meth:`item_id` paths are relative to.
        folder: the split folder.
        classes: the class names, in index order; a class with no folder here has no images here.
        transform: applied to the RGB PIL image.
    """

    def __init__(self, data_root: str | os.PathLike, folder: str | os.PathLike, classes: Sequence[str],
                 transform: Callable | None = None) -> None:
        self.data_root = Path(data_root)
        self._fixed_classes = list(classes)
        super().__init__(str(folder), transform=transform, is_valid_file=_ImageFile(str(folder)), allow_empty=True)

    def find_classes(self, directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
        """The given classes (torchvision calls this to map class folders to indices)."""
        return list(self._fixed_classes), {c: i for i, c in enumerate(self._fixed_classes)}

    def item_id(self, index: int) -> str:
        """The image's path relative to ``data_root``, with ``/`` separators (what prediction files name each row
        by), e.g. ``test/cat/0001.jpg``."""
        return Path(os.path.relpath(self.samples[index][0], self.data_root)).as_posix()

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, target = self.samples[index]
        try:
            sample = self.loader(path)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise OSError(f"cannot read image file {path}: {e}") from e
        if self.transform is not None:
            sample = self.transform(sample)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return sample, target


@dataclass(frozen=True)
class FolderLayout:
    """What :meth:`ImageFolderDataModule.layout` found: the split folders (``None``: absent) and the classes."""

    train: Path
    val: Path | None
    test: Path | None
    classes: tuple[str, ...]


class ImageFolderDataModule(ImageDataModule):
    """Fine-tune on your own images: torchvision's ImageFolder layout, ``<data_root>/<split>/<class>/<image>``.

    The classes are the class folders of the train folder, sorted by name (index = position); the validation and
    test folders use the same mapping (a class folder there that train lacks is an error naming it). Validation
    is the ``val_dir`` folder if there is one; without it, ``val_fraction`` > 0 holds out that fraction of each
    class of train (rounded per class, drawn with ``seed``), and ``val_fraction: 0`` means no validation.
    ``test`` scores the ``test_dir`` folder and ``predict`` runs over it (each prediction row's ``id`` is the
    image's path relative to ``data_root``). Images are resized to ``img_size``×``img_size`` (bicubic) and
    normalised, with no augmentation.

    The layout is checked when the module first needs it (``num_classes``, ``data_info()`` — which the CLI calls at
    start-up —, or ``setup``), so a wrong folder fails before any training: ``ValueError`` for a missing
    ``data_root`` or train folder, a class folder without images, fewer than 2 classes, a class in val/test that
    train lacks, a val folder together with ``val_fraction``.

    Args:
        data_root: the folder holding the split folders.
        train_dir: name of the training folder under ``data_root``.
        val_dir: name of the validation folder; used if it exists (a name other than the default must exist);
            null: never use a validation folder.
        test_dir: name of the test folder, for ``test``, ``predict`` and ``test_after_fit``; used if it exists (a
            name other than the default must exist); null: no test folder.
        val_fraction: without a validation folder, the fraction of each class of train held out for validation
            (seeded; in [0, 1)); 0: no validation. Must be 0 when the validation folder exists.
        img_size: side of the square network input.
        batch_size: batch size of every loader.
        num_workers: DataLoader worker processes.
        mean: per-channel normalisation mean; null: the connected model's (``data_config``), else ImageNet's.
        std: per-channel normalisation std; null: as for ``mean``.
        seed: seeds the training-loader shuffle and the ``val_fraction`` hold-out.
        last_batch: the epoch's last training batch when the batch size does not divide the training set:
            ``pad`` (default: filled up with the epoch's first examples), ``drop`` (left out) or ``partial``
            (short). ``pad`` and ``drop`` give N processes of batch B exactly the batches of one process of batch
            N·B (``lit_peft.data.sampling.EpochShuffleSampler``).
    """

    def __init__(
        self,
        data_root: str,
        train_dir: str = "train",
        val_dir: str | None = "val",
        test_dir: str | None = "test",
        val_fraction: float = 0.0,
        img_size: int = 224,
        batch_size: int = 64,
        num_workers: int = 4,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        seed: int = 42,
        last_batch: Literal["pad", "drop", "partial"] = "pad",
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, mean=mean, std=std, seed=seed,
                         last_batch=last_batch)
        if not isinstance(data_root, (str, os.PathLike)) or not str(data_root).strip():
            raise ValueError(f"data_root must be a folder (a non-empty path), got {data_root!r}")
        dirs = {"train_dir": train_dir, "val_dir": val_dir, "test_dir": test_dir}
        for name, value in dirs.items():
            if value is None and name != "train_dir":
                continue
            if not isinstance(value, str) or not value.strip() or value.strip() in (".", ".."):
                also = "" if name == "train_dir" else " or null"
                raise ValueError(f"{name} must be the name of a folder under data_root{also}, got {value!r}")
        given = [v for v in dirs.values() if v is not None]
        if len(set(given)) != len(given):
            raise ValueError(f"train_dir, val_dir and test_dir must name different folders, got {dirs}")
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) \
                or not 0.0 <= float(val_fraction) < 1.0:
            raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction!r}")
        _check_int("img_size", img_size)
        self.save_hyperparameters()
        self.data_root = str(data_root)
        self.train_dir = train_dir
        self.val_dir = val_dir
        self.test_dir = test_dir
        self.val_fraction = float(val_fraction)
        self.img_size = img_size
        self.split_indices: dict[str, list[int]] = {}
        self._layout: FolderLayout | None = None

    # -- the folder layout ---------------------------------------------------------------------------------------

    @property
    def task(self) -> str:
        """The data root's folder name (for messages)."""
        return Path(self.data_root).expanduser().name or str(self.data_root)

    def layout(self) -> FolderLayout:
        """The split folders and classes, checked (once; see the class docstring for the errors)."""
        if self._layout is None:
            self._layout = self._find_layout()
        return self._layout

    def _optional_folder(self, arg: str, root: Path) -> Path | None:
        name = getattr(self, arg)
        if name is None:
            return None
        folder = root / name
        if folder.is_dir():
            return folder
        if name != _DEFAULT_DIRS[arg]:
            raise ValueError(f"{arg}: {folder} is not a folder (an explicitly named {arg} must exist; null: none)")
        return None

    def _find_layout(self) -> FolderLayout:
        root = Path(self.data_root).expanduser()
        expected = f"expected {root}/{self.train_dir}/<class>/<image> (val/ and test/ beside train/ are optional)"
        if not root.exists():
            raise ValueError(f"ImageFolderDataModule: data_root {root} does not exist; {expected}")
        if not root.is_dir():
            raise ValueError(f"ImageFolderDataModule: data_root {root} is not a folder; {expected}")
        train = root / self.train_dir
        if not train.is_dir():
            present = sorted(p.name for p in root.iterdir() if not _hidden(p.name))
            raise ValueError(f"ImageFolderDataModule: no training folder {train}; {expected}. {root} holds: "
                             f"{', '.join(present[:10]) or 'nothing'}{' …' if len(present) > 10 else ''}")
        classes = class_folders(train)
        accepted = f"accepted image extensions: {', '.join(IMAGE_EXTENSIONS)} (any case)"
        if not classes:
            loose = any(_is_image_name(p.name) for p in train.iterdir() if p.is_file())
            why = " (its images lie directly in it; put each class's images in a folder of their own)" if loose else ""
            raise ValueError(f"ImageFolderDataModule: {train} has no class folders{why}; {expected}")
        if len(classes) < 2:
            raise ValueError(f"ImageFolderDataModule: {train} has 1 class folder ({classes[0]!r}); a classifier "
                             f"needs at least 2 classes, one folder each")
        val = self._optional_folder("val_dir", root)
        test = self._optional_folder("test_dir", root)
        if val is not None and self.val_fraction > 0:
            raise ValueError(f"ImageFolderDataModule: val_fraction={self.val_fraction} holds out part of train for "
                             f"validation, but the validation folder {val} exists too; use one: val_fraction: 0 "
                             f"(validate on {val}), or val_dir: null (hold out)")
        known = set(classes)
        for split in (val, test):
            if split is None:
                continue
            extra = [c for c in class_folders(split) if c not in known]
            if extra:
                raise ValueError(f"ImageFolderDataModule: {split} has class folder(s) that {train} lacks: "
                                 f"{', '.join(map(repr, extra))}; every split uses the train folder's classes "
                                 f"({', '.join(classes[:20])}{' …' if len(classes) > 20 else ''})")
        for split in (train, val, test):
            if split is None:
                continue
            names = class_folders(split)
            empty = [split / c for c in names if not has_image(split / c)]
            if empty:
                more = f" (and {len(empty) - 5} more)" if len(empty) > 5 else ""
                shown = ", ".join(str(p) for p in empty[:5]) + more
                raise ValueError(f"ImageFolderDataModule: class folder(s) with no images: {shown}; {accepted}")
            if not names:
                raise ValueError(f"ImageFolderDataModule: {split} has no class folders (expected "
                                 f"{split}/<class>/<image>); remove it, or name no such folder (null)")
        return FolderLayout(train=train, val=val, test=test, classes=tuple(classes))

    @property
    def class_names(self) -> list[str]:
        """The class names in index order: the train folder's class folders, sorted."""
        return list(self.layout().classes)

    @property
    def num_classes(self) -> int:
        """The number of class folders in the train folder."""
        return len(self.layout().classes)

    # -- Lightning hooks -----------------------------------------------------------------------------------------

    def check_can_test(self) -> None:
        """``test``, ``predict`` and ``test_after_fit`` need the test folder."""
        if self.layout().test is None:
            where = (f"{Path(self.data_root).expanduser() / self.test_dir} does not exist" if self.test_dir is not None
                     else "test_dir is null")
            raise ValueError(f"ImageFolderDataModule: no test folder to test or predict on ({where}); add "
                             f"<data_root>/test/<class>/<image>, or set data.init_args.test_dir")

    def _split(self, folder: Path, transform: Callable) -> ImageFolderSplit:
        ds = ImageFolderSplit(Path(self.data_root).expanduser(), folder, self.layout().classes, transform)
        if len(ds) == 0:
            raise ValueError(f"ImageFolderDataModule: {folder} holds no images; accepted image extensions: "
                             f"{', '.join(IMAGE_EXTENSIONS)}")
        return ds

    def _holdout(self, targets: Sequence[int]) -> tuple[list[int], list[int]]:
        """(train, val) indices: ``val_fraction`` of each class (rounded), drawn with ``seed``."""
        y = np.asarray(targets, dtype=np.int64)
        rng = np.random.default_rng(self.seed)
        train_idx: list[int] = []
        val_idx: list[int] = []
        for c, name in enumerate(self.layout().classes):
            idx = np.flatnonzero(y == c)
            idx = idx[rng.permutation(len(idx))]
            k = int(round(self.val_fraction * len(idx)))
            if k >= len(idx):
                raise ValueError(f"ImageFolderDataModule: val_fraction={self.val_fraction} would hold out all "
                                 f"{len(idx)} image(s) of class {name!r}, leaving none to train on; lower it or add "
                                 f"images")
            val_idx.extend(int(i) for i in idx[:k])
            train_idx.extend(int(i) for i in idx[k:])
        if not val_idx:
            raise ValueError(f"ImageFolderDataModule: val_fraction={self.val_fraction} holds out no image (each "
                             f"class's share rounds to 0); raise it or add a validation folder")
        return sorted(train_idx), sorted(val_idx)

    def setup(self, stage: str | None = None) -> None:
        """Build the sets the stage needs (``fit``: train+val, ``validate``: val, ``test``/``predict``: test)."""
        train, val, test = self._setup_stages(stage)
        layout = self.layout()
        if stage in ("test", "predict"):
            self.check_can_test()
        mean, std = self.resolve_normalization()
        tf = eval_transform(self.img_size, mean, std)
        built = []
        if train or (val and self.val_fraction > 0):
            full = self._split(layout.train, tf)
            if self.val_fraction > 0:
                train_idx, val_idx = self._holdout(full.targets)
                self.split_indices = {"train": train_idx, "val": val_idx}
                if train:
                    self.train_set = Subset(full, train_idx)
                if val:
                    self.val_set = Subset(full, val_idx)
                built.append(f"train {len(train_idx)} and validation {len(val_idx)} images ({self.val_fraction:g} "
                             f"of each class of {layout.train} held out, seed {self.seed})")
            else:
                self.train_set = full
                built.append(f"train {len(full)} images ({layout.train})")
        if val and self.val_fraction == 0:
            if layout.val is not None:
                self.val_set = self._split(layout.val, tf)
                built.append(f"validation {len(self.val_set)} images ({layout.val})")
            else:
                self.val_set = None
                built.append("no validation (no validation folder, val_fraction 0)")
        if test and layout.test is not None:
            self.test_set = self._split(layout.test, tf)
            built.append(f"test {len(self.test_set)} images ({layout.test})")
        rank_zero_info(f"ImageFolderDataModule: {len(layout.classes)} classes; " + "; ".join(built))

    def val_dataloader(self) -> DataLoader | list:
        """The validation images; ``[]`` (no validation) without a validation folder and with ``val_fraction: 0``."""
        if self.layout().val is None and self.val_fraction == 0:
            return []
        return super().val_dataloader()

    def test_dataloader(self) -> DataLoader:
        """The test folder's images."""
        self.check_can_test()
        return super().test_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """The test folder's images (with labels), in a fixed order: class by class, file names sorted."""
        self.check_can_test()
        return super().predict_dataloader()


__all__ = ["IMAGE_EXTENSIONS", "FolderLayout", "ImageFolderDataModule", "ImageFolderSplit"]
