"""Every private Lightning / PyTorch interface lit_peft relies on, in one place.

Each is reached through a function here that first checks it exists in the installed version and otherwise raises
:class:`UnsupportedVersionError` naming the version and what is missing: an upgrade that removes one fails loudly at
the first use, never as a silent no-op (a resume that silently restarts the epoch, say).

Used (checked against Lightning 2.4–2.6 and torch 2.4–2.14):

- Lightning's ``strategy._forward_redirection`` (run a method of the LightningModule through the FSDP1 root
  wrapper's ``forward``, as Lightning runs the training steps): :func:`forward_through`.
- ``trainer.fit_loop._load_combined_loader_states`` (hand the training loader its mid-epoch position from a
  checkpoint; Lightning drops it when ``configure_optimizers`` builds the loader early, its issue #20550):
  :func:`restore_loader_states`.
- ``FSDPStrategy.kwargs`` (the keyword arguments Lightning passes to ``FullyShardedDataParallel``; lit_peft adds
  its ``auto_wrap_policy``): :func:`fsdp1_kwargs`.
- ``LightningModule._trainer`` (the attached trainer or ``None``; the public ``trainer`` property raises when there
  is none): :func:`trainer_of`.
- ``lightning.fabric.utilities.seed.reset_seed`` (re-seed from ``seed_everything``'s seed): :func:`reset_seed`.
- ``LightningCLI._parse_ckpt_path`` (where the CLI replaces model arguments by a checkpoint's hyperparameters;
  lit_peft wraps it to name each replaced argument): :func:`parse_ckpt_hparams`.
- ``torch.nn.Module._apply`` (move a subset of a module's tensors, and the hook a module overrides to see every
  ``.to()``/``.cuda()``): :func:`apply_to_tensors`, :class:`MoveHook`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class UnsupportedVersionError(RuntimeError):
    """An installed Lightning or torch lacks a private interface lit_peft needs."""


def _lightning_version() -> str:
    import lightning

    return lightning.__version__


def _missing(owner: str, name: str, purpose: str, library: str = "lightning") -> UnsupportedVersionError:
    version = _lightning_version() if library == "lightning" else torch.__version__
    return UnsupportedVersionError(
        f"lit_peft needs {owner}.{name} ({purpose}), which {library} {version} does not have; lit_peft supports "
        f"lightning 2.4–2.6 and torch 2.4 or newer: install one of those (pip install 'lightning>=2.4,<2.7')")


def forward_through(strategy: Any, wrapper: nn.Module, module: nn.Module, method: str, *args: Any) -> Any:
    """``module.<method>(*args)`` run inside ``wrapper.forward`` (so FSDP1 gathers the root's weights around it)."""
    redirect = getattr(strategy, "_forward_redirection", None)
    if not callable(redirect):
        raise _missing(type(strategy).__name__, "_forward_redirection",
                       "running the merge check through the FSDP1 root wrapper")
    return redirect(wrapper, module, method, *args)


def parse_ckpt_hparams(cli: Any) -> None:
    """Run LightningCLI's own ``_parse_ckpt_path`` on ``cli`` (the checkpoint's hyperparameters into the config)."""
    from lightning.pytorch.cli import LightningCLI

    parse = getattr(LightningCLI, "_parse_ckpt_path", None)
    if not callable(parse):
        raise _missing("LightningCLI", "_parse_ckpt_path", "naming the model arguments a checkpoint replaces on resume")
    parse(cli)


def restore_loader_states(trainer: Any) -> None:
    """Load the training loader's saved position (a no-op when it is already loaded or nothing is resumed)."""
    load = getattr(trainer.fit_loop, "_load_combined_loader_states", None)
    if not callable(load):
        raise _missing("trainer.fit_loop", "_load_combined_loader_states", "mid-epoch resume of the training loader")
    load()


def fsdp1_kwargs(strategy: Any) -> dict[str, Any]:
    """The (mutable) keyword arguments Lightning's ``FSDPStrategy`` passes to ``FullyShardedDataParallel``."""
    kwargs = getattr(strategy, "kwargs", None)
    if not isinstance(kwargs, dict):
        raise _missing(type(strategy).__name__, "kwargs", "giving FSDPStrategy lit_peft's auto_wrap_policy")
    return kwargs


def trainer_of(module: Any) -> Any:
    """The ``Trainer`` a LightningModule is attached to, or ``None``."""
    if "_trainer" not in vars(module):
        raise _missing(type(module).__name__, "_trainer", "knowing whether a Trainer is attached")
    return module._trainer


def reset_seed() -> None:
    """Re-seed every RNG from ``seed_everything``'s seed, as Lightning's DDP/FSDP strategies do per process."""
    try:
        from lightning.fabric.utilities.seed import reset_seed as lightning_reset_seed
    except ImportError as err:
        raise _missing("lightning.fabric.utilities.seed", "reset_seed", "the same adapter init on every rank") from err
    lightning_reset_seed()


def apply_to_tensors(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> nn.Module:
    """``fn`` applied to every parameter and buffer of ``module`` in place (what ``.to()``/``.cpu()`` use), keeping
    the parameters' identity, so optimisers holding them stay valid."""
    if not callable(getattr(nn.Module, "_apply", None)):
        raise _missing("torch.nn.Module", "_apply", "moving FSDP2's offloaded shards back to the CPU", "torch")
    return module._apply(fn)


class MoveHook(nn.Module):
    """A mixin whose :meth:`after_move` runs after every ``.to()``/``.cuda()``/``.cpu()`` of the module (torch's
    ``_apply``, the one method those all call)."""

    def _apply(self, fn, *args, **kwargs):
        module = super()._apply(fn, *args, **kwargs)
        self.after_move()
        return module

    def after_move(self) -> None:
        """Called after the module's tensors were moved or cast; nothing by default."""


class _TorchaoEnumNotice(logging.Filter):
    """Drops the deprecation notice torch >= 2.14 logs for each enum that torchao registers with torch's pytree ("...
    is an Enum subclass and is now natively supported by torch.compile ..."), addressed to torchao's developers and
    printed whenever torchao is imported (by lit_peft's quantized base, and by peft and transformers when torchao is
    installed); every other record of that logger passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is an Enum subclass and is now natively supported" not in str(record.msg)


def install_log_filters() -> None:
    """Add lit_peft's log filters (once; called when ``lit_peft`` is imported)."""
    logger = logging.getLogger("torch.utils._pytree")
    if not any(isinstance(f, _TorchaoEnumNotice) for f in logger.filters):
        logger.addFilter(_TorchaoEnumNotice())
