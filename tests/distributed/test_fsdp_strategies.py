"""The FSDP options besides the plain FSDP2 overlay, through ``python -m lit_peft fit`` (the tiny ViT, BOFT and the
generated VTAB data of ``test_ddp_fsdp2_vit.py``, 2 CPU processes with gloo, global batch 8, 6 steps):

* FSDP2 with ``model.init_args.fsdp_reshard_after_forward: false`` and ``fsdp_cpu_offload: true`` (on the CPU the
  shards already live in host memory, so offloading changes nothing) trains exactly as the default FSDP2 run;
* Lightning's ``FSDPStrategy`` (FSDP1) with the shipped ``configs/strategy/fsdp1.yaml``: Lightning refuses it on the
  CPU, but torch's FSDP1 runs there with gloo when given ``device_id=cpu``, so the test swaps in a subclass
  (``cpu_fsdp1.CPUFSDPStrategy``, below) that passes it. The module supplies the auto-wrap policy (each ViT block
  wrapped), the orthogonality check and the merge read the gathered weights, ``test`` after ``fit`` reuses the fit's
  wrapper, and losses, merged weights, checkpoint and test metrics agree with FSDP2's.

The ``OrthogonalityCheck`` runs every step in all of them (also covering it on FSDP2's DTensor shards in a CLI run).
Without Lightning, on 2 spawned gloo processes: a ViT module wrapped by FSDP1 with the module's own policy, and one
sharded by FSDP2, load a trained adapter state (``load_trained_state``, what ``MergeAdapters(weights="best")`` does)
and then give the unsharded module's outputs, merged weights, adapter tensors and orthogonality error. A GPU-only test
runs the shipped FSDP1 overlay unchanged on one GPU.
"""
from __future__ import annotations

import math
import os
import traceback
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.strategies.strategy import _ForwardRedirection
from safetensors.torch import load_file

from helpers.cli import REPO, read_metrics
from helpers.distributed import NEEDS_GLOO, RUNS, fit, spawn_workers
from helpers.models import tiny_vit
from lit_peft.adapters import BOFT, adapter_state_dict, merged_state_dict, orthogonality_error
from lit_peft.modules import ViTClassifier
from lit_peft.modules.base import AdaptedModule

FSDP1_OVERLAY = REPO / "configs" / "strategy" / "fsdp1.yaml"
CPU_FSDP1 = '''
import torch
import torch.distributed.fsdp as fsdp
from lightning.pytorch.strategies import FSDPStrategy


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy on the CPU: torch's FSDP1 needs ``device_id=cpu`` there, Lightning passes None."""

    def _setup_model(self, model):
        real = fsdp.FullyShardedDataParallel
        if any(isinstance(m, real) for m in model.modules()):  # wrapped already: Lightning wraps nothing
            return super()._setup_model(model)

        class OnCPU(real):
            def __init__(self, module, *args, device_id=None, **kwargs):
                super().__init__(module, *args, device_id=torch.device("cpu"), **kwargs)

        fsdp.FullyShardedDataParallel = OnCPU  # the name Lightning's _setup_model imports
        try:
            return super()._setup_model(model)
        finally:
            fsdp.FullyShardedDataParallel = real
'''
ORTHOGONALITY = {"class_path": "lit_peft.callbacks.OrthogonalityCheck",
                 "init_args": {"every_n_steps": 1, "tolerance": 1.0e-5, "action": "raise"}}
TEST_AFTER_FIT = ("--test_after_fit=final",)
FSDP2_OPTIONS = ("--model.init_args.fsdp_reshard_after_forward=false", "--model.init_args.fsdp_cpu_offload=true")


