"""``OrthogonalityCheck`` (:mod:`lit_peft.callbacks.orthogonality`): BOFT's blocks stay orthogonal in training; a
planted non-orthogonal layer warns, stops or raises; LoRA models are left alone. A real ``lightning.Trainer`` runs a
few steps on scikit-learn's digits, on the tiny ViT of ``helpers.callbacks``.
"""

from __future__ import annotations

import pytest
import torch

from helpers.callbacks import make_module, trainer
from lit_peft.adapters import BOFT, BOFTLinear, LoRA
from lit_peft.callbacks import OrthogonalityCheck, OrthogonalityError
from lit_peft.modules.vision import ViTClassifier


def boft_module(seed: int = 0) -> ViTClassifier:
    module = make_module(BOFT(block_size=8, n_butterfly_factors=2), seed,
                         optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))
    module.configure_model()  # idempotent; Lightning's own call then does nothing
    return module


def plant_non_orthogonal(module: ViTClassifier, name: str = "blocks.0.attn.qkv") -> None:
    """Make one layer's blocks ``1.1 Q``: ``‖(1.1Q)ᵀ(1.1Q) − I‖_F = 0.21·√8 ≈ 0.59``."""
    layer = module.model.get_submodule(name)
    assert isinstance(layer, BOFTLinear)
    original = layer.orthogonal_blocks
    layer.orthogonal_blocks = lambda part, training=False: original(part, training) * 1.1


def test_orthogonality_check_logs_tiny_error(tmp_path, digits):
    module = boft_module()
    check = OrthogonalityCheck(every_n_steps=1, tolerance=1e-4, action="raise")
    run = trainer(tmp_path, [check], max_steps=3)
    run.fit(module, datamodule=digits)
    assert run.global_step == 3
    assert check.last_error is not None and check.last_error < 1e-5
    assert float(run.callback_metrics["orthogonality_error"]) == pytest.approx(check.last_error)
    # The adapters did train (so the blocks are not trivially the identity).
    skew = module.model.blocks[0].attn.qkv.adapters["q"].skew
    assert skew.abs().max() > 0


def test_orthogonality_check_warn(tmp_path, digits):
    module = boft_module()
    plant_non_orthogonal(module)
    check = OrthogonalityCheck(every_n_steps=1, tolerance=1e-4, action="warn")
    run = trainer(tmp_path, [check], max_steps=3)
    with pytest.warns(UserWarning, match="OrthogonalityCheck: max .* exceeds tolerance") as record:
        run.fit(module, datamodule=digits)
    assert len([w for w in record if "OrthogonalityCheck" in str(w.message)]) == 3  # every step, training went on
    assert run.global_step == 3 and not run.should_stop
    assert check.last_error == pytest.approx(0.21 * 8 ** 0.5, rel=1e-3)
    assert float(run.callback_metrics["orthogonality_error"]) == pytest.approx(check.last_error)


def test_orthogonality_check_stop(tmp_path, digits):
    module = boft_module()
    plant_non_orthogonal(module, "blocks.1.mlp.fc2")
    check = OrthogonalityCheck(every_n_steps=1, tolerance=1e-4, action="stop")
    run = trainer(tmp_path, [check], max_steps=5)
    with pytest.warns(UserWarning, match="exceeds tolerance"):
        run.fit(module, datamodule=digits)
    assert run.should_stop
    assert run.global_step == 1  # stopped after the first check, long before max_steps


def test_orthogonality_check_raise(tmp_path, digits):
    module = boft_module()
    plant_non_orthogonal(module)
    check = OrthogonalityCheck(every_n_steps=1, tolerance=1e-4, action="raise")
    run = trainer(tmp_path, [check], max_steps=5)
    with pytest.raises(OrthogonalityError, match="exceeds tolerance"):
        run.fit(module, datamodule=digits)
    assert run.global_step == 1


@pytest.mark.parametrize("every, accumulate, expected", [(2, 1, [2, 4]), (1, 3, [1, 2, 3])],
                         ids=["every-2-steps", "once-per-optimiser-step-under-accumulation"])
