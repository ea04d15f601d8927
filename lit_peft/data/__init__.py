"""Data modules of lit_peft.

Vision (:mod:`lit_peft.data.vision`): VTAB-1k (:class:`VTABDataModule`, prepared list-file layout or torchvision),
SVFT few-shot (:class:`FewShotDataModule`) and the scikit-learn digits demo (:class:`DigitsDataModule`). Every
module yields ``(images, labels)`` batches and exposes ``num_classes``.
"""

from lit_peft.data.vision import (
    FEWSHOT_DATASETS,
    VTAB_LIST_FILES,
    VTAB_TASKS,
    VTAB_TORCHVISION_TASKS,
    DigitsDataModule,
    FewShotDataModule,
    HFImageDataset,
    ImageListDataset,
    VTABDataModule,
    eval_transform,
    resolve_normalization,
    sample_per_class,
)
from lit_peft.data.text import (
    ALPACA_PROMPT_NO_INPUT,
    ALPACA_PROMPT_WITH_INPUT,
    EVAL_TASKS,
    GLUE_TASKS,
    IGNORE_INDEX,
    GLUEDataModule,
    GLUETask,
    InstructionCollator,
    InstructionDataModule,
    InstructionDataset,
    PromptCollator,
    PromptDataset,
    format_prompt,
    load_split,
)

__all__ = [
    "FEWSHOT_DATASETS",
    "VTAB_LIST_FILES",
    "VTAB_TASKS",
    "VTAB_TORCHVISION_TASKS",
    "DigitsDataModule",
    "FewShotDataModule",
    "HFImageDataset",
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