def wrapped_by(policy, root: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules an FSDP1 ``auto_wrap_policy`` (the callable form) wraps below ``root``."""
    return [m for m in root.modules() if m is not root and policy(module=m, recurse=False, nonwrapped_numel=1)]


# -- the FSDP1 auto-wrap policy and what the module refuses (no process group) --------------------------------------
def test_fsdp1_policy_wraps_exactly_the_shard_units():
    module = tiny_vit(2, depth=3)
    policy = module.fsdp1_auto_wrap_policy()
    assert wrapped_by(policy, module) == list(module.model.blocks)
    assert policy(module=module, recurse=True, nonwrapped_numel=1)  # it descends everywhere

    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                      num_attention_heads=2, num_key_value_heads=2)
    holder = AdaptedModule()
    holder.model = transformers.AutoModelForCausalLM.from_config(config)
    assert wrapped_by(holder.fsdp1_auto_wrap_policy(), holder) == list(holder.model.model.layers)


def test_fsdp1_strategy_gets_the_policy_unless_it_has_one():
    module = tiny_vit(2, depth=3)
    strategy = FSDPStrategy()
    module._prepare_fsdp1(strategy)
    assert wrapped_by(strategy.kwargs["auto_wrap_policy"], module) == list(module.model.blocks)
    assert strategy.kwargs["use_orig_params"] is True

    def own(module, recurse, nonwrapped_numel):
        return False

    strategy = FSDPStrategy(auto_wrap_policy=own)
    tiny_vit(2, depth=3)._prepare_fsdp1(strategy)
    assert strategy.kwargs["auto_wrap_policy"] is own


@pytest.mark.parametrize(("strategy_kwargs", "module_kwargs", "match"), [
    ({"use_orig_params": False}, {}, "use_orig_params=True"),
    ({}, {"fsdp_cpu_offload": True}, "fsdp_cpu_offload applies to FSDP2.*cpu_offload: true"),
    ({}, {"fsdp_reshard_after_forward": False}, "fsdp_reshard_after_forward applies to FSDP2.*SHARD_GRAD_OP"),
])
def test_fsdp1_refuses_what_cannot_work(strategy_kwargs, module_kwargs, match):
    module = ViTClassifier(backbone="vit_tiny_patch16_224", num_classes=2, img_size=32, **module_kwargs,
                           model_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2})
    with pytest.raises(ValueError, match=match):
        module._prepare_fsdp1(FSDPStrategy(**strategy_kwargs))


# -- through the CLI on 2 CPU processes -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(vtab_workdir):
    tmp, data_root = vtab_workdir
    (tmp / "cpu_fsdp1.py").write_text(CPU_FSDP1)
    cpu_fsdp1 = (["--config", str(FSDP1_OVERLAY), "--trainer.strategy.class_path=cpu_fsdp1.CPUFSDPStrategy"], 2, 4)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(RUNS, "fsdp1", cpu_fsdp1)
        results = {"fsdp2": fit(tmp, data_root, "boft", "fsdp", name="fsdp2", callbacks=[ORTHOGONALITY],
                                args=TEST_AFTER_FIT),
                   "fsdp2-options": fit(tmp, data_root, "boft", "fsdp", name="fsdp2-options",
                                        callbacks=[ORTHOGONALITY], args=TEST_AFTER_FIT + FSDP2_OPTIONS),
                   "fsdp1": fit(tmp, data_root, "boft", "fsdp1", name="fsdp1", callbacks=[ORTHOGONALITY],
                                args=TEST_AFTER_FIT)}
    for name, result in results.items():
        result["metrics"] = read_metrics(tmp / "runs" / name / "version_0")
    return results


def logged(result: dict, key: str) -> list[float]:
    return [float(row[key]) for row in result["metrics"] if row.get(key)]


def test_orthogonality_checked_every_step_on_shards(runs):
    for name, result in runs.items():
        errors = logged(result, "orthogonality_error")
        assert len(errors) == len(result["losses"]) == 6, name
        assert all(0 <= e < 1e-5 for e in errors), (name, errors)


def assert_same_training(result: dict, reference: dict, loss_rel: float, weight_atol: float | None) -> None:
    """The same global batches, per-step losses (mean over ranks) and merged weights (``None``: torch's default
    float32 tolerances)."""
    assert result["samples"] == reference["samples"]
    assert result["losses"] == pytest.approx(reference["losses"], rel=loss_rel, abs=1e-7)
    assert result["merged"].keys() == reference["merged"].keys()
    tolerance = {} if weight_atol is None else {"rtol": 0, "atol": weight_atol}
    for key, value in reference["merged"].items():
        torch.testing.assert_close(result["merged"][key], value, **tolerance, msg=f"merged {key}")


def test_fsdp2_options_train_as_the_default(runs):
    default, options = runs["fsdp2"], runs["fsdp2-options"]
    assert "reshard_after_forward=True, cpu_offload=False)" in default["output"]
    assert "reshard_after_forward=False, cpu_offload=True: no effect, the run is on the CPU)" in options["output"]
    assert_same_training(options, default, loss_rel=1e-6, weight_atol=None)
    assert logged(options, "test_loss") == pytest.approx(logged(default, "test_loss"), rel=1e-5)


def test_fsdp1_agrees_with_fsdp2(runs):
    reference, result = runs["fsdp2"], runs["fsdp1"]
    assert "FSDP1 auto-wrap policy: 2 shard units (Block) + the root" in result["output"]
    assert "merged vs adapted relative difference" in result["output"]
    assert_same_training(result, reference, loss_rel=1e-4, weight_atol=5e-4)
    adapter, reference_adapter = load_file(result["adapter"]), load_file(reference["adapter"])
    assert adapter.keys() == reference_adapter.keys()
    # one adapter-only checkpoint (FSDP1's full state dict, the frozen backbone dropped), keyed as FSDP2's
    state = torch.load(result["checkpoint"], map_location="cpu", weights_only=False)["state_dict"]
    reference_state = torch.load(reference["checkpoint"], map_location="cpu", weights_only=False)["state_dict"]
    assert state.keys() == reference_state.keys()
    for key, value in reference_state.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=5e-4, msg=f"checkpoint {key}")
    # test after fit: Lightning does not wrap a wrapped module again, the module hands back the fit's wrapper
    test_loss = logged(result, "test_loss")
    assert len(test_loss) == 1 and math.isfinite(test_loss[0])
    assert test_loss == pytest.approx(logged(reference, "test_loss"), rel=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning's FSDPStrategy needs a GPU")
def test_shipped_fsdp1_overlay_on_one_gpu(vtab_workdir, monkeypatch):
    tmp, data_root = vtab_workdir
    monkeypatch.setitem(RUNS, "fsdp1-gpu", (["--config", str(FSDP1_OVERLAY)], 1, 8))
    result = fit(tmp, data_root, "boft", "fsdp1-gpu", name="fsdp1-gpu", callbacks=[ORTHOGONALITY],
                 args=("--trainer.accelerator=gpu", *TEST_AFTER_FIT))
    assert "FSDP1 auto-wrap policy: 2 shard units (Block) + the root" in result["output"]
    assert "merged vs adapted relative difference" in result["output"]
    assert len(result["losses"]) == 6 and all(math.isfinite(loss) for loss in result["losses"])
    metrics = read_metrics(tmp / "runs" / "fsdp1-gpu" / "version_0")
    assert len([row for row in metrics if row.get("orthogonality_error")]) == 6
    assert [row for row in metrics if row.get("test_loss")]


# -- FSDP1 / FSDP2 wrapping of the module, without Lightning (2 spawned gloo processes) ------------------------------
def adapted_vit() -> ViTClassifier:
    """The tiny ViT with BOFT applied (``configure_model`` without a trainer), the same base weights every call."""
    torch.manual_seed(0)
    module = tiny_vit(2, depth=3, adapter=BOFT(block_size=4, n_butterfly_factors=2, train_bias=True))
    module.configure_model()
    return module.eval()


def sharded_worker(rank: int, world: int, port: int, errors) -> None:
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

        reference = adapted_vit()
        with torch.no_grad():  # "trained": every trainable tensor moved off its initialisation
            generator = torch.Generator().manual_seed(1)
            for param in reference.parameters():
                if param.requires_grad:
                    param.add_(0.1 * torch.randn(param.shape, generator=generator))
        trained = reference.state_dict()  # adapter-only, as in a checkpoint
        batch = (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1]))
        expected = {"outputs": reference.adapted_outputs(batch), "merged": merged_state_dict(reference.model),
                    "adapter": adapter_state_dict(reference.model), "error": orthogonality_error(reference)}

        fsdp1 = adapted_vit()
        units = fsdp1.shard_units()
        root = FullyShardedDataParallel(fsdp1, auto_wrap_policy=fsdp1.fsdp1_auto_wrap_policy(), use_orig_params=True,
                                        device_id=torch.device("cpu"))
        # the policy wrapped exactly the blocks (now wrappers in model.blocks), the root holds the rest
        assert [m.module for m in root.modules() if isinstance(m, FullyShardedDataParallel) and m is not root] == units
        assert all(isinstance(block, FullyShardedDataParallel) for block in fsdp1.model.blocks)
        fsdp1._trainer = SimpleNamespace(strategy=SimpleNamespace(model=root,
                                                                  _forward_redirection=_ForwardRedirection()))
        fsdp1._sharded = True
        fsdp2 = adapted_vit()
        mesh = init_device_mesh("cpu", (world,))
        for module in [*fsdp2.shard_units(), fsdp2.model]:
            fully_shard(module, mesh=mesh)
        fsdp2._sharded = True

        for name, module in (("fsdp1", fsdp1), ("fsdp2", fsdp2)):
            module.load_trained_state(trained)
            with torch.no_grad():
                outputs = module.adapted_outputs(batch)
            with module.full_weights() as keep:
                got = {"outputs": outputs, "merged": keep(merged_state_dict(module.model)),
                       "adapter": keep(adapter_state_dict(module.model)), "error": orthogonality_error(module)}
            torch.testing.assert_close(got["outputs"], expected["outputs"], rtol=1e-5, atol=1e-6, msg=name)
            for part in ("merged", "adapter"):
                if rank == 0 or got[part]:  # other ranks may keep no merged state
                    assert got[part].keys() == expected[part].keys(), (name, part)
                    for key, value in expected[part].items():
                        torch.testing.assert_close(got[part][key], value, rtol=1e-5, atol=1e-6,
                                                   msg=f"{name}: {part} {key}")
            assert abs(got["error"] - expected["error"]) < 1e-6, name
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise


@NEEDS_GLOO
def test_sharded_module_loads_merges_and_checks_like_unsharded():
    spawn_workers(sharded_worker, 2)
