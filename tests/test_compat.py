"""lit_peft.compat: every private Lightning/torch interface is there in the installed versions, and one that is
missing fails loudly, naming the version and what it was for."""

from __future__ import annotations

import types

import lightning
import pytest
import torch
from torch import nn

from lit_peft import compat


def test_the_installed_versions_have_every_private_interface():
    trainer = lightning.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False)
    assert callable(trainer.fit_loop._load_combined_loader_states)
    assert callable(trainer.strategy._forward_redirection)
    from lightning.pytorch.strategies import FSDPStrategy

    assert isinstance(compat.fsdp1_kwargs(FSDPStrategy()), dict)
    compat.reset_seed()
    assert compat.trainer_of(lightning.LightningModule()) is None
    layer = nn.Linear(2, 2)
    weight = layer.weight
    compat.apply_to_tensors(layer, lambda t: t.double())
    assert layer.weight is weight and layer.weight.dtype == torch.float64  # parameters keep their identity


@pytest.mark.parametrize("call, what", [
    (lambda: compat.forward_through(types.SimpleNamespace(), nn.Linear(1, 1), nn.Linear(1, 1), "forward"),
     "_forward_redirection"),
    (lambda: compat.restore_loader_states(types.SimpleNamespace(fit_loop=types.SimpleNamespace())),
     "_load_combined_loader_states"),
    (lambda: compat.fsdp1_kwargs(types.SimpleNamespace()), "kwargs"),
    (lambda: compat.trainer_of(types.SimpleNamespace()), "_trainer"),
])
def test_a_missing_interface_fails_loudly_with_the_version(call, what):
    with pytest.raises(compat.UnsupportedVersionError, match=rf"{what}.*lightning {lightning.__version__}"):
        call()


def test_move_hook_runs_after_every_move():
    class Watched(compat.MoveHook):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(2, 2)
            self.moves = 0

        def after_move(self):
            self.moves += 1

    module = Watched()
    module.double()
    module.to(torch.float32)
    assert module.moves == 2 and module.layer.weight.dtype == torch.float32
