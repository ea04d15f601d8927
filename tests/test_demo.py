"""The demo (:mod:`lit_peft.demo`, ``configs/demo.yaml``) end to end, shortened."""

from __future__ import annotations

import csv


def test_demo_runs_end_to_end_shortened(tmp_path, monkeypatch):
    """The README's main job with fewer epochs: pretrain on digits 0-4 (cached), BOFT on 5-9, test, merge."""
    from lit_peft.cli import main

    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    args = ["fit", "--config", "demo.yaml", "--trainer.max_epochs=1", "--model.init_args.pretrain_epochs=2",
            f"--model.init_args.cache_dir={cache}"]
    main(args)
    assert len(list(cache.glob("digits-backbone-*.safetensors"))) == 1
    version = tmp_path / "runs" / "demo" / "boft" / "version_0"
    with open(version / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    accuracy = [float(r["test_acc"]) for r in rows if r.get("test_acc")]
    assert len(accuracy) == 1 and 0.0 <= accuracy[0] <= 1.0
    assert (version / "merged" / "model.safetensors").is_file()
    assert (version / "merged" / "adapter" / "adapter_config.json").is_file()
