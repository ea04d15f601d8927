"""A sequence classifier / regressor (``AutoModelForSequenceClassification``) with a pluggable adapter (GLUE with
DeBERTaV3; both papers)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification

from ..handover import DataInfo
from .hf import CLASSIFIER_NAMES, HFAdaptedModule


class SequenceClassifierModule(HFAdaptedModule):
    """A sequence classifier / regressor (``AutoModelForSequenceClassification``) fine-tuned with an adapter (GLUE).

    The head: the modules that ``from_pretrained`` had to initialise (missing from the checkpoint or of another
    shape) together with the top-level ``classifier`` / ``score`` modules. For DeBERTaV3 that is ``pooler.dense``
    and ``classifier`` (the pooler is new: the pretrained checkpoint has none), for BERT-style checkpoints with a
    pretrained pooler only ``classifier`` (the pooler is then an ordinary linear, adapted by ``"all-linear"``). The
    head is always trained in full (as in both papers) with ``head_lr`` / ``head_weight_decay``, is never an
    adapter target, and is not counted as adapter parameters.

    Batches: ``{input_ids, attention_mask, (token_type_ids), labels}`` (float labels for regression).

    Args:
        model_name_or_path: hub id (``microsoft/deberta-v3-base``) or a local folder.
        num_labels: classes; ``1`` makes a regressor (``problem_type="regression"``, MSE loss; STS-B); ``None``
            takes the data module's number of labels (GLUE: 3 for MNLI, 1 for STS-B, else 2), building the backbone
            when the data is connected (:mod:`lit_peft.handover`: by the CLI, or at ``setup``).
        tokenizer: tokenizer id or folder; default ``model_name_or_path`` (exposed as ``tokenizer_name_or_path``).
        torch_dtype, attn_implementation, gradient_checkpointing, export_peft: as :class:`CausalLMModule`.
        metric: ``"accuracy"``, ``"matthews"`` (CoLA) or ``"pearson"`` (STS-B); default the data module's
            ``metric_name`` (else pearson for regression, accuracy otherwise). Logged as ``val_<metric>`` and
            ``test_<metric>``, beside ``val_loss``.
        **kwargs: the arguments every module shares (``adapter``, ``optimizer``, ``head_lr``, ``lr_schedule``, …,
            the ``fsdp_*`` options), see :class:`~lit_peft.modules.base.AdaptedModule`; each encoder layer is one
            FSDP shard unit.
    """

    auto_class = AutoModelForSequenceClassification
    peft_task_type = "SEQ_CLS"

    def __init__(self, model_name_or_path: str, num_labels: int | None = None, tokenizer: str | None = None,
                 torch_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
                 metric: Literal["accuracy", "matthews", "pearson"] | None = None,
                 gradient_checkpointing: bool = False, attn_implementation: str | None = None,
                 export_peft: bool = True, **kwargs: Any):
        super().__init__(**kwargs)
        if num_labels is not None and (isinstance(num_labels, bool) or not isinstance(num_labels, int)
                                       or num_labels < 1):
            raise ValueError(f"num_labels must be an integer >= 1 or null, got {num_labels!r}")
        if metric not in (None, "accuracy", "matthews", "pearson"):
            raise ValueError(f"metric must be 'accuracy', 'matthews', 'pearson' or None, got {metric!r}")
        if metric in ("accuracy", "matthews") and num_labels == 1:
            raise ValueError(f"metric {metric!r} needs classes; num_labels=1 is a regression (use 'pearson')")
        self._init_common(model_name_or_path, tokenizer, torch_dtype, attn_implementation, export_peft)
        self.num_labels = num_labels
        self.metric = metric
        self.metrics = nn.ModuleDict()
        self.metric_name: str | None = None
        self._gradient_checkpointing = gradient_checkpointing
        self._deferred = num_labels is None
        if num_labels is not None:
            self._build(num_labels)

    def _build(self, num_labels: int) -> None:
        """Load the backbone with a ``num_labels`` head, find the head, check the adapter's targets."""
        self._deferred = False
        self.num_labels = num_labels
        if self.metric in ("accuracy", "matthews") and num_labels == 1:
            raise ValueError(f"metric {self.metric!r} needs classes; num_labels=1 is a regression (use 'pearson')")
        problem = "regression" if num_labels == 1 else "single_label_classification"
        self.model, info = AutoModelForSequenceClassification.from_pretrained(
            self.model_name_or_path, num_labels=num_labels, problem_type=problem, ignore_mismatched_sizes=True,
            output_loading_info=True, **self._load_kwargs())
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps module modes as they are
        self._head_names = self._find_head(info)
        if self.metric is not None:
            self._set_metric(self.metric)
        self._finish_init(self._gradient_checkpointing)

    def _find_head(self, info: dict) -> list[str]:
        params = dict(self.model.named_parameters())
        new = {k if isinstance(k, str) else k[0] for k in
               list(info.get("missing_keys") or []) + list(info.get("mismatched_keys") or [])}
        owners = {key.rpartition(".")[0] for key in new if key in params}
        for name, module in self.model.named_modules():
            if name.split(".")[0] in CLASSIFIER_NAMES and any(True for _ in module.parameters(recurse=False)):
                owners.add(name)
        order = [name for name, _ in self.model.named_modules()]
        head = [name for name in order if name in owners]
        if not head:
            raise ValueError(f"SequenceClassifierModule: found no classification head in "
                             f"{type(self.model).__name__} ({self.model_name_or_path})")
        return head

    def head_names(self) -> list[str]:
        self._require_built()
        return list(self._head_names)

    def _require_built(self) -> None:
        if self._deferred:
            raise ValueError("SequenceClassifierModule: num_labels is null and no data module that gives a number of "
                             "labels (GLUEDataModule) was connected to take it from; set model.init_args.num_labels")

    # -- metrics ---------------------------------------------------------------------------------------------------
    def _set_metric(self, name: str) -> None:
        self.metric_name = name
        for stage in ("val", "test"):
            self.metrics[stage] = self._make_metric(name)

    def _make_metric(self, name: str):
        from torchmetrics import Accuracy, MatthewsCorrCoef, PearsonCorrCoef

        if name == "pearson":
            return PearsonCorrCoef()
        if self.num_labels < 2:
            raise ValueError(f"metric {name!r} needs num_labels >= 2, got {self.num_labels}")
        if name == "matthews":
            return MatthewsCorrCoef(task="multiclass", num_classes=self.num_labels)
        return Accuracy(task="multiclass", num_classes=self.num_labels, average="micro")

    def connect_data(self, info: DataInfo) -> None:
        if self._deferred and info.num_classes is not None:
            self._build(info.num_classes)
        elif info.num_classes is not None and info.num_classes != self.num_labels:
            raise ValueError(f"model.num_labels={self.num_labels} but the data ({info.name}, task {info.task}) has "
                             f"{info.num_classes}; set model.init_args.num_labels: {info.num_classes}")
        if self.metric_name is None and info.metric is not None:
            self._set_metric(info.metric)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self._require_built()
        if self.metric_name is None:
            self._set_metric("pearson" if self.num_labels == 1 else "accuracy")

    # -- MergeAdapters hook ----------------------------------------------------------------------------------------
    def model_outputs(self, model: nn.Module, batch) -> torch.Tensor:
        return model(**self._inputs(batch)).logits

    # -- steps -----------------------------------------------------------------------------------------------------
    @staticmethod
    def _inputs(batch) -> dict:
        return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if batch.get(k) is not None}

    def _labels(self, batch) -> torch.Tensor:
        labels = batch["labels"]
        return labels.float() if self.num_labels == 1 else labels.long()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits

    def training_step(self, batch, batch_idx):
        out = self.model(**self._inputs(batch), labels=self._labels(batch))
        self.log("train_loss", out.loss, prog_bar=True, on_step=True, on_epoch=False,
                 batch_size=batch["input_ids"].shape[0], sync_dist=True)
        return self.checked_loss(out.loss, batch_idx)

    def _evaluate(self, batch, stage: str) -> None:
        labels = self._labels(batch)
        out = self.model(**self._inputs(batch), labels=labels)
        size = labels.shape[0]
        if self.metric_name is None:
            self._set_metric("pearson" if self.num_labels == 1 else "accuracy")
            self.metrics.to(self.device)
        metric = self.metrics[stage]
        if self.metric_name == "pearson":
            metric.update(out.logits.float().reshape(-1), labels.float().reshape(-1))
        else:
            metric.update(out.logits.argmax(dim=-1), labels)
        self.log(f"{stage}_loss", out.loss, prog_bar=True, sync_dist=True, batch_size=size)
        self.log(f"{stage}_{self.metric_name}", metric, prog_bar=True, on_step=False, on_epoch=True, batch_size=size)

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._evaluate(batch, "test")

    def predict_step(self, batch, batch_idx, dataloader_idx: int = 0):
        """One ``{"prediction": class index, "probabilities": softmax}`` per example (regression: the score)."""
        logits = self.model(**self._inputs(batch)).logits.float()
        if self.num_labels == 1:
            return [{"prediction": float(v)} for v in logits.squeeze(-1)]
        return [{"prediction": int(p.argmax()), "probabilities": p.tolist()} for p in logits.softmax(dim=-1)]
