"""Hugging Face ``transformers`` backbones with a pluggable adapter: causal language models (MetaMathQA → GSM-8K /
MATH, Commonsense-15K; SVFT Table 1, BOFT Table 3) and sequence classifiers (GLUE with DeBERTaV3; both papers).

Both modules load the backbone with ``from_pretrained`` (a hub id or a local folder) in ``__init__`` (the classifier
with ``num_labels: null`` at ``setup``, once the data module says how many labels), check the adapter's
``target_modules`` against it right away (a clear error listing the model's linear layers, before any training work)
and let :class:`~lit_peft.modules.base.AdaptedModule` apply the adapter in ``configure_model``.

Export (``lit_peft.callbacks.MergeAdapters``): the merged model is rebuilt with ``from_config`` on the ``meta``
device, loaded with ``load_state_dict(assign=True, strict=True)`` and written with ``save_pretrained`` together
with the tokenizer, so ``AutoModelFor*.from_pretrained(folder)`` loads it; with ``export_peft`` the same folder
also gets ``peft_adapter/``, a Hugging Face ``peft`` adapter (:func:`lit_peft.adapters.peft_export.export_peft_adapter`)
when the strategy has a ``peft`` counterpart.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from lightning.pytorch.utilities import rank_zero_info
from packaging.version import Version
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GenerationConfig

from ..adapters import AdapterStrategy, resolve_targets
from ..adapters.io import atomic_write
from ..adapters.peft_export import export_peft_adapter, peft_export_problem
from .base import AdaptedModule, OptimizerFactory

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Left out of ``save_hyperparameters``: the strategy objects, and ``tokenizer`` / ``eval_task``, which the text data
#: modules also have as hyperparameters (Lightning refuses to log a module and a data module whose shared
#: hyperparameters differ, e.g. ``eval_task: null`` here and ``gsm8k`` there). LightningCLI's ``config.yaml`` still
#: records them; pass them again to ``load_from_checkpoint`` when they are not the defaults.
HPARAMS_IGNORED = ["adapter", "optimizer", "tokenizer", "eval_task"]
#: Top-level module names of the classification heads of ``AutoModelForSequenceClassification`` models.
CLASSIFIER_NAMES = ("classifier", "score")


def dtype_kwargs(torch_dtype: str) -> dict[str, torch.dtype]:
    """``from_pretrained``'s dtype argument: ``dtype`` from transformers 4.56 on, ``torch_dtype`` before."""
    if torch_dtype not in DTYPES:
        raise ValueError(f"torch_dtype must be one of {sorted(DTYPES)}, got {torch_dtype!r}")
    key = "dtype" if Version(transformers.__version__.split("+")[0]) >= Version("4.56") else "torch_dtype"
    return {key: DTYPES[torch_dtype]}


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing: gradients reach the adapters although the embeddings (the inputs of
    the checkpointed blocks) are frozen, so ``enable_input_require_grads`` is not needed."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x (the old name is deprecated)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class HFAdaptedModule(AdaptedModule):
    """What the ``transformers`` modules share: tokenizer, early target check, merged export and ``peft`` export.

    Subclasses set ``self.model`` (loaded with ``from_pretrained``), ``self.auto_class`` and ``self.peft_task_type``
    and then call :meth:`_finish_init`.
    """

    auto_class: Any = None
    peft_task_type: str | None = None

    def _init_common(self, model_name_or_path: str, tokenizer: str | None, torch_dtype: str,
                     attn_implementation: str | None, export_peft: bool) -> None:
        self.model_name_or_path = model_name_or_path
        #: read by the text data modules when their own ``tokenizer`` argument is ``None``
        self.tokenizer_name_or_path = tokenizer or model_name_or_path
        self.torch_dtype = torch_dtype
        self.attn_implementation = attn_implementation
        self.export_peft = export_peft
        self._dtype_kwargs = dtype_kwargs(torch_dtype)

    def _load_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(self._dtype_kwargs)
        if self.attn_implementation is not None:
            kwargs["attn_implementation"] = self.attn_implementation
        return kwargs

    def _finish_init(self, gradient_checkpointing: bool) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name_or_path)
        if getattr(self.model.config, "pad_token_id", None) is None and self.tokenizer.pad_token_id is not None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.gradient_checkpointing = gradient_checkpointing
        if gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        if self.adapter is not None:
            self.check_targets(self.adapter)

    def check_targets(self, adapter: AdapterStrategy) -> None:
        """Resolve the adapter's targets on the loaded model now, so a projection name the model lacks fails at
        construction time with the list of its linear layers (not after data loading, SVDs, ...)."""
        exclude = list(adapter.trainable_modules) + self.head_names()
        try:
            resolve_targets(self.model, adapter.target_modules, adapter.fused_qkv, exclude=exclude)
        except ValueError as err:
            raise ValueError(f"{type(self).__name__}: {type(adapter).__name__}(target_modules="
                             f"{adapter.target_modules!r}) does not fit {self.model_name_or_path!r} "
                             f"({type(self.model).__name__}): {err}") from err

    # -- the MergeAdapters hooks -----------------------------------------------------------------------------------
    def build_plain_model(self) -> nn.Module:
        """The un-adapted architecture from ``self.model.config`` on the ``meta`` device, ready for
        ``load_state_dict(state, strict=True, assign=True)``.

        Two things ``from_config`` on ``meta`` leaves wrong are fixed here: non-persistent buffers computed at
        construction (rotary ``inv_freq``, …), which no state dict carries, are copied from the live model; and
        tied weights (``tie_word_embeddings``: Gemma, small Llamas), which ``assign=True`` unties, are re-tied by a
        load-state-dict post-hook.
        """
        kwargs = {}
        if self.attn_implementation is not None:
            kwargs["attn_implementation"] = self.attn_implementation
        with torch.device("meta"):
            plain = self.auto_class.from_config(copy.deepcopy(self.model.config), **kwargs)
        live = dict(self.model.named_buffers(remove_duplicate=False))
        for name, _ in list(plain.named_buffers(remove_duplicate=False)):
            owner_name, _, leaf = name.rpartition(".")
            owner = plain.get_submodule(owner_name) if owner_name else plain
            if leaf in owner._non_persistent_buffers_set:
                if name not in live:
                    raise RuntimeError(f"build_plain_model: non-persistent buffer {name} has no counterpart in the "
                                       f"adapted model")
                owner._buffers[leaf] = live[name].detach().clone()
        if getattr(self.model, "generation_config", None) is not None:
            plain.generation_config = copy.deepcopy(self.model.generation_config)

        def retie(module, incompatible_keys):
            if callable(getattr(module, "tie_weights", None)):
                module.tie_weights()

        plain.register_load_state_dict_post_hook(retie)
        return plain

    def save_merged_model(self, model: nn.Module, folder: Path) -> None:
        """``model.save_pretrained`` + ``tokenizer.save_pretrained`` into a temporary folder beside ``folder``'s
        files, then every file renamed into ``folder`` (``AutoModelFor….from_pretrained(folder)`` loads it)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".hf-export-tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            if callable(getattr(model, "tie_weights", None)):
                model.tie_weights()
            model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            for item in sorted(tmp.iterdir()):
                target = folder / item.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                os.replace(item, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def export_extra(self, folder: Path, tensors: dict[str, torch.Tensor] | None = None) -> None:
        """``peft_adapter/`` (a Hugging Face ``peft`` adapter) when ``export_peft`` and the strategy has one, from
        ``tensors`` (the gathered adapter state) when given, so it also works on rank 0 of an FSDP2 run."""
        if not self.export_peft or getattr(self.model, "lit_peft_strategy", None) is None:
            return
        problem = peft_export_problem(self.model)
        if problem is not None:
            rank_zero_info(f"{type(self).__name__}: no peft export ({problem})")
            return
        out = export_peft_adapter(self.model, Path(folder) / "peft_adapter", self.model_name_or_path,
                                  task_type=self.peft_task_type, tensors=tensors)
        rank_zero_info(f"{type(self).__name__}: peft adapter written to {out}")


# ----------------------------------------------------------------------------------------------------------------
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
        adapter, optimizer, head_lr, head_weight_decay, lr_schedule, warmup_ratio, warmup_steps: see
            :class:`~lit_peft.modules.base.AdaptedModule`. There is no head: the embeddings and ``lm_head`` stay
            frozen.
        fsdp_reshard_after_forward, fsdp_cpu_offload: FSDP2 options (``configs/strategy/fsdp.yaml``), see
            :class:`~lit_peft.modules.base.AdaptedModule`; each decoder layer is one shard unit.
    """

    auto_class = AutoModelForCausalLM
    peft_task_type = "CAUSAL_LM"

    def __init__(self, model_name_or_path: str, tokenizer: str | None = None,
                 torch_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
                 gradient_checkpointing: bool = False, attn_implementation: str | None = None,
                 max_new_tokens: int = 256, eval_task: str | None = None,
                 predictions_file: str | None = "predictions.jsonl", export_peft: bool = True,
                 adapter: AdapterStrategy | None = None, optimizer: OptimizerFactory = torch.optim.AdamW,
                 head_lr: float | None = None, head_weight_decay: float | None = None, lr_schedule: str = "cosine",
                 warmup_ratio: float = 0.1, warmup_steps: int | None = None, fsdp_reshard_after_forward: bool = True,
                 fsdp_cpu_offload: bool = False):
        super().__init__(adapter, optimizer, head_lr, head_weight_decay, lr_schedule, warmup_ratio, warmup_steps,
                         fsdp_reshard_after_forward, fsdp_cpu_offload)
        self.save_hyperparameters(ignore=HPARAMS_IGNORED)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self._init_common(model_name_or_path, tokenizer, torch_dtype, attn_implementation, export_peft)
        self.max_new_tokens = max_new_tokens
        self.eval_task = eval_task
        self.predictions_file = predictions_file
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
    def resolved_eval_task(self) -> str:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        data_task = getattr(datamodule, "eval_task", None)
        if self.eval_task and data_task and self.eval_task != data_task:
            raise ValueError(f"CausalLMModule: model.init_args.eval_task={self.eval_task!r} but the data module's "
                             f"eval_task is {data_task!r}; set one of them (or make them agree)")
        task = self.eval_task or data_task
        if not task:
            raise ValueError("CausalLMModule: no eval_task to score generations with; set model.init_args.eval_task "
                             "(gsm8k, math, boolq, …) or use a data module with an eval_task attribute")
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
        synced = self._sharded and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
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
        return loss

    def _global_token_mean(self, loss: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """With several processes, rescale this rank's token-mean loss so that the gradient averaged over ranks
        (DDP, FSDP) is that of the mean over *all* ranks' label tokens, as one process with the whole global batch
        computes it: ``loss_r · n_r · world / N`` (``n_r`` this rank's label tokens, ``N`` all ranks'). Without it
        every rank's mean would weigh equally however many tokens it holds (variable-length examples). The mean of
        the returned values over ranks is the global token mean, which ``train_loss`` logs."""
        world = self.trainer.world_size if self._trainer is not None else 1
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
        if torch.distributed.is_available() and torch.distributed.is_initialized() and \
                torch.distributed.get_world_size() > 1:
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


# ----------------------------------------------------------------------------------------------------------------
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
            takes the data module's ``num_labels`` (GLUE: 3 for MNLI, 1 for STS-B, else 2), building the backbone
            at ``setup`` (or when a callback's ``setup`` first touches ``model``).
        tokenizer: tokenizer id or folder; default ``model_name_or_path`` (exposed as ``tokenizer_name_or_path``).
        torch_dtype, attn_implementation, gradient_checkpointing, export_peft: as :class:`CausalLMModule`.
        metric: ``"accuracy"``, ``"matthews"`` (CoLA) or ``"pearson"`` (STS-B); default the data module's
            ``metric_name`` (else pearson for regression, accuracy otherwise). Logged as ``val_<metric>`` and
            ``test_<metric>``, beside ``val_loss``.
        adapter, optimizer, head_lr, head_weight_decay, lr_schedule, warmup_ratio, warmup_steps: see
            :class:`~lit_peft.modules.base.AdaptedModule`.
        fsdp_reshard_after_forward, fsdp_cpu_offload: FSDP2 options (``configs/strategy/fsdp.yaml``), see
            :class:`~lit_peft.modules.base.AdaptedModule`; each encoder layer is one shard unit.
    """

    auto_class = AutoModelForSequenceClassification
    peft_task_type = "SEQ_CLS"

    def __init__(self, model_name_or_path: str, num_labels: int | None = None, tokenizer: str | None = None,
                 torch_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
                 metric: Literal["accuracy", "matthews", "pearson"] | None = None,
                 gradient_checkpointing: bool = False, attn_implementation: str | None = None,
                 export_peft: bool = True, adapter: AdapterStrategy | None = None,
                 optimizer: OptimizerFactory = torch.optim.AdamW, head_lr: float | None = None,
                 head_weight_decay: float | None = None, lr_schedule: str = "cosine", warmup_ratio: float = 0.1,
                 warmup_steps: int | None = None, fsdp_reshard_after_forward: bool = True,
                 fsdp_cpu_offload: bool = False):
        super().__init__(adapter, optimizer, head_lr, head_weight_decay, lr_schedule, warmup_ratio, warmup_steps,
                         fsdp_reshard_after_forward, fsdp_cpu_offload)
        self.save_hyperparameters(ignore=HPARAMS_IGNORED)
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

    def _num_labels_from_data(self) -> int:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        labels = getattr(datamodule, "num_labels", None)
        if labels is None:
            raise ValueError("SequenceClassifierModule: num_labels is null and there is no data module with a "
                             "num_labels attribute (GLUEDataModule) to take it from; set model.init_args.num_labels")
        return int(labels)

    def __getattr__(self, name: str):
        # ``num_labels: null``: the backbone is built on first use, with the data module's num_labels (so a GLUE
        # config switches tasks with data.init_args.task alone); callbacks' ``setup`` (SVDCache) may be first.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model" and self.__dict__.get("_deferred", False):
                self._build(self._num_labels_from_data())
                return super().__getattr__(name)
            raise

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
        self.model  # noqa: B018 - builds a deferred backbone (num_labels: null)
        return list(self._head_names)

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

    def setup(self, stage: str) -> None:
        if self._deferred:
            self._build(self._num_labels_from_data())
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_labels = getattr(datamodule, "num_labels", None)
        if data_labels is not None and data_labels != self.num_labels:
            raise ValueError(f"model.num_labels={self.num_labels} but the data ({type(datamodule).__name__}, task "
                             f"{getattr(datamodule, 'task', '?')}) has {data_labels}; set "
                             f"model.init_args.num_labels: {data_labels}")
        if self.metric_name is None:
            name = getattr(datamodule, "metric_name", None) or ("pearson" if self.num_labels == 1 else "accuracy")
            self._set_metric(name)

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
        return out.loss

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
        logits = self.model(**self._inputs(batch)).logits
        return logits.squeeze(-1) if self.num_labels == 1 else logits.argmax(dim=-1)


__all__ = ["CausalLMModule", "SequenceClassifierModule", "HFAdaptedModule"]
