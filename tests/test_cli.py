"""End to end through the user's path: ``python -m lit_peft fit --config X.yaml`` (:mod:`lit_peft.cli`) on a tiny ViT
and generated VTAB-layout images, then the files it wrote loaded back the way a user loads them; resuming from
``last.ckpt`` continues with the same losses."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
from safetensors.torch import load_file

from helpers.cli import BACKBONE, TASK, make_vtab_task, model_args, read_metrics, run_cli, write_config
from helpers.models import TINY
from lit_peft.adapters import BOFT, SVFT, count_parameters
from lit_peft.data import VTABDataModule
from lit_peft.modules import ViTClassifier


def adapted_module(adapter, checkpoint: Path) -> ViTClassifier:
    """The adapted model rebuilt from the config's arguments and the adapter-only checkpoint. The frozen backbone
    is not in the checkpoint: it is rebuilt from its source, here a random init under the run's seed."""
    args = model_args(None)
    args.pop("optimizer")
    L.seed_everything(0)
    module = ViTClassifier(**{**args, "adapter": adapter})
    module.configure_model()
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    missing = module.load_state_dict(state, strict=False)
    assert not missing.unexpected_keys
    return module.eval()


@pytest.mark.parametrize("method", ["boft", "svft"])
def test_fit_writes_everything_and_merged_model_reproduces(tmp_path, method):
    data_root = make_vtab_task(tmp_path / "vtab")
    if method == "boft":
        adapter_cfg = {"class_path": "lit_peft.adapters.BOFT",
                       "init_args": {"block_size": 8, "n_butterfly_factors": 2, "dropout": 0.1, "train_bias": True,
                                     "target_modules": ["qkv", "proj", "fc1", "fc2"]}}
        strategy = BOFT(block_size=8, n_butterfly_factors=2, dropout=0.1, train_bias=True,
                        target_modules=["qkv", "proj", "fc1", "fc2"])
        callbacks = [{"class_path": "lit_peft.callbacks.OrthogonalityCheck",
                      "init_args": {"every_n_steps": 1, "tolerance": 1e-4, "action": "raise"}}]
    else:
        adapter_cfg = {"class_path": "lit_peft.adapters.SVFT",
                       "init_args": {"pattern": "banded", "off_diag": 1, "target_modules": ["qkv", "proj", "fc1", "fc2"]}}
        strategy = SVFT(pattern="banded", off_diag=1, target_modules=["qkv", "proj", "fc1", "fc2"])
        callbacks = [{"class_path": "lit_peft.callbacks.SVDCache", "init_args": {"cache_dir": str(tmp_path / "svd")}}]
    config = write_config(tmp_path, data_root, adapter_cfg, callbacks=callbacks)
    output = run_cli("fit", "--config", str(config), cwd=tmp_path)

    # the start-up line with the adapter's own count
    expected = timm.create_model(BACKBONE, pretrained=False, num_classes=2, img_size=32, **TINY)
    type(strategy)(**{**strategy.init_args(), "trainable_modules": ["head"]}).apply(expected)
    counts = count_parameters(expected)
    line = re.search(r"lit_peft: adapter parameters: ([\d,]+) \| trainable parameters: ([\d,]+) \| total "
                     r"parameters: ([\d,]+)", output)
    assert line, output[-3000:]
    assert [int(g.replace(",", "")) for g in line.groups()] == [counts["adapter"], counts["trainable"], counts["total"]]

    version = tmp_path / "runs" / "run" / "version_0"
    rows = read_metrics(version)
    assert any(r.get("train_loss") for r in rows) and any(r.get("val_acc") for r in rows)
    assert any(r.get("test_acc") for r in rows), "test_after_fit: final must log test_acc"

    # adapter-only checkpoint: trainable tensors (+ adapter buffers), no frozen backbone weights
    checkpoint = version / "checkpoints" / "last.ckpt"
    keys = set(torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"])
    assert keys and all(".adapters." in k or k.startswith("model.head.") for k in keys), sorted(keys)[:10]
    assert "model.blocks.0.attn.qkv.weight" not in keys
    trainable = {f"model.{n}" for n, p in expected.named_parameters() if p.requires_grad}
    assert trainable <= keys

    # the merged model in a plain timm model reproduces the adapted model's predictions
    merged_dir = version / "merged"
    assert {p.name for p in merged_dir.iterdir()} == {"model.safetensors", "config.json", "model_config.json",
                                                      "adapter"}
    plain = timm.create_model(BACKBONE, pretrained=False, num_classes=2, img_size=32, **TINY)
    plain.load_state_dict(load_file(merged_dir / "model.safetensors"), strict=True)
    plain.eval()
    module = adapted_module(strategy, checkpoint)
    data = VTABDataModule(task=TASK, data_root=str(data_root), img_size=32, batch_size=8, num_workers=0,
                          mean=module.data_config["mean"], std=module.data_config["std"])
    data.setup("test")
    images, _ = next(iter(data.test_dataloader()))
    with torch.no_grad():
        adapted_logits, merged_logits = module(images), plain(images)
    torch.testing.assert_close(merged_logits, adapted_logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(merged_logits.argmax(-1), adapted_logits.argmax(-1))
    # timm's own folder convention: the folder alone rebuilds the merged model
    local = timm.create_model(f"local-dir:{merged_dir}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(local(images), merged_logits, rtol=0, atol=0)
    if method == "svft":
        assert len(list((tmp_path / "svd").glob("*.safetensors"))) == 2 * 6  # q, k, v, proj, fc1, fc2 per block


STOP_CALLBACK = '''
import lightning as L


class StopAfterEpochs(L.Callback):
    """Ends fit after `epochs` epochs, as a job killed at an epoch boundary would."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True
'''


def test_resume_continues_with_the_same_losses(tmp_path, monkeypatch):
    """Uninterrupted 3 epochs vs 2 epochs + ``--ckpt_path last.ckpt`` for the third: identical train losses.
    BOFT with multiplicative dropout, so the random stream must be restored too."""
    from lit_peft.cli import main

    (tmp_path / "stopper.py").write_text(STOP_CALLBACK)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    data_root = make_vtab_task(tmp_path / "vtab")
    adapter = {"class_path": "lit_peft.adapters.BOFT",
               "init_args": {"block_size": 8, "n_butterfly_factors": 2, "dropout": 0.25,
                             "target_modules": ["qkv", "fc1"]}}
    full = write_config(tmp_path, data_root, adapter, max_epochs=3, name="full")
    main(["fit", "--config", str(full), "--test_after_fit=null"])
    stop = [{"class_path": "stopper.StopAfterEpochs", "init_args": {"epochs": 2}}]
    first = write_config(tmp_path, data_root, adapter, max_epochs=3, callbacks=stop, name="part1")
    main(["fit", "--config", str(first), "--test_after_fit=null"])
    checkpoint = tmp_path / "runs" / "part1" / "version_0" / "checkpoints" / "last.ckpt"
    second = write_config(tmp_path, data_root, adapter, max_epochs=3, name="part2")
    main(["fit", "--config", str(second), "--test_after_fit=null", "--ckpt_path", str(checkpoint)])

    def losses(name):
        rows = read_metrics(tmp_path / "runs" / name / "version_0")
        return {int(r["step"]): float(r["train_loss"]) for r in rows if r.get("train_loss")}

    uninterrupted, part1, part2 = losses("full"), losses("part1"), losses("part2")
    assert part1 and part2 and set(part1).isdisjoint(part2)
    assert set(part1) | set(part2) == set(uninterrupted)
    resumed = {**part1, **part2}
    for step, loss in uninterrupted.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-6, abs=1e-7), f"step {step}"


def test_resume_names_the_model_arguments_the_checkpoint_replaces(tmp_path, monkeypatch):
    """On ``--ckpt_path`` Lightning replaces the model arguments by the checkpoint's hyperparameters (the run goes on
    as it was trained); those given otherwise in the config or on the command line are named in a warning."""
    from lit_peft.cli import main

    monkeypatch.chdir(tmp_path)
    data_root = make_vtab_task(tmp_path / "vtab")
    adapter = {"class_path": "lit_peft.adapters.LoRA", "init_args": {"rank": 2}}
    config = write_config(tmp_path, data_root, adapter, max_epochs=1, name="first")
    main(["fit", "--config", str(config), "--test_after_fit=null"])
    checkpoint = tmp_path / "runs" / "first" / "version_0" / "checkpoints" / "last.ckpt"
    again = write_config(tmp_path, data_root, adapter, max_epochs=2, name="again")
    with pytest.warns(UserWarning, match=r"hyperparameters replace these model arguments .*: lr_schedule: 'linear' "
                                         r"-> 'cosine'; warmup_ratio: 0.3 -> 0.1") as record:
        cli = main(["fit", "--config", str(again), "--test_after_fit=null", "--ckpt_path", str(checkpoint),
                    "--model.init_args.lr_schedule", "linear", "--model.init_args.warmup_ratio", "0.3"])
    assert cli.model.lr_schedule == "cosine" and cli.model.warmup_ratio == 0.1
    assert not any("num_classes" in str(w.message) for w in record)   # unchanged arguments are not named


def test_help_names_the_command_and_no_args_warning(tmp_path):
    """``--help`` says ``python -m lit_peft`` (not ``__main__.py``), and a command-line run no longer prints
    LightningCLI's warning about ``args`` given beside ``sys.argv``."""
    import subprocess
    import sys

    from helpers.cli import cli_env

    out = subprocess.run([sys.executable, "-m", "lit_peft", "fit", "--help"], cwd=tmp_path, env=cli_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("usage: python -m lit_peft"), out.stdout[:300]
    out = subprocess.run([sys.executable, "-m", "lit_peft", "fit", "--config", "demo.yaml", "--print_config"],
                         cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "args parameter is intended" not in out.stdout + out.stderr
    out = subprocess.run([sys.executable, "-m", "lit_peft", "fit", "--model.help", "ViTClassifier"], cwd=tmp_path,
                         env=cli_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "--model.checkpoint_path" in out.stdout, out.stderr[-2000:]


def test_predict_writes_every_prediction_and_says_where(tmp_path):
    """``predict`` used to exit 0 having printed and saved nothing: now one JSON line per test image, with its path,
    class and probabilities, in the run folder, and the path printed."""
    import json

    data_root = make_vtab_task(tmp_path / "vtab")
    adapter = {"class_path": "lit_peft.adapters.LoRA", "init_args": {"rank": 2}}
    config = write_config(tmp_path, data_root, adapter, max_epochs=1, name="pred")
    run_cli("fit", "--config", str(config), "--test_after_fit=null", cwd=tmp_path)
    checkpoint = tmp_path / "runs" / "pred" / "version_0" / "checkpoints" / "last.ckpt"
    output = run_cli("predict", "--config", str(config), "--ckpt_path", str(checkpoint), cwd=tmp_path)
    match = re.search(r"PredictionWriter: 8 predictions written to (\S+)", output)
    assert match, output[-2000:]
    rows = [json.loads(line) for line in Path(match.group(1)).read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(8))
    assert [r["id"] for r in rows] == [f"images/test_{i}.png" for i in range(8)]
    for row in rows:
        assert row["prediction"] in (0, 1) and row["prediction"] == max(range(2), key=row["probabilities"].__getitem__)
        assert abs(sum(row["probabilities"]) - 1) < 1e-5


def test_switching_the_adapter_on_the_command_line_names_the_carried_arguments(tmp_path):
    """``--model.init_args.adapter LoRA`` over a BOFT config keeps BOFT's ``dropout`` (jsonargparse carries every
    argument the new class also has): a warning names it; arguments given on the command line or equal to the new
    class's default are not named."""
    import subprocess
    import sys

    from helpers.cli import cli_env

    data_root = make_vtab_task(tmp_path / "vtab")
    adapter = {"class_path": "lit_peft.adapters.BOFT",
               "init_args": {"block_size": 8, "n_butterfly_factors": 2, "dropout": 0.1, "target_modules": ["qkv"]}}
    config = write_config(tmp_path, data_root, adapter, max_epochs=1, name="switch")
    quick = ["--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--test_after_fit", "null"]
    named = ["--trainer.logger.init_args.name", "switch-{adapter}", "--trainer.default_root_dir", "runs/{adapter}"]
    out = subprocess.run([sys.executable, "-m", "lit_peft", "fit", "--config", str(config), *quick, *named,
                          "--model.init_args.adapter", "LoRA"], cwd=tmp_path, env=cli_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    # the run folder is named after the adapter used (LoRA's default rank 8), not the config's BOFT
    assert (tmp_path / "runs" / "switch-lora_r8" / "version_0" / "metrics.csv").is_file()
    assert not list((tmp_path / "runs").glob("switch-boft*"))
    assert re.search(r"the adapter is LoRA \(command line\), not the config's BOFT, and it keeps these init_args of "
                     r"the config's adapter: dropout=0\.1, target_modules=\['qkv'\]", out.stderr), out.stderr[-2000:]
    out = subprocess.run([sys.executable, "-m", "lit_peft", "fit", "--config", str(config), *quick,
                          "--model.init_args.adapter", "LoRA", "--model.init_args.adapter.init_args.dropout", "0.0",
                          "--model.init_args.adapter.init_args.target_modules", "[qkv]"],
                         cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "keeps these init_args" not in out.stderr, out.stderr[-2000:]


def test_adapter_placeholder_becomes_the_tag_of_the_adapter_used():
    """``{adapter}`` in the trainer's settings becomes ``AdapterStrategy.tag``; other braces stay (a checkpoint's
    ``{epoch}``); an adapter whose arguments it would refuse still names the folder (the refusal comes later)."""
    from jsonargparse import Namespace

    from lit_peft.cli import adapter_tag, fill_adapter_placeholder

    assert adapter_tag({"class_path": "BOFT", "init_args": {"block_size": 4, "n_butterfly_factors": 3}}) == "boft_m3b4"
    assert adapter_tag({"class_path": "lit_peft.adapters.SVFT", "init_args": {"pattern": "banded"}}) == "svft_banded_d2"
    assert adapter_tag(Namespace(class_path="lit_peft.adapters.LoRA", init_args=Namespace(rank=4))) == "lora_r4"
    assert adapter_tag({"class_path": "OFT", "init_args": {"block_size": -1}}) == "oft"
    assert adapter_tag(None) == "head_only"
    trainer = Namespace(default_root_dir="runs/{adapter}/cifar100",
                        logger=Namespace(class_path="CSVLogger", init_args=Namespace(name="{adapter}")),
                        callbacks=[Namespace(class_path="ModelCheckpoint",
                                             init_args=Namespace(filename="{adapter}-{epoch}"))])
    fill_adapter_placeholder(trainer, "vera_r256")
    assert trainer.default_root_dir == "runs/vera_r256/cifar100" and trainer.logger.init_args.name == "vera_r256"
    assert trainer.callbacks[0].init_args.filename == "vera_r256-{epoch}"


def test_export_lora_command_writes_a_trained_run_as_a_peft_lora(tmp_path, capsys):
    """``python -m lit_peft export-lora --config X --ckpt_path CKPT``: the run's BOFT adapter as a peft LoRA in
    ``<run>/lora`` (per-layer ranks, the output difference on a validation batch printed and stored); ``--rank``
    fixes the rank; bad arguments are refused before any model is built."""
    import json

    data_root = make_vtab_task(tmp_path / "vtab")
    adapter = {"class_path": "lit_peft.adapters.BOFT",
               "init_args": {"block_size": 4, "n_butterfly_factors": 2, "target_modules": ["qkv", "fc1"]}}
    config = write_config(tmp_path, data_root, adapter, max_epochs=1, name="export")
    run_cli("fit", "--config", str(config), "--test_after_fit=null", cwd=tmp_path)
    run = tmp_path / "runs" / "export" / "version_0"
    ckpt = run / "checkpoints" / "last.ckpt"
    output = run_cli("export-lora", "--config", str(config), "--ckpt_path", str(ckpt), "--tolerance", "1e-6",
                     cwd=tmp_path)
    match = re.search(r"LoRA export: 4 layers, ranks (\d+)–(\d+) .*relative difference (\S+) -> (\S+)", output)
    assert match, output[-2000:]
    assert Path(match.group(4)) == run / "lora" and float(match.group(3)) < 1e-4
    report = json.loads((run / "lora" / "lora_export.json").read_text())
    assert report["tolerance"] == 1e-6 and len(report["layers"]) == 4
    assert (run / "lora" / "adapter_config.json").is_file() and (run / "lora" / "adapter_model.safetensors").is_file()

    out = tmp_path / "rank2"
    output = run_cli("export-lora", "--config", str(config), "--ckpt_path", str(ckpt), "--rank", "2", "--out",
                     str(out), cwd=tmp_path)
    assert "ranks 2–2" in output and json.loads((out / "lora_export.json").read_text())["rank"] == 2

    def refused(*args):  # in-process: every refusal comes before a model is built
        from lit_peft.export import main as export_main

        with pytest.raises(SystemExit) as err:
            export_main(list(args))
        assert err.value.code != 0
        return str(err.value.code) + capsys.readouterr().err

    assert "--ckpt_path missing.ckpt is not a file" in refused("--config", str(config), "--ckpt_path", "missing.ckpt")
    assert "rank must be" in refused("--config", str(config), "--ckpt_path", str(ckpt), "--rank", "0")
    assert "not allowed with argument" in refused("--config", str(config), "--ckpt_path", str(ckpt), "--rank", "2",
                                                  "--tolerance", "0.1")
    assert "--config is required" in refused("--ckpt_path", str(ckpt))


def test_quantized_base_from_yaml_trains_merges_and_caches_the_dequantized_svds(tmp_path):
    """``model.init_args.quantize: nf4`` with SVFT and an SVDCache through the CLI: the console names the quantized
    layers, the SVD cache holds the SVDs of the dequantized weights (one per q/k/v part and fc1), training runs, and
    MergeAdapters' check passes on the full-precision merged model it writes."""
    pytest.importorskip("torchao")
    data_root = make_vtab_task(tmp_path / "vtab")
    adapter = {"class_path": "lit_peft.adapters.SVFT",
               "init_args": {"pattern": "banded", "off_diag": 1, "svd_rank": 8, "target_modules": ["qkv", "fc1"]}}
    cache = tmp_path / "svd"
    config = write_config(tmp_path, data_root, adapter, max_epochs=1, name="quant",
                          callbacks=[{"class_path": "lit_peft.callbacks.SVDCache",
                                      "init_args": {"cache_dir": str(cache)}}])
    output = run_cli("fit", "--config", str(config), "--model.init_args.quantize", "nf4", cwd=tmp_path)
    assert re.search(r"nf4 base: 8 frozen linear layers quantized, their weights [\d.]+ MiB -> [\d.]+ MiB", output), \
        output[-3000:]
    assert "SVDCache: the base is stored in nf4" in output
    assert len(list(cache.glob("*.safetensors"))) == 2 * 4  # q, k, v, fc1 of 2 blocks
    assert re.search(r"merged vs adapted relative difference \d\.\d\de-0[5-9]", output), output[-3000:]
    merged = load_file(str(tmp_path / "runs" / "quant" / "version_0" / "merged" / "model.safetensors"))
    assert merged["blocks.0.attn.qkv.weight"].dtype == torch.float32 and "blocks.0.attn.proj.weight" in merged


def test_switching_a_lora_config_to_svft_keeps_svft_at_full_rank():
    """SVFT's truncation is ``svd_rank``, not ``rank``: jsonargparse carries every argument the new adapter class
    also has, so a ``rank`` would have turned LoRA's ``rank: 8`` into SVFT keeping 8 singular triplets (the
    comparison harness switched its LLM config's LoRA to SVFT this way and trained 56 values per layer)."""
    from helpers.cli import print_config

    config = print_config("--config", "configs/math_lora.yaml", "--model.init_args.adapter", "SVFT")
    adapter = config["model"]["init_args"]["adapter"]
    assert adapter["class_path"] == "lit_peft.adapters.SVFT" and adapter["init_args"]["svd_rank"] is None
