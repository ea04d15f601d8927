"""Data modules of lit_peft.

Vision: VTAB-1k (:class:`VTABDataModule`, prepared list-file layout or torchvision), SVFT few-shot
(:class:`FewShotDataModule`), your own images in torchvision's ImageFolder layout (:class:`ImageFolderDataModule`)
and the scikit-learn digits demo (:class:`DigitsDataModule`). Every module yields
``(images, labels)`` batches and exposes ``num_classes``.

Text, for the LLM and GLUE experiments: instruction tuning (MetaMathQA-40K, Commonsense-15K) with generation-based
evaluation (GSM-8K, MATH, the eight commonsense tasks) (:class:`InstructionDataModule`), and GLUE with
DeBERTaV3-base (:class:`GLUEDataModule`).

The papers' protocols and published numbers are in ``docs/protocols.md``.

Layout: :mod:`~lit_peft.data.tasks` (task tables, prompt templates), :mod:`~lit_peft.data.sources` (where data come
from, file formats), :mod:`~lit_peft.data.transforms`, :mod:`~lit_peft.data.datasets`,
:mod:`~lit_peft.data.collators`, :mod:`~lit_peft.data.base` (the shared base classes and the model↔data hand-over,
:mod:`lit_peft.handover`), :mod:`~lit_peft.data.sampling` (resumable shuffling), and one module per data module.
"""

from lit_peft.data.collators import InstructionCollator, PromptCollator
from lit_peft.data.datasets import (
    IGNORE_INDEX,
    HFImageDataset,
    ImageListDataset,
    InstructionDataset,
    PromptDataset,
    sample_per_class,
)
from lit_peft.data.digits import DigitsDataModule
from lit_peft.data.fewshot import FewShotDataModule
from lit_peft.data.glue import GLUEDataModule
from lit_peft.data.imagefolder import ImageFolderDataModule
from lit_peft.data.instruction import InstructionDataModule
from lit_peft.data.sources import load_split
from lit_peft.data.tasks import (
    ALPACA_PROMPT_NO_INPUT,
    ALPACA_PROMPT_WITH_INPUT,
    EVAL_TASKS,
    FEWSHOT_DATASETS,
    GLUE_TASKS,
    VTAB_LIST_FILES,
    VTAB_TASKS,
    VTAB_TORCHVISION_TASKS,
    GLUETask,
    format_prompt,
)
from lit_peft.data.transforms import eval_transform, resolve_normalization
from lit_peft.data.vtab import VTABDataModule

__all__ = [
    "FEWSHOT_DATASETS",
    "VTAB_LIST_FILES",
    "VTAB_TASKS",
    "VTAB_TORCHVISION_TASKS",
    "DigitsDataModule",
    "FewShotDataModule",
    "HFImageDataset",
    "ImageFolderDataModule",
    "ImageListDataset",
    "VTABDataModule",
    "eval_transform",
    "resolve_normalization",
    "sample_per_class",
    "ALPACA_PROMPT_NO_INPUT",
    "ALPACA_PROMPT_WITH_INPUT",
    "EVAL_TASKS",
    "GLUE_TASKS",
    "IGNORE_INDEX",
    "GLUEDataModule",
    "GLUETask",
    "InstructionCollator",
    "InstructionDataModule",
    "InstructionDataset",
    "PromptCollator",
    "PromptDataset",
    "format_prompt",
    "load_split",
]
