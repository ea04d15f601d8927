"""Text data for the LLM and GLUE experiments: instruction tuning (MetaMathQA-40K, Commonsense-15K) with
generation-based evaluation (GSM-8K, MATH, the eight commonsense tasks), and GLUE with DeBERTaV3-base.

Protocols (see ``experiments.md``, sections *LLMs* and *GLUE*):

* **Instruction tuning** (:class:`InstructionDataModule`; SVFT Table 1, BOFT Table 3): train on MetaMathQA-40K
  (fields ``query``/``response``) or Commonsense-15K (``instruction``/``output``, an optional ``input``) with the
  Alpaca prompt MetaMath uses, max length 512, loss on the response tokens only. Evaluation is zero-shot greedy
  generation: GSM-8K (gold = the number after ``####``), MATH, or a commonsense task (gold = the answer word);
  batches carry the *raw* gold answers, scoring belongs to the LightningModule.
* **GLUE** (:class:`GLUEDataModule`; both papers, DeBERTaV3-base): the eight tasks with the papers' per-task
  maximum lengths (:data:`GLUE_TASKS`), batch 32, dynamic padding; metrics accuracy (matched for MNLI), Matthews
  correlation for CoLA, Pearson for STS-B, all on the validation (dev) split, as GLUE's test labels are hidden.

Where the data come from: a hub name goes to ``datasets.load_dataset(name, config, split=split)``; a local file
(``.json`` — a JSON array or JSON lines —, ``.jsonl``, ``.parquet``, ``.csv``) is the whole split; a local folder
holds one file per split, ``<folder>/<split>.<ext>`` (:func:`load_split`).

The tokenizer is a hub id or a local folder (``transformers.AutoTokenizer``); left ``None`` it is taken from the
LightningModule being trained (``trainer.lightning_module.tokenizer_name_or_path``), so the model and its data
cannot disagree on the vocabulary.

Every loader comes from :func:`~lit_peft.data.sampling.make_loader` (resumable, seeded per-epoch shuffling that
never touches the global RNG).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Subset

from .sampling import make_loader

__all__ = [
    "ALPACA_PROMPT_NO_INPUT",
    "ALPACA_PROMPT_WITH_INPUT",
    "EVAL_TASKS",
    "GLUE_TASKS",
    "IGNORE_INDEX",
    "GLUEDataModule",
    "GLUETask",
    "InstructionCollator",
    "InstructionDataModule",
    "InstructionDataset",
    "PromptCollator",
    "PromptDataset",
    "format_prompt",
    "load_split",
]

#: Label of the tokens that carry no loss (prompt and padding); ``torch.nn.functional.cross_entropy``'s default.
IGNORE_INDEX = -100

# --------------------------------------------------------------------------------------------------------------
# Prompt templates
# --------------------------------------------------------------------------------------------------------------

#: The Alpaca prompt without an input; MetaMath trains (``train_math.py``) with exactly this text.
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{query}\n\n### Response:\n"
)

#: The Alpaca prompt with an input (LLM-Adapters / Commonsense-15K when an example's ``input`` is non-empty).
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{query}\n\n### Input:\n{input}\n\n### Response:\n"
)

TEMPLATES = ("metamath", "alpaca")


def format_prompt(template: str, query: str, input: str | None = None) -> str:  # noqa: A002 - Alpaca's name
    """The prompt of one example.

    ``metamath``: :data:`ALPACA_PROMPT_NO_INPUT`; a non-empty ``input`` is appended to the query after a blank
    line. ``alpaca``: :data:`ALPACA_PROMPT_WITH_INPUT` when ``input`` is non-empty, else
    :data:`ALPACA_PROMPT_NO_INPUT` (Stanford Alpaca's and LLM-Adapters' ``generate_prompt``).
    """
    has_input = input is not None and str(input).strip() != ""
    if template == "metamath":
        return ALPACA_PROMPT_NO_INPUT.format(query=f"{query}\n\n{input}" if has_input else query)
    if template == "alpaca":
        if has_input:
            return ALPACA_PROMPT_WITH_INPUT.format(query=query, input=input)
        return ALPACA_PROMPT_NO_INPUT.format(query=query)
    raise _unknown("template", template, TEMPLATES)


#: Generation-eval tasks → how the gold answer in ``eval_answer_field`` is written (for the LightningModule that
#: scores the generations; this module passes the gold answers through raw).
EVAL_TASKS: dict[str, str] = {
    "gsm8k": "GSM-8K (openai/gsm8k, config main; question/answer): the gold number follows '####' in the answer; "
             "a generation is scored by its last number",
    "math": "MATH (problem/solution): the gold answer is the last \\boxed{...} of the solution",
    **{t: f"{t} (LLM-Adapters dataset/{t}/test.json; instruction/answer): the gold answer is a word or option "
          "label, compared with the first such word of the generation"
       for t in ("boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Challenge", "ARC-Easy",
                 "openbookqa")},
}

# --------------------------------------------------------------------------------------------------------------
# GLUE task table
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GLUETask:
    """One GLUE task: its text fields, number of labels (1 = regression), metric and the papers' max length."""

    text_fields: tuple[str, ...]
    num_labels: int
    metric: str
    max_length: int


