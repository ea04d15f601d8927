"""Batch collators of the text data modules: right-padded training batches, left-padded generation prompts, and GLUE
batches padded by ``transformers``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .datasets import IGNORE_INDEX


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


class InstructionCollator:
    """Right-pads a list of :class:`~lit_peft.data.InstructionDataset` items to the longest in the batch.

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
