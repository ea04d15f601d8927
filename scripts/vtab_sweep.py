#!/usr/bin/env python
"""Write the VTAB-1K sweep of the BOFT paper's Table 4: one config per task (19) and method, and the commands.

Each config is the method's base config (``configs/vtab_boft.yaml``, ``vtab_oft.yaml``, ``vtab_lora.yaml``) with the
task's ``data.task``, ``model.num_classes`` (:data:`lit_peft.data.VTAB_TASKS`), the paper's learning rate for that
task and method, and the adapter shape of the method. Seeds are command-line overrides of the one config per
task, each writing to its own folder::

    <out-dir>/configs/<method>/<task>.yaml                  the configs
    <out-dir>/<method>/<task>/seed_<s>/version_<n>/metrics.csv   the runs (CSVLogger), read by collect_results.py

Usage::

    python scripts/vtab_sweep.py --method boft_m2b8 --data-root /data/vtab-1k            # prints the commands
    python scripts/vtab_sweep.py --method all --seeds 0 1 2 3 4 --slurm                 # + a SLURM array line
    python scripts/vtab_sweep.py --method oft_b16 | bash                                # run them one by one

Learning rates (BOFT paper, Table 4, as listed in ``docs/protocols.md``): the OFT b=16, BOFT m=4 b=4 and BOFT
m=6 b=2 rows as printed; BOFT m=2 b=8 uses the m=4 b=4 row (its own lrs are not printed). The paper prints no LoRA
lrs: LoRA r=4 uses one lr, 1e-3, for every task (our choice, as in ``configs/vtab_lora.yaml``).

Seeds: ``seed_everything`` is the run seed; so is ``data.init_args.seed`` when the base config reads the prepared
VTAB-1k folders (``source: folder``, where the 800/200 split is fixed by the list files and the data seed only
orders the shuffle). With ``source: torchvision`` the data seed draws the 800/200 split, so it is left as in the
base config to keep the split fixed across seeds, as VTAB-1k does.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
from collections import OrderedDict
from pathlib import Path

import yaml

from lit_peft.files import atomic_write_text

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BASE_DIR = REPO / "configs"

#: Task order of the BOFT paper's Table 4 (and of ``docs/protocols.md``); the lr rows below follow it.
TASK_ORDER: tuple[str, ...] = (
    "cifar100", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397",
    "patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy",
    "clevr_count", "clevr_dist", "dmlab", "kitti_dist", "dsprites_loc", "dsprites_ori", "smallnorb_azi",
    "smallnorb_ele",
)

#: Per-task learning rates as printed (BOFT paper, Table 4; ``docs/protocols.md``), in TASK_ORDER.
LR_OFT_B16 = (8e-4, 5e-4, 6e-4, 2e-3, 3e-4, 3e-3, 1e-3, 9e-4, 9e-4, 5e-4, 1e-3, 2e-4, 4e-4, 2e-3, 1e-3, 2e-3, 3e-4,
              4e-3, 6e-4)
LR_BOFT_M4B4 = (8e-4, 5e-4, 6e-4, 2e-3, 3e-4, 3e-3, 1e-3, 1e-3, 6e-4, 9e-4, 2e-3, 2e-4, 3e-4, 3e-3, 9e-4, 4e-3, 5e-4,
                5e-3, 8e-4)
LR_BOFT_M6B2 = (8e-4, 9e-4, 1e-3, 1e-3, 8e-4, 3e-3, 1e-3, 4e-3, 9e-4, 1e-3, 2e-3, 4e-4, 4e-4, 4e-3, 3e-3, 4e-3, 8e-4,
                4e-3, 9e-4)
LR_LORA_R4 = (1e-3,) * len(TASK_ORDER)  # not printed in the paper: our choice, one lr for all tasks

#: method -> base config, adapter init_args overrides, the paper's row label, per-task lrs and where they come from.
METHODS: "OrderedDict[str, dict]" = OrderedDict(
    [
        ("boft_m2b8", {"base": "vtab_boft.yaml", "adapter": {"block_size": 8, "n_butterfly_factors": 2},
                       "row": "BOFT m=2 b=8", "lrs": LR_BOFT_M4B4,
                       "lr_source": "the BOFT m=4 b=4 row (m=2 b=8 lrs are not printed)"}),
        ("boft_m4b4", {"base": "vtab_boft.yaml", "adapter": {"block_size": 4, "n_butterfly_factors": 4},
                       "row": "BOFT m=4 b=4", "lrs": LR_BOFT_M4B4, "lr_source": "the BOFT m=4 b=4 row"}),
        ("boft_m6b2", {"base": "vtab_boft.yaml", "adapter": {"block_size": 2, "n_butterfly_factors": 6},
                       "row": "BOFT m=6 b=2", "lrs": LR_BOFT_M6B2, "lr_source": "the BOFT m=6 b=2 row"}),
        ("oft_b16", {"base": "vtab_oft.yaml", "adapter": {"block_size": 16},
                     "row": "OFT b=16", "lrs": LR_OFT_B16, "lr_source": "the OFT b=16 row"}),
        ("lora_r4", {"base": "vtab_lora.yaml", "adapter": {"rank": 4, "alpha": 4.0},
                     "row": "LoRA r=4", "lrs": LR_LORA_R4,
                     "lr_source": "our choice, 1e-3 for every task (the paper prints no LoRA lrs)"}),
    ]
)

DEFAULT_SEEDS = (0, 1, 2, 3, 4)


def task_lr(method: str, task: str) -> float:
    """The learning rate of ``method`` on ``task``."""
    return METHODS[method]["lrs"][TASK_ORDER.index(task)]


def check_tasks() -> None:
    """The lr rows follow TASK_ORDER, which must be lit_peft's VTAB task order."""
    from lit_peft.data import VTAB_TASKS

    if tuple(VTAB_TASKS) != TASK_ORDER:
        raise RuntimeError(f"lit_peft.data.VTAB_TASKS order {list(VTAB_TASKS)} differs from the paper's {TASK_ORDER}")
    for method, spec in METHODS.items():
        if len(spec["lrs"]) != len(TASK_ORDER):
            raise RuntimeError(f"{method}: {len(spec['lrs'])} learning rates for {len(TASK_ORDER)} tasks")


