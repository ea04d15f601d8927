"""The task tables and prompt templates (:mod:`lit_peft.data.tasks`)."""

from __future__ import annotations

import pytest

from lit_peft.data import FEWSHOT_DATASETS, VTAB_TASKS, format_prompt


def test_vtab_task_table():
    assert list(VTAB_TASKS) == [
        "cifar100", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397",
        "patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy",
        "clevr_count", "clevr_dist", "dmlab", "kitti_dist", "dsprites_loc", "dsprites_ori", "smallnorb_azi",
        "smallnorb_ele",
    ]
    assert list(VTAB_TASKS.values()) == [100, 102, 47, 102, 37, 10, 397, 2, 10, 45, 5, 8, 6, 6, 4, 16, 16, 18, 9]
    assert FEWSHOT_DATASETS == {"cifar100": 100, "food101": 101, "flowers102": 102, "resisc45": 45}


def test_templates():
    assert format_prompt("metamath", "Q?") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nQ?\n\n### Response:\n")
    assert format_prompt("alpaca", "Q?") == format_prompt("metamath", "Q?")
    assert format_prompt("alpaca", "Q?", "") == format_prompt("metamath", "Q?")
    assert format_prompt("alpaca", "Q?", "ctx") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nQ?\n\n### Input:\nctx"
        "\n\n### Response:\n")
    assert format_prompt("metamath", "Q?", "ctx") == format_prompt("metamath", "Q?\n\nctx")
    with pytest.raises(ValueError, match="unknown template 'alpacca' \\(did you mean 'alpaca'\\?\\)"):
        format_prompt("alpacca", "Q?")
