"""scripts/compare_methods.py --suite smoke: one task, two methods, one seed, a few steps, through the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _require_assets():
    from lit_peft import assets

    try:
        assets.path("mnist-5k")
    except assets.AssetNotPrepared as err:
        pytest.skip(f"the mnist-5k asset is not prepared (python -m lit_peft.assets prepare mnist-5k): {err}")


def test_smoke_suite_writes_table_and_plots(tmp_path):
    _require_assets()
    pytest.importorskip("matplotlib")
    out, runs = tmp_path / "results", tmp_path / "runs"
    proc = subprocess.run([sys.executable, "scripts/compare_methods.py", "--suite", "smoke", "--out", str(out),
                           "--runs", str(runs), "--threads", "1", "--jobs", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (out / "mnist-vit.md").read_text()
    for method in ("head-only", "lora-r8"):
        row = next((line for line in table.splitlines() if line.startswith(f"| {method} |")), None)
        assert row is not None, table
        assert "failed" not in row, row
    assert "| peft-lora-r8 | not run" in table
    assert "Machine:" in table and "Versions:" in table and "Command:" in table
    for png in ("mnist-vit_params.png", "mnist-vit_loss.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    record = json.loads((out / "mnist-vit.json").read_text())
    by_method = {s["method"]: s for s in record["summary"]}
    assert by_method["head-only"]["trainable_params"] < by_method["lora-r8"]["trainable_params"]
    for s in by_method.values():
        assert 0.0 <= s["mean"] <= 1.0 and s["step_time_s"] > 0 and s["peak_rss_mib"] > 0
    # every run's own command is kept, and it is the user's CLI
    run = record["result"]["rows"]["lora-r8"]["runs"][0]
    assert run["cmd"].startswith("-m lit_peft fit --config configs/compare/mnist-vit.yaml")
    assert (runs / "mnist-vit" / "lora-r8").is_dir()
