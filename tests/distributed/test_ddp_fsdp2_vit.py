"""Single process vs DDP vs FSDP2 (``ModelParallelStrategy``), each through ``python -m lit_peft fit`` on the tiny ViT
and generated VTAB-layout data of ``tests/test_cli.py`` (``helpers.cli``, ``helpers.distributed``): 2 CPU processes with gloo, the shipped ``configs/strategy``
overlays, BOFT (with multiplicative dropout) and SVFT.

One process with ``batch_size=8`` against two with ``batch_size=4`` each, on 16 training images: 2 steps per epoch,
3 epochs. The training sampler (``EpochShuffleSampler``) is a ``DistributedSampler`` that shards the single process's
per-epoch permutation itself (so Lightning does not wrap it in a reshuffling sampler): the ranks' batches ``k``
together are the single process's batch ``k``, which per-sample fingerprints check. BOFT's dropout masks the
weight-side rotation with blocks drawn from the global RNG, which ``seed_everything`` seeds alike on every rank and
every rank draws from identically, so all ranks drop the single process's blocks. With equal per-rank batch sizes the
gradient averaged over ranks is the gradient of the global mean loss, so the per-step losses (mean over ranks) and the
merged weights must agree up to float summation order: 1e-4 relative for the losses; merged and trained tensors
within 5e-4 absolute (the weights agree to ~1e-7, but AdamW's normalisation turns summation-order noise in near-zero
bias gradients into ~1e-4 steps). A callback records every rank's loss; ``train_loss`` in ``metrics.csv`` is logged
with ``sync_dist``, so it is their mean.

Mid-epoch resume under DDP and FSDP2: a run that fails after step 3 of 6 (epoch 1's first batch) and is resumed with
``--ckpt_path`` from its step-3 checkpoint continues with the uninterrupted run's batches and losses and ends with its
weights (the training loader's position inside the epoch is in the checkpoint: ``ResumableLoader``).

``MergeAdapters`` runs in every run: under FSDP2 every rank takes part in gathering the shards and in the check's
sharded forward, and rank 0 alone writes (a rank that skipped the collectives would hang the job).
"""
from __future__ import annotations

import functools

import pytest
import torch
from safetensors.torch import load_file

from helpers.distributed import NEEDS_GLOO, RUNS, fit

pytestmark = NEEDS_GLOO


@pytest.fixture(scope="module")
def fitted(vtab_workdir):
    """``fit(method, run)`` in the module's workdir, each at most once (the resume tests reuse the agreement runs)."""
    return functools.cache(lambda method, run: fit(*vtab_workdir, method, run))


@pytest.mark.parametrize("method", ["boft", "svft"])
def test_single_ddp_fsdp2_agree(fitted, method):
    runs = {run: fitted(method, run) for run in RUNS}
    single = runs["single"]
    assert len(single["losses"]) == 6  # 16 training images, global batch 8, 3 epochs
    for run, result in runs.items():  # the logged train_loss is the mean over ranks
        assert result["train_loss"] == pytest.approx(result["losses"], rel=1e-6), run
    assert "FSDP2 over 2 processes: 2 shard units" in runs["fsdp"]["output"]
    for run in ("ddp", "fsdp"):
        result = runs[run]
        assert result["samples"] == single["samples"], f"{run}: the ranks' batches are not the global batch"
        assert result["losses"] == pytest.approx(single["losses"], rel=1e-4, abs=1e-6), run
        assert result["merged"].keys() == single["merged"].keys()
        for key, value in single["merged"].items():
            torch.testing.assert_close(result["merged"][key], value, rtol=0, atol=5e-4, msg=f"{run}: merged {key}")
        assert load_file(result["adapter"]).keys() == load_file(single["adapter"]).keys()
        # one adapter-only checkpoint file, also from FSDP2 (save_distributed_checkpoint: false)
        assert result["checkpoint"].is_file()
        state = torch.load(result["checkpoint"], map_location="cpu", weights_only=False)["state_dict"]
        reference = torch.load(single["checkpoint"], map_location="cpu", weights_only=False)["state_dict"]
        assert state.keys() == reference.keys()
        for key, value in reference.items():
            torch.testing.assert_close(state[key], value, rtol=0, atol=5e-4, msg=f"{run}: checkpoint {key}")


