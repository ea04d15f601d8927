"""``python -m lit_peft export-lora --config RUN.yaml --ckpt_path CKPT [--tolerance T | --rank R] [--out DIR]``.

Writes a trained run's adapter, whatever its method, as a peft LoRA folder for LoRA-only servers
(:func:`lit_peft.adapters.export_lora`: a truncated SVD of each adapted layer's ``W' − W``). The model is built from
the same config as ``fit``/``predict`` (any other ``--key value`` goes to it, as on those commands), the checkpoint's
trained tensors are loaded into it, and the served LoRA's output difference is measured on the first validation
(else training) batch of the config's data unless ``--no-check``. The folder defaults to ``lora/`` beside the
checkpoint's ``checkpoints/`` folder; each layer's rank and error, and the output difference, go to its
``lora_export.json`` and are printed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

USAGE = "python -m lit_peft export-lora --config RUN.yaml --ckpt_path CKPT [--tolerance T | --rank R] [--out DIR]"


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m lit_peft export-lora", description=__doc__.split("\n\n")[1],
                                     usage=USAGE)
    parser.add_argument("--ckpt_path", required=True, help="the run's checkpoint (e.g. <run>/checkpoints/last.ckpt)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--tolerance", type=float, default=None,
                      help="largest relative Frobenius error of each layer's ΔW (0 < T < 1); the rank is chosen "
                           "per layer (default 0.01)")
    size.add_argument("--rank", type=int, default=None, help="one fixed LoRA rank for every layer instead")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: lora/ beside the checkpoint's checkpoints/ folder)")
    parser.add_argument("--no-check", action="store_true",
                        help="do not measure the LoRA's output difference on a batch of the config's data")
    args, rest = parser.parse_known_args(list(argv))
    if "--config" not in rest and not any(a.startswith("--config=") for a in rest):
        parser.error("--config is required: the YAML the run was trained with (as for fit and predict)")
    if args.rank is None and args.tolerance is None:
        args.tolerance = 1e-2
    return args, rest


def default_out(ckpt: Path) -> Path:
    """``<run>/lora`` for ``<run>/checkpoints/<file>.ckpt``, else ``lora/`` beside the checkpoint file."""
    folder = ckpt.resolve().parent
    return (folder.parent if folder.name == "checkpoints" else folder) / "lora"


def main(argv: Sequence[str] | None = None) -> int:
    args, rest = parse(sys.argv[1:] if argv is None else argv)
    ckpt = Path(args.ckpt_path)
    if not ckpt.is_file():
        raise SystemExit(f"lit_peft export-lora: --ckpt_path {ckpt} is not a file (a checkpoint written by fit, "
                         f"e.g. <run>/checkpoints/last.ckpt)")
    from .adapters.lora_export import _check_rank_args

    try:
        _check_rank_args(args.rank, args.tolerance)
    except ValueError as err:
        raise SystemExit(f"lit_peft export-lora: {err}") from None
    out = args.out or default_out(ckpt)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"lit_peft export-lora: --out {out} is a file; give a folder")

    import lightning as L
    import torch

    from .adapters import export_lora, find_strategy
    from .cli import LitPeftCLI, resolve_config_args

    # The config's model and data, no trainer work: one process, no logger, no callbacks, nothing written.
    overrides = ["--trainer.logger=false", "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false",
                 "--trainer.strategy=auto", "--trainer.devices=1", "--trainer.num_nodes=1"]
    argv_before = sys.argv[1:]
    sys.argv[1:] = [*resolve_config_args(rest), *overrides]  # LightningCLI reads them as its command line
    try:
        cli = LitPeftCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True,
                         subclass_mode_data=True, auto_configure_optimizers=False, run=False,
                         save_config_callback=None, parser_kwargs={"prog": "python -m lit_peft export-lora"})
    finally:
        sys.argv[1:] = argv_before
    module, data = cli.model, cli.datamodule
    module.configure_model()
    if find_strategy(module.model) is None:
        raise SystemExit("lit_peft export-lora: the config has no adapter (model.init_args.adapter is null): there is "
                         "nothing to export")
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    if "state_dict" not in checkpoint:
        raise SystemExit(f"lit_peft export-lora: {ckpt} holds no state_dict (not a Lightning checkpoint)")
    module.load_trained_state(checkpoint["state_dict"])
    module.eval()
    batch = None
    if not args.no_check:
        batch = _first_batch(data)
        if batch is None:
            raise SystemExit("lit_peft export-lora: the config's data gives no validation or training batch to check "
                             "the LoRA on; pass --no-check to export without the check")
    check = None if batch is None else (lambda model: module.model_outputs(model, batch))
    report = export_lora(module.model, out, rank=args.rank, tolerance=args.tolerance, outputs=check,
                         base_model_name_or_path=getattr(module, "model_name_or_path", None),
                         task_type=getattr(module, "peft_task_type", None))
    print(f"lit_peft: {report.summary()}", flush=True)
    return 0


def _first_batch(data):
    """The first validation batch of ``data``, else its first training batch (``None``: it has neither)."""
    if data is None:
        return None
    data.prepare_data()
    for stage, getter in (("validate", "val_dataloader"), ("fit", "train_dataloader")):
        try:
            data.setup(stage)
            loader = getattr(data, getter)()
        except (NotImplementedError, AttributeError, TypeError):
            continue
        for batch in loader if loader is not None else ():
            return batch
    return None


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
