"""A causal language model (``AutoModelForCausalLM``) with a pluggable adapter, evaluated by greedy generation
(MetaMathQA → GSM-8K / MATH, Commonsense-15K; SVFT Table 1, BOFT Table 3)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from transformers import AutoModelForCausalLM, GenerationConfig

from ..files import atomic_write
from ..compat import trainer_of
from ..distributed import is_distributed
from ..handover import DataInfo
from .hf import HFAdaptedModule


class CausalLMModule(HFAdaptedModule):
    """A causal language model (``AutoModelForCausalLM``) fine-tuned with an adapter; greedy-generation evaluation.

    Batches (from :class:`lit_peft.data.InstructionDataModule`):

    * training: ``{input_ids, attention_mask, labels}`` (labels ``-100`` on prompt and padding), right-padded;
    * validation / test: either the same (then ``val_loss`` is logged) or a generation batch
      ``{input_ids, attention_mask, answers, indices, prompts}`` with *left*-padded prompts: the model generates
      greedily, only the new tokens are decoded, :func:`lit_peft.eval.answers.is_correct` scores them and
      ``val_acc`` / ``test_acc`` are logged. At the end of ``test`` every example is written to
      ``<log_dir>/<predictions_file>`` (one JSON object per line: index, prompt, output, extracted, gold, correct).

    Args:
        model_name_or_path: hub id (``google/gemma-2b``) or a local folder.
        tokenizer: tokenizer id or folder; default ``model_name_or_path`` (exposed as ``tokenizer_name_or_path``).
        torch_dtype: dtype the frozen backbone is loaded in (adapter tensors stay at least float32).
        gradient_checkpointing: non-reentrant activation checkpointing of the decoder layers.
        attn_implementation: passed to ``from_pretrained`` (``"sdpa"``, ``"eager"``, ``"flash_attention_2"``).
        max_new_tokens: generation budget for evaluation.
        eval_task: answer format for scoring (``gsm8k``, ``math``, ``boolq``, …); default the data module's
            ``eval_task`` (both set and different is an error).
        predictions_file: file name (under ``trainer.log_dir``) of the test predictions; ``None`` writes none.
        export_peft: ``MergeAdapters`` also writes ``peft_adapter/`` when the strategy has a ``peft`` counterpart.
        **kwargs: the arguments every module shares (``adapter``, ``optimizer``, ``head_lr``, ``lr_schedule``, …,
            the ``fsdp_*`` options), see :class:`~lit_peft.modules.base.AdaptedModule`. There is no head: the
            embeddings and ``lm_head`` stay frozen. Each decoder layer is one FSDP shard unit.
    """

    auto_class = AutoModelForCausalLM
    peft_task_type = "CAUSAL_LM"

    def __init__(self, model_name_or_path: str, tokenizer: str | None = None,
                 torch_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
                 gradient_checkpointing: bool = False, attn_implementation: str | None = None,
                 max_new_tokens: int = 256, eval_task: str | None = None,
                 predictions_file: str | None = "predictions.jsonl", export_peft: bool = True, **kwargs: Any):
        super().__init__(**kwargs)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self._init_common(model_name_or_path, tokenizer, torch_dtype, attn_implementation, export_peft)
        self.max_new_tokens = max_new_tokens
        self.eval_task = eval_task
        self.predictions_file = predictions_file
        self.data_eval_task: str | None = None  # the connected data module's (connect_data)
        # from_pretrained returns the model in eval mode and Lightning keeps module modes as they are
        self.model = AutoModelForCausalLM.from_pretrained(model_name_or_path, **self._load_kwargs()).train()
        from ..eval.answers import AnswerAccuracy

        self.val_acc = AnswerAccuracy()
        self.test_acc = AnswerAccuracy()
        self._predictions: list[dict] = []
        self._finish_init(gradient_checkpointing)

    def head_names(self) -> list[str]:
        return []

    # -- helpers ---------------------------------------------------------------------------------------------------
    def connect_data(self, info: DataInfo) -> None:
        self.data_eval_task = info.eval_task

    def resolved_eval_task(self) -> str:
        data_task = self.data_eval_task
        if self.eval_task and data_task and self.eval_task != data_task:
            raise ValueError(f"CausalLMModule: model.init_args.eval_task={self.eval_task!r} but the data module's "
                             f"eval_task is {data_task!r}; set one of them (or make them agree)")
        task = self.eval_task or data_task
        if not task:
            raise ValueError("CausalLMModule: no eval_task to score generations with; set model.init_args.eval_task "
                             "(gsm8k, math, boolq, …) or use a data module that has one (InstructionDataModule)")
        return task

    def generation_config(self) -> GenerationConfig:
        """Greedy decoding with ``max_new_tokens``; ``eos`` from the model's generation config (may be a list)."""
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = eos[0] if isinstance(eos, (list, tuple)) else eos
        return GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1,
                                pad_token_id=pad, eos_token_id=eos, bos_token_id=self.tokenizer.bos_token_id)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[str]:
        """Greedy completions of left-padded prompts, decoded from the new tokens only. Under FSDP2 every rank runs
        the same number of decoding steps (``synced_gpus``: a sharded forward is collective, and ranks whose
        sequences ended earlier keep stepping until all have), which transformers only infers for its own FSDP."""
        if attention_mask is not None and attention_mask.shape[0] and bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("CausalLMModule.generate: prompts must be left-padded (attention_mask has padding at "
                             "the end of a row); the generation batches of InstructionDataModule are")
        synced = self._sharded and is_distributed()
        output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                     generation_config=self.generation_config(), synced_gpus=True if synced else None)
        return self.tokenizer.batch_decode(output[:, input_ids.shape[1]:], skip_special_tokens=True)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def model_outputs(self, model: nn.Module, batch) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False).logits

    # -- steps -----------------------------------------------------------------------------------------------------
    def _loss(self, batch) -> torch.Tensor:
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                         labels=batch["labels"], use_cache=False)
        return out.loss

    def training_step(self, batch, batch_idx):
        loss = self._global_token_mean(self._loss(batch), batch["labels"])
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False,
                 batch_size=batch["input_ids"].shape[0], sync_dist=True)
        return self.checked_loss(loss, batch_idx)

    def _global_token_mean(self, loss: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """With several processes, rescale this rank's token-mean loss so that the gradient averaged over ranks
        (DDP, FSDP) is that of the mean over *all* ranks' label tokens, as one process with the whole global batch
        computes it: ``loss_r · n_r · world / N`` (``n_r`` this rank's label tokens, ``N`` all ranks'). Without it
        every rank's mean would weigh equally however many tokens it holds (variable-length examples). The mean of
        the returned values over ranks is the global token mean, which ``train_loss`` logs."""
        trainer = trainer_of(self)
        world = trainer.world_size if trainer is not None else 1
        if world == 1:
            return loss
        tokens = (labels[:, 1:] != -100).sum().to(torch.float32)  # the causal-LM loss predicts labels[1:]
        total = self.trainer.strategy.reduce(tokens.clone(), reduce_op="sum")
        return loss * (tokens * world / total.clamp_min(1))

    def _evaluate(self, batch, stage: str) -> list[dict] | None:
        size = batch["input_ids"].shape[0]
        if "labels" in batch:  # a loss batch
            self.log(f"{stage}_loss", self._loss(batch), prog_bar=True, sync_dist=True, batch_size=size)
            return None
        from ..eval.answers import extract_answer, is_correct

        task = self.resolved_eval_task()
        outputs = self.generate(batch["input_ids"], batch.get("attention_mask"))
        golds = list(batch["answers"])
        correct = [bool(is_correct(task, text, gold)) for text, gold in zip(outputs, golds)]
        metric = self.val_acc if stage == "val" else self.test_acc
        metric.update(torch.tensor(correct, dtype=torch.bool, device=self.device))
        self.log(f"{stage}_acc", metric, prog_bar=True, on_step=False, on_epoch=True, batch_size=size)
        indices = batch.get("indices") or [None] * size
        prompts = batch.get("prompts") or [None] * size
        return [{"index": int(i) if i is not None else None, "prompt": p, "output": o,
                 "extracted": extract_answer(task, o), "gold": g, "correct": c}
                for i, p, o, g, c in zip(indices, prompts, outputs, golds, correct)]

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._evaluate(batch, "val")

    def on_test_epoch_start(self) -> None:
        self._predictions = []

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        records = self._evaluate(batch, "test")
        if records:
            self._predictions.extend(records)

    def on_test_epoch_end(self) -> None:
        records = self._predictions
        if is_distributed():
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, records)
            records = [r for part in gathered for r in (part or [])]
        self._predictions = []
        if not self.predictions_file or not records:
            return
        path = self.predictions_path()  # on every rank: trainer.log_dir broadcasts under DDP / FSDP2
        if not self.trainer.is_global_zero:
            return
        records = sorted(records, key=lambda r: (r["index"] is None, r["index"] or 0))
        seen, unique = set(), []
        for r in records:  # DistributedSampler pads the last batch with repeats
            if r["index"] is not None and r["index"] in seen:
                continue
            seen.add(r["index"])
            unique.append(r)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in unique)
        atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))
        rank_zero_info(f"CausalLMModule: {len(unique)} test predictions written to {path}")

    def predictions_path(self) -> Path:
        base = self.trainer.log_dir or self.trainer.default_root_dir
        return Path(base) / str(self.predictions_file)

    def predict_step(self, batch, batch_idx, dataloader_idx: int = 0):
        outputs = self.generate(batch["input_ids"], batch.get("attention_mask"))
        prompts = batch.get("prompts") or [None] * len(outputs)
        return [{"prompt": p, "output": o} for p, o in zip(prompts, outputs)]
