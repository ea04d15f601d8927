"""Instruction tuning with generation-based evaluation (:class:`InstructionDataModule`).

Protocol (SVFT Table 1, BOFT Table 3; see ``docs/protocols.md``, sections *LLMs: math* and *LLMs: commonsense*):
train on MetaMathQA-40K (fields ``query``/``response``) or Commonsense-15K (``instruction``/``output``, an
optional ``input``) with the Alpaca prompt MetaMath uses, max length 512, loss on the response tokens only.
Evaluation is zero-shot greedy generation: GSM-8K (gold = the number after ``####``), MATH, or a commonsense task
(gold = the answer word); batches carry the *raw* gold answers, scoring belongs to the LightningModule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Subset

from lit_peft.handover import DataInfo

from .base import TextDataModule, _check_int, _unknown
from .collators import InstructionCollator, PromptCollator
from .datasets import InstructionDataset, PromptDataset, _tokenize, special_prefix
from .sources import _column, _require_fields, _text, is_local, load_split
from .tasks import EVAL_TASKS, TEMPLATES, format_prompt


class InstructionDataModule(TextDataModule):
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
        tokenizer: a hub id or local folder; null: the connected model's tokenizer (``ModelInfo.tokenizer``,
            :mod:`lit_peft.handover`).
        max_length: maximum training sequence length in tokens (512 in the protocol).
        batch_size: training batch size per device (the protocol's 64 = this × devices × accumulation).
        eval_batch_size: batch size of the generation-eval and loss-validation loaders.
        num_workers: DataLoader worker processes.
        seed: seeds the training shuffle and the ``val_fraction`` hold-out.
        last_batch: the epoch's last training batch when the batch size does not divide the training set:
            ``pad`` (default: filled up with the epoch's first examples), ``drop`` (left out) or ``partial``
            (short). ``pad`` and ``drop`` give N processes of batch B exactly the batches of one process of batch
            N·B (``lit_peft.data.sampling.EpochShuffleSampler``).
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
                           "ARC-Challenge", "ARC-Easy", "openbookqa", "sentiment"] | None = None,
        eval_query_field: str = "question",
        eval_answer_field: str = "answer",
        tokenizer: str | None = None,
        max_length: int = 512,
        batch_size: int = 4,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 42,
        last_batch: Literal["pad", "drop", "partial"] = "pad",
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        val_fraction: float = 0.0,
        drop_overlong: bool = False,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(tokenizer=tokenizer, num_workers=num_workers, seed=seed, last_batch=last_batch, cache_dir=cache_dir)
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

    def data_info(self) -> DataInfo:
        """The answer-extraction task of the generation eval (``eval_task``)."""
        return DataInfo(name=type(self).__name__, eval_task=self.eval_task)

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
        self.connect_trainer()
        if not is_local(self.train_data):
            load_split(self.train_data, self.train_split, role="train_data", cache_dir=self.cache_dir)
        if self.eval_data is not None and not is_local(self.eval_data):
            load_split(self.eval_data, self.eval_split, role="eval_data", config=self.resolved_eval_config(),
                       cache_dir=self.cache_dir)
        _ = self.tokenizer

    def setup(self, stage: str | None = None) -> None:
        """Tokenise what the stage needs (``fit``: train, loss-val and eval; ``validate``/``test``/``predict``:
        eval); overlong prompts are found here, before any training step. Built sets are kept across stages."""
        train, val, test = self._setup_stages(stage)
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

    def check_can_test(self) -> None:
        if self.eval_data is None:
            raise RuntimeError("no evaluation data to test on: set data.init_args.eval_data (e.g. openai/gsm8k with "
                               "eval_task gsm8k, or a local file)")

    def test_dataloader(self) -> DataLoader:
        """All generation-eval batches."""
        self.check_can_test()
        return self._eval_loader(capped=False)

    def predict_dataloader(self) -> DataLoader:
        """All generation-eval batches (as :meth:`test_dataloader`)."""
        return self.test_dataloader()
