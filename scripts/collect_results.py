#!/usr/bin/env python
"""Average our runs' test accuracy over seeds and print it beside the papers' numbers as a markdown table.

Runs are read in the layout that ``scripts/vtab_sweep.py`` and the ``fewshot_*.yaml`` configs write (CSVLogger)::

    <runs-dir>/<method>/<task>/seed_<s>/version_<n>/metrics.csv      (column ``test_acc``, a fraction or a %)

For each seed the newest ``version_<n>`` that logged a ``test_acc`` counts (its last ``test_acc`` row); the seeds
are averaged per task, and tasks without any finished run are shown as ``–``. The mean column is over the tasks
we have; when some are missing it says how many, e.g. ``77.9 (12/19)``, and is not comparable to the paper's.

Usage::

    python scripts/collect_results.py --table vtab --runs-dir runs/vtab                    # every method found
    python scripts/collect_results.py --table vtab --method boft_m2b8 oft_b16 --std
    python scripts/collect_results.py --table fewshot --runs-dir runs/fewshot --output results.md

The papers' rows (BOFT paper Table 4; SVFT paper few-shot table, NeurIPS version, ViT-B; both in
``docs/protocols.md``) are typed in below as data. Method folder names map to them (``boft_m2b8`` -> "BOFT m=2
b=8", ``svft_banded_d4`` -> "SVFT banded d=4", ...); a method without a paper row (e.g. ``svft_banded_d2`` on VTAB,
``svft_top_k_d4`` few-shot) gets our row only.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

DASH = "–"

# -- the papers' numbers ------------------------------------------------------------------------------------------

VTAB_TASKS: tuple[str, ...] = (
    "cifar100", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397",
    "patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy",
    "clevr_count", "clevr_dist", "dmlab", "kitti_dist", "dsprites_loc", "dsprites_ori", "smallnorb_azi",
    "smallnorb_ele",
)
#: Short column headers, in VTAB_TASKS order.
VTAB_HEADERS: tuple[str, ...] = (
    "C100", "Cal101", "DTD", "Flw102", "Pets", "SVHN", "Sun397", "Camel", "EuroSAT", "R45", "Retino",
    "Clevr-C", "Clevr-D", "DMLab", "KITTI", "dSpr-L", "dSpr-O", "sNORB-A", "sNORB-E",
)


@dataclass(frozen=True)
class PaperRow:
    label: str
    params: str
    values: tuple[float | None, ...]
    mean: float | None  # as printed; None: not printed (computed from the values then)
    note: str = ""


def _row(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.replace("·", " ").split())


#: BOFT paper, Table 4 (VTAB-1K, DINOv2-large): key -> row. Keys are our method folder names.
VTAB_PAPER: "OrderedDict[str, PaperRow]" = OrderedDict(
    [
        ("full", PaperRow("Full fine-tuning", "304.4M", _row(
            "67.6 91.7 77.9 99.7 93.7 92.8 52.3 · 88.1 96.1 90.9 77.2 · 67.2 59.8 58.1 82.8 83.6 62.0 36.9 39.4"),
            74.6)),
        ("linear", PaperRow("Linear probing", "0", _row(
            "73.2 90.9 78.1 99.7 95.2 40.3 59.3 · 84.2 92.9 86.8 75.6 · 48.1 44.4 45.9 65.4 25.5 37.0 18.5 30.9"),
            62.7)),
        ("lora_r4", PaperRow("LoRA r=4", "1.77M", _row(
            "77.2 92.8 80.3 99.7 94.8 92.7 59.5 · 88.3 96.4 91.4 77.4 · 74.7 62.4 58.1 85.2 85.8 57.2 31.8 37.2"),
            76.6, "printed mean 76.6; the mean of the printed row is 75.9")),
        ("oft_b16", PaperRow("OFT b=16", "2.10M", _row(
            "77.7 91.9 80.1 99.7 94.7 92.9 59.3 · 88.4 96.4 91.5 77.2 · 81.0 64.7 60.5 84.0 92.2 61.1 34.8 40.3"),
            77.3)),
        ("boft_m2b8", PaperRow("BOFT m=2 b=8", "1.99M", _row(
            "78.1 92.5 80.6 99.7 95.0 93.0 59.9 · 88.9 96.6 91.6 77.3 · 84.5 64.9 61.4 84.1 93.9 62.0 36.2 40.0"),
            77.9)),
        ("boft_m4b4", PaperRow("BOFT m=4 b=4", "1.77M", _row(
            "78.2 91.4 79.6 99.7 94.9 92.8 59.4 · 88.1 96.4 91.6 76.2 · 81.9 65.4 60.0 84.5 92.9 61.3 37.1 39.3"),
            77.4)),
        ("boft_m6b2", PaperRow("BOFT m=6 b=2", "1.11M", _row(
            "78.3 91.5 79.9 99.7 95.0 92.0 60.2 · 88.2 96.5 91.4 77.2 · 80.5 64.1 61.4 85.0 91.6 60.8 34.0 38.5"),
            77.1)),
    ]
)

FEWSHOT_TASKS: tuple[str, ...] = ("cifar100", "food101", "flowers102", "resisc45")
FEWSHOT_HEADERS: tuple[str, ...] = ("C100", "F101", "F102", "R45")

#: SVFT paper few-shot table (NeurIPS version: Q and V only, ViT-B/16 in21k), plus its v1 rows (``docs/protocols.md``).
#: The paper prints no mean: ``mean=None``, computed from the four values.
FEWSHOT_PAPER: "OrderedDict[str, PaperRow]" = OrderedDict(
    [
        ("head", PaperRow("Head only", DASH, (78.58, 75.14, 98.71, 64.42), None)),
        ("full", PaperRow("Full FT", "85.8M", (85.02, 75.41, 99.16, 75.30), None)),
        ("lora_r8", PaperRow("LoRA r=8", "294.9K", (85.65, 76.13, 99.14, 74.01), None)),
        ("vera_r256", PaperRow("VeRA r=256", "24.6K", (84.00, 74.02, 99.10, 71.86), None)),
        ("svft_plain", PaperRow("SVFT plain", "18.5K", (83.78, 74.43, 98.99, 70.55), None)),
        ("svft_random_d4", PaperRow("SVFT random d=4", "165.4K", (84.85, 76.45, 99.17, 74.53), None)),
        ("svft_banded_d4", PaperRow("SVFT banded d=4", "165.4K", (84.65, 76.51, 99.21, 75.12), None)),
        ("svft_banded_d2_v1", PaperRow("SVFT banded d=2 (v1: all six linears)", "0.28M",
                                       (84.72, 75.64, 99.28, 72.49), None)),
        ("svft_banded_d8_v1", PaperRow("SVFT banded d=8 (v1: all six linears)", "0.94M",
                                       (85.69, 76.70, 98.88, 70.41), None)),
    ]
)


#: Labels of our methods that have no paper row in a table (our extensions of its protocol).
VTAB_EXTRA_LABELS = {"svft_banded_d2": "SVFT banded d=2"}
FEWSHOT_EXTRA_LABELS = {"svft_top_k_d4": "SVFT top-k d=4", "boft_m2b8": "BOFT m=2 b=8"}


@dataclass(frozen=True)
class Table:
    name: str
    title: str
    tasks: tuple[str, ...]
    headers: tuple[str, ...]
    paper: "OrderedDict[str, PaperRow]"
    decimals: int
    default_runs_dir: str
    extra_labels: dict[str, str] = field(default_factory=dict)

    def label(self, method: str) -> str:
        if method in self.paper:
            return self.paper[method].label
        return self.extra_labels.get(method, method)


TABLES = {
    "vtab": Table("vtab", "VTAB-1K, DINOv2-large (BOFT paper Table 4); test top-1 %", VTAB_TASKS, VTAB_HEADERS,
                  VTAB_PAPER, 1, "runs/vtab", VTAB_EXTRA_LABELS),
    "fewshot": Table("fewshot", "Few-shot, ViT-B/16 in21k, Q and V (SVFT paper, NeurIPS version); test top-1 % of "
                     "the best-validation checkpoint", FEWSHOT_TASKS, FEWSHOT_HEADERS, FEWSHOT_PAPER, 2,
                     "runs/fewshot", FEWSHOT_EXTRA_LABELS),
}

# -- reading our runs ---------------------------------------------------------------------------------------------


def _version_number(path: Path) -> int:
    match = re.search(r"version_(\d+)", str(path))
    return int(match.group(1)) if match else -1


def read_test_acc(metrics_csv: Path) -> float | None:
    """The last ``test_acc`` of a CSVLogger ``metrics.csv``, in %; ``None`` if it logged none."""
    value = None
    try:
        with open(metrics_csv, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                cell = (row.get("test_acc") or "").strip()
                if cell:
                    try:
                        value = float(cell)
                    except ValueError:
                        continue
    except OSError:
        return None
    if value is None or math.isnan(value):
        return None
    return value * 100.0 if value <= 1.0 else value


def seed_result(seed_dir: Path) -> float | None:
    """Test accuracy of one seed's folder: the newest run (``version_<n>``, then mtime) that logged a test_acc."""
    files = sorted(seed_dir.rglob("metrics.csv"), key=lambda p: (_version_number(p), p.stat().st_mtime))
    for metrics in reversed(files):
        acc = read_test_acc(metrics)
        if acc is not None:
            return acc
    return None


