"""``python -m lit_peft plot`` (:mod:`lit_peft.plot`): a run's loss, validation and orthogonality curves as PNG, and
several runs side by side, from the CSVLogger's ``metrics.csv``, through the command a user types."""

from __future__ import annotations

import subprocess
import sys

from helpers.cli import cli_env
from lit_peft.plot import panels, read_curves

METRICS = """epoch,step,train_loss,orthogonality_error,val_loss,val_acc
0,0,2.3,1.0e-7,,
0,1,2.1,2.0e-7,,
0,1,,,2.0,0.4
1,2,1.7,3.0e-7,,
1,3,1.2,,,
1,3,,,1.5,0.7
"""


def run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "lit_peft", "plot", *map(str, args)], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=300)


def test_plot_one_run_and_several(tmp_path):
    for name in ("boft", "lora"):
        folder = tmp_path / "runs" / name / "version_0"
        folder.mkdir(parents=True)
        text = METRICS if name == "boft" else METRICS.replace("1.0e-7", "").replace("2.0e-7", "").replace("3.0e-7", "")
        (folder / "metrics.csv").write_text(text)
    curves = read_curves(tmp_path / "runs" / "boft" / "version_0" / "metrics.csv")
    assert curves["train_loss"] == [(0, 2.3), (1, 2.1), (2, 1.7), (3, 1.2)] and curves["val_acc"] == [(1, 0.4), (3, 0.7)]
    assert [title for title, _ in panels({"boft": curves})] == ["training loss", "validation",
                                                               "orthogonality error max ‖QᵀQ − I‖"]

    one = run(tmp_path / "runs" / "boft", cwd=tmp_path)
    png = tmp_path / "runs" / "boft" / "curves.png"
    assert one.returncode == 0 and f"wrote {png}" in one.stdout, one.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    both = run(tmp_path / "runs" / "boft", tmp_path / "runs" / "lora", "--out", tmp_path / "both.png", cwd=tmp_path)
    assert both.returncode == 0 and (tmp_path / "both.png").stat().st_size > 10_000, both.stderr
    missing = run(tmp_path / "nowhere", cwd=tmp_path)
    assert missing.returncode == 2 and "nowhere does not exist" in missing.stderr