def run_dir(out_dir: Path, method: str, task: str, seed: int) -> Path:
    """Where one run logs: ``<out-dir>/<method>/<task>/seed_<seed>`` (CSVLogger adds ``version_<n>``)."""
    return Path(out_dir) / method / task / f"seed_{seed}"


def config_path(out_dir: Path, method: str, task: str) -> Path:
    return Path(out_dir) / "configs" / method / f"{task}.yaml"


def varies_data_seed(config: dict) -> bool:
    """Whether the run seed also goes to ``data.init_args.seed`` (see the module docstring)."""
    return config["data"]["init_args"].get("source", "folder") == "folder"


def make_config(base: dict, method: str, task: str, out_dir: Path, seed: int, data_root: str | None) -> dict:
    """The config of ``method`` on ``task`` (run seed ``seed``), derived from the method's base config."""
    from lit_peft.data import VTAB_TASKS

    spec = METHODS[method]
    config = copy.deepcopy(base)
    model = config["model"]["init_args"]
    model["num_classes"] = VTAB_TASKS[task]
    adapter = model["adapter"]["init_args"]
    for key, value in spec["adapter"].items():
        if key not in adapter:
            raise KeyError(f"{spec['base']}: adapter init_args lack {key!r} (method {method})")
        adapter[key] = value
    model["optimizer"]["init_args"]["lr"] = task_lr(method, task)
    data = config["data"]["init_args"]
    data["task"] = task
    if data_root is not None:
        data["data_root"] = str(data_root)
    config["seed_everything"] = int(seed)
    if varies_data_seed(config):
        data["seed"] = int(seed)
    root = run_dir(out_dir, method, task, seed)
    trainer = config["trainer"]
    trainer["default_root_dir"] = str(root)
    logger = trainer["logger"]["init_args"]
    logger["save_dir"] = str(root.parent)
    logger["name"] = root.name
    return config


def header(method: str, task: str) -> str:
    spec = METHODS[method]
    return (f"# BOFT paper Table 4 (VTAB-1K, DINOv2-large), row \"{spec['row']}\", task {task}: generated by "
            f"scripts/vtab_sweep.py from configs/{spec['base']}.\n"
            f"# lr {task_lr(method, task):g}: {spec['lr_source']}. Seeds: see the commands the script prints "
            f"(--seed_everything, --data.init_args.seed, logger name and default_root_dir per seed).\n")