@pytest.mark.parametrize("run", ["ddp", "fsdp"])
def test_mid_epoch_resume(vtab_workdir, fitted, run):
    """Fail after step 3 of 6 (epoch 1's first batch), resume from that step's checkpoint: the uninterrupted run's
    batches, losses and final weights."""
    tmp, data_root = vtab_workdir
    uninterrupted = fitted("boft", run)
    steps = tmp / f"{run}-steps"
    crash = [{"class_path": "recorder.FailAfter", "init_args": {"steps": 3}},
             {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
              "init_args": {"dirpath": str(steps), "filename": "{step}", "every_n_train_steps": 1, "save_top_k": -1}}]
    with pytest.raises(AssertionError, match="FailAfter: stopped after step 3"):  # the run exits non-zero
        fit(tmp, data_root, "boft", run, name=f"boft-{run}-failed", callbacks=crash)
    assert sorted(p.name for p in steps.iterdir()) == ["step=1.ckpt", "step=2.ckpt", "step=3.ckpt"]
    resumed = fit(tmp, data_root, "boft", run, name=f"boft-{run}-resumed",
                  args=("--ckpt_path", str(steps / "step=3.ckpt")))
    assert resumed["samples"] == uninterrupted["samples"][3:]
    assert resumed["losses"] == pytest.approx(uninterrupted["losses"][3:], rel=1e-6, abs=1e-7)
    assert resumed["train_loss"] == pytest.approx(uninterrupted["train_loss"][3:], rel=1e-6, abs=1e-7)
    torch.testing.assert_close(resumed["merged"], uninterrupted["merged"])
    torch.testing.assert_close(load_file(resumed["adapter"]), load_file(uninterrupted["adapter"]))
    torch.testing.assert_close(*(torch.load(r["checkpoint"], map_location="cpu", weights_only=False)["state_dict"]
                                 for r in (resumed, uninterrupted)))


def test_shard_units_find_the_transformer_blocks():
    from lit_peft.modules import ViTClassifier
    from lit_peft.modules.base import AdaptedModule

    module = ViTClassifier(backbone="vit_tiny_patch16_224", num_classes=2, img_size=32,
                           model_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2})
    assert module.shard_units() == list(module.model.blocks)
    assert AdaptedModule.shard_units(module) == list(module.model.blocks)  # the generic rule finds timm's Block too

    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                      num_attention_heads=2, num_key_value_heads=2)
    holder = type("Holder", (), {"model": transformers.AutoModelForCausalLM.from_config(config)})()
    assert AdaptedModule.shard_units(holder) == list(holder.model.model.layers)


def test_odd_sized_training_set_single_and_ddp_take_the_same_batches(vtab_workdir, tmp_path):
    """13 training images and a global batch of 8: each epoch's last batch would hold 5. With ``last_batch: pad``
    (every data module's default) it is filled up with the epoch's first images, the same ones in one process and in
    two, so the DDP run's batches and losses are the single process's to the end (the issue seen with the demo's 537
    images and ``--config strategy/ddp.yaml``: losses agreed until each epoch's partial batch)."""
    import shutil

    from helpers.cli import make_vtab_task

    shutil.copy(vtab_workdir[0] / "recorder.py", tmp_path / "recorder.py")
    data_root = make_vtab_task(tmp_path / "vtab", sizes=(("train800", 13), ("val200", 6), ("test", 8)))
    single, ddp = (fit(tmp_path, data_root, "boft", run) for run in ("single", "ddp"))
    assert len(single["losses"]) == 6  # 13 images padded to 16: 2 full steps per epoch, 3 epochs
    assert all(len(batch) == 8 for batch in single["samples"])
    for epoch in range(3):  # every image once per epoch, 3 of them twice (the padding)
        seen = single["samples"][2 * epoch] + single["samples"][2 * epoch + 1]
        assert len(set(seen)) == 13
    assert ddp["samples"] == single["samples"]
    assert ddp["losses"] == pytest.approx(single["losses"], rel=1e-4, abs=1e-6)