@dataclass
class Cell:
    accs: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float | None:
        return sum(self.accs) / len(self.accs) if self.accs else None

    @property
    def std(self) -> float | None:
        if len(self.accs) < 2:
            return None
        m = self.mean
        return math.sqrt(sum((a - m) ** 2 for a in self.accs) / (len(self.accs) - 1))


def collect_method(method_dir: Path, tasks: tuple[str, ...]) -> dict[str, Cell]:
    """``{task: Cell}`` for one method folder; seeds are the ``seed_*`` sub-folders (or the task folder itself)."""
    cells = {}
    for task in tasks:
        cell = Cell()
        task_dir = method_dir / task
        if task_dir.is_dir():
            seed_dirs = sorted(p for p in task_dir.iterdir() if p.is_dir() and p.name.startswith("seed_"))
            for seed_dir in seed_dirs or [task_dir]:
                acc = seed_result(seed_dir)
                if acc is not None:
                    cell.accs.append(acc)
        cells[task] = cell
    return cells


def find_methods(runs_dir: Path, tasks: tuple[str, ...]) -> list[str]:
    """Method folders under ``runs_dir``: those holding at least one task folder."""
    if not runs_dir.is_dir():
        return []
    return sorted(p.name for p in runs_dir.iterdir()
                  if p.is_dir() and any((p / t).is_dir() for t in tasks))


