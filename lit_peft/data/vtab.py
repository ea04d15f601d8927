"""VTAB-1k image classification (:class:`VTABDataModule`).

Protocol (BOFT paper Table 4; see ``docs/protocols.md``, section *VTAB-1K*): 19 tasks, 800 training + 200
validation images per task; hyperparameters are chosen on train800 → val200, the reported number trains on all
1000 images (``train800val200``) and is scored on the task's original test set. Images are resized to 224×224
(bicubic) with **no augmentation**. Data come in the widely used *prepared VTAB-1k layout*: one folder per task holding
``train800.txt``, ``val200.txt``, ``train800val200.txt`` and ``test.txt``, each line
``<image path relative to the task folder> <label>``. For the tasks torchvision ships, the 800/200 split can
instead be drawn (seeded) from the torchvision train split (``source: torchvision``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from torch.utils.data import Dataset, Subset

from .base import ImageDataModule, _check_int, _unknown
from .datasets import ImageListDataset
from .sources import vtab_torchvision
from .tasks import (
    _HOLDOUT_SEED,
    _TV_UNSUPPORTED_REASON,
    LIST_LAYOUT_TASKS,
    VTAB_FOLDER_ALIASES,
    VTAB_LIST_FILES,
    VTAB_TASKS,
    VTAB_TORCHVISION_TASKS,
)
from .transforms import eval_transform


class VTABDataModule(ImageDataModule):
    """VTAB-1k (BOFT paper Table 4 protocol): 800 train + 200 val images per task, original test set.

    ``final: false`` trains on ``train800`` and validates on ``val200`` (for choosing hyperparameters);
    ``final: true`` trains on all 1000 (``train800val200``) and validates on the test set, which is how the
    published numbers are produced. ``test`` always scores the test set; ``predict`` runs over it too.
    Images are resized to ``img_size``×``img_size`` (bicubic) and normalised, with no augmentation.

    Args:
        task: one of the 19 VTAB-1k tasks (:data:`VTAB_TASKS`), e.g. ``cifar100``, ``dmlab``, ``smallnorb_ele``,
            or a task of :data:`LIST_LAYOUT_TASKS` in the same layout (``mnist``, ``fashion_mnist``: the image
            assets of ``python -m lit_peft.assets``, whose folder is the ``data_root``).
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
        mean: per-channel normalisation mean; null: the connected model's (``data_config``), else ImageNet's.
        std: per-channel normalisation std; null: as for ``mean``.
        seed: seeds the training-loader shuffle and, with ``source: torchvision``, the 800/200 draw. Keep it
            fixed across repeated runs to keep the split fixed, as in VTAB-1k.
        last_batch: the epoch's last training batch when the batch size does not divide the training set:
            ``pad`` (default: filled up with the epoch's first examples), ``drop`` (left out) or ``partial``
            (short). ``pad`` and ``drop`` give N processes of batch B exactly the batches of one process of batch
            N·B (``lit_peft.data.sampling.EpochShuffleSampler``).
        download: with ``source: torchvision``, let torchvision download the data in ``prepare_data``.
        verify_images: with ``source: folder``, open and decode every listed image at setup (a truncated or
            unreadable file fails before training rather than when its batch comes up); listed images that do
            not exist are always found at setup.
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
        last_batch: Literal["pad", "drop", "partial"] = "pad",
        download: bool = False,
        verify_images: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, mean=mean, std=std, seed=seed,
                         last_batch=last_batch)
        if task not in VTAB_TASKS and task not in LIST_LAYOUT_TASKS:
            raise _unknown("VTAB task", task, [*VTAB_TASKS, *LIST_LAYOUT_TASKS])
        if source not in ("folder", "torchvision"):
            raise ValueError(f"unknown source {source!r}; valid: 'folder' (prepared VTAB-1k layout), 'torchvision'")
        if source == "torchvision" and task not in VTAB_TORCHVISION_TASKS:
            reason = _TV_UNSUPPORTED_REASON.get(task, "torchvision does not provide this task")
            raise ValueError(
                f"VTAB task {task!r} cannot be built from torchvision ({reason}); use source: folder with the "
                f"prepared VTAB-1k layout (<data_root>/{task}/{{{','.join(VTAB_LIST_FILES)}}}). "
                f"Tasks available from torchvision: {', '.join(VTAB_TORCHVISION_TASKS)}"
            )
        _check_int("img_size", img_size)
        self.save_hyperparameters()
        self.task = task
        self.data_root = data_root
        self.source = source
        self.final = bool(final)
        self.img_size = img_size
        self.download = bool(download)
        self.verify_images = bool(verify_images)

    @property
    def num_classes(self) -> int:
        """Number of classes of the task (:data:`VTAB_TASKS`, :data:`LIST_LAYOUT_TASKS`)."""
        return VTAB_TASKS.get(self.task) or LIST_LAYOUT_TASKS[self.task]

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
            setattr(self, f"{split}_set", ImageListDataset(folder, name, tf, num_classes=self.num_classes,
                                                           verify=self.verify_images))

    # -- torchvision ---------------------------------------------------------------------------------------------

    def _setup_torchvision(self, train: bool, val: bool, test: bool) -> None:
        spec = VTAB_TORCHVISION_TASKS[self.task]
        mean, std = self.resolve_normalization()
        tf = eval_transform(self.img_size, mean, std)
        full = vtab_torchvision(self.task, self.data_root, spec.train_kwargs, tf, download=False)
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
                test_set = vtab_torchvision(self.task, self.data_root, spec.test_kwargs, tf, download=False)
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
            vtab_torchvision(self.task, self.data_root, spec.train_kwargs, None, download=True)
            if spec.test_kwargs is not None:
                vtab_torchvision(self.task, self.data_root, spec.test_kwargs, None, download=True)

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets the stage needs (``fit``: train+val, ``validate``: val, ``test``/``predict``: test)."""
        train, val, test = self._setup_stages(stage)
        if self.source == "folder":
            self._setup_folder(train, val, test)
        else:
            self._setup_torchvision(train, val, test)
