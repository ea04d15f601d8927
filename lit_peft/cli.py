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
_SHORT_NAME_MODULES = ("lit_peft.modules", "lit_peft.data", "lit_peft.adapters", "lit_peft.callbacks",
                       "lit_peft.loggers", "torch.optim", "lightning.pytorch.callbacks", "lightning.pytorch.loggers",
                       "lightning.pytorch.strategies")


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

    _argv: list[str] | None = None

    def before_instantiate_classes(self) -> None:
        """Put the adapter's tag in place of ``{adapter}`` in the trainer's settings (run folders, logger names), and
        warn when the adapter class chosen on the command line differs from the configs' and keeps some of their
        adapter ``init_args`` (jsonargparse carries over every argument the new class also has)."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        trainer = config.get("trainer") if config is not None else None
        if trainer is not None:  # run folders named after the adapter actually used: {adapter} in the trainer's
            fill_adapter_placeholder(trainer, adapter_tag(_model_init_args(self.config).get("adapter")))
            hide_rich_progress_bar(trainer)
        carried = carried_adapter_args(sys.argv[1:] if self._argv is None else self._argv, self.config)
        if carried:
            from lightning.pytorch.utilities import rank_zero_warn

            old, new, args = carried
            rank_zero_warn(f"lit_peft: the adapter is {new} (command line), not the config's {old}, and it keeps these "
                           f"init_args of the config's adapter: "
                           + ", ".join(f"{k}={v!r}" for k, v in args.items())
                           + "; give them on the command line (--model.init_args.adapter.init_args.<name>) to change "
                             "them")

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


def carried_adapter_args(argv: Sequence[str], config) -> tuple[str, str, dict] | None:
    """``(config's adapter class, chosen class, carried init_args)`` when a command-line ``--model.init_args.adapter``
    switches the class that the ``--config`` files set and some of their adapter arguments are kept; else ``None``."""
    import yaml

    yaml_adapter, cli_class, cli_keys = None, None, set()
    args = list(argv)
    for i, arg in enumerate(args):
        key, _, value = arg.partition("=")
        if not _ and i + 1 < len(args):
            value = args[i + 1]
        if key in ("--config", "-c") and os.path.isfile(value):
            with open(value, encoding="utf-8") as f:
                loaded = yaml.safe_load(f) or {}
            adapter = (((loaded.get("model") or {}).get("init_args") or {}).get("adapter")
                       if isinstance(loaded, dict) else None)
            if isinstance(adapter, dict) and adapter.get("class_path"):
                yaml_adapter = adapter
        elif key in ("--model.init_args.adapter", "--model.init_args.adapter.class_path"):
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError:
                parsed = value
            cli_class = parsed.get("class_path") if isinstance(parsed, dict) else parsed
            if isinstance(parsed, dict):
                cli_keys |= set((parsed.get("init_args") or {}))
        elif key.startswith("--model.init_args.adapter.init_args."):
            cli_keys.add(key.rsplit(".", 1)[1])
    if yaml_adapter is None or not isinstance(cli_class, str):
        return None
    old, new = yaml_adapter["class_path"], full_class_path(cli_class)
    if old.rsplit(".", 1)[-1] == new.rsplit(".", 1)[-1]:
        return None
    final = _model_init_args(config).get("adapter") or {}
    final_args = final.get("init_args") or {} if isinstance(final, dict) else {}
    defaults = {}
    try:  # a carried value equal to the new class's default changes nothing: not worth a warning
        import importlib
        import inspect

        module_name, _, class_name = new.rpartition(".")
        cls = getattr(importlib.import_module(module_name), class_name)
        defaults = {name: p.default for name, p in inspect.signature(cls).parameters.items()
                    if p.default is not inspect.Parameter.empty}
    except (ImportError, AttributeError, ValueError, TypeError):
        pass
    carried = {k: v for k, v in (yaml_adapter.get("init_args") or {}).items()
               if k in final_args and k not in cli_keys and final_args[k] == v
               and not (k in defaults and _same(defaults[k], v))}
    return (old.rsplit(".", 1)[-1], new.rsplit(".", 1)[-1], carried) if carried else None


#: The placeholder of a config's run folders that becomes the adapter's tag (``AdapterStrategy.tag``)
ADAPTER_PLACEHOLDER = "{adapter}"


def adapter_tag(adapter) -> str:
    """The tag of the configured adapter (``{class_path, init_args}``, parsed or plain; ``None``: the head alone):
    ``lora_r8``, ``boft_m2b8``, ``svft_banded_d2``, ``head_only``. Arguments the adapter would refuse give the
    lower-cased class name here (the refusal comes when the model is built, with its message)."""
    if adapter is None:
        return "head_only"
    if hasattr(adapter, "as_dict"):
        adapter = adapter.as_dict()
    class_path = adapter.get("class_path") if isinstance(adapter, dict) else None
    if not isinstance(class_path, str):
        return "adapter"
    import importlib

    module_name, _, class_name = full_class_path(class_path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
        return str(cls(**dict(adapter.get("init_args") or {})).tag)
    except Exception:  # noqa: BLE001 - any refusal is reported when the model is built
        return class_name.lower()


def fill_adapter_placeholder(value, tag: str):
    """``value`` (a parsed config subtree: namespaces, lists, dicts, strings) with every ``{adapter}`` in its
    strings replaced by ``tag``, in place where it can be; other braces (``{epoch}`` of a checkpoint file name)
    are left alone."""
    if isinstance(value, str):
        return value.replace(ADAPTER_PLACEHOLDER, tag)
    if isinstance(value, list):
        value[:] = [fill_adapter_placeholder(v, tag) for v in value]
        return value
    if isinstance(value, dict):
        for k in list(value):
            value[k] = fill_adapter_placeholder(value[k], tag)
        return value
    if hasattr(value, "__dict__") and type(value).__name__ == "Namespace":
        for k, v in list(vars(value).items()):
            setattr(value, k, fill_adapter_placeholder(v, tag))
    return value


def hide_rich_progress_bar(trainer) -> None:
    """``enable_progress_bar: false`` with a ``lit_peft.callbacks.RichProgress`` in the callbacks (every shipped
    config has one): Lightning refuses any progress-bar callback then, so the bar is hidden instead (its
    ``refresh_rate: 0``) and the trainer keeps the callback, whose per-epoch metric lines still print
    (``epoch_lines: false`` hides them too)."""
    if trainer.get("enable_progress_bar") is not False:
        return
    found = False
    for callback in trainer.get("callbacks") or []:
        class_path = callback.get("class_path") if hasattr(callback, "get") else None
        if isinstance(class_path, str) and full_class_path(class_path) in (
                "lit_peft.callbacks.RichProgress", "lit_peft.callbacks.progress.RichProgress"):
            callback.init_args.refresh_rate = 0
            found = True
    if found:
        trainer.enable_progress_bar = True


def _same(a, b) -> bool:
    return (list(a) if isinstance(a, tuple) else a) == (list(b) if isinstance(b, tuple) else b)


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
    LitPeftCLI._argv = None if args is None else list(cli_args)
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
    if sys.argv[1:2] == ["export-lora"]:  # any trained adapter as a peft LoRA (lit_peft.export)
        from .export import main as export_main

        raise SystemExit(export_main(sys.argv[2:]))
    from torch.distributed.elastic.multiprocessing.errors import record

    record(main)()
