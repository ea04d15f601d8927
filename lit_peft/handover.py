"""The model↔data hand-over: what a lit_peft LightningModule and a lit_peft DataModule tell each other.

Each side declares what it offers in a small frozen record and receives the other side's record through one method;
nothing reads the other side's attributes.

- the model offers :class:`ModelInfo` (``AdaptedModule.model_info()``): the tokenizer it was trained with, timm's
  resolved data config of its backbone (mean, std, input size);
- the data offers :class:`DataInfo` (``DataModule.data_info()``): its task, its number of classes or labels, the
  metric its task is scored with, the answer-extraction task of its generation eval.

:func:`connect` hands both records over. The CLI calls it as soon as it has built the model and the data (so a
GLUE config switches tasks with ``data.init_args.task`` alone); each side's ``setup`` calls it again when a
``Trainer`` brought them together from Python (``trainer.fit(model, datamodule=data)``). It is idempotent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class ModelInfo:
    """What a model tells its data.

    Attributes:
        tokenizer: hub id or folder of the model's tokenizer (text data with ``tokenizer: null`` loads this one).
        data_config: timm's resolved data config of the backbone (``mean``, ``std``, ``input_size``); image data
            with ``mean``/``std`` null normalise with it.
    """

    tokenizer: str | None = None
    data_config: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class DataInfo:
    """What a data module tells its model.

    Attributes:
        name: the data module's class name (for error messages).
        task: the task's name (``dtd``, ``sst2``, …), for error messages.
        num_classes: classes of a classification task (GLUE: labels; ``1`` = a regression), ``None`` if the data
            does not say.
        metric: the metric the task is scored with (GLUE: ``accuracy``, ``matthews`` or ``pearson``).
        eval_task: the answer-extraction task of a generation eval (``gsm8k``, ``boolq``, …).
    """

    name: str
    task: str | None = None
    num_classes: int | None = None
    metric: str | None = None
    eval_task: str | None = None


@runtime_checkable
class ModelSide(Protocol):
    """A LightningModule that takes part in the hand-over (every :class:`~lit_peft.modules.AdaptedModule`)."""

    def model_info(self) -> ModelInfo: ...

    def connect_data(self, info: DataInfo) -> None: ...


@runtime_checkable
class DataSide(Protocol):
    """A LightningDataModule that takes part in the hand-over (every lit_peft data module)."""

    def data_info(self) -> DataInfo: ...

    def connect_model(self, info: ModelInfo) -> None: ...


def connect(model: Any, data: Any) -> None:
    """Hand each side the other's record; a side that does not take part (a user's own module) is left alone, and
    gives nothing. Errors (a class count that disagrees) come from the receiving side and name both."""
    if isinstance(data, DataSide) and isinstance(model, ModelSide):
        data.connect_model(model.model_info())
        model.connect_data(data.data_info())


def connect_from_trainer(trainer: Any) -> None:
    """:func:`connect` the model and data a ``Trainer`` holds (what each side's ``setup`` calls); nothing without a
    trainer, or while it holds no model or data yet."""
    if trainer is None:
        return
    connect(trainer.lightning_module, trainer.datamodule)
