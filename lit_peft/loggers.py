"""``CSVTensorBoardLogger``: the shipped configs' logger. One run folder, read by both kinds of tools.

Lightning's :class:`~lightning.pytorch.loggers.CSVLogger` (``metrics.csv`` and ``hparams.yaml``, which
``python -m lit_peft plot`` and the result scripts read) that also writes TensorBoard event files into the same
``<save_dir>/<name>/<version>`` folder through Lightning's own
:class:`~lightning.pytorch.loggers.TensorBoardLogger`, so ``tensorboard --logdir runs/`` shows every run.

Why one logger and not a list of two: two loggers pick their ``version_N`` folders independently (the second one
sees the folder the first has just created and takes the next number), and a command-line override such as
``--trainer.logger.init_args.save_dir`` changes only the last logger of a list. This class keeps the single-logger
interface (``trainer.logger.init_args.*``) and one folder per run.
"""

from __future__ import annotations

from argparse import Namespace
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only


class CSVTensorBoardLogger(CSVLogger):
    """:class:`~lightning.pytorch.loggers.CSVLogger` plus TensorBoard event files in the same run folder.

    Args:
        save_dir: root of the runs.
        name: sub-folder of ``save_dir`` (``""``: none).
        version: folder of this run under ``save_dir/name``; ``None``: the next free ``version_N``.
        prefix: string put at the beginning of every metric name.
        flush_logs_every_n_steps: how often ``metrics.csv`` is written.
        tensorboard: also write TensorBoard event files (``false``: a plain CSVLogger).
    """

    def __init__(self, save_dir: str | Path, name: str | None = "lightning_logs", version: int | str | None = None,
                 prefix: str = "", flush_logs_every_n_steps: int = 100, tensorboard: bool = True) -> None:
        super().__init__(save_dir, name=name, version=version, prefix=prefix,
                         flush_logs_every_n_steps=flush_logs_every_n_steps)
        self.tensorboard = bool(tensorboard)
        self._tb_prefix = prefix
        self._tb: TensorBoardLogger | None = None

    @property
    def tensorboard_logger(self) -> TensorBoardLogger | None:
        """The TensorBoard side, writing into this logger's :attr:`log_dir` (created on first use)."""
        if not self.tensorboard:
            return None
        if self._tb is None:
            version = self.version  # decided once, by the CSV side: both write into the same folder
            self._tb = TensorBoardLogger(self.save_dir, name=self.name or "", version=version,
                                         prefix=self._tb_prefix, default_hp_metric=False)
        return self._tb

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        super().log_metrics(metrics, step)
        if self.tensorboard_logger is not None:
            self.tensorboard_logger.log_metrics(metrics, step)

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace | None = None, *args: Any, **kwargs: Any) -> None:
        super().log_hyperparams(params, *args, **kwargs)
        if self.tensorboard_logger is not None and params is not None:
            self.tensorboard_logger.log_hyperparams(params)

    @rank_zero_only
    def save(self) -> None:
        super().save()
        if self._tb is not None:
            self._tb.save()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        if self._tb is not None:
            self._tb.finalize(status)
