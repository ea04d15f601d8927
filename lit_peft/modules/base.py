"""What every lit_peft LightningModule shares: adapting the backbone, adapter-only checkpoints, optimiser groups
(adapter / head, each with its own learning rate and weight decay) and the warm-up schedules the papers use.

Subclasses build ``self.model`` (the backbone, an ``nn.Module``) in ``__init__`` and name its head modules in
``head_modules()``; the adapter is applied in :meth:`configure_model`, i.e. after the callbacks' ``setup`` (the SVD
cache hooks in there) and before any distributed wrapping, so it also runs for ``validate``/``test``/``predict``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from ..adapters import AdapterStrategy, count_parameters
from ..adapters.base import unwrapped_name

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
        fsdp_cpu_offload: under ``ModelParallelStrategy`` (FSDP2), keep the sharded parameters, their gradients and
            the optimiser state in CPU memory (``fully_shard(offload_policy=CPUOffloadPolicy())``; the optimiser
            step runs on the CPU): least GPU memory, slowest. On a CPU-only run the parameters already live there,
            so it changes nothing.

    Both ``fsdp_*`` options are ignored under DDP and on one device. Lightning's ``FSDPStrategy`` (FSDP1, GPU only)
    has its own knobs (``trainer.strategy.init_args.cpu_offload`` and ``sharding_strategy: SHARD_GRAD_OP`` for no
    resharding after forward), so there a non-default value here is an error; the module gives that strategy an
    ``auto_wrap_policy`` wrapping each of :meth:`shard_units` unless the strategy has one.
    """

    def __init__(self, adapter: AdapterStrategy | None = None, optimizer: OptimizerFactory = torch.optim.AdamW,
                 head_lr: float | None = None, head_weight_decay: float | None = None,
                 lr_schedule: str = "cosine", warmup_ratio: float = 0.1, warmup_steps: int | None = None,
                 fsdp_reshard_after_forward: bool = True, fsdp_cpu_offload: bool = False):
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
        self.fsdp_cpu_offload = fsdp_cpu_offload
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

    def export_extra(self, folder: Path, tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Optional extra exports written by ``MergeAdapters`` after the merged model and the adapter (e.g. a
        Hugging Face ``peft`` adapter folder); nothing by default. ``tensors``: the model's gathered
        :func:`~lit_peft.adapters.adapter_state_dict` (rank 0 alone calls this, so it must not read sharded
        tensors from the model)."""

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
        if self._trainer is not None:
            # Lightning's DDP/FSDP strategies re-seed every process from seed_everything's seed (reset_seed) when
            # they set up the process group, single-device ones do not: re-seed in every strategy, so an adapter's
            # random init and the dropout masks drawn in training are the same in one process as in many.
            from lightning.fabric.utilities.seed import reset_seed

            reset_seed()
        self._apply_adapter()
        self._shard()

    def _apply(self, fn, *args, **kwargs):
        module = super()._apply(fn, *args, **kwargs)
        if self.__dict__.get("_sharded") and self.fsdp_cpu_offload:
            # ModelParallelStrategy moves the whole module to its GPU after configure_model; FSDP2's CPU offload
            # needs the (sharded) parameters back in host memory, the buffers stay where they were moved.
            moved = {id(p) for p in self.model.parameters() if p.device.type != "cpu"}
            if moved:
                self.model._apply(lambda t: t.cpu() if id(t) in moved else t)
        return module

    def _shard(self) -> None:
        """Under Lightning's ``ModelParallelStrategy``: ``fully_shard`` every shard unit, then the backbone (the
        rest: embeddings, final norm, head) on the data-parallel mesh. Runs after the adapter is applied, so the
        adapters' initialisation (SVFT's SVD, DoRA's norms) has seen whole weights; frozen weights are sharded too.
        Under ``FSDPStrategy`` (FSDP1), which wraps the module itself after this hook: see :meth:`_prepare_fsdp1`."""
        if self._trainer is None:
            return
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        if isinstance(self.trainer.strategy, FSDPStrategy):
            self._prepare_fsdp1(self.trainer.strategy)
            return
        if self._sharded:
            return
        if not isinstance(self.trainer.strategy, ModelParallelStrategy):
            return
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        mesh = self.device_mesh["data_parallel"]
        # Pinned host memory needs an accelerator; on a CPU mesh the parameters are already in CPU memory.
        offload = CPUOffloadPolicy(pin_memory=mesh.device_type != "cpu") if self.fsdp_cpu_offload else OffloadPolicy()
        units = self.shard_units()
        for module in [*units, self.model]:
            fully_shard(module, mesh=mesh, reshard_after_forward=self.fsdp_reshard_after_forward,
                        offload_policy=offload)
        self._sharded = True
        rank_zero_info(f"lit_peft: FSDP2 over {mesh.size()} processes: {len(units)} shard units + the backbone root "
                       f"(reshard_after_forward={self.fsdp_reshard_after_forward}, cpu_offload={self.fsdp_cpu_offload}"
                       + (": no effect, the run is on the CPU)" if self.fsdp_cpu_offload and mesh.device_type == "cpu"
                          else ")"))

    def fsdp1_auto_wrap_policy(self) -> Callable[..., bool]:
        """An FSDP1 ``auto_wrap_policy`` that wraps exactly the modules of :meth:`shard_units` (by identity, so no
        other module of the same class); the root wrapper, which Lightning puts around this module, holds the rest."""
        from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

        units = {id(unit) for unit in self.shard_units()}
        return functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda module: id(module) in units)

    def _prepare_fsdp1(self, strategy) -> None:
        """Lightning's ``FSDPStrategy`` wraps this module in ``FullyShardedDataParallel`` after ``configure_model``:
        give it :meth:`fsdp1_auto_wrap_policy` unless the user configured a policy, and refuse what cannot work.

        In a later stage (``test`` after ``fit``) Lightning sees wrapped blocks and does not wrap this module again,
        which would leave the weights outside the blocks (held by that root wrapper) sharded: it gets the wrapper of
        the first stage back instead."""
        wrapper = self.__dict__.get("_fsdp1_wrapper")
        if self._sharded:
            if wrapper is not None and strategy.model is self:
                strategy.kwargs.pop("auto_wrap_policy", None)  # already applied; Lightning would warn and drop it
                strategy.model = wrapper
            return
        knobs = {"fsdp_cpu_offload": (self.fsdp_cpu_offload, "trainer.strategy.init_args.cpu_offload: true"),
                 "fsdp_reshard_after_forward": (not self.fsdp_reshard_after_forward,
                                                "trainer.strategy.init_args.sharding_strategy: SHARD_GRAD_OP")}
        for key, (changed, instead) in knobs.items():
            if changed:
                raise ValueError(f"model.init_args.{key} applies to FSDP2 (ModelParallelStrategy, configs/strategy/"
                                 f"fsdp.yaml); with FSDPStrategy (FSDP1) leave it at its default and set {instead}")
        if not strategy.kwargs.get("use_orig_params", True):
            raise ValueError("FSDPStrategy(use_orig_params=False) cannot wrap adapted layers: every wrapped block "
                             "holds frozen base weights and trainable adapter tensors, which FSDP1 flattens together "
                             "only with use_orig_params=True (Lightning's default); leave use_orig_params unset or true")
        if "auto_wrap_policy" not in strategy.kwargs:
            strategy.kwargs["auto_wrap_policy"] = self.fsdp1_auto_wrap_policy()
            rank_zero_info(f"lit_peft: FSDP1 auto-wrap policy: {len(self.shard_units())} shard units "
                           f"({', '.join(sorted({type(u).__name__ for u in self.shard_units()}))}) + the root")
        self._sharded = True

    def _fsdp1_root(self) -> nn.Module | None:
        """The ``FullyShardedDataParallel`` (FSDP1) wrapper that Lightning's ``FSDPStrategy`` put around this module,
        if any."""
        if self._trainer is None:
            return None
        from torch.distributed.fsdp import FullyShardedDataParallel

        root = getattr(self.trainer.strategy, "model", None)
        if not isinstance(root, FullyShardedDataParallel):
            return None
        self.__dict__["_fsdp1_wrapper"] = root  # kept for the next stage (not a submodule: it holds this module)
        return root

    # Every stage's first hook after the strategy has wrapped the module: remember an FSDP1 wrapper.
    def on_fit_start(self) -> None:
        self._fsdp1_root()

    def on_validation_start(self) -> None:
        self._fsdp1_root()

    def on_test_start(self) -> None:
        self._fsdp1_root()

    def on_predict_start(self) -> None:
        self._fsdp1_root()

    @contextlib.contextmanager
    def full_weights(self) -> Iterator[Callable[[dict], dict]]:
        """Inside it, every parameter of the model reads whole on every rank, outside ``forward`` (what the merge
        and the orthogonality check read). FSDP2 shards are DTensors that those readers gather (``full_tensor``);
        FSDP1's flat shards are gathered here (``summon_full_params``, read-only: nothing is written back) and freed
        on exit, so it yields ``keep``: ``keep(tensors)`` makes a dict of tensors read inside outlive it (copies
        under FSDP1, the dict itself otherwise). Collective under FSDP1: every rank must enter it."""
        root = self._fsdp1_root()
        if root is None:
            yield lambda tensors: tensors
            return
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(root, writeback=False):
            yield lambda tensors: {key: tensor.clone() for key, tensor in tensors.items()}

    def adapted_outputs(self, batch) -> torch.Tensor:
        """``model_outputs(self.model, batch)``, the adapted model's outputs (the merge check). Under FSDP1 it runs
        through the root wrapper's ``forward``, as Lightning runs the steps, since that gathers the weights outside
        the shard units. Collective when sharded: every rank must call it."""
        root = self._fsdp1_root()
        if root is None:
            return self._own_outputs(batch)
        return self.trainer.strategy._forward_redirection(root, self, "_own_outputs", batch)

    def _own_outputs(self, batch) -> torch.Tensor:
        return self.model_outputs(self.model, batch)

    def load_trained_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load an adapter-only ``state_dict`` (a checkpoint's: whole tensors, on every rank) into this module, also
        when it is sharded: each rank keeps its own shard of FSDP2's DTensors (no communication), FSDP1's flat
        parameters load through the root wrapper (``set_model_state_dict``, collective: every rank calls it)."""
        root = self._fsdp1_root()
        if root is not None:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            # a copy: set_model_state_dict adds the model's missing (frozen) entries to the dict it is given
            set_model_state_dict(root, dict(state), options=StateDictOptions(full_state_dict=True, strict=False))
            return
        from torch.distributed.tensor import DTensor, distribute_tensor

        targets = {**dict(self.named_parameters()), **dict(self.named_buffers())}
        self.load_state_dict({key: distribute_tensor(tensor, targets[key].device_mesh, targets[key].placements,
                                                     src_data_rank=None)
                              if isinstance(targets.get(key), DTensor) else tensor
                              for key, tensor in state.items()}, strict=False)

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
        support). The frozen backbone is rebuilt from its own source when a checkpoint is loaded. Under FSDP1 the
        root wrapper's state-dict hooks need every key, so there :meth:`on_save_checkpoint` drops them instead."""
        state = super().state_dict(*args, **kwargs)
        if self._fsdp1_root() is None:
            self._drop_frozen(state, kwargs.get("prefix", args[1] if len(args) > 1 else ""))
        return state

    def _drop_frozen(self, state: dict, prefix: str = "") -> None:
        # FSDP1's wrapped blocks: named_parameters says blocks.0._fsdp_wrapped_module.…, its state dict blocks.0.…
        keep = {prefix + unwrapped_name(name) for name, p in self.named_parameters() if p.requires_grad}
        keep |= {prefix + unwrapped_name(name) for name, _ in self.named_buffers() if ".adapters." in name}
        for key in list(state):
            if key.startswith(prefix) and key not in keep:
                del state[key]

    # -- exact resume --------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep the random state (BOFT's multiplicative dropout and LoRA's dropout draw from it), so a resumed run
        continues with the same random stream as an uninterrupted one."""
        checkpoint["lit_peft_rng_states"] = rng_states()
        if self._fsdp1_root() is not None and "state_dict" in checkpoint:
            self._drop_frozen(checkpoint["state_dict"])

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "lit_peft_rng_states" in checkpoint:
            set_rng_states(checkpoint["lit_peft_rng_states"])

    def on_train_start(self) -> None:
        """Mid-epoch resume: hand the training loader its position from the checkpoint. Lightning does that when
        it creates the loader, but ``configure_optimizers`` creates it earlier (``trainer.estimated_stepping_batches``
        for the schedules), before the checkpoint is restored, and Lightning then drops the position (Lightning
        issue #20550). Here is early enough: the loader draws its first batch lazily, after this hook
        (``lit_peft.data.sampling.ResumableLoader``); a no-op when the states are already loaded or not resuming."""
        load = getattr(self.trainer.fit_loop, "_load_combined_loader_states", None)
        if load is not None:
            load()

    # -- optimisation --------------------------------------------------------------------------------------------
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
