"""The base classes of every lit_peft data module, and the checks they share.

:class:`LitPeftDataModule` is the data side of the model↔data hand-over (:mod:`lit_peft.handover`): it offers a
:class:`~lit_peft.handover.DataInfo` (:meth:`~LitPeftDataModule.data_info`, callable right after ``__init__``) and
keeps the model's :class:`~lit_peft.handover.ModelInfo` (:meth:`~LitPeftDataModule.connect_model`); each ``setup``
first connects to the model its ``Trainer`` holds. Nothing in the data package reads the model's attributes.

* :class:`ImageDataModule` (VTAB-1k, few-shot, digits): every module yields ``(images, labels)`` batches:
  ``images`` a float tensor ``(B, 3, img_size, img_size)`` normalised with the backbone's mean/std, ``labels``
  int64 class indices in ``[0, num_classes)``; it exposes ``num_classes``. Mean/std: when ``mean``/``std`` are
  left ``None`` they are taken from the connected model (``ModelInfo.data_config["mean"/"std"]``, timm's resolved
  data config), else ImageNet defaults.
* :class:`TextDataModule` (instruction tuning, GLUE): the tokenizer is a hub id or a local folder
  (``transformers.AutoTokenizer``); left ``None`` it is the one the connected model names
  (``ModelInfo.tokenizer``), so the model and its data cannot disagree on the vocabulary.

Every loader comes from :func:`~lit_peft.data.sampling.make_loader` (resumable, seeded per-epoch shuffling that
never touches the global RNG).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Dataset

from lit_peft.handover import DataInfo, ModelInfo, connect_from_trainer

from .sampling import LAST_BATCH_MODES, make_loader
from .transforms import _check_norm_arg, resolve_normalization

#: What a "not built" loader error tells the user to do, unless the loader says otherwise.
_SETUP_FIRST = "call setup() for the matching stage first (the Trainer does this)"


def _stages(stage: str | None) -> tuple[bool, bool, bool]:
    """(train, val, test) needed for a Lightning stage; ``None`` builds everything."""
    valid = (None, "fit", "validate", "test", "predict")
    if stage not in valid:
        raise ValueError(f"unknown stage {stage!r}; valid stages are {valid}")
    return stage in (None, "fit"), stage in (None, "fit", "validate"), stage in (None, "test", "predict")


def _unknown(kind: str, value: Any, valid: Sequence[str]) -> ValueError:
    """The error for a name that is not in ``valid``, with the closest valid name as a hint."""
    close = difflib.get_close_matches(str(value), list(valid), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"unknown {kind} {value!r}{hint}; valid: {', '.join(valid)}")


def _check_int(name: str, value: Any, minimum: int = 1, optional: bool = False) -> None:
    """``value`` must be an ``int`` (not a ``bool``) ``>= minimum`` (or ``None`` when ``optional``)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{' or null' if optional else ''}, got {value!r}")


class LitPeftDataModule(L.LightningDataModule):
    """The data side of the model↔data hand-over, and the loader plumbing of every lit_peft data module.

    Attributes:
        connected_model: the :class:`~lit_peft.handover.ModelInfo` the model handed over
            (:meth:`connect_model`); ``None`` until a model is connected.
    """

    def __init__(self, *, num_workers: int, seed: int, last_batch: str = "pad") -> None:
        super().__init__()
        _check_int("num_workers", num_workers, minimum=0)
        if last_batch not in LAST_BATCH_MODES:
            raise _unknown("last_batch", last_batch, LAST_BATCH_MODES)
        self.num_workers = num_workers
        self.seed = int(seed)
        self.last_batch = last_batch
        self.connected_model: ModelInfo | None = None

    # -- the hand-over -------------------------------------------------------------------------------------------

    def data_info(self) -> DataInfo:
        """What this data tells its model (overridden by every data module; needs no ``setup``)."""
        return DataInfo(name=type(self).__name__)

    def connect_model(self, info: ModelInfo) -> None:
        """Keep what the model told: its tokenizer, its backbone's data config. Idempotent."""
        if not isinstance(info, ModelInfo):
            raise TypeError(f"{type(self).__name__}.connect_model takes a lit_peft.handover.ModelInfo, got "
                            f"{type(info).__name__}")
        self.connected_model = info

    def connect_trainer(self) -> None:
        """:func:`~lit_peft.handover.connect_from_trainer`: connect to the model of the attached ``Trainer`` (nothing
        without a trainer, or before a model is attached to it)."""
        connect_from_trainer(self.trainer)

    def check_can_test(self) -> None:
        """Raise if ``test`` cannot run with these settings (called before ``fit`` when a test follows it, so a
        missing test split fails before training rather than after it). Nothing to check by default."""

    def _setup_stages(self, stage: str | None) -> tuple[bool, bool, bool]:
        """Where every ``setup`` starts: the (train, val, test) sets ``stage`` needs (:func:`_stages`), after
        connecting to the trainer's model (:meth:`connect_trainer`)."""
        needed = _stages(stage)
        self.connect_trainer()
        return needed

    # -- loaders -------------------------------------------------------------------------------------------------

    def _loader(self, ds: Dataset | None, what: str, batch_size: int, collate: Callable | None = None,
                shuffle: bool = False, fix: str = _SETUP_FIRST) -> DataLoader:
        if ds is None:
            raise RuntimeError(f"{type(self).__name__}: the {what} is not built; {fix}")
        return make_loader(ds, batch_size, shuffle, self.seed, self.num_workers, collate_fn=collate,
                           last_batch=self.last_batch)


