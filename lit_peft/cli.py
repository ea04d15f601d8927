"""``python -m lit_peft fit|validate|test|predict --config X.yaml``: LightningCLI over lit_peft's modules.

The model, its adapter, the data and the callbacks are all ``class_path``/``init_args`` entries, so any
LightningModule, any :class:`~lit_peft.adapters.AdapterStrategy` (or a user's own subclass) and any data module
plugs in from YAML. A ``--config NAME`` that is not a file in the working directory is looked up in the bundled
``configs/`` folder (``--config vtab_boft.yaml``, ``--config strategy/ddp.yaml``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Optional

import lightning as L
from lightning.pytorch.cli import LightningCLI

from .compat import parse_ckpt_hparams
from .handover import connect


def bundled_configs_dir() -> Path:
    """The configs folder: the repository's ``configs/`` in a checkout, ``lit_peft/configs`` when installed."""
    checkout = Path(__file__).resolve().parent.parent / "configs"
    if checkout.is_dir():
        return checkout
    from importlib.resources import files

    return Path(str(files("lit_peft.configs")))


def _check_yaml(path: str) -> None:
    """Parse ``path`` once so that a YAML syntax error names its file (jsonargparse's message does not say which of
    several ``--config`` files it was)."""
    import yaml

    if not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            yaml.safe_load(f)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f", line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SystemExit(f"lit_peft: config {path}{line}: not valid YAML ({problem})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SystemExit(f"lit_peft: config {path} cannot be read: {err}") from None


#: Modules whose public classes may be named by their short name where jsonargparse wants an import path.
_SHORT_NAME_MODULES = ("lit_peft.modules", "lit_peft.data", "lit_peft.adapters", "lit_peft.callbacks", "torch.optim",
                       "lightning.pytorch.callbacks", "lightning.pytorch.loggers", "lightning.pytorch.strategies")


def full_class_path(name: str) -> str:
    """``ViTClassifier`` -> ``lit_peft.modules.ViTClassifier`` (the first of :data:`_SHORT_NAME_MODULES` that has
    it); a dotted path or an unknown name is returned as given."""
    if "." in name:
        return name
    import importlib

    for module_name in _SHORT_NAME_MODULES:
        module = importlib.import_module(module_name)
        if isinstance(getattr(module, name, None), type):
            return f"{module_name}.{name}"
    return name


def resolve_help_args(args: Sequence[str]) -> list[str]:
    """``--model.help ViTClassifier`` (and ``--<key>.help NAME`` in general): the short name as its import path,
    which jsonargparse's help action requires."""
    resolved = list(args)
    for i, arg in enumerate(resolved):
        if arg.endswith(".help") and arg.startswith("--") and i + 1 < len(resolved):
            resolved[i + 1] = full_class_path(resolved[i + 1])
        elif arg.startswith("--") and ".help=" in arg:
            key, value = arg.split("=", 1)
            resolved[i] = f"{key}={full_class_path(value)}"
    return resolved


def resolve_config_args(args: Sequence[str]) -> list[str]:
    """Rewrite ``--config NAME`` to the bundled file when ``NAME`` is not a file here but is a bundled config."""
    resolved = list(args)
    for i, arg in enumerate(resolved):
        if arg == "--config" and i + 1 < len(resolved):
            index, value = i + 1, resolved[i + 1]
        elif arg.startswith("--config="):
            index, value = i, arg.split("=", 1)[1]
        else:
            continue
        if os.path.exists(value):
            _check_yaml(value)
            continue
        candidate = bundled_configs_dir() / value
        if not candidate.is_file() and value.startswith("configs/"):
            candidate = bundled_configs_dir() / value[len("configs/"):]
        if candidate.is_file():
            _check_yaml(str(candidate))
            resolved[index] = str(candidate) if index == i + 1 else f"--config={candidate}"
        else:
            available = sorted(str(p.relative_to(bundled_configs_dir())) for p in bundled_configs_dir().rglob("*.yaml"))
            raise SystemExit(f"lit_peft: config {value!r} is neither a file here nor a bundled config; bundled: "
                             f"{', '.join(available)}")
    return resolved