def write_configs(methods: list[str], out_dir: Path, seed: int = 0, data_root: str | None = None,
                  base_dir: Path = DEFAULT_BASE_DIR, tasks: list[str] | None = None) -> dict[str, list[Path]]:
    """Write one config per task for each method; returns ``{method: [paths]}`` in task order."""
    check_tasks()
    tasks = list(TASK_ORDER) if tasks is None else list(tasks)
    written: dict[str, list[Path]] = {}
    for method in methods:
        base_file = Path(base_dir) / METHODS[method]["base"]
        with open(base_file, encoding="utf-8") as f:
            base = yaml.safe_load(f)
        written[method] = []
        for task in tasks:
            config = make_config(base, method, task, out_dir, seed, data_root)
            path = config_path(out_dir, method, task)
            atomic_write_text(path, header(method, task) + yaml.safe_dump(config, sort_keys=False,
                                                                           default_flow_style=False))
            written[method].append(path)
    return written


def seed_overrides(config: dict, out_dir: Path, method: str, task: str, seed: int) -> list[str]:
    """Command-line arguments that turn a written config into the run of ``seed``."""
    root = run_dir(out_dir, method, task, seed)
    args = ["--seed_everything", str(seed)]
    if varies_data_seed(config):
        args += ["--data.init_args.seed", str(seed)]
    args += ["--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root.parent),
             "--trainer.logger.init_args.name", root.name]
    return args


def commands(written: dict[str, list[Path]], out_dir: Path, seeds: list[int],
             python: str = "python") -> list[str]:
    """One ``python -m lit_peft fit`` command per (method, task, seed)."""
    lines = []
    for method, paths in written.items():
        for path in paths:
            with open(path, encoding="utf-8") as f:
                config = yaml.safe_load(f)
            task = config["data"]["init_args"]["task"]
            for seed in seeds:
                argv = [python, "-m", "lit_peft", "fit", "--config", str(path),
                        *seed_overrides(config, out_dir, method, task, seed)]
                lines.append(shlex.join(argv))
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", nargs="+", default=["all"], choices=[*METHODS, "all"],
                        help="method(s) to sweep (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS),
                        help="run seeds (default: 0 1 2 3 4)")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/vtab"),
                        help="root of the configs (<out-dir>/configs) and of the runs (default: runs/vtab)")
    parser.add_argument("--data-root", default=None,
                        help="VTAB-1k folder (prepared layout); default: the base config's data_root")
    parser.add_argument("--tasks", nargs="+", default=None, choices=list(TASK_ORDER),
                        help="a subset of the 19 tasks (default: all)")
    parser.add_argument("--base-dir", type=Path, default=DEFAULT_BASE_DIR,
                        help="folder of the base configs (default: the repository's configs/)")
    parser.add_argument("--python", default="python", help="interpreter in the printed commands")
    parser.add_argument("--slurm", action="store_true",
                        help="also print an sbatch array line running <out-dir>/configs/commands.txt, one run per line")
    parser.add_argument("--max-parallel", type=int, default=8, help="SLURM array concurrency (%%N) with --slurm")
    args = parser.parse_args(argv)
    if not args.seeds:
        parser.error("--seeds needs at least one seed")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    methods = list(METHODS) if "all" in args.method else list(dict.fromkeys(args.method))
    written = write_configs(methods, args.out_dir, seed=args.seeds[0], data_root=args.data_root,
                            base_dir=args.base_dir, tasks=args.tasks)
    lines = commands(written, args.out_dir, args.seeds, python=args.python)
    commands_file = Path(args.out_dir) / "configs" / "commands.txt"
    atomic_write_text(commands_file, "\n".join(lines) + "\n")
    n_configs = sum(len(p) for p in written.values())
    print(f"# {n_configs} configs ({', '.join(f'{m}: {len(p)}' for m, p in written.items())}) under "
          f"{Path(args.out_dir) / 'configs'}; {len(lines)} runs (seeds {' '.join(map(str, args.seeds))}), "
          f"listed in {commands_file}", file=sys.stderr)
    for line in lines:
        print(line)
    if args.slurm:
        wrap = f'eval "$(sed -n "${{SLURM_ARRAY_TASK_ID}}p" {shlex.quote(str(commands_file))})"'
        print(f"# SLURM: sbatch --array=1-{len(lines)}%{args.max_parallel} --gres=gpu:1 --cpus-per-task=8 "
              f"--job-name=vtab --wrap {shlex.quote(wrap)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
