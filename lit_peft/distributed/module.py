"""The Lightning side of sharding: which strategy shards the backbone how, and the FSDP1 root wrapper across stages.

:class:`ShardedModuleMixin` is part of every :class:`~lit_peft.modules.AdaptedModule`; it reads the module's
``model`` (the backbone), ``shard_units()``, ``fsdp_reshard_after_forward`` and ``fsdp_cpu_offload``.

- Lightning's ``ModelParallelStrategy`` (FSDP2): after the adapter is applied (so SVFT's SVD and DoRA's norms saw
  whole weights) every shard unit and then the backbone root are ``fully_shard``-ed on the data-parallel mesh.
- Lightning's ``FSDPStrategy`` (FSDP1, GPU only) wraps the module itself after ``configure_model``: the mixin gives
  it an ``auto_wrap_policy`` wrapping exactly the shard units (unless the user set one) and refuses what cannot
  work. In a later stage (``test`` after ``fit``) Lightning sees wrapped blocks and does not wrap again, which would
  leave the root's weights sharded: it gets the first stage's wrapper back instead.
- DDP and one device: nothing to do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from ..compat import MoveHook, apply_to_tensors, forward_through, fsdp1_kwargs, trainer_of
from .sharding import check_fsdp1_options, default_shard_units, fsdp1_full_weights, fully_shard_model, is_fsdp1
from .sharding import fsdp1_auto_wrap_policy as wrap_exactly
from .sharding import load_whole_state


class ShardedModuleMixin(MoveHook):
    """Sharding hooks of a LightningModule whose backbone is ``self.model``."""

    model: nn.Module
    fsdp_reshard_after_forward: bool
    fsdp_cpu_offload: bool
    _sharded: bool = False

    def shard_units(self) -> list[nn.Module]:
        """The modules FSDP shards one by one: :func:`~lit_peft.distributed.default_shard_units` of the backbone
        (its transformer blocks); subclasses may override."""
        return default_shard_units(self.model)

    def shard(self) -> None:
        """Shard the backbone for the trainer's strategy (``configure_model`` calls it after the adapter)."""
        if trainer_of(self) is None:
            return
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        strategy = self.trainer.strategy
        if isinstance(strategy, FSDPStrategy):
            self._prepare_fsdp1(strategy)
        elif isinstance(strategy, ModelParallelStrategy) and not self._sharded:
            mesh = self.device_mesh["data_parallel"]
            units = self.shard_units()
            fully_shard_model(self.model, units, mesh, self.fsdp_reshard_after_forward, self.fsdp_cpu_offload)
            self._sharded = True
            rank_zero_info(
                f"lit_peft: FSDP2 over {mesh.size()} processes: {len(units)} shard units + the backbone root "
                f"(reshard_after_forward={self.fsdp_reshard_after_forward}, cpu_offload={self.fsdp_cpu_offload}"
                + (": no effect, the run is on the CPU)" if self.fsdp_cpu_offload and mesh.device_type == "cpu"
                   else ")"))

    def after_move(self) -> None:
        # ModelParallelStrategy moves the whole module to its GPU after configure_model; FSDP2's CPU offload needs
        # the (sharded) parameters back in host memory, the buffers stay where they were moved.
        if self.__dict__.get("_sharded") and self.fsdp_cpu_offload:
            moved = {id(p) for p in self.model.parameters() if p.device.type != "cpu"}
            if moved:
                apply_to_tensors(self.model, lambda t: t.cpu() if id(t) in moved else t)

    def fsdp1_auto_wrap_policy(self) -> Callable[..., bool]:
        """An FSDP1 ``auto_wrap_policy`` wrapping exactly :meth:`shard_units`."""
        return wrap_exactly(self.shard_units())

    def _prepare_fsdp1(self, strategy) -> None:
        kwargs = fsdp1_kwargs(strategy)
        wrapper = self.__dict__.get("_fsdp1_wrapper")
        if self._sharded:
            if wrapper is not None and strategy.model is self:
                kwargs.pop("auto_wrap_policy", None)  # already applied; Lightning would warn and drop it
                strategy.model = wrapper
            return
        check_fsdp1_options(kwargs, self.fsdp_reshard_after_forward, self.fsdp_cpu_offload)
        if "auto_wrap_policy" not in kwargs:
            units = self.shard_units()
            kwargs["auto_wrap_policy"] = wrap_exactly(units)
            rank_zero_info(f"lit_peft: FSDP1 auto-wrap policy: {len(units)} shard units "
                           f"({', '.join(sorted({type(u).__name__ for u in units}))}) + the root")
        self._sharded = True

    def fsdp1_root(self) -> nn.Module | None:
        """The ``FullyShardedDataParallel`` (FSDP1) wrapper Lightning's ``FSDPStrategy`` put around this module, if
        any (remembered for the next stage: not a submodule, since it holds this module)."""
        if trainer_of(self) is None:
            return None
        root = self.trainer.strategy.model
        if not is_fsdp1(root):
            return None
        self.__dict__["_fsdp1_wrapper"] = root
        return root

    # Every stage's first hook after the strategy has wrapped the module: remember an FSDP1 wrapper.
    def on_fit_start(self) -> None:
        self.fsdp1_root()

    def on_validation_start(self) -> None:
        self.fsdp1_root()

    def on_test_start(self) -> None:
        self.fsdp1_root()

    def on_predict_start(self) -> None:
        self.fsdp1_root()

    @contextlib.contextmanager
    def full_weights(self) -> Iterator[Callable[[dict], dict]]:
        """Inside it every parameter of the model reads whole on every rank, outside ``forward`` (what the merge and
        the orthogonality check read): FSDP2's DTensors are gathered by their readers (``full_tensor``), FSDP1's
        flat shards here (see :func:`~lit_peft.distributed.fsdp1_full_weights`, which yields ``keep``). Collective
        under FSDP1: every rank must enter it."""
        with fsdp1_full_weights(self.fsdp1_root()) as keep:
            yield keep

    def adapted_outputs(self, batch) -> torch.Tensor:
        """``model_outputs(self.model, batch)``, the adapted model's outputs (the merge check), run through the FSDP1
        root wrapper's ``forward`` when there is one, as Lightning runs the steps. Collective when sharded."""
        root = self.fsdp1_root()
        if root is None:
            return self._own_outputs(batch)
        return forward_through(self.trainer.strategy, root, self, "_own_outputs", batch)

    def _own_outputs(self, batch) -> torch.Tensor:
        return self.model_outputs(self.model, batch)

    def load_trained_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load an adapter-only ``state_dict`` (a checkpoint's: whole tensors, on every rank) into this module, also
        when it is sharded (:func:`~lit_peft.distributed.load_whole_state`; collective under FSDP1)."""
        load_whole_state(self, state, self.fsdp1_root())
