"""The demo (:mod:`lit_peft.demo`, ``configs/demo.yaml``) end to end, shortened."""

from __future__ import annotations

import csv
import re


def test_demo_runs_end_to_end_shortened(tmp_path, monkeypatch, capsys):
    """The README's main job with fewer epochs: pretrain on digits 0-4 (cached, with progress lines), BOFT on 5-9
    (a metric line per epoch, TensorBoard events beside metrics.csv, last.ckpt), test, merge; the run folder is
    named after the adapter."""
    from lit_peft.cli import main

    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    args = ["fit", "--config", "demo.yaml", "--trainer.max_epochs=1", "--model.init_args.pretrain_epochs=2",
            f"--model.init_args.cache_dir={cache}"]
    main(args)
    assert len(list(cache.glob("digits-backbone-*.safetensors"))) == 1
    out = capsys.readouterr().out
    assert re.search(r"^demo: pretraining epoch 2/2 · loss [0-9.]+ · \d+ s$", out, re.M), out
    assert re.search(r"^epoch 1/1 · step \d+ · [0-9.]+ s · train_loss \S+ · val_acc \S+ · val_loss \S+ · "
                     r"orthogonality_error \S+$", out, re.M), out
    version = tmp_path / "runs" / "demo" / "boft_m2b8" / "version_0"
    assert list(version.glob("events.out.tfevents.*")) and (version / "checkpoints" / "last.ckpt").is_file()
    with open(version / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    accuracy = [float(r["test_acc"]) for r in rows if r.get("test_acc")]
    assert len(accuracy) == 1 and 0.0 <= accuracy[0] <= 1.0
    assert (version / "merged" / "model.safetensors").is_file()
    assert (version / "merged" / "adapter" / "adapter_config.json").is_file()
