"""Sharding a backbone with FSDP2 (``fully_shard``) or FSDP1 (an auto-wrap policy), and reading or loading it whole.

Plain torch: the Lightning wiring (which strategy, when) is :class:`lit_peft.distributed.ShardedModuleMixin`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn


def default_shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards one by one (each gathers its weights for its own forward/backward): the transformer
    blocks. The members of every ``nn.ModuleList``/``nn.Sequential`` inside ``model`` whose class name ends with
    ``Layer`` or ``Block`` (``LlamaDecoderLayer``, ``BertLayer``, timm's ``Block``), outermost first and never one
    inside another."""
    units: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside or not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        members = [m for m in module if type(m).__name__.endswith(("Layer", "Block"))]
        if members and len(members) == len(module):
            units += members
            inside |= {id(m) for member in members for m in member.modules()}
    return units


def fully_shard_model(model: nn.Module, units: Sequence[nn.Module], mesh, reshard_after_forward: bool = True,
                      cpu_offload: bool = False) -> None:
    """FSDP2: ``fully_shard`` every unit, then ``model`` (the rest: embeddings, final norm, head) on ``mesh``.
    Frozen weights are sharded too. ``cpu_offload`` keeps shards, gradients and optimiser state in host memory
    (pinned on an accelerator mesh; on a CPU mesh it changes nothing)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    shard_svd_tensors(model)
    offload = CPUOffloadPolicy(pin_memory=mesh.device_type != "cpu") if cpu_offload else OffloadPolicy()
    for module in [*units, model]:
        fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward, offload_policy=offload)


def shard_svd_tensors(model: nn.Module) -> int:
    """Before ``fully_shard``: SVFT's ``U``, ``S``, ``V`` become frozen parameters, so FSDP2 shards them instead of
    keeping them whole on every rank (about 6 bytes per base parameter in float32). Returns how many parts."""
    parts = [m for m in model.modules() if callable(getattr(m, "svd_to_parameters", None))]
    for part in parts:
        part.svd_to_parameters()
    return len(parts)


def fsdp1_auto_wrap_policy(units: Sequence[nn.Module]) -> Callable[..., bool]:
    """An FSDP1 ``auto_wrap_policy`` that wraps exactly ``units`` (by identity, so no other module of the same
    class); the root wrapper holds the rest."""
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    ids = {id(unit) for unit in units}
    return functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda module: id(module) in ids)


def check_fsdp1_options(fsdp_kwargs: Mapping, reshard_after_forward: bool, cpu_offload: bool) -> None:
    """Refuse what cannot work under FSDP1: the FSDP2-only options of the module, ``use_orig_params=False``."""
    knobs = {"fsdp_cpu_offload": (cpu_offload, "trainer.strategy.init_args.cpu_offload: true"),
             "fsdp_reshard_after_forward": (not reshard_after_forward,
                                            "trainer.strategy.init_args.sharding_strategy: SHARD_GRAD_OP")}
    for key, (changed, instead) in knobs.items():
        if changed:
            raise ValueError(f"model.init_args.{key} applies to FSDP2 (ModelParallelStrategy, configs/strategy/"
                             f"fsdp.yaml); with FSDPStrategy (FSDP1) leave it at its default and set {instead}")
    if not fsdp_kwargs.get("use_orig_params", True):
        raise ValueError("FSDPStrategy(use_orig_params=False) cannot wrap adapted layers: every wrapped block "
                         "holds frozen base weights and trainable adapter tensors, which FSDP1 flattens together "
                         "only with use_orig_params=True (Lightning's default); leave use_orig_params unset or true")


def is_fsdp1(module: object) -> bool:
    """``module`` is a ``FullyShardedDataParallel`` (FSDP1) wrapper."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(module, FullyShardedDataParallel)


@contextlib.contextmanager
def fsdp1_full_weights(root: nn.Module | None) -> Iterator[Callable[[dict], dict]]:
    """Inside it every parameter under the FSDP1 ``root`` reads whole (``summon_full_params``, read-only; freed on
    exit; collective: every rank must enter it). Yields ``keep``: ``keep(tensors)`` makes a dict of tensors read
    inside outlive it (copies under FSDP1, the dict itself when ``root`` is ``None``: nothing to gather)."""
    if root is None:
        yield lambda tensors: tensors
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(root, writeback=False):
        yield lambda tensors: {key: tensor.clone() for key, tensor in tensors.items()}


def load_whole_state(module: nn.Module, state: Mapping[str, torch.Tensor], fsdp1_root: nn.Module | None = None) -> None:
    """Load a state dict of whole tensors (``strict=False``) into ``module``, also when it is sharded: each rank
    keeps its own shard of FSDP2's DTensors (no communication); under an FSDP1 ``fsdp1_root`` the flat parameters
    load through it (``set_model_state_dict``, collective: every rank calls it)."""
    if fsdp1_root is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # a copy: set_model_state_dict adds the model's missing (frozen) entries to the dict it is given
        set_model_state_dict(fsdp1_root, dict(state), options=StateDictOptions(full_state_dict=True, strict=False))
        return
    from torch.distributed.tensor import DTensor, distribute_tensor

    targets = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    module.load_state_dict({key: distribute_tensor(tensor, targets[key].device_mesh, targets[key].placements,
                                                   src_data_rank=None)
                            if isinstance(targets.get(key), DTensor) else tensor
                            for key, tensor in state.items()}, strict=False)