class LitPeftCLI(LightningCLI):
    """LightningCLI with lit_peft's defaults: subclass mode for model and data, our own optimiser set-up, and
    ``test_after_fit`` to test in the same run (``final``: the weights at the end of fit, the BOFT VTAB protocol;
    ``best``: the best checkpoint of a ``ModelCheckpoint``, the SVFT few-shot protocol)."""

    def instantiate_classes(self) -> None:
        """Build the model, data and trainer, then hand model and data over to each other (:mod:`lit_peft.handover`),
        so a disagreement (a class count) fails before any work and ``num_labels: null`` builds the classifier."""
        super().instantiate_classes()
        connect(self.model, self.datamodule)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--test_after_fit", type=Optional[Literal["final", "best"]], default=None,
                            help="after fit, run test on the final weights or on the best checkpoint")

    def _parse_ckpt_path(self) -> None:
        """Lightning replaces the model arguments by the checkpoint's hyperparameters on ``--ckpt_path``; the
        checkpoint wins (the run continues as it was trained), and each argument it replaces is named here."""
        before = _model_init_args(self.config)
        parse_ckpt_hparams(self)
        after = _model_init_args(self.config)
        changed = [k for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
        if changed:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn("lit_peft: resuming from a checkpoint whose hyperparameters replace these model arguments "
                           "of the config/command line (the checkpoint's values are used): "
                           + "; ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in changed))

    def before_fit(self) -> None:
        """Settings that would fail only after the whole fit fail now."""
        when = self.config.get(self.subcommand, {}).get("test_after_fit")
        if when == "best" and self.trainer.checkpoint_callback is None:
            raise SystemExit("lit_peft: test_after_fit: best needs a checkpoint to test, but checkpointing is off "
                             "(trainer.enable_checkpointing: false and no ModelCheckpoint callback); use "
                             "test_after_fit: final, or add a lightning.pytorch.callbacks.ModelCheckpoint")
        if when is not None and callable(getattr(self.datamodule, "check_can_test", None)):
            try:
                self.datamodule.check_can_test()
            except (RuntimeError, ValueError) as err:
                raise SystemExit(f"lit_peft: test_after_fit: {when} would fail after the whole fit: {err}") from None

    def before_predict(self) -> None:
        """``predict`` writes its predictions (``lit_peft.callbacks.PredictionWriter``) unless a prediction writer is
        configured already."""
        from lightning.pytorch.callbacks import BasePredictionWriter

        from .callbacks import PredictionWriter

        if not any(isinstance(c, BasePredictionWriter) for c in self.trainer.callbacks):
            self.trainer.callbacks.append(PredictionWriter())

    def after_fit(self) -> None:
        when = self.config.get(self.subcommand, {}).get("test_after_fit")
        if when is None or self.trainer.interrupted:
            return
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best" if when == "best" else None)


def _model_init_args(config) -> dict:
    """The model's ``init_args`` of the parsed config, as plain values (empty when there is none)."""
    sub = config.get("subcommand")
    model = (config.get(sub) if sub else config).get("model") if config is not None else None
    if model is None:
        return {}
    model = model.as_dict() if hasattr(model, "as_dict") else dict(model)
    return dict(model.get("init_args") or {})


def main(args: Sequence[str] | None = None) -> LitPeftCLI:
    """The CLI on ``args`` (``None``: the command line, whose ``--config`` names are resolved in place, so that
    LightningCLI does not warn about ``args`` given beside a command line)."""
    if args is None:
        sys.argv[1:] = resolve_help_args(resolve_config_args(sys.argv[1:]))
        cli_args = None
    else:
        cli_args = resolve_help_args(resolve_config_args(args))
    return LitPeftCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "python -m lit_peft"},
        args=cli_args,
    )


def entry_point() -> None:
    """``python -m lit_peft`` and the ``lit-peft`` command: :func:`main` under torchelastic's ``record``, so a rank's
    exception reaches torchrun's failure summary (its traceback in place of "error_file: <N/A>"), and returning
    ``None``, not the CLI object, which a console script would pass to ``sys.exit`` as a failure."""
    if sys.argv[1:2] == ["plot"]:  # not a Lightning subcommand: curves of finished runs (lit_peft.plot)
        from .plot import main as plot_main

        raise SystemExit(plot_main(sys.argv[2:]))
    from torch.distributed.elastic.multiprocessing.errors import record

    record(main)()
