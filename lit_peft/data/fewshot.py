"""Few-shot image classification (:class:`FewShotDataModule`).

Protocol (SVFT paper; see ``docs/protocols.md``, section *Few-shot*): CIFAR-100, Food101, Flowers102, RESISC45;
``shots`` (10) training and ``val_shots`` (2) validation images **per class**, sampled with a seeded generator from
the train split (:func:`~lit_peft.data.sample_per_class`), the full test split for testing; resize to 224, no
augmentation.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

from torch.utils.data import Dataset, Subset

from .base import ImageDataModule, _check_int, _unknown
from .datasets import HFImageDataset, _labels_of, sample_per_class
from .sources import fewshot_torchvision, imagefolder, resisc45_split
from .tasks import FEWSHOT_DATASETS
from .transforms import eval_transform


class FewShotDataModule(ImageDataModule):
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
        last_batch: the epoch's last training batch when the batch size does not divide the training set:
            ``pad`` (default: filled up with the epoch's first examples), ``drop`` (left out) or ``partial``
            (short). ``pad`` and ``drop`` give N processes of batch B exactly the batches of one process of batch
            N·B (``lit_peft.data.sampling.EpochShuffleSampler``).
        img_size: side of the square network input (224).
        batch_size: batch size of every loader (64).
        num_workers: DataLoader worker processes.
        mean: per-channel normalisation mean; null: the connected model's (``data_config``), else ImageNet's.
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
        last_batch: Literal["pad", "drop", "partial"] = "pad",
        img_size: int = 224,
        batch_size: int = 64,
        num_workers: int = 4,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        download: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, mean=mean, std=std, seed=seed,
                         last_batch=last_batch)
        if dataset not in FEWSHOT_DATASETS:
            raise _unknown("few-shot dataset", dataset, list(FEWSHOT_DATASETS))
        _check_int("shots", shots)
        _check_int("val_shots", val_shots, minimum=0)
        _check_int("img_size", img_size)
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
    def task(self) -> str:
        """The dataset's name (``dataset``)."""
        return self.dataset

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

    def _torchvision(self, split: str, transform: Callable | None, download: bool) -> Dataset:
        return fewshot_torchvision(self.dataset, self.data_root, split, transform, download, self.local_dir())

    def _hub(self, split: str, transform: Callable | None) -> Dataset:
        return HFImageDataset(resisc45_split(split, self.data_root, self.local_dir()), transform)

    def _split(self, split: str, transform: Callable | None) -> Dataset:
        src = self.data_source()
        if src == "imagefolder":
            return imagefolder(self.local_dir() / split, transform, self.dataset, self.num_classes)
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
        train, val, test = self._setup_stages(stage)
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
