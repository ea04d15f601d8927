"""The task tables of the experiments: VTAB-1k and the few-shot datasets (vision), GLUE and the generation-eval tasks
(text), and the instruction-tuning prompt templates. The papers' protocols and published numbers are in
``docs/protocols.md``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from .base import _unknown

# --------------------------------------------------------------------------------------------------------------
# Vision: VTAB-1k and few-shot
# --------------------------------------------------------------------------------------------------------------

#: The 19 VTAB-1k tasks in the order of the papers' tables (natural | specialized | structured) → #classes.
VTAB_TASKS: OrderedDict[str, int] = OrderedDict(
    [
        # natural
        ("cifar100", 100),
        ("caltech101", 102),  # 101 object categories + the background class, as in tfds / VTAB
        ("dtd", 47),
        ("oxford_flowers102", 102),
        ("oxford_iiit_pet", 37),
        ("svhn", 10),
        ("sun397", 397),
        # specialized
        ("patch_camelyon", 2),
        ("eurosat", 10),
        ("resisc45", 45),
        ("diabetic_retinopathy", 5),
        # structured
        ("clevr_count", 8),
        ("clevr_dist", 6),
        ("dmlab", 6),
        ("kitti_dist", 4),
        ("dsprites_loc", 16),
        ("dsprites_ori", 16),
        ("smallnorb_azi", 18),
        ("smallnorb_ele", 9),
    ]
)

#: Further tasks in the same list-file layout → #classes: the image assets ``lit_peft.assets`` prepares from real data
#: that installs offline (``mnist-5k``, ``fashion-mnist``). Kept apart from :data:`VTAB_TASKS`, so VTAB sweeps and
#: tables stay the 19 tasks.
LIST_LAYOUT_TASKS: OrderedDict[str, int] = OrderedDict([("mnist", 10), ("fashion_mnist", 10)])

#: The list files of one task folder in the prepared VTAB-1k layout.
VTAB_LIST_FILES: tuple[str, ...] = ("train800.txt", "val200.txt", "train800val200.txt", "test.txt")

#: Folder names used by the common prepared VTAB-1k release (NOAH / ``vtab-1k.zip``) where they differ from ours.
VTAB_FOLDER_ALIASES: dict[str, tuple[str, ...]] = {"cifar100": ("cifar",), "kitti_dist": ("kitti",)}

#: Few-shot datasets of the SVFT paper → #classes.
FEWSHOT_DATASETS: dict[str, int] = {"cifar100": 100, "food101": 101, "flowers102": 102, "resisc45": 45}

#: Hugging Face hub id used for RESISC45 (columns ``image``, ``label``; splits ``train``/``validation``/``test``).
RESISC45_HUB_ID = "timm/resisc45"


@dataclass(frozen=True)
class _TVSource:
    """How to get one VTAB task from torchvision."""

    cls_name: str
    train_kwargs: dict[str, Any]
    #: kwargs of the official test split; ``None``: torchvision has no split, hold out ``holdout`` of the data.
    test_kwargs: dict[str, Any] | None
    holdout: float = 0.0
    label_offset: int = 0  # subtracted from torchvision's label


#: VTAB tasks that ``source: torchvision`` can build (test split: official where torchvision has one).
VTAB_TORCHVISION_TASKS: dict[str, _TVSource] = {
    "cifar100": _TVSource("CIFAR100", {"train": True}, {"train": False}),
    "dtd": _TVSource("DTD", {"split": "train", "partition": 1}, {"split": "test", "partition": 1}),
    "oxford_flowers102": _TVSource("Flowers102", {"split": "train"}, {"split": "test"}),
    "oxford_iiit_pet": _TVSource("OxfordIIITPet", {"split": "trainval"}, {"split": "test"}),
    "svhn": _TVSource("SVHN", {"split": "train"}, {"split": "test"}),
    "patch_camelyon": _TVSource("PCAM", {"split": "train"}, {"split": "test"}),
    # CLEVR's test split is unlabelled; VTAB tests on CLEVR val. Label = #objects - 3 (3..10 → 0..7).
    "clevr_count": _TVSource("CLEVRClassification", {"split": "train"}, {"split": "val"}, label_offset=3),
    # No official split in torchvision: a fixed 20% hold-out (VTAB: EuroSAT train[80%:], SUN397 ~20% test).
    "eurosat": _TVSource("EuroSAT", {}, None, holdout=0.2),
    "sun397": _TVSource("SUN397", {}, None, holdout=0.2),
}

#: Why the other VTAB tasks cannot come from torchvision.
_TV_UNSUPPORTED_REASON: dict[str, str] = {
    "caltech101": "torchvision's Caltech101 drops the background class (101 classes, VTAB has 102) and has no "
    "train/test split",
}

#: Seed of the fixed test hold-out for torchvision datasets without a test split (independent of ``seed`` so
#: every run is scored on the same images).
_HOLDOUT_SEED = 0

# --------------------------------------------------------------------------------------------------------------
# Text: GLUE and the generation-eval tasks
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GLUETask:
    """One GLUE task: its text fields, number of labels (1 = regression), metric and the papers' max length."""

    text_fields: tuple[str, ...]
    num_labels: int
    metric: str
    max_length: int


