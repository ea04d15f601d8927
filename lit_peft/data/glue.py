"""GLUE with DeBERTaV3-base (:class:`GLUEDataModule`).

Protocol (both papers; see ``docs/protocols.md``, section *GLUE*): the eight tasks with the papers' per-task
maximum lengths (:data:`~lit_peft.data.GLUE_TASKS`), batch 32, dynamic padding; metrics accuracy (matched for
MNLI), Matthews correlation for CoLA, Pearson for STS-B, all on the validation (dev) split, as GLUE's test labels
are hidden.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch.utils.data import DataLoader

from lit_peft.handover import DataInfo

from .base import TextDataModule, _check_int, _unknown
from .collators import GLUECollator
from .datasets import GLUEDataset
from .sources import _column, _require_fields, _text, is_local, load_split
from .tasks import GLUE_TASKS, TEXT_CLASSIFICATION_TASKS, GLUETask

#: Every task this module reads: GLUE's eight and the further local ones.
SEQUENCE_TASKS: dict[str, GLUETask] = {**GLUE_TASKS, **TEXT_CLASSIFICATION_TASKS}


class GLUEDataModule(TextDataModule):
    """GLUE with the papers' protocol (DeBERTaV3-base; BOFT and SVFT): sentence(-pair) classification, STS-B
    regression.

    Each example is encoded as ``tokenizer(text_a[, text_b], truncation=True, max_length=max_length)`` (pairs
    truncated longest-first), batches are padded to their longest example by
    ``transformers.DataCollatorWithPadding``. Splits: ``fit`` trains on ``train`` and validates on
    ``validation`` (MNLI: ``validation_matched``, or ``validation_mismatched`` with ``mnli_mismatched: true``).
    GLUE's test labels are hidden and the papers report the validation (dev) split, so ``test_dataloader``
    returns the validation split too (``test_split: validation``, the default); data with a labelled ``test``
    split (the ``rt-sentiment`` and ``bbc-news`` assets) can be tested on it with ``test_split: test``, so that
    the choices made on validation are not scored on the same examples; ``predict_dataloader`` returns GLUE's (unlabelled) ``test`` split (MNLI
    ``test_matched``/``test_mismatched``; the hub marks its labels -1).

    Batches: ``{"input_ids": (B, T) long, "attention_mask": (B, T) long, "token_type_ids": (B, T) long (only if
    the tokenizer returns them), "labels": (B,) float32 for STS-B, long otherwise}``.

    Args:
        task: ``cola``, ``sst2``, ``mrpc``, ``qqp``, ``stsb``, ``mnli``, ``qnli`` or ``rte`` (:data:`GLUE_TASKS`), or
            ``bbc_news`` (:data:`TEXT_CLASSIFICATION_TASKS`, a local folder from ``lit_peft.assets``).
        data: a hub dataset with GLUE's configs and splits (``nyu-mll/glue``), or a local folder holding
            ``<data>/<task>/<split>.{jsonl,json,parquet,csv}`` (``<data>`` itself may be the task folder) with
            the task's text fields and ``label``.
        tokenizer: a hub id or local folder; null: the connected model's tokenizer (``ModelInfo.tokenizer``,
            :mod:`lit_peft.handover`).
        max_length: maximum tokens per example; null: the papers' length for the task (``GLUE_TASKS``: MNLI 256,
            SST-2 128, MRPC 320, CoLA 64, QNLI 512, QQP 320, RTE 320, STS-B 128).
        batch_size: batch size of every loader (32 in the protocol).
        num_workers: DataLoader worker processes.
        seed: seeds the training shuffle.
        last_batch: the epoch's last training batch when the batch size does not divide the training set:
            ``pad`` (default: filled up with the epoch's first examples), ``drop`` (left out) or ``partial``
            (short). ``pad`` and ``drop`` give N processes of batch B exactly the batches of one process of batch
            N·B (``lit_peft.data.sampling.EpochShuffleSampler``).
        mnli_mismatched: for MNLI, validate/test on ``validation_mismatched`` (predict on ``test_mismatched``).
        test_split: the split ``test`` evaluates: ``validation`` (GLUE's convention) or ``test`` (needs labels
            in the data's test split; an unlabelled one is refused when it is loaded).
        cache_dir: ``datasets`` cache folder; null: its default.
    """

    def __init__(
        self,
        task: Literal["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "bbc_news"],
        data: str = "nyu-mll/glue",
        tokenizer: str | None = None,
        max_length: int | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 42,
        last_batch: Literal["pad", "drop", "partial"] = "pad",
        mnli_mismatched: bool = False,
        test_split: Literal["validation", "test"] = "validation",
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(tokenizer=tokenizer, num_workers=num_workers, seed=seed, last_batch=last_batch, cache_dir=cache_dir)
        if task not in SEQUENCE_TASKS:
            raise _unknown("GLUE task", task, list(SEQUENCE_TASKS))
        _check_int("max_length", max_length, minimum=2, optional=True)
        _check_int("batch_size", batch_size)
        if mnli_mismatched and task != "mnli":
            raise ValueError(f"mnli_mismatched applies to task mnli only, not {task!r}")
        if test_split not in ("validation", "test"):
            raise _unknown("test_split", test_split, ["validation", "test"])
        self.save_hyperparameters()
        self.task = task
        self.data = data
        self.max_length = int(max_length) if max_length is not None else SEQUENCE_TASKS[task].max_length
        self.batch_size = batch_size
        self.mnli_mismatched = bool(mnli_mismatched)
        self.test_split = test_split
        self.train_set: GLUEDataset | None = None
        self.test_set: GLUEDataset | None = None
        self.val_set: GLUEDataset | None = None
        self.predict_set: GLUEDataset | None = None

    # -- task facts ----------------------------------------------------------------------------------------------

    @property
    def spec(self) -> GLUETask:
        return SEQUENCE_TASKS[self.task]

    @property
    def num_labels(self) -> int:
        """1 for STS-B (regression), 3 for MNLI, 2 otherwise."""
        return self.spec.num_labels

    @property
    def is_regression(self) -> bool:
        return self.spec.num_labels == 1

    @property
    def metric_name(self) -> str:
        """``matthews`` (CoLA), ``pearson`` (STS-B) or ``accuracy``."""
        return self.spec.metric

    @property
    def text_fields(self) -> tuple[str, ...]:
        return self.spec.text_fields

    def data_info(self) -> DataInfo:
        """The task, its number of labels (``1``: STS-B's regression) and its metric."""
        return DataInfo(name=type(self).__name__, task=self.task, num_classes=self.num_labels, metric=self.metric_name)

    def split_name(self, which: Literal["train", "validation", "test"]) -> str:
        """The dataset split behind ``which`` (MNLI: ``validation_matched`` etc.)."""
        if self.task != "mnli" or which == "train":
            return which
        return f"{which}_{'mismatched' if self.mnli_mismatched else 'matched'}"

    # -- data ----------------------------------------------------------------------------------------------------

    def _source(self) -> tuple[str, str | None]:
        """(path or hub name, hub config) of the task's data."""
        if is_local(self.data):
            root = Path(self.data).expanduser()
            task_dir = root / self.task
            return (str(task_dir) if task_dir.is_dir() or not root.is_dir() else str(root)), None
        return self.data, self.task

    def _load(self, which: Literal["train", "validation", "test"]) -> tuple[Any, str]:
        source, config = self._source()
        split = self.split_name(which)
        aliases = (which,) if split != which else ()  # a local MNLI folder may name validation_matched 'validation'
        return load_split(source, split, role=f"GLUE {self.task} data", config=config, cache_dir=self.cache_dir,
                          split_aliases=aliases)

    def _build(self, which: Literal["train", "validation", "test"]) -> GLUEDataset:
        ds, desc = self._load(which)
        fields: dict[str, str | None] = {f: None for f in self.text_fields}
        labelled = which != "test" or "label" in ds.column_names
        if labelled:
            fields["label"] = None
        try:
            _require_fields(ds, desc, fields)
        except KeyError as e:
            need = ", ".join((*self.text_fields, "label"))
            raise KeyError(f"{e.args[0]}; GLUE task {self.task} needs the fields {need}") from None
        n = len(ds)
        if n == 0:
            raise ValueError(f"{desc} has no examples")
        columns = [[_text(v, desc, f, i, allow_none=True) for i, v in enumerate(_column(ds, f))]
                   for f in self.text_fields]
        tok = self.tokenizer
        if tok.pad_token_id is None:
            if tok.eos_token is None:
                raise ValueError(f"tokenizer {self._tokenizer_source} has neither a pad_token nor an eos_token to "
                                 "pad with")
            tok.pad_token = tok.eos_token
        encodings: dict[str, list[np.ndarray]] = {}
        keep = ("input_ids", "attention_mask", "token_type_ids")
        for start in range(0, n, 1024):
            texts = [c[start : start + 1024] for c in columns]
            enc = tok(*texts, truncation=True, max_length=self.max_length)
            for key in keep:
                if key in enc:
                    encodings.setdefault(key, []).extend(np.asarray(x, dtype=np.int64) for x in enc[key])
        labels = self._labels(_column(ds, "label"), desc, which) if labelled else None
        return GLUEDataset(encodings, labels)

    def _labels(self, raw: list[Any], desc: str, which: str) -> list[float] | list[int]:
        if self.is_regression:
            try:
                return [float(v) for v in raw]
            except (TypeError, ValueError):
                bad = next(i for i, v in enumerate(raw) if not isinstance(v, (int, float)))
                raise ValueError(f"{desc}: example {bad} has label {raw[bad]!r}; STS-B labels are similarity "
                                 "scores (floats in [0, 5])") from None
        allowed = set(range(self.num_labels)) | ({-1} if which == "test" else set())
        for i, v in enumerate(raw):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) not in allowed:
                raise ValueError(f"{desc}: example {i} has label {v!r}; GLUE {self.task} labels are the integers "
                                 f"0..{self.num_labels - 1}" + (" (-1: unlabelled)" if which == "test" else ""))
        return [int(v) for v in raw]

    # -- Lightning hooks -----------------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Fill the ``datasets`` and tokenizer caches when loading from the hub (rank 0 only)."""
        self.connect_trainer()
        if not is_local(self.data):
            for which in ("train", "validation"):
                self._load(which)  # type: ignore[arg-type]
        _ = self.tokenizer

    def setup(self, stage: str | None = None) -> None:
        """Tokenise what the stage needs (``fit``: train + validation, ``validate``/``test``: validation,
        ``predict``: GLUE's test split). Built sets are kept across stages."""
        train, val, test = self._setup_stages(stage)
        if train and self.train_set is None:
            self.train_set = self._build("train")
        if (val or (stage in (None, "test") and self.test_split == "validation")) and self.val_set is None:
            self.val_set = self._build("validation")
        if stage in (None, "test") and self.test_split == "test" and self.test_set is None:
            self.test_set = self._build("test")
            if self.test_set.labels is None or any(label < 0 for label in self.test_set.labels):
                raise ValueError(f"test_split: test, but the GLUE {self.task} test split of {self.data!r} is "
                                 f"unlabelled (labels -1, as GLUE's hidden test labels); use test_split: "
                                 f"validation or data whose test split has labels")
        if stage in (None, "predict") and self.predict_set is None:
            self.predict_set = self._build("test")

    def _collate(self) -> GLUECollator:
        return GLUECollator(self.tokenizer, self.is_regression)

    def train_dataloader(self) -> DataLoader:
        """Training batches, shuffled per epoch from ``(seed, epoch)``."""
        return self._loader(self.train_set, "training set", self.batch_size, self._collate(), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """The validation split (MNLI: matched, or mismatched with ``mnli_mismatched``)."""
        return self._loader(self.val_set, "validation set", self.batch_size, self._collate())

    def test_dataloader(self) -> DataLoader:
        """The validation split again (what the papers report: GLUE's test labels are hidden), or the labelled
        test split with ``test_split: test``."""
        if self.test_split == "test":
            return self._loader(self.test_set, "test set", self.batch_size, self._collate())
        return self._loader(self.val_set, "validation set", self.batch_size, self._collate())

    def predict_dataloader(self) -> DataLoader:
        """GLUE's unlabelled test split (for a leaderboard submission)."""
        return self._loader(self.predict_set, "GLUE test split", self.batch_size, self._collate())
