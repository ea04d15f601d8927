"""The datasets of the data modules: images with labels, the few-shot split (:func:`sample_per_class`), and
tokenised text (instruction-tuning examples, generation-eval prompts, GLUE examples) with its tokenisation
helpers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import ConcatDataset, Dataset, Subset

from .base import _check_int
from .sources import read_image_list
from .tasks import VTAB_LIST_FILES

#: Label of the tokens that carry no loss (prompt and padding); ``torch.nn.functional.cross_entropy``'s default.
IGNORE_INDEX = -100

# --------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------


class ImageListDataset(Dataset):
    """Images listed in a text file, one ``<relative/image/path> <label>`` per line (the VTAB-1k list files).

    Args:
        root: the folder image paths are relative to (a VTAB-1k task folder).
        list_file: the list file, relative to ``root`` (or absolute).
        transform: applied to the RGB PIL image; ``None`` returns the PIL image.
        num_classes: if given, every label must lie in ``[0, num_classes)``.
        verify: also open and fully decode every image when the dataset is built (slower; catches truncated or
            unreadable files before training instead of when their batch comes up).

    The list is parsed and checked when the dataset is built (missing folder/file, malformed line, label out of
    range, an empty list, listed images that do not exist: errors name the file and line;
    :func:`~lit_peft.data.sources.read_image_list`); images are decoded lazily (unless ``verify``), and an
    unreadable image raises naming the image file and the list line that refers to it. Blank lines are skipped;
    paths may contain spaces (the label is the last field).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        list_file: str | os.PathLike,
        transform: Callable | None = None,
        num_classes: int | None = None,
        verify: bool = False,
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
        self.samples, self._line_numbers = read_image_list(self.list_file, num_classes)
        if not self.samples:
            raise ValueError(f"list file {self.list_file} lists no images; a split must hold at least one "
                             f"'<relative/image/path> <label>' line")
        missing = [i for i, (rel, _) in enumerate(self.samples) if not (self.root / rel).is_file()]
        if missing:
            shown = ", ".join(f"{self.root / self.samples[i][0]} (line {self._line_numbers[i]})" for i in missing[:3])
            raise FileNotFoundError(f"{len(missing)} of the {len(self.samples)} images listed in {self.list_file} do "
                                    f"not exist: {shown}{', …' if len(missing) > 3 else ''}")
        if verify:
            for i in range(len(self.samples)):
                self.load_image(i).load()

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

    def item_id(self, index: int) -> str:
        """The image's path as listed (what prediction files name each row by)."""
        return self.samples[index][0]

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
    _check_int("shots", shots)
    _check_int("val_shots", val_shots, minimum=0)
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
# Text
# --------------------------------------------------------------------------------------------------------------


def _tokenize(tokenizer: Any, texts: Sequence[str], chunk: int = 1024) -> list[np.ndarray]:
    """Token ids of every text without special tokens, as int64 arrays (compact for 100k-example datasets)."""
    out: list[np.ndarray] = []
    for start in range(0, len(texts), chunk):
        ids = tokenizer(list(texts[start : start + chunk]), add_special_tokens=False)["input_ids"]
        out.extend(np.asarray(x, dtype=np.int64) for x in ids)
    return out


def special_prefix(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts *before* a text (e.g. ``[bos]`` for Llama/Gemma, ``[]`` for GPT-2 or
    Qwen), found by comparing a probe encoded with and without special tokens; trailing ones (EOS, SEP) are not
    included."""
    probe = "Hello world"
    with_sp = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    without = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    n = len(without)
    for i in range(len(with_sp) - n + 1):
        if with_sp[i : i + n] == without:
            return with_sp[:i]
    return []


class InstructionDataset(Dataset):
    """Tokenised training examples: ``input_ids = prompt + response + eos`` (truncated), and how many leading
    tokens are prompt. Items: ``{"input_ids": LongTensor (T,), "labels": LongTensor (T,), "index": int}`` with
    ``labels`` = ``input_ids`` on the response tokens and :data:`IGNORE_INDEX` on the prompt tokens; ``index``
    is the example's row in the source data."""

    def __init__(self, input_ids: Sequence[np.ndarray], prompt_lengths: Sequence[int], indices: Sequence[int]):
        if not len(input_ids) == len(prompt_lengths) == len(indices):
            raise ValueError("input_ids, prompt_lengths and indices must have the same length")
        self.input_ids = list(input_ids)
        self.prompt_lengths = [int(n) for n in prompt_lengths]
        self.indices = [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ids = torch.as_tensor(self.input_ids[i], dtype=torch.long)
        labels = ids.clone()
        labels[: self.prompt_lengths[i]] = IGNORE_INDEX
        return {"input_ids": ids, "labels": labels, "index": self.indices[i]}


class PromptDataset(Dataset):
    """Evaluation prompts for generation. Items: ``{"input_ids": LongTensor (T,), "answer": str, "index": int,
    "prompt": str}`` (``answer``: the raw gold answer; ``index``: the row in the eval data)."""

    def __init__(self, input_ids: Sequence[np.ndarray], answers: Sequence[str], indices: Sequence[int],
                 prompts: Sequence[str]) -> None:
        if not len(input_ids) == len(answers) == len(indices) == len(prompts):
            raise ValueError("input_ids, answers, indices and prompts must have the same length")
        self.input_ids = list(input_ids)
        self.answers = list(answers)
        self.indices = [int(i) for i in indices]
        self.prompts = list(prompts)

    def item_id(self, index: int) -> int:
        """The row of the eval data this prompt came from."""
        return self.indices[index]

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": torch.as_tensor(self.input_ids[i], dtype=torch.long), "answer": self.answers[i],
                "index": self.indices[i], "prompt": self.prompts[i]}


class GLUEDataset(Dataset):
    """Tokenised GLUE examples: items ``{"input_ids": list[int], "attention_mask": list[int],
    ("token_type_ids": list[int],) ("labels": float | int)}``."""

    def __init__(self, encodings: Mapping[str, Sequence[np.ndarray]], labels: Sequence[float] | None) -> None:
        self.encodings = {k: list(v) for k, v in encodings.items()}
        self.labels = None if labels is None else list(labels)
        self._n = len(next(iter(self.encodings.values())))

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {k: v[i].tolist() for k, v in self.encodings.items()}
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item