# -- the table ----------------------------------------------------------------------------------------------------


def _fmt(value: float | None, decimals: int, std: float | None = None) -> str:
    if value is None:
        return DASH
    text = f"{value:.{decimals}f}"
    if std is not None:
        text += f" ± {std:.{decimals}f}"
    return text


def paper_cells(row: PaperRow, decimals: int) -> list[str]:
    cells = [_fmt(v, decimals) for v in row.values]
    if row.mean is not None:
        mean = _fmt(row.mean, decimals)
    else:
        vals = [v for v in row.values if v is not None]
        mean = _fmt(sum(vals) / len(vals), decimals) + "*" if len(vals) == len(row.values) else DASH
    return [*cells, mean]


def our_cells(cells: dict[str, Cell], table: Table, show_std: bool) -> list[str]:
    out = [_fmt(cells[t].mean, table.decimals, cells[t].std if show_std else None) for t in table.tasks]
    means = [cells[t].mean for t in table.tasks if cells[t].mean is not None]
    if not means:
        mean = DASH
    else:
        mean = _fmt(sum(means) / len(means), table.decimals)
        if len(means) < len(table.tasks):
            mean += f" ({len(means)}/{len(table.tasks)})"
    return [*out, mean]


def seed_counts(cells: dict[str, Cell]) -> str:
    counts = sorted({len(c.accs) for c in cells.values() if c.accs})
    if not counts:
        return "no runs"
    return f"{counts[0]} seed{'s' if counts[0] != 1 else ''}" if len(counts) == 1 else \
        f"{counts[0]}–{counts[-1]} seeds"


BASELINES = ("full", "linear", "head")


def build_table(table: Table, runs_dir: Path, methods: list[str] | None = None, show_std: bool = False,
                paper_rows: str = "all") -> str:
    """The markdown table: the paper's rows in its order, each of our methods right below its paper row, then our
    methods that have no paper row. ``paper_rows="matched"`` keeps only the baselines and the rows of ``methods``."""
    runs_dir = Path(runs_dir)
    if methods is None:
        methods = find_methods(runs_dir, table.tasks)
    if paper_rows not in ("all", "matched"):
        raise ValueError(f"paper_rows must be 'all' or 'matched', got {paper_rows!r}")
    lines = [f"**{table.title}**", "",
             "| method | #params | " + " | ".join(table.headers) + " | mean |",
             "|---|---|" + "---|" * (len(table.headers) + 1)]
    notes = []

    def ours(method: str) -> None:
        cells = collect_method(runs_dir / method, table.tasks)
        lines.append(f"| {table.label(method)} (ours: {method}, {seed_counts(cells)}) | | "
                     + " | ".join(our_cells(cells, table, show_std)) + " |")

    for key, row in table.paper.items():
        if paper_rows == "all" or key in BASELINES or key in methods:
            lines.append(f"| {row.label} (paper) | {row.params} | " + " | ".join(paper_cells(row, table.decimals))
                         + " |")
            if row.note:
                notes.append(f"{row.label} (paper): {row.note}.")
        if key in methods:
            ours(key)
    for method in methods:
        if method not in table.paper:
            ours(method)
            notes.append(f"{table.label(method)} ({method}): no paper number in this table; our extension of its "
                         f"protocol.")
    if any(row.mean is None for row in table.paper.values()):
        notes.append("Paper means marked * are computed here from the four values (the paper prints none).")
    notes.append(f"Ours: mean over seeds of the test accuracy in {runs_dir}/<method>/<task>/seed_*/"
                 f"version_*/metrics.csv; {DASH} = no finished run; a partial mean says how many tasks it covers.")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", choices=sorted(TABLES), default="vtab", help="which paper table (default: vtab)")
    parser.add_argument("--runs-dir", type=Path, default=None,
                        help="root of the runs (default: runs/vtab or runs/fewshot)")
    parser.add_argument("--method", nargs="+", default=None,
                        help="method folder(s) under --runs-dir (default: every one found)")
    parser.add_argument("--std", action="store_true", help="show the standard deviation over seeds")
    parser.add_argument("--paper-rows", choices=("all", "matched"), default="all",
                        help="all of the paper's rows (default), or only its baselines and the methods shown")
    parser.add_argument("--output", type=Path, default=None, help="also write the table to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    table = TABLES[args.table]
    runs_dir = args.runs_dir if args.runs_dir is not None else Path(table.default_runs_dir)
    text = build_table(table, runs_dir, args.method, show_std=args.std,
                       paper_rows=args.paper_rows)
    print(text, end="")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.output.with_name(f".{args.output.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