#: The eight GLUE tasks of the papers' tables; ``max_length`` as in both papers (DeBERTaV3-base).
GLUE_TASKS: dict[str, GLUETask] = {
    "cola": GLUETask(("sentence",), 2, "matthews", 64),
    "sst2": GLUETask(("sentence",), 2, "accuracy", 128),
    "mrpc": GLUETask(("sentence1", "sentence2"), 2, "accuracy", 320),
    "qqp": GLUETask(("question1", "question2"), 2, "accuracy", 320),
    "stsb": GLUETask(("sentence1", "sentence2"), 1, "pearson", 128),
    "mnli": GLUETask(("premise", "hypothesis"), 3, "accuracy", 256),
    "qnli": GLUETask(("question", "sentence"), 2, "accuracy", 512),
    "rte": GLUETask(("sentence1", "sentence2"), 2, "accuracy", 320),
}

#: Further sequence-classification tasks that ``GLUEDataModule`` reads from a local folder in the same layout: the
#: text assets ``lit_peft.assets`` prepares from real data that installs offline (``bbc-news``; ``rt-sentiment``
#: reads as ``sst2``). Kept apart from :data:`GLUE_TASKS`, so GLUE tables stay the eight tasks.
TEXT_CLASSIFICATION_TASKS: dict[str, GLUETask] = {
    "bbc_news": GLUETask(("text",), 5, "accuracy", 512),
}

#: Generation-eval tasks → how the gold answer in ``eval_answer_field`` is written (for the LightningModule that
#: scores the generations; the data modules pass the gold answers through raw).
EVAL_TASKS: dict[str, str] = {
    "gsm8k": "GSM-8K (openai/gsm8k, config main; question/answer): the gold number follows '####' in the answer; "
             "a generation is scored by its last number",
    "math": "MATH (problem/solution): the gold answer is the last \\boxed{...} of the solution",
    **{t: f"{t} (LLM-Adapters dataset/{t}/test.json; instruction/answer): the gold answer is a word or option "
          "label, compared with the first such word of the generation"
       for t in ("boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Challenge", "ARC-Easy",
                 "openbookqa")},
    "sentiment": "Rotten Tomatoes sentence sentiment (lit_peft.assets rt-sentiment; instruction/answer): the gold "
                 "answer is 'positive' or 'negative', compared with the first such word of the generation",
}

# --------------------------------------------------------------------------------------------------------------
# Text: prompt templates
# --------------------------------------------------------------------------------------------------------------

#: The Alpaca prompt without an input; MetaMath trains (``train_math.py``) with exactly this text.
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{query}\n\n### Response:\n"
)

#: The Alpaca prompt with an input (LLM-Adapters / Commonsense-15K when an example's ``input`` is non-empty).
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{query}\n\n### Input:\n{input}\n\n### Response:\n"
)

TEMPLATES = ("metamath", "alpaca")


def format_prompt(template: str, query: str, input: str | None = None) -> str:  # noqa: A002 - Alpaca's name
    """The prompt of one example.

    ``metamath``: :data:`ALPACA_PROMPT_NO_INPUT`; a non-empty ``input`` is appended to the query after a blank
    line. ``alpaca``: :data:`ALPACA_PROMPT_WITH_INPUT` when ``input`` is non-empty, else
    :data:`ALPACA_PROMPT_NO_INPUT` (Stanford Alpaca's and LLM-Adapters' ``generate_prompt``).
    """
    has_input = input is not None and str(input).strip() != ""
    if template == "metamath":
        return ALPACA_PROMPT_NO_INPUT.format(query=f"{query}\n\n{input}" if has_input else query)
    if template == "alpaca":
        if has_input:
            return ALPACA_PROMPT_WITH_INPUT.format(query=query, input=input)
        return ALPACA_PROMPT_NO_INPUT.format(query=query)
    raise _unknown("template", template, TEMPLATES)
