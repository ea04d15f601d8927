"""Single process vs DDP vs FSDP2 on a Hugging Face causal LM: the tiny Llama of the ``llama_dir`` fixture (``LlamaConfig``,
tied embeddings, saved with ``save_pretrained`` and loaded by :class:`~lit_peft.modules.CausalLMModule` from the
folder) fine-tuned through ``python -m lit_peft fit`` with :class:`~lit_peft.data.InstructionDataModule` on its
local arithmetic jsonl files, BOFT (dropout 0) and SVFT (with ``SVDCache``), 2 CPU processes with gloo and the
shipped ``configs/strategy`` overlays.

As in ``test_ddp_fsdp2_vit.py`` (whose recorder and run table this reuses) every step is the whole training set
(full-batch: 16 examples, one process with ``batch_size=16``, two with 8 each), so the comparison does not depend on
the samplers' order. The training examples have different lengths (``varied_lengths``), so the ranks hold different
numbers of label tokens: the causal-LM loss is a mean over *all* ranks' label tokens only because each rank rescales
its own token mean (``CausalLMModule._global_token_mean``); a plain mean of the ranks' means would differ. The
per-step losses (mean over ranks), the merged model, the adapter files and the ``peft`` export (BOFT) then agree up
to float summation order. Validation (greedy generation, synced across ranks under FSDP2) runs every epoch and the test
after fit writes ``predictions.jsonl`` from all ranks: same accuracy, same predictions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers.cli import read_metrics, run_cli, write_config
from helpers.distributed import NEEDS_GLOO, RECORDER, RUNS
from helpers.language import PROJECTIONS

pytestmark = NEEDS_GLOO

GLOBAL_BATCH = 16
ADAPTERS = {
    "boft": {"class_path": "lit_peft.adapters.BOFT",
             "init_args": {"block_size": 8, "n_butterfly_factors": 2, "dropout": 0.0, "target_modules": PROJECTIONS}},
    "svft": {"class_path": "lit_peft.adapters.SVFT",
             "init_args": {"pattern": "banded", "off_diag": 2, "target_modules": PROJECTIONS}},
}


def fit(tmp: Path, root: Path, method: str, run: str) -> dict:
    extra, processes, _ = RUNS[run]
    name = f"{method}-{run}"
    record = tmp / name
    record.mkdir()
    callbacks = [{"class_path": "recorder.RecordSteps", "init_args": {"folder": str(record)}}]
    if method == "svft":
        callbacks.append({"class_path": "lit_peft.callbacks.SVDCache", "init_args": {"cache_dir": str(tmp / "svd")}})
    model = {"class_path": "lit_peft.modules.CausalLMModule",
             "init_args": {"model_name_or_path": str(root / "model"), "max_new_tokens": 8,
                           "adapter": ADAPTERS[method], "lr_schedule": "constant", "warmup_ratio": 0.0,
                           "optimizer": {"class_path": "torch.optim.AdamW",
                                         "init_args": {"lr": 2e-2, "weight_decay": 0.0}}}}
    data = {"class_path": "lit_peft.data.InstructionDataModule",
            "init_args": {"train_data": str(tmp / "train_varied.jsonl"),
                          "eval_data": str(root / "data" / "gsm8k_test.jsonl"), "eval_task": "gsm8k",
                          "max_length": 64, "batch_size": GLOBAL_BATCH // processes, "eval_batch_size": 3,
                          "max_train_samples": GLOBAL_BATCH, "seed": 0}}
    config = write_config(tmp, root, ADAPTERS[method], max_epochs=3, callbacks=callbacks, name=name, model=model,
                          data=data)
    output = run_cli("fit", "--config", str(config), *extra, f"--trainer.devices={processes}",
                     "--trainer.accelerator=cpu", cwd=tmp)
    ranks = [json.loads((record / f"steps-rank{r}.json").read_text()) for r in range(processes)]
    assert len({len(steps) for steps in ranks}) == 1, [len(s) for s in ranks]
    version = tmp / "runs" / name / "version_0"
    merged = version / "merged"
    return {"output": output,
            "losses": [sum(rank[i]["loss"] for rank in ranks) / processes for i in range(len(ranks[0]))],
            "samples": [sorted(s for rank in ranks for s in rank[i]["samples"]) for i in range(len(ranks[0]))],
            "val_acc": [float(r["val_acc"]) for r in read_metrics(version) if r.get("val_acc")],
            "predictions": (version / "predictions.jsonl").read_text().splitlines(),
            "merged": load_file(merged / "model.safetensors"),
            "adapter": load_file(merged / "adapter" / "adapter.safetensors"),
            "adapter_config": json.loads((merged / "adapter" / "adapter_config.json").read_text()),
            "peft": merged / "peft_adapter"}


def assert_tensors_close(actual: dict, expected: dict, what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=0, atol=5e-4, msg=f"{what} {key}")


def peft_config(folder: Path) -> dict:
    """The peft ``adapter_config.json``, ``target_modules`` sorted (peft writes its set in hash order)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    return {**config, "target_modules": sorted(config["target_modules"])}


