"""``python -m lit_peft plot RUN_DIR [RUN_DIR ...]``: a run's curves as PNG, or several runs side by side.

Reads each run's ``metrics.csv`` (Lightning's ``CSVLogger``; the newest one under the folder) and draws, against the
optimiser step: the training loss, every validation metric (``val_*``), and for BOFT/OFT runs the orthogonality error
that ``OrthogonalityCheck`` logs (log scale). One run: ``<RUN_DIR>/curves.png``; several: one figure with a line per
run, ``--out`` (default ``runs.png``). The file is written under a temporary name and renamed; its path is printed.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from .files import atomic_write


def find_metrics(run: Path) -> Path:
    """The run's ``metrics.csv`` (``run`` may be the file, its folder or a folder above it: the newest one)."""
    if run.is_file():
        return run
    if not run.exists():
        raise FileNotFoundError(f"{run} does not exist (expected a run folder holding a CSVLogger metrics.csv)")
    found = sorted(run.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no metrics.csv under {run}: is it a run folder written with the CSVLogger?")
    return found[-1]


def read_curves(file: Path) -> dict[str, list[tuple[int, float]]]:
    """``{column: [(step, value), ...]}`` for every numeric column but ``step``/``epoch``."""
    curves: dict[str, list[tuple[int, float]]] = {}
    with open(file, newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if step in (None, ""):
                continue
            for key, value in row.items():
                if key in ("step", "epoch") or value in (None, ""):
                    continue
                try:
                    curves.setdefault(key, []).append((int(float(step)), float(value)))
                except ValueError:
                    continue
    return curves


def panels(runs: dict[str, dict[str, list[tuple[int, float]]]]) -> list[tuple[str, list[str]]]:
    """(title, columns) of each panel: training loss, validation metrics, orthogonality error (where logged)."""
    columns = {c for curves in runs.values() for c in curves}
    out = []
    if "train_loss" in columns:
        out.append(("training loss", ["train_loss"]))
    val = sorted(c for c in columns if c.startswith("val_"))
    if val:
        out.append(("validation", val))
    if "orthogonality_error" in columns:
        out.append(("orthogonality error max ‖QᵀQ − I‖", ["orthogonality_error"]))
    if not out:
        raise ValueError(f"nothing to plot: the runs log none of train_loss, val_*, orthogonality_error "
                         f"(columns: {sorted(columns)})")
    return out


def plot(run_dirs: list[Path], out: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {}
    for run in run_dirs:
        runs[str(run)] = read_curves(find_metrics(run))
    layout = panels(runs)
    out = out or (run_dirs[0] / "curves.png" if len(run_dirs) == 1 else Path("runs.png"))
    fig, axes = plt.subplots(1, len(layout), figsize=(5.2 * len(layout), 3.8), squeeze=False)
    for ax, (title, columns) in zip(axes[0], layout):
        for name, curves in runs.items():
            for column in columns:
                points = curves.get(column)
                if not points:
                    continue
                label = (name if len(runs) > 1 else "") + (f" {column}" if len(columns) > 1 else "")
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if len(points) < 30 else None,
                        ms=3, lw=1.2, label=label.strip() or column)
        ax.set_title(title)
        ax.set_xlabel("optimiser step")
        if columns == ["orthogonality_error"]:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        if len(runs) > 1 or len(columns) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lit_peft plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (or metrics.csv files)")
    parser.add_argument("--out", type=Path, default=None, help="the PNG to write (default: see above)")
    args = parser.parse_args(argv)
    try:
        path = plot(args.runs, args.out)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"lit_peft plot: {err}\n")
    print(f"lit_peft plot: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
