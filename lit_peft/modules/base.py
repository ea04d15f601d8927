"""What every lit_peft LightningModule shares: adapting the backbone, adapter-only checkpoints, optimiser groups
(adapter / head, each with its own learning rate and weight decay) and the warm-up schedules the papers use.

Subclasses build ``self.model`` (the backbone, an ``nn.Module``) in ``__init__`` and name its head modules in
``head_modules()``; the adapter is applied in :meth:`configure_model`, i.e. after the callbacks' ``setup`` (the SVD
cache hooks in there) and before any distributed wrapping, so it also runs for ``validate``/``test``/``predict``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from ..adapters import AdapterStrategy, count_parameters

OptimizerFactory = Callable[[Iterable], torch.optim.Optimizer]


def rng_states() -> dict:
    """The random states of torch (CPU and CUDA), numpy and Python, as tensors and plain Python values only, so a
    checkpoint holding them still loads with ``torch.load(weights_only=True)``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
            "python": random.getstate()}


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


def warmup_lambda(schedule: str, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Learning-rate multiplier per optimiser step: linear warm-up, then cosine or linear decay to 0, or constant."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if schedule == "linear":
            return 1.0 - progress
        return 1.0

    return factor


class AdaptedModule(L.LightningModule):
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
            Ignored by every other strategy.
    """

    def __init__(self, adapter: AdapterStrategy | None = None, optimizer: OptimizerFactory = torch.optim.AdamW,
                 head_lr: float | None = None, head_weight_decay: float | None = None,
                 lr_schedule: str = "cosine", warmup_ratio: float = 0.1, warmup_steps: int | None = None,
                 fsdp_reshard_after_forward: bool = True):
        super().__init__()
        if lr_schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine', 'linear' or 'constant', got {lr_schedule!r}")
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
        # Checkpoints hold the trainable tensors only (see state_dict), so loading one is never strict.
        self.strict_loading = False
        self._adapted = False
        self._sharded = False

    # -- to be provided by subclasses ----------------------------------------------------------------------------
    model: nn.Module

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

    def export_extra(self, folder: Path) -> None:
        """Optional extra exports written by ``MergeAdapters`` after the merged model and the adapter (e.g. a
        Hugging Face ``peft`` adapter folder); nothing by default."""

    def shard_units(self) -> list[nn.Module]:
        """The modules that FSDP2 shards one by one (each gathers its weights for its own forward/backward): the
        transformer blocks. By default the members of every ``nn.ModuleList``/``nn.Sequential`` inside
        ``self.model`` whose class name ends with ``Layer`` or ``Block`` (``LlamaDecoderLayer``, ``BertLayer``,
        timm's ``Block``), outermost first and never one inside another; subclasses may override."""
        units: list[nn.Module] = []
        inside: set[int] = set()
        for module in self.model.modules():
            if id(module) in inside or not isinstance(module, (nn.ModuleList, nn.Sequential)):
                continue
            members = [m for m in module if type(m).__name__.endswith(("Layer", "Block"))]
            if members and len(members) == len(module):
                units += members
                inside |= {id(m) for member in members for m in member.modules()}
        return units

    # -- adapting ------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        self._apply_adapter()
        self._shard()

    def _shard(self) -> None:
        """Under Lightning's ``ModelParallelStrategy``: ``fully_shard`` every shard unit, then the backbone (the
        rest: embeddings, final norm, head) on the data-parallel mesh. Runs after the adapter is applied, so the
        adapters' initialisation (SVFT's SVD, DoRA's norms) has seen whole weights; frozen weights are sharded too."""
        if self._sharded or self._trainer is None:
            return
        from lightning.pytorch.strategies import ModelParallelStrategy

        if not isinstance(self.trainer.strategy, ModelParallelStrategy):
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        units = self.shard_units()
        for unit in units:
            fully_shard(unit, mesh=mesh, reshard_after_forward=self.fsdp_reshard_after_forward)
        fully_shard(self.model, mesh=mesh, reshard_after_forward=self.fsdp_reshard_after_forward)
        self._sharded = True
        rank_zero_info(f"lit_peft: FSDP2 over {mesh.size()} processes: {len(units)} shard units + the backbone root "
                       f"(reshard_after_forward={self.fsdp_reshard_after_forward})")

    def _apply_adapter(self) -> None:
        if self._adapted:
            return
        heads = self.head_names()
        if self.adapter is not None:
            missing = [h for h in heads if h not in self.adapter.trainable_modules]
            self.adapter.trainable_modules = list(self.adapter.trainable_modules) + missing
            self.adapter.apply(self.model)
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

    # -- adapter-only checkpoints --------------------------------------------------------------------------------
    def state_dict(self, *args, **kwargs):
        """Only what training changes: trainable parameters and the adapters' persistent buffers (e.g. SVFT's
        support). The frozen backbone is rebuilt from its own source when a checkpoint is loaded."""
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        keep = {prefix + name for name, p in self.named_parameters() if p.requires_grad}
        keep |= {prefix + name for name, _ in self.named_buffers() if ".adapters." in name}
        for key in list(state):
            if key.startswith(prefix) and key not in keep:
                del state[key]
        return state

    # -- exact resume --------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep the random state (BOFT's multiplicative dropout and LoRA's dropout draw from it), so a resumed run
        continues with the same random stream as an uninterrupted one."""
        checkpoint["lit_peft_rng_states"] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "lit_peft_rng_states" in checkpoint:
            set_rng_states(checkpoint["lit_peft_rng_states"])

    # -- optimisation --------------------------------------------------------------------------------------------
    def parameter_groups(self) -> list[dict]:
        heads = tuple(f"model.{h}." for h in self.head_names())
        adapter, head = [], []
        for name, param in self.named_parameters():
            if param.requires_grad:
                (head if name.startswith(heads) else adapter).append(param)
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
