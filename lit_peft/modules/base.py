"""What every lit_peft LightningModule shares: applying the adapter to the backbone, the model↔data hand-over,
optimiser groups (adapter / head, each with its own learning rate and weight decay) and the warm-up schedules the
papers use. Beside it: adapter-only checkpoints and exact resume (:mod:`lit_peft.modules.checkpointing`) and the
sharding hooks (:mod:`lit_peft.distributed.module`), which :class:`AdaptedModule` inherits.

Subclasses build ``self.model`` (the backbone, an ``nn.Module``) in ``__init__`` and name its head modules in
``head_names()``; the adapter is applied in :meth:`configure_model`, i.e. after the callbacks' ``setup`` and before
any distributed wrapping, so it also runs for ``validate``/``test``/``predict``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from ..adapters import AdapterStrategy, count_parameters
from ..adapters.base import unwrapped_name
from ..adapters.quantized import SCHEMES, QuantizationReport, quantize_frozen_linears
from ..adapters.targets import resolve_targets
from ..callbacks import find_svd_provider
from ..compat import reset_seed, trainer_of
from ..distributed.lifetime import end_with_job
from ..distributed.module import ShardedModuleMixin
from ..handover import DataInfo, ModelInfo, connect_from_trainer
from .checkpointing import AdapterCheckpointMixin, use_atomic_checkpoints
from .schedules import SCHEDULES, warmup_lambda

OptimizerFactory = Callable[[Iterable], torch.optim.Optimizer]


class AdaptedModule(AdapterCheckpointMixin, ShardedModuleMixin):
    """Base LightningModule: a backbone in ``self.model`` with an adapter strategy applied to it.

    Args:
        adapter: the adapter strategy (``class_path``/``init_args`` in YAML); ``None`` trains the head only.
        optimizer: optimiser factory (``class_path: torch.optim.AdamW`` + ``init_args`` in YAML); its ``lr`` and
            ``weight_decay`` apply to the adapter parameters.
        head_lr: learning rate of the head (the SVFT recipe: head 4e-3, adapter 5e-2); ``None`` = the adapter's.
        head_weight_decay: weight decay of the head; ``None`` = the optimiser's.
        lr_schedule: ``"cosine"`` (BOFT VTAB, math), ``"linear"`` (SVFT few-shot, commonsense) or ``"constant"``,
            stepped per optimiser step.
        warmup_ratio: fraction of the total optimiser steps spent in linear warm-up (0.1 in both papers).
        warmup_steps: absolute warm-up steps; overrides ``warmup_ratio`` when set (commonsense uses 100).
        fsdp_reshard_after_forward: under Lightning's ``ModelParallelStrategy`` (FSDP2), passed to ``fully_shard``
            for every shard unit: ``True`` frees each block's gathered weights after its forward and gathers them
            again for the backward (least memory), ``False`` keeps them until the backward (less communication).
        fsdp_cpu_offload: under ``ModelParallelStrategy`` (FSDP2), keep the sharded parameters, their gradients and
            the optimiser state in CPU memory (``fully_shard(offload_policy=CPUOffloadPolicy())``; the optimiser
            step runs on the CPU): least GPU memory, slowest. On a CPU-only run the parameters already live there,
            so it changes nothing.
        skip_nonfinite: a training loss that is NaN or infinite stops the run with an error naming the step (0,
            the default), before its backward pass, so no non-finite value reaches the weights or a checkpoint;
            ``N > 0`` instead skips up to ``N`` such steps in the run (no backward, no optimiser step, a warning
            each) and stops at the next one. With several processes the ranks decide together.
        quantize: ``"nf4"`` (4-bit NormalFloat, QLoRA's) or ``"int8"``: store the backbone's frozen linear weights
            quantized (torchao; :mod:`lit_peft.adapters.quantized`) before the adapter is applied, for any adapter;
            the head, ``trainable_modules`` and weights tied to an embedding stay in full precision. SVFT takes the
            SVD of the dequantized weights; merging writes a full-precision model. One device only. ``null``: full
            precision.

    Both ``fsdp_*`` options are ignored under DDP and on one device. Lightning's ``FSDPStrategy`` (FSDP1, GPU only)
    has its own knobs (``trainer.strategy.init_args.cpu_offload`` and ``sharding_strategy: SHARD_GRAD_OP`` for no
    resharding after forward), so there a non-default value here is an error; the module gives that strategy an
    ``auto_wrap_policy`` wrapping each of :meth:`shard_units` unless the strategy has one.
    """

    def __init__(self, adapter: AdapterStrategy | None = None, optimizer: OptimizerFactory = torch.optim.AdamW,
                 head_lr: float | None = None, head_weight_decay: float | None = None,
                 lr_schedule: str = "cosine", warmup_ratio: float = 0.1, warmup_steps: int | None = None,
                 fsdp_reshard_after_forward: bool = True, fsdp_cpu_offload: bool = False, skip_nonfinite: int = 0,
                 quantize: Literal["nf4", "int8"] | None = None):
        super().__init__()
        if quantize not in (None, *SCHEMES):
            raise ValueError(f"quantize must be one of {', '.join(map(repr, SCHEMES))} or null (full precision), got "
                             f"{quantize!r}")
        if isinstance(skip_nonfinite, bool) or not isinstance(skip_nonfinite, int) or skip_nonfinite < 0:
            raise ValueError(f"skip_nonfinite must be an integer >= 0 (0: stop at the first non-finite loss), "
                             f"got {skip_nonfinite!r}")
        if lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(map(repr, SCHEDULES))}, got {lr_schedule!r}")
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
        self.adapter = adapter
        self.optimizer_factory = optimizer
        self.head_lr = head_lr
        self.head_weight_decay = head_weight_decay
        self.lr_schedule = lr_schedule
        self.warmup_ratio = warmup_ratio
        self.warmup_steps = warmup_steps
        self.fsdp_reshard_after_forward = fsdp_reshard_after_forward
        self.fsdp_cpu_offload = fsdp_cpu_offload
        self.skip_nonfinite = skip_nonfinite
        self.quantize = quantize
        self.quantization: QuantizationReport | None = None
        self._nonfinite_skipped = 0
        # Checkpoints hold the trainable tensors only (see state_dict), so loading one is never strict.
        self.strict_loading = False
        self._adapted = False
        self._sharded = False
        # Every constructor argument of the concrete module (its own and these, defaults included: Lightning reads
        # the whole chain of __init__ frames) but the objects in ``hparams_ignored``.
        self.save_hyperparameters(ignore=list(self.hparams_ignored))

    # -- to be provided by subclasses ----------------------------------------------------------------------------
    model: nn.Module
    #: Constructor arguments left out of ``hparams`` (the strategy and optimiser objects).
    hparams_ignored: tuple[str, ...] = ("adapter", "optimizer")

    def head_names(self) -> list[str]:
        """Names (inside ``self.model``) of the modules that are always trained: the task head."""
        return []

    def build_plain_model(self) -> nn.Module:
        """A fresh, un-adapted backbone skeleton (weights to be loaded), for the merged export."""
        raise NotImplementedError

    def model_outputs(self, model: nn.Module, batch) -> torch.Tensor:
        """The backbone's output tensor for ``batch`` (what the merge check compares)."""
        raise NotImplementedError

    def save_merged_model(self, model: nn.Module, folder: Path) -> None:
        """Write the merged plain model into ``folder`` in the backbone library's own format."""
        raise NotImplementedError

    def export_extra(self, folder: Path, tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Optional extra exports written by ``MergeAdapters`` after the merged model and the adapter (e.g. a
        Hugging Face ``peft`` adapter folder); nothing by default. ``tensors``: the model's gathered
        :func:`~lit_peft.adapters.adapter_state_dict` (rank 0 alone calls this, so it must not read sharded
        tensors from the model)."""

    # -- the model↔data hand-over (lit_peft.handover) -----------------------------------------------------------
    def model_info(self) -> ModelInfo:
        """What this model tells its data (nothing by default)."""
        return ModelInfo()

    def connect_data(self, info: DataInfo) -> None:
        """Take what the data tells (its classes, metric, …); subclasses check and keep what they use."""

    def setup(self, stage: str) -> None:
        trainer = trainer_of(self)
        connect_from_trainer(trainer)
        use_atomic_checkpoints(trainer)
        if trainer is not None:
            end_with_job(trainer.world_size)  # no rank outlives a failed job (lit_peft.distributed.lifetime)

    # -- adapting ------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if trainer_of(self) is not None:
            # Lightning's DDP/FSDP strategies re-seed every process from seed_everything's seed when they set up
            # the process group, single-device ones do not: re-seed in every strategy, so an adapter's random init
            # and the dropout masks drawn in training are the same in one process as in many.
            reset_seed()
        self.apply_adapter()
        self.shard()

    def apply_adapter(self) -> None:
        """Apply the adapter strategy to the backbone (once), its head trainable; without a strategy train the head
        alone. Logs the parameter counts."""
        if self._adapted:
            return
        heads = self.head_names()
        if self.quantize is not None:
            self.quantize_base(heads)
        if self.adapter is not None:
            missing = [h for h in heads if h not in self.adapter.trainable_modules]
            self.adapter.trainable_modules = list(self.adapter.trainable_modules) + missing
            # SVFT takes its SVDs from the run's SVDCache callback when there is one
            trainer = trainer_of(self)
            callbacks = trainer.callbacks if trainer is not None else ()
            self.adapter.apply(self.model, svd_provider=find_svd_provider(callbacks))
        else:
            for param in self.model.parameters():
                param.requires_grad_(False)
            for name in heads:
                self.model.get_submodule(name).requires_grad_(True)
        self._adapted = True
        counts = count_parameters(self.model)
        what = repr(self.adapter) if self.adapter is not None else "no adapter (head only)"
        rank_zero_info(f"lit_peft: {what}\n"
                       f"lit_peft: adapter parameters: {counts['adapter']:,} | trainable parameters: "
                       f"{counts['trainable']:,} | total parameters: {counts['total']:,} | trainable "
                       f"{100 * counts['trainable'] / max(1, counts['total']):.3f}%")

    def quantize_base(self, heads: list[str]) -> None:
        """Store the backbone's frozen linear weights in ``self.quantize`` (:mod:`lit_peft.adapters.quantized`), the
        adapter's parts as separate blocks; the head and the adapter's ``trainable_modules`` stay in full precision."""
        trainer = trainer_of(self)
        if trainer is not None and trainer.world_size > 1:
            raise ValueError(f"model.init_args.quantize: {self.quantize!r} trains on one device; a quantized base "
                             f"under {type(trainer.strategy).__name__} over {trainer.world_size} processes is not "
                             f"supported (quantize: null, or devices: 1)")
        keep = list(heads)
        targets = {}
        if self.adapter is not None:
            keep += list(self.adapter.trainable_modules)
            targets = resolve_targets(self.model, self.adapter.target_modules, self.adapter.fused_qkv, exclude=keep)
        self.quantization = quantize_frozen_linears(self.model, self.quantize, targets=targets, keep=keep)
        rank_zero_info(f"lit_peft: {self.quantization.summary()}")

    # -- optimisation --------------------------------------------------------------------------------------------
    def checked_loss(self, loss: torch.Tensor, batch_idx: int) -> torch.Tensor | None:
        """What ``training_step`` returns: ``loss`` if it is finite; otherwise ``None`` (Lightning skips the step)
        while ``skip_nonfinite`` allows, else a ``FloatingPointError`` naming the step."""
        bad = ~torch.isfinite(loss.detach())
        trainer = trainer_of(self)
        if trainer is not None and trainer.world_size > 1:
            bad = trainer.strategy.reduce(bad.to(torch.float32), reduce_op="sum") > 0  # all ranks skip or none
        if not bool(bad):
            return loss
        where = f"optimiser step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx})"
        value = loss.detach().float().item()
        if self._nonfinite_skipped < self.skip_nonfinite:
            self._nonfinite_skipped += 1
            rank_zero_warn(f"lit_peft: train_loss is {value} at {where}: step skipped "
                           f"({self._nonfinite_skipped} of at most {self.skip_nonfinite}, model.init_args."
                           f"skip_nonfinite)")
            return None
        lrs = sorted({f"{g.get('initial_lr', g['lr']):g}" for g in trainer.optimizers[0].param_groups}) \
            if trainer is not None and trainer.optimizers else []
        skipped = f" after skipping {self._nonfinite_skipped} such step(s)" if self._nonfinite_skipped else ""
        raise FloatingPointError(
            f"train_loss is {value} at {where}{skipped}: the run diverged (or the batch holds non-finite inputs); "
            f"stopped before its backward pass, so no non-finite value reached the weights or a checkpoint. Lower "
            f"the learning rate (model.init_args.optimizer.init_args.lr" + (f": {', '.join(lrs)}" if lrs else "")
            + "), lengthen the warm-up, or set model.init_args.skip_nonfinite: N to skip up to N such steps with a "
            "warning")

    def parameter_groups(self) -> list[dict]:
        heads = tuple(f"model.{h}." for h in self.head_names())
        adapter, head = [], []
        for name, param in self.named_parameters():
            if param.requires_grad:
                (head if unwrapped_name(name).startswith(heads) else adapter).append(param)
        groups = []
        if adapter:
            groups.append({"params": adapter, "name": "adapter"})
        if head:
            group = {"params": head, "name": "head"}
            if self.head_lr is not None:
                group["lr"] = self.head_lr
            if self.head_weight_decay is not None:
                group["weight_decay"] = self.head_weight_decay
            groups.append(group)
        if not groups:
            raise ValueError("nothing to train: the adapter and head have no trainable parameters")
        return groups

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameter_groups())
        total = int(self.trainer.estimated_stepping_batches)
        warmup = self.warmup_steps if self.warmup_steps is not None else int(self.warmup_ratio * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(self.lr_schedule, total, warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