def varied_lengths(source: Path, target: Path, n: int) -> None:
    """The first ``n`` training rows with 0, 1 or 2 extra copies of the closing "The answer is v" sentence: examples
    (and so the ranks' batches) with different numbers of label tokens."""
    rows = [json.loads(line) for line in source.read_text().splitlines()[:n]]
    for i, row in enumerate(rows):
        value = row["response"].rsplit(" ", 1)[1]
        row["response"] += f" . The answer is {value}" * (i % 3)
    target.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture(scope="module")
def llama_workdir(tmp_path_factory, llama_dir):
    tmp = tmp_path_factory.mktemp("distributed_language")
    (tmp / "recorder.py").write_text(RECORDER)
    varied_lengths(llama_dir / "data" / "train.jsonl", tmp / "train_varied.jsonl", GLOBAL_BATCH)
    return tmp


@pytest.mark.parametrize("method", ["boft", "svft"])
def test_single_ddp_fsdp2_agree_on_llama(llama_workdir, llama_dir, method):
    runs = {run: fit(llama_workdir, llama_dir, method, run) for run in RUNS}
    single = runs["single"]
    assert len(single["losses"]) == 3  # 16 training examples, global batch 16, 3 epochs
    assert len(single["val_acc"]) == 3 and len(single["predictions"]) == 6
    assert "FSDP2 over 2 processes: 2 shard units" in runs["fsdp"]["output"]  # the two LlamaDecoderLayers
    # the tied embeddings survive the merge: one tensor in the file, as save_pretrained writes a tied model
    assert "model.embed_tokens.weight" in single["merged"] and "lm_head.weight" not in single["merged"]
    base = load_file(llama_dir / "model" / "model.safetensors")
    assert torch.equal(single["merged"]["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert (single["merged"]["model.layers.0.self_attn.q_proj.weight"] -
            base["model.layers.0.self_attn.q_proj.weight"]).abs().max() > 1e-4, "the adapter changed nothing"
    for run in ("ddp", "fsdp"):
        result = runs[run]
        assert result["samples"] == single["samples"], f"{run}: the ranks' batches are not the global batch"
        assert result["losses"] == pytest.approx(single["losses"], rel=1e-4, abs=1e-6), run
        assert result["val_acc"] == single["val_acc"], run
        assert result["predictions"] == single["predictions"], run
        assert_tensors_close(result["merged"], single["merged"], f"{run}: merged")
        assert_tensors_close(result["adapter"], single["adapter"], f"{run}: adapter")
        # the same config; the tensors' digest differs as they are close, not bit-identical
        assert ({k: v for k, v in result["adapter_config"].items() if k != "tensors_sha256"}
                == {k: v for k, v in single["adapter_config"].items() if k != "tensors_sha256"}), run
        if method == "boft":  # the peft export, also from the sharded run
            assert peft_config(result["peft"]) == peft_config(single["peft"]), run
            assert_tensors_close(load_file(result["peft"] / "adapter_model.safetensors"),
                                 load_file(single["peft"] / "adapter_model.safetensors"), f"{run}: peft")
        else:
            assert not result["peft"].exists()