def test_orthogonality_check_every_n_steps(tmp_path, digits, monkeypatch, every, accumulate, expected):
    """Checks fall on optimiser steps: every ``every_n_steps``, and once per step (not per micro-batch) under
    gradient accumulation."""
    steps = []
    original = OrthogonalityCheck.check

    def spy(self, trainer, pl_module):
        steps.append(trainer.global_step)
        return original(self, trainer, pl_module)

    monkeypatch.setattr(OrthogonalityCheck, "check", spy)
    run = trainer(tmp_path, [OrthogonalityCheck(every_n_steps=every)], max_steps=5 if every == 2 else 3,
                  accumulate_grad_batches=accumulate)
    run.fit(boft_module(), datamodule=digits)
    assert steps == expected


def test_orthogonality_check_lora_is_a_no_op(tmp_path, digits, lightning_log, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("orthogonality_error called on a LoRA model")

    monkeypatch.setattr("lit_peft.callbacks.orthogonality.orthogonality_error", fail)
    module = make_module(LoRA(rank=4))
    check = OrthogonalityCheck(every_n_steps=1, action="raise")
    run = trainer(tmp_path, [check], max_steps=2)
    run.fit(module, datamodule=digits)
    assert run.global_step == 2
    assert not check.active and check.last_error is None
    assert "orthogonality_error" not in run.callback_metrics
    notices = lightning_log.messages("OrthogonalityCheck")
    assert len(notices) == 1 and "\n" not in notices[0] and "LoRA" in notices[0]


def test_orthogonality_check_arguments():
    with pytest.raises(ValueError, match="every_n_steps"):
        OrthogonalityCheck(every_n_steps=0)
    with pytest.raises(ValueError, match="action"):
        OrthogonalityCheck(action="ignore")


def test_orthogonality_check_nan_blocks_are_a_violation(tmp_path, digits, monkeypatch):
    """``nan > tolerance`` is False: a NaN error must still count as a violation, and ``orthogonality_error``
    reports NaN whichever block holds it (Python's ``max`` would drop it after a finite value)."""
    from lit_peft.adapters import orthogonality_error

    module = boft_module()
    with torch.no_grad():
        module.model.blocks[1].mlp.fc1.adapters["all"].skew[0, 0, 0] = float("nan")
    assert orthogonality_error(module) != orthogonality_error(module)   # NaN
    monkeypatch.setattr("lit_peft.callbacks.orthogonality.orthogonality_error", lambda module: float("nan"))
    check = OrthogonalityCheck(every_n_steps=1, action="raise")
    with pytest.raises(OrthogonalityError, match=r"nan \(not finite\) violates tolerance"):
        trainer(tmp_path, [check], max_steps=3).fit(boft_module(), datamodule=digits)


def _stop_decision_worker(rank, world, port, errors):
    import os
    import traceback

    import torch.distributed as dist

    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)

        class Strategy:
            def reduce_boolean_decision(self, decision, all=True):
                flag = torch.tensor(int(bool(decision)))
                dist.all_reduce(flag)
                return bool(flag.item() == world) if all else bool(flag.item() > 0)

        class Trainer:
            world_size, global_step, should_stop, strategy = world, 1, False, Strategy()

        class Module(torch.nn.Module):
            def __init__(self, model):
                super().__init__()
                self.model = model

            def log(self, *args, **kwargs):
                pass

        module = Module(boft_module().model)
        if rank == 1:  # only this rank's blocks violate (e.g. a rank whose state diverged)
            layer = module.model.blocks[0].attn.qkv
            original = layer.orthogonal_blocks
            layer.orthogonal_blocks = lambda part, training=False: original(part, training) * 1.1
        trainer = Trainer()
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            OrthogonalityCheck(every_n_steps=1, action="stop").check(trainer, module)
        assert trainer.should_stop, f"rank {rank} did not stop"
        dist.destroy_process_group()
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")


def test_orthogonality_check_stop_is_decided_by_all_ranks():
    """A violation seen on one rank stops every rank (a stop on one rank alone would hang the others)."""
    from helpers.distributed import NEEDS_GLOO, spawn_workers

    if NEEDS_GLOO.args and NEEDS_GLOO.args[0]:
        pytest.skip("needs torch.distributed with gloo")
    spawn_workers(_stop_decision_worker, 2)
