"""Single process vs DDP vs FSDP2 (``ModelParallelStrategy``), each through ``python -m lit_peft fit`` on the tiny ViT
and generated VTAB-layout data of ``test_cli_e2e``: 2 CPU processes with gloo, the shipped ``configs/strategy``
overlays, BOFT (dropout 0) and SVFT.

The runs are equivalent by construction: one process with ``batch_size=8`` against two with ``batch_size=4`` each,
on 8 training images, so every step is the whole training set (full-batch) whatever order the samplers produce.
That is deliberate: Lightning treats our training loader as shuffled and wraps its ``EpochShuffleSampler`` in a
``DistributedSamplerWrapper(shuffle=True, seed=PL_GLOBAL_SEED)``, which shuffles the epoch order a second time before
splitting it by rank, so with more than one step per epoch the multi-process batches differ from the single
process's (still deterministic per ``(seed, epoch)``). Per-sample fingerprints check that the ranks' batches
together are the single process's batch. With equal per-rank batch sizes the gradient averaged over ranks is the
gradient of the global mean loss, so the per-step losses (mean over ranks) and the merged weights must agree up to
float summation order: 1e-4 relative for the losses; merged and trained tensors within 5e-4 absolute (the weights
agree to ~1e-7, but AdamW's normalisation turns summation-order noise in near-zero bias gradients into ~1e-4 steps).
``train_loss`` in ``metrics.csv`` is rank 0's alone, so a callback records every rank's loss.

``MergeAdapters`` runs in every run: under FSDP2 every rank takes part in gathering the shards and in the check's
sharded forward, and rank 0 alone writes (a rank that skipped the collectives would hang the job).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from test_cli_e2e import REPO, make_vtab_task, run_cli, write_config

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available() or sys.platform == "win32",
                                reason="needs torch.distributed with gloo")

RECORDER = '''
import json
from pathlib import Path

import lightning as L


class RecordSteps(L.Callback):
    """Per rank: the training loss of every step and a fingerprint (pixel sum) of every sample of its batch."""

    def __init__(self, folder: str):
        self.folder = folder
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        images, labels = batch
        self.steps.append({"loss": float(outputs["loss"]),
                           "samples": [round(float(s), 2) for s in images.double().flatten(1).sum(1)]})

    def on_train_end(self, trainer, pl_module):
        path = Path(self.folder) / f"steps-rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.steps))
'''

ADAPTERS = {
    "boft": {"class_path": "lit_peft.adapters.BOFT",
             "init_args": {"block_size": 8, "n_butterfly_factors": 2, "dropout": 0.0, "train_bias": True,
                           "target_modules": ["qkv", "proj", "fc1", "fc2"]}},
    "svft": {"class_path": "lit_peft.adapters.SVFT",
             "init_args": {"pattern": "banded", "off_diag": 1, "target_modules": ["qkv", "proj", "fc1", "fc2"]}},
}
#: name -> (extra CLI arguments, processes, per-process batch size); global batch 8 in all three
RUNS = {"single": ([], 1, 8),
        "ddp": (["--config", str(REPO / "configs" / "strategy" / "ddp.yaml")], 2, 4),
        "fsdp": (["--config", str(REPO / "configs" / "strategy" / "fsdp.yaml")], 2, 4)}


def fit(tmp: Path, data_root: Path, method: str, run: str) -> dict:
    extra, processes, batch_size = RUNS[run]
    record = tmp / f"{method}-{run}"
    record.mkdir()
    callbacks = [{"class_path": "recorder.RecordSteps", "init_args": {"folder": str(record)}}]
    if method == "svft":
        callbacks.append({"class_path": "lit_peft.callbacks.SVDCache", "init_args": {"cache_dir": str(tmp / "svd")}})
    config = write_config(tmp, data_root, ADAPTERS[method], max_epochs=3, callbacks=callbacks, name=f"{method}-{run}")
    output = run_cli("fit", "--config", str(config), *extra, f"--trainer.devices={processes}",
                     "--trainer.accelerator=cpu", f"--data.init_args.batch_size={batch_size}", "--test_after_fit=null",
                     cwd=tmp)
    ranks = [json.loads((record / f"steps-rank{r}.json").read_text()) for r in range(processes)]
    assert len({len(steps) for steps in ranks}) == 1, [len(s) for s in ranks]
    version = tmp / "runs" / f"{method}-{run}" / "version_0"
    return {"output": output,
            "losses": [sum(rank[i]["loss"] for rank in ranks) / processes for i in range(len(ranks[0]))],
            "samples": [sorted(s for rank in ranks for s in rank[i]["samples"]) for i in range(len(ranks[0]))],
            "merged": load_file(version / "merged" / "model.safetensors"),
            "adapter": version / "merged" / "adapter" / "adapter.safetensors",
            "checkpoint": version / "checkpoints" / "last.ckpt"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distributed")
    (tmp / "recorder.py").write_text(RECORDER)
    return tmp, make_vtab_task(tmp / "vtab", sizes=(("train800", 8), ("val200", 6), ("test", 8)))


@pytest.mark.parametrize("method", ["boft", "svft"])
def test_single_ddp_fsdp2_agree(workdir, method):
    tmp, data_root = workdir
    runs = {run: fit(tmp, data_root, method, run) for run in RUNS}
    single = runs["single"]
    assert len(single["losses"]) == 3  # 8 training images, global batch 8, 3 epochs
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