class ImageDataModule(LitPeftDataModule):
    """Shared loader and normalisation logic of the image data modules (see the module docstring)."""

    task: str  # the task's name: an attribute or a property of every image data module
    train_set: Dataset | None
    val_set: Dataset | None
    test_set: Dataset | None

    def __init__(self, *, batch_size: int, num_workers: int, mean: Any, std: Any, seed: int,
                 last_batch: str = "pad") -> None:
        _check_int("batch_size", batch_size)
        super().__init__(num_workers=num_workers, seed=seed, last_batch=last_batch)
        self.batch_size = batch_size
        self.mean = _check_norm_arg("mean", mean)
        self.std = _check_norm_arg("std", std)
        self.train_set = self.val_set = self.test_set = None

    @property
    def num_classes(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    def data_info(self) -> DataInfo:
        """The task (every image data module has a ``task``) and its number of classes."""
        return DataInfo(name=type(self).__name__, task=self.task, num_classes=self.num_classes)

    def resolve_normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Mean/std in effect: explicit args, else the connected model's ``data_config``, else ImageNet's."""
        info = self.connected_model
        return resolve_normalization(self.mean, self.std, info.data_config if info is not None else None)

    def train_dataloader(self) -> DataLoader:
        """Training loader, shuffled per epoch from ``(seed, epoch)`` (resumable, see ``EpochShuffleSampler``)."""
        return self._loader(self.train_set, "train set", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, "validation set", self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, "test set", self.batch_size)

    def predict_dataloader(self) -> DataLoader:
        """The test set (with labels)."""
        return self._loader(self.test_set, "test set", self.batch_size)


class TextDataModule(LitPeftDataModule):
    """The tokenizer (explicit, or the connected model's :attr:`~lit_peft.handover.ModelInfo.tokenizer`) and the
    ``datasets`` cache of the text data modules."""

    def __init__(self, *, tokenizer: str | None, num_workers: int, seed: int, cache_dir: str | None,
                 last_batch: str = "pad") -> None:
        super().__init__(num_workers=num_workers, seed=seed, last_batch=last_batch)
        if tokenizer is not None and (not isinstance(tokenizer, str) or not tokenizer.strip()):
            raise ValueError(f"tokenizer must be a hub id or a local folder (a non-empty string) or null, got "
                             f"{tokenizer!r}")
        self.tokenizer_name = tokenizer
        self.cache_dir = cache_dir
        self._tokenizer: Any = None
        self._tokenizer_source: str | None = None

    def tokenizer_source(self) -> str:
        """``tokenizer`` if set, else the connected model's ``ModelInfo.tokenizer``; raises if neither."""
        if self.tokenizer_name:
            return self.tokenizer_name
        info = self.connected_model
        if info is not None and info.tokenizer:
            return str(info.tokenizer)
        why = "no model was connected" if info is None else "the connected model gave no tokenizer"
        raise ValueError(
            f"{type(self).__name__}: no tokenizer given and none to inherit ({why}); set data.init_args.tokenizer "
            "to a hub id or a local tokenizer folder"
        )

    @property
    def tokenizer(self) -> Any:
        """The ``transformers`` tokenizer (loaded with ``AutoTokenizer.from_pretrained`` on first use)."""
        source = self.tokenizer_source()
        if self._tokenizer is None or self._tokenizer_source != source:
            from transformers import AutoTokenizer

            try:
                tok = AutoTokenizer.from_pretrained(source)
            except Exception as e:
                local = Path(source).expanduser()
                where = (f"local folder {local}" if local.is_dir() else
                         f"{source!r} (no local folder by that name; looked up on the hub)")
                raise RuntimeError(f"cannot load the tokenizer from {where}: {type(e).__name__}: {e}; set "
                                   "data.init_args.tokenizer to a hub id or a folder saved with "
                                   "save_pretrained") from e
            self._tokenizer, self._tokenizer_source = tok, source
        return self._tokenizer

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's pad token, or its EOS when it has none (Llama, Gemma-style tokenizers)."""
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if pad is None:
            raise ValueError(f"tokenizer {self._tokenizer_source} has neither a pad_token nor an eos_token to pad "
                             "with; use a tokenizer that defines one")
        return int(pad)