#: The eight GLUE tasks of the papers' tables; ``max_length`` as in both papers (DeBERTaV3-base).
GLUE_TASKS: dict[str, GLUETask] = {
    "cola": GLUETask(("sentence",), 2, "matthews", 64),
    "sst2": GLUETask(("sentence",), 2, "accuracy", 128),
    "mrpc": GLUETask(("sentence1", "sentence2"), 2, "accuracy", 320),
    "qqp": GLUETask(("question1", "question2"), 2, "accuracy", 320),
    "stsb": GLUETask(("sentence1", "sentence2"), 1, "pearson", 128),
    "mnli": GLUETask(("premise", "hypothesis"), 3, "accuracy", 256),
    "qnli": GLUETask(("question", "sentence"), 2, "accuracy", 512),
    "rte": GLUETask(("sentence1", "sentence2"), 2, "accuracy", 320),
}

# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------

#: Local file suffix → ``datasets`` packaged builder.
LOCAL_FORMATS: dict[str, str] = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _unknown(kind: str, value: Any, valid: Sequence[str]) -> ValueError:
    close = difflib.get_close_matches(str(value), list(valid), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"unknown {kind} {value!r}{hint}; valid: {', '.join(valid)}")


def _check_int(name: str, value: Any, minimum: int = 1, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{' or null' if optional else ''}, got {value!r}")


def _stages(stage: str | None) -> tuple[bool, bool, bool]:
    """(train, val, test) needed for a Lightning stage; ``None`` builds everything."""
    valid = (None, "fit", "validate", "test", "predict")
    if stage not in valid:
        raise ValueError(f"unknown stage {stage!r}; valid stages are {valid}")
    return stage in (None, "fit"), stage in (None, "fit", "validate"), stage in (None, "test", "predict")


def is_local(source: str) -> bool:
    """Whether ``source`` names a local file or folder (existing, a known data-file suffix, or an explicit path)
    rather than a dataset on the Hugging Face hub."""
    path = Path(source).expanduser()
    return (path.exists() or path.suffix.lower() in LOCAL_FORMATS
            or source.startswith(("/", "./", "../", "~", ".\\")))


def _describe(role: str, source: str, split: str | None) -> str:
    return f"{role} {source}" + (f" (split {split})" if split else "")


def load_split(
    source: str,
    split: str,
    *,
    role: str = "data",
    config: str | None = None,
    cache_dir: str | None = None,
    split_aliases: Sequence[str] = (),
) -> tuple[Any, str]:
    """One split as a ``datasets.Dataset``, and a description of where it came from (for error messages).

    * a local file (``.json``/``.jsonl``/``.parquet``/``.csv``): the whole file, whatever ``split`` says;
    * a local folder: the first of ``<folder>/<name>.<ext>`` for ``name`` in ``(split, *split_aliases)`` and
      ``ext`` in ``jsonl, json, parquet, csv``;
    * anything else: ``datasets.load_dataset(source, config, split=split, cache_dir=cache_dir)`` (the hub).

    ``role`` names the argument in errors (``train_data``, ``eval_data``, ...). A missing local path raises
    ``FileNotFoundError`` naming it; a hub dataset that cannot be loaded raises ``RuntimeError`` with the cause.
    """
    import datasets

    path = Path(source).expanduser()
    if is_local(source):
        if path.is_dir():
            names = (split, *split_aliases)
            for name in names:
                for suffix in LOCAL_FORMATS:
                    candidate = path / f"{name}{suffix}"
                    if candidate.is_file():
                        return _load_file(candidate, role, cache_dir), f"{role} {candidate}"
            present = sorted(p.name for p in path.iterdir() if p.suffix.lower() in LOCAL_FORMATS)
            wanted = ", ".join(f"{n}{s}" for n in names for s in (".jsonl", ".json", ".parquet", ".csv"))
            raise FileNotFoundError(
                f"{role} folder {path} has no file for split {split!r}: expected one of {wanted} "
                f"(data files present: {', '.join(present) or 'none'})"
            )
        if path.is_file():
            return _load_file(path, role, cache_dir), f"{role} {path}"
        kind = "file" if path.suffix.lower() in LOCAL_FORMATS else "file or folder"
        raise FileNotFoundError(
            f"{role} {kind} not found: {path} (expected a local .json/.jsonl/.parquet/.csv file or a folder of "
            "<split>.<ext> files; anything else is looked up on the Hugging Face hub)"
        )
    try:
        ds = datasets.load_dataset(source, config, split=split, cache_dir=cache_dir)
    except Exception as e:
        raise RuntimeError(
            f"could not load {role} {source!r} (config {config!r}, split {split!r}) with datasets.load_dataset: "
            f"{type(e).__name__}: {e}. No local file or folder {source!r} exists either; give a local "
            ".json/.jsonl/.parquet/.csv file or folder, or run once with internet access to fill the cache"
        ) from e
    return ds, _describe(role, source, split)


def _load_file(path: Path, role: str, cache_dir: str | None) -> Any:
    import datasets

    suffix = path.suffix.lower()
    if suffix not in LOCAL_FORMATS:
        raise ValueError(f"{role} {path}: unsupported file type {suffix!r}; use one of {', '.join(LOCAL_FORMATS)}")
    try:
        return datasets.load_dataset(LOCAL_FORMATS[suffix], data_files=str(path), split="train", cache_dir=cache_dir)
    except Exception as e:
        raise ValueError(f"cannot read {role} {path} as {LOCAL_FORMATS[suffix]}: {type(e).__name__}: {e}") from e


def _require_fields(ds: Any, desc: str, fields: Mapping[str, str | None]) -> None:
    """``fields``: dataset field → the config argument that names it (``None``: not configurable)."""
    columns = list(ds.column_names)
    missing = [(f, arg) for f, arg in fields.items() if f not in columns]
    if not missing:
        return
    names = ", ".join(repr(f) for f, _ in missing)
    args = [f"data.init_args.{arg}" for _, arg in missing if arg]
    fix = f"; set {' / '.join(args)}" if args else ""
    raise KeyError(
        f"{desc} has no field{'s' if len(missing) > 1 else ''} {names} (fields: {', '.join(columns)}){fix}"
    )


def _column(ds: Any, field: str) -> list[Any]:
    return list(ds[field])


def _text(value: Any, desc: str, field: str, index: int, allow_none: bool = False) -> str:
    if value is None:
        if allow_none:
            return ""
        raise ValueError(f"{desc}: example {index} has no value (null) in field {field!r}")
    return value if isinstance(value, str) else str(value)


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


def _pad(seqs: Sequence[torch.Tensor], value: int, left: bool) -> torch.Tensor:
    length = max(len(s) for s in seqs)
    out = torch.full((len(seqs), length), value, dtype=torch.long)
    for row, s in enumerate(seqs):
        if len(s):
            if left:
                out[row, length - len(s) :] = s
            else:
                out[row, : len(s)] = s
    return out


# --------------------------------------------------------------------------------------------------------------
# Datasets and collators
# --------------------------------------------------------------------------------------------------------------


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


class InstructionCollator:
    """Right-pads a list of :class:`InstructionDataset` items to the longest in the batch.

    Returns ``{"input_ids": (B, T) long, "attention_mask": (B, T) long (1 = token, 0 = padding),
    "labels": (B, T) long (:data:`IGNORE_INDEX` on prompt and padding)}``.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = int(pad_token_id)

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [it["input_ids"] for it in items]
        return {
            "input_ids": _pad(ids, self.pad_token_id, left=False),
            "attention_mask": _pad([torch.ones(len(s), dtype=torch.long) for s in ids], 0, left=False),
            "labels": _pad([it["labels"] for it in items], IGNORE_INDEX, left=False),
        }


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

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": torch.as_tensor(self.input_ids[i], dtype=torch.long), "answer": self.answers[i],
                "index": self.indices[i], "prompt": self.prompts[i]}


class PromptCollator:
    """Left-pads prompts (so batched greedy generation appends to every row at the same position).

    Returns ``{"input_ids": (B, T) long, "attention_mask": (B, T) long, "answers": list[str],
    "indices": list[int], "prompts": list[str]}``.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = int(pad_token_id)

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        ids = [it["input_ids"] for it in items]
        return {
            "input_ids": _pad(ids, self.pad_token_id, left=True),
            "attention_mask": _pad([torch.ones(len(s), dtype=torch.long) for s in ids], 0, left=True),
            "answers": [it["answer"] for it in items],
            "indices": [int(it["index"]) for it in items],
            "prompts": [it["prompt"] for it in items],
        }


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


class GLUECollator:
    """``transformers.DataCollatorWithPadding`` (pads to the longest in the batch) with the labels as a float
    tensor for regression (STS-B) and a long tensor otherwise. Returns a plain ``dict``."""

    def __init__(self, tokenizer: Any, regression: bool) -> None:
        from transformers import DataCollatorWithPadding

        self.pad = DataCollatorWithPadding(tokenizer, padding="longest", return_tensors="pt")
        self.regression = bool(regression)

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        features = [{k: v for k, v in it.items() if k != "labels"} for it in items]
        batch = {k: torch.as_tensor(v, dtype=torch.long) for k, v in dict(self.pad(features)).items()}
        if items and "labels" in items[0]:
            dtype = torch.float32 if self.regression else torch.long
            batch["labels"] = torch.tensor([it["labels"] for it in items], dtype=dtype)
        return batch


# --------------------------------------------------------------------------------------------------------------
# Datamodules
# --------------------------------------------------------------------------------------------------------------


class _TextDataModule(L.LightningDataModule):
    """The tokenizer (explicit, or the trained module's ``tokenizer_name_or_path``) and loader plumbing."""

    def __init__(self, *, tokenizer: str | None, num_workers: int, seed: int, cache_dir: str | None) -> None:
        super().__init__()
        _check_int("num_workers", num_workers, minimum=0)
        if tokenizer is not None and (not isinstance(tokenizer, str) or not tokenizer.strip()):
            raise ValueError(f"tokenizer must be a hub id or a local folder (a non-empty string) or null, got "
                             f"{tokenizer!r}")
        self.tokenizer_name = tokenizer
        self.num_workers = num_workers
        self.seed = int(seed)
        self.cache_dir = cache_dir
        self._tokenizer: Any = None
        self._tokenizer_source: str | None = None

    def tokenizer_source(self) -> str:
        """``tokenizer`` if set, else ``trainer.lightning_module.tokenizer_name_or_path``; raises if neither."""
        if self.tokenizer_name:
            return self.tokenizer_name
        module = None
        if self.trainer is not None:
            try:
                module = self.trainer.lightning_module
            except Exception:  # a trainer without a model attached yet
                module = None
        name = getattr(module, "tokenizer_name_or_path", None) if module is not None else None
        if name:
            return str(name)
        why = ("no trainer is attached" if self.trainer is None else
               f"the LightningModule ({type(module).__name__}) has no tokenizer_name_or_path")
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

    def _loader(self, ds: Dataset | None, what: str, batch_size: int, collate, shuffle: bool = False,
                fix: str = "call setup() for the matching stage first (the Trainer does this)") -> DataLoader:
        if ds is None:
            raise RuntimeError(f"{type(self).__name__}: the {what} is not built; {fix}")
        return make_loader(ds, batch_size, shuffle, self.seed, self.num_workers, collate_fn=collate)


class InstructionDataModule(_TextDataModule):
    """Instruction tuning with loss on the response, and prompts for zero-shot greedy-generation evaluation.

    **Training examples** (MetaMathQA-40K: ``query``/``response``; Commonsense-15K: ``instruction``/``output``
    with ``input``): the prompt (:func:`format_prompt`) and the response are tokenised *separately*; an example is
    ``prompt_ids + response_ids + [eos]``, where ``prompt_ids`` starts with the special tokens the tokenizer puts
    before a text (BOS for Llama/Gemma; none for GPT-2/Qwen; :func:`special_prefix`). It is truncated to
    ``max_length`` from the end; ``labels`` are :data:`IGNORE_INDEX` (-100) on the prompt and on padding, so the
    loss covers the response tokens (and EOS) only. An example whose prompt alone has ``>= max_length`` tokens has
    nothing left to learn from: :meth:`setup` raises naming it (before training starts), or drops such examples
    with ``drop_overlong: true`` (the count is reported and kept in ``num_dropped``).

    **Evaluation examples** (``eval_data``; GSM-8K ``question``/``answer``, MATH ``problem``/``solution``, a
    commonsense test set ``instruction``/``answer``): the same template around ``eval_query_field`` (and
    ``input_field`` if set and present there), tokenised like a training prompt, never truncated, LEFT-padded.
    ``answers`` are the raw gold strings (GSM-8K's full solution with ``#### 42``); extracting and comparing is
    the LightningModule's job (:data:`EVAL_TASKS` says how, ``eval_task`` tells it which).

    Batches:

    * ``train_dataloader`` (shuffled per epoch from ``seed``) and :meth:`loss_val_dataloader`:
      ``{"input_ids": (B, T) long, "attention_mask": (B, T) long, "labels": (B, T) long}``, right-padded to the
      longest example of the batch with the pad token (EOS when the tokenizer has none).
    * ``val_dataloader`` (the first ``max_eval_samples`` eval examples; ``[]`` — no validation — when
      ``eval_data`` is null), ``test_dataloader`` and ``predict_dataloader`` (all eval examples):
      ``{"input_ids": (B, T) long, "attention_mask": (B, T) long, "answers": list[str], "indices": list[int],
      "prompts": list[str]}``, left-padded.

    Args:
        train_data: a hub dataset (``meta-math/MetaMathQA-40K``) or a local ``.json``/``.jsonl``/``.parquet``/
            ``.csv`` file (e.g. LLM-Adapters' ``commonsense_15k.json``) or folder of ``<split>.<ext>`` files.
        train_split: the split of a hub dataset or folder.
        query_field: field of the instruction (``instruction`` for Commonsense-15K).
        response_field: field of the target response (``output`` for Commonsense-15K).
        input_field: optional field of an additional input (``input`` for Commonsense-15K); see ``template``.
        template: ``metamath`` (:data:`ALPACA_PROMPT_NO_INPUT`, as MetaMath trains; a non-empty input is
            appended to the query) or ``alpaca`` (:data:`ALPACA_PROMPT_WITH_INPUT` for examples with an input).
        eval_data: generation-eval data (hub name or local file/folder), e.g. ``openai/gsm8k``; null: none.
        eval_split: its split.
        eval_config: the hub dataset's configuration; null: ``main`` for ``eval_task: gsm8k``, else none.
        eval_task: which benchmark ``eval_data`` is (:data:`EVAL_TASKS`), for the module's answer scoring.
        eval_query_field: the eval data's question field.
        eval_answer_field: the eval data's gold-answer field.
        tokenizer: a hub id or local folder; null: ``trainer.lightning_module.tokenizer_name_or_path``.
        max_length: maximum training sequence length in tokens (512 in the protocol).
        batch_size: training batch size per device (the protocol's 64 = this × devices × accumulation).
        eval_batch_size: batch size of the generation-eval and loss-validation loaders.
        num_workers: DataLoader worker processes.
        seed: seeds the training shuffle and the ``val_fraction`` hold-out.
        max_train_samples: keep the first N training examples (before the hold-out); null: all.
        max_eval_samples: validate on the first N eval examples (testing always uses all); null: all.
        val_fraction: fraction of the training examples held out (seeded) for :meth:`loss_val_dataloader`.
        drop_overlong: drop examples whose prompt alone fills ``max_length`` instead of raising.
        cache_dir: ``datasets`` cache folder; null: its default.
    """

    def __init__(
        self,
        train_data: str,
        train_split: str = "train",
        query_field: str = "query",
        response_field: str = "response",
        input_field: str | None = None,
        template: Literal["metamath", "alpaca"] = "metamath",
        eval_data: str | None = None,
        eval_split: str = "test",
        eval_config: str | None = None,
        eval_task: Literal["gsm8k", "math", "boolq", "piqa", "social_i_qa", "hellaswag", "winogrande",
                           "ARC-Challenge", "ARC-Easy", "openbookqa"] | None = None,
        eval_query_field: str = "question",
        eval_answer_field: str = "answer",
        tokenizer: str | None = None,
        max_length: int = 512,
        batch_size: int = 4,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 42,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        val_fraction: float = 0.0,
        drop_overlong: bool = False,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(tokenizer=tokenizer, num_workers=num_workers, seed=seed, cache_dir=cache_dir)
        if not isinstance(train_data, str) or not train_data:
            raise ValueError(f"train_data must be a hub dataset name or a local file/folder, got {train_data!r}")
        if template not in TEMPLATES:
            raise _unknown("template", template, TEMPLATES)
        if eval_task is not None and eval_task not in EVAL_TASKS:
            raise _unknown("eval_task", eval_task, list(EVAL_TASKS))
        _check_int("max_length", max_length, minimum=2)
        _check_int("batch_size", batch_size)
        _check_int("eval_batch_size", eval_batch_size)
        _check_int("max_train_samples", max_train_samples, optional=True)
        _check_int("max_eval_samples", max_eval_samples, optional=True)
        if not 0.0 <= float(val_fraction) < 1.0:
            raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction!r}")
        for name, value in (("query_field", query_field), ("response_field", response_field),
                            ("eval_query_field", eval_query_field), ("eval_answer_field", eval_answer_field)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a field name, got {value!r}")
        self.save_hyperparameters()
        self.train_data = train_data
        self.train_split = train_split
        self.query_field = query_field
        self.response_field = response_field
        self.input_field = input_field
        self.template = template
        self.eval_data = eval_data
        self.eval_split = eval_split
        self.eval_config = eval_config
        self.eval_task = eval_task
        self.eval_query_field = eval_query_field
        self.eval_answer_field = eval_answer_field
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.max_train_samples = max_train_samples
        self.max_eval_samples = max_eval_samples
        self.val_fraction = float(val_fraction)
        self.drop_overlong = bool(drop_overlong)
        self.train_set: InstructionDataset | None = None
        self.loss_val_set: InstructionDataset | None = None
        self.eval_set: PromptDataset | None = None
        self.num_dropped = 0
        self.num_truncated = 0
        self.split_indices: dict[str, list[int]] = {}

    # -- data ----------------------------------------------------------------------------------------------------

    def resolved_eval_config(self) -> str | None:
        """``eval_config``, defaulting to ``main`` for GSM-8K from the hub (``openai/gsm8k`` has two configs)."""
        if self.eval_config is not None:
            return self.eval_config
        if self.eval_task == "gsm8k" and self.eval_data is not None and not is_local(self.eval_data):
            return "main"
        return None

    def prompt_ids(self, prompts: Sequence[str]) -> list[np.ndarray]:
        """Token ids of prompts as the model sees them: the tokenizer's leading special tokens, then the text."""
        prefix = np.asarray(special_prefix(self.tokenizer), dtype=np.int64)
        return [np.concatenate([prefix, ids]) for ids in _tokenize(self.tokenizer, prompts)]

    def _prompt(self, desc: str, query_field: str, index: int, queries: list, inputs: list | None) -> str:
        q = _text(queries[index], desc, query_field, index)
        x = None if inputs is None else _text(inputs[index], desc, str(self.input_field), index, allow_none=True)
        return format_prompt(self.template, q, x)

    def _build_train(self) -> None:
        tok = self.tokenizer
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer {self._tokenizer_source} has no eos_token; every response ends with EOS so "
                             "the model learns to stop")
        ds, desc = load_split(self.train_data, self.train_split, role="train_data", cache_dir=self.cache_dir)
        fields = {self.query_field: "query_field", self.response_field: "response_field"}
        if self.input_field is not None:
            fields[self.input_field] = "input_field"
        _require_fields(ds, desc, fields)
        n = len(ds)
        if self.max_train_samples is not None:
            n = min(n, self.max_train_samples)
            ds = ds.select(range(n))
        if n == 0:
            raise ValueError(f"{desc} has no examples")
        queries = _column(ds, self.query_field)
        responses = _column(ds, self.response_field)
        inputs = _column(ds, self.input_field) if self.input_field is not None else None
        prompts = [self._prompt(desc, self.query_field, i, queries, inputs) for i in range(n)]
        prompt_ids = self.prompt_ids(prompts)
        response_ids = _tokenize(tok, [_text(r, desc, self.response_field, i) for i, r in enumerate(responses)])
        eos = np.asarray([tok.eos_token_id], dtype=np.int64)

        overlong = [i for i in range(n) if len(prompt_ids[i]) >= self.max_length]
        if overlong and not self.drop_overlong:
            i = overlong[0]
            raise ValueError(
                f"{desc}: example {i} has a prompt of {len(prompt_ids[i])} tokens and max_length is "
                f"{self.max_length}, so none of its response ({len(response_ids[i]) + 1} tokens with EOS) would be "
                f"left to learn from ({len(overlong)} of {n} examples are like this"
                f"{': ' + ', '.join(map(str, overlong[:10])) + (' ...' if len(overlong) > 10 else '')}). Raise "
                "data.init_args.max_length, or set data.init_args.drop_overlong: true to drop them"
            )
        self.num_dropped = len(overlong)
        if overlong:
            rank_zero_warn(f"{desc}: dropped {len(overlong)} of {n} examples whose prompt alone has >= "
                           f"max_length={self.max_length} tokens (drop_overlong: true)")
        skip = set(overlong)

        # seeded hold-out for the loss-validation split (on row indices, before dropping)
        n_val = 0
        if self.val_fraction > 0:
            n_val = max(1, int(round(self.val_fraction * n)))
            if n_val >= n:
                raise ValueError(f"val_fraction={self.val_fraction} of {n} training examples leaves none to train on")
        perm = np.random.default_rng(self.seed).permutation(n)
        val_rows = sorted(int(i) for i in perm[:n_val])
        train_rows = sorted(int(i) for i in perm[n_val:])

        truncated = 0

        def build(rows: list[int]) -> InstructionDataset:
            nonlocal truncated
            ids, plen, kept = [], [], []
            for i in rows:
                if i in skip:
                    continue
                full = np.concatenate([prompt_ids[i], response_ids[i], eos])
                if len(full) > self.max_length:
                    truncated += 1
                    full = full[: self.max_length]
                ids.append(full)
                plen.append(len(prompt_ids[i]))
                kept.append(i)
            return InstructionDataset(ids, plen, kept)

        self.train_set = build(train_rows)
        self.loss_val_set = build(val_rows) if n_val else None
        self.num_truncated = truncated
        self.split_indices = {"train": self.train_set.indices,
                              "loss_val": self.loss_val_set.indices if self.loss_val_set is not None else []}
        if len(self.train_set) == 0:
            raise ValueError(f"{desc}: no training examples left (dropped {self.num_dropped} overlong ones)")
        rank_zero_info(
            f"{desc}: {len(self.train_set)} training examples"
            + (f", {len(self.loss_val_set)} held out for loss validation" if self.loss_val_set is not None else "")
            + (f"; {truncated} responses truncated to max_length={self.max_length}" if truncated else "")
        )

    def _build_eval(self) -> None:
        assert self.eval_data is not None
        ds, desc = load_split(self.eval_data, self.eval_split, role="eval_data", config=self.resolved_eval_config(),
                              cache_dir=self.cache_dir)
        _require_fields(ds, desc, {self.eval_query_field: "eval_query_field",
                                   self.eval_answer_field: "eval_answer_field"})
        n = len(ds)
        if n == 0:
            raise ValueError(f"{desc} has no examples")
        queries = _column(ds, self.eval_query_field)
        answers = [_text(a, desc, self.eval_answer_field, i) for i, a in enumerate(_column(ds, self.eval_answer_field))]
        has_input = self.input_field is not None and self.input_field in ds.column_names
        inputs = _column(ds, self.input_field) if has_input else None  # type: ignore[arg-type]
        prompts = [self._prompt(desc, self.eval_query_field, i, queries, inputs) for i in range(n)]
        self.eval_set = PromptDataset(self.prompt_ids(prompts), answers, range(n), prompts)

    # -- Lightning hooks -----------------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Fill the ``datasets`` and tokenizer caches for hub sources (rank 0 only); local files need nothing."""
        if not is_local(self.train_data):
            load_split(self.train_data, self.train_split, role="train_data", cache_dir=self.cache_dir)
        if self.eval_data is not None and not is_local(self.eval_data):
            load_split(self.eval_data, self.eval_split, role="eval_data", config=self.resolved_eval_config(),
                       cache_dir=self.cache_dir)
        _ = self.tokenizer

    def setup(self, stage: str | None = None) -> None:
        """Tokenise what the stage needs (``fit``: train, loss-val and eval; ``validate``/``test``/``predict``:
        eval); overlong prompts are found here, before any training step. Built sets are kept across stages."""
        train, val, test = _stages(stage)
        if train and self.train_set is None:
            self._build_train()
        if (val or test) and self.eval_data is not None and self.eval_set is None:
            self._build_eval()

    def train_dataloader(self) -> DataLoader:
        """Training batches (right-padded, prompt-masked labels), shuffled per epoch from ``(seed, epoch)``."""
        return self._loader(self.train_set, "training set", self.batch_size, InstructionCollator(self.pad_token_id),
                            shuffle=True, fix="call setup('fit') first (the Trainer does this)")

    def loss_val_dataloader(self) -> DataLoader:
        """The ``val_fraction`` hold-out of the training data, batched like training (not shuffled)."""
        if self.val_fraction == 0:
            raise RuntimeError("no loss-validation split: set data.init_args.val_fraction > 0 to hold out part of "
                               "the training data")
        return self._loader(self.loss_val_set, "loss-validation set", self.eval_batch_size,
                            InstructionCollator(self.pad_token_id), fix="call setup('fit') first")

    def _eval_loader(self, capped: bool) -> DataLoader:
        ds: Dataset | None = self.eval_set
        if ds is not None and capped and self.max_eval_samples is not None and self.max_eval_samples < len(ds):
            ds = Subset(ds, range(self.max_eval_samples))
        return self._loader(ds, "generation-eval set", self.eval_batch_size, PromptCollator(self.pad_token_id))

    def val_dataloader(self) -> DataLoader | list:
        """Generation-eval batches (left-padded prompts), the first ``max_eval_samples``; ``[]`` (no
        validation) without ``eval_data``."""
        if self.eval_data is None:
            return []
        return self._eval_loader(capped=True)

    def test_dataloader(self) -> DataLoader:
        """All generation-eval batches."""
        if self.eval_data is None:
            raise RuntimeError("no evaluation data: set data.init_args.eval_data (e.g. openai/gsm8k with eval_task "
                               "gsm8k, or a local file)")
        return self._eval_loader(capped=False)

    def predict_dataloader(self) -> DataLoader:
        """All generation-eval batches (as :meth:`test_dataloader`)."""
        return self.test_dataloader()


class GLUEDataModule(_TextDataModule):
    """GLUE with the papers' protocol (DeBERTaV3-base; BOFT and SVFT): sentence(-pair) classification, STS-B
    regression.

    Each example is encoded as ``tokenizer(text_a[, text_b], truncation=True, max_length=max_length)`` (pairs
    truncated longest-first), batches are padded to their longest example by
    ``transformers.DataCollatorWithPadding``. Splits: ``fit`` trains on ``train`` and validates on
    ``validation`` (MNLI: ``validation_matched``, or ``validation_mismatched`` with ``mnli_mismatched: true``).
    GLUE's test labels are hidden and the papers report the validation (dev) split, so ``test_dataloader``
    returns the validation split too; ``predict_dataloader`` returns GLUE's (unlabelled) ``test`` split (MNLI
    ``test_matched``/``test_mismatched``; the hub marks its labels -1).

    Batches: ``{"input_ids": (B, T) long, "attention_mask": (B, T) long, "token_type_ids": (B, T) long (only if
    the tokenizer returns them), "labels": (B,) float32 for STS-B, long otherwise}``.

    Args:
        task: ``cola``, ``sst2``, ``mrpc``, ``qqp``, ``stsb``, ``mnli``, ``qnli`` or ``rte`` (:data:`GLUE_TASKS`).
        data: a hub dataset with GLUE's configs and splits (``nyu-mll/glue``), or a local folder holding
            ``<data>/<task>/<split>.{jsonl,json,parquet,csv}`` (``<data>`` itself may be the task folder) with
            the task's text fields and ``label``.
        tokenizer: a hub id or local folder; null: ``trainer.lightning_module.tokenizer_name_or_path``.
        max_length: maximum tokens per example; null: the papers' length for the task (``GLUE_TASKS``: MNLI 256,
            SST-2 128, MRPC 320, CoLA 64, QNLI 512, QQP 320, RTE 320, STS-B 128).
        batch_size: batch size of every loader (32 in the protocol).
        num_workers: DataLoader worker processes.
        seed: seeds the training shuffle.
        mnli_mismatched: for MNLI, validate/test on ``validation_mismatched`` (predict on ``test_mismatched``).
        cache_dir: ``datasets`` cache folder; null: its default.
    """

    def __init__(
        self,
        task: Literal["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"],
        data: str = "nyu-mll/glue",
        tokenizer: str | None = None,
        max_length: int | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 42,
        mnli_mismatched: bool = False,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(tokenizer=tokenizer, num_workers=num_workers, seed=seed, cache_dir=cache_dir)
        if task not in GLUE_TASKS:
            raise _unknown("GLUE task", task, list(GLUE_TASKS))
        _check_int("max_length", max_length, minimum=2, optional=True)
        _check_int("batch_size", batch_size)
        if mnli_mismatched and task != "mnli":
            raise ValueError(f"mnli_mismatched applies to task mnli only, not {task!r}")
        self.save_hyperparameters()
        self.task = task
        self.data = data
        self.max_length = int(max_length) if max_length is not None else GLUE_TASKS[task].max_length
        self.batch_size = batch_size
        self.mnli_mismatched = bool(mnli_mismatched)
        self.train_set: GLUEDataset | None = None
        self.val_set: GLUEDataset | None = None
        self.predict_set: GLUEDataset | None = None

    # -- task facts ----------------------------------------------------------------------------------------------

    @property
    def spec(self) -> GLUETask:
        return GLUE_TASKS[self.task]

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
        if not is_local(self.data):
            for which in ("train", "validation"):
                self._load(which)  # type: ignore[arg-type]
        _ = self.tokenizer

    def setup(self, stage: str | None = None) -> None:
        """Tokenise what the stage needs (``fit``: train + validation, ``validate``/``test``: validation,
        ``predict``: GLUE's test split). Built sets are kept across stages."""
        train, val, test = _stages(stage)
        if train and self.train_set is None:
            self.train_set = self._build("train")
        if (val or stage in (None, "test")) and self.val_set is None:
            self.val_set = self._build("validation")
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
        """The validation split again: what the papers report (GLUE's test labels are hidden)."""
        return self._loader(self.val_set, "validation set", self.batch_size, self._collate())

    def predict_dataloader(self) -> DataLoader:
        """GLUE's unlabelled test split (for a leaderboard submission)."""
        return self._loader(self.predict_set, "GLUE test split", self.batch_size, self._collate())
