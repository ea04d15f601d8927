"""lit_peft.handover: model and data tell each other what they offer through declared records, by the CLI right
after it builds them and by each side's setup under a Trainer; nothing reads the other side's attributes."""

from __future__ import annotations

import pytest
import torch

from helpers.models import tiny_vit
from lit_peft.data import DigitsDataModule
from lit_peft.handover import DataInfo, DataSide, ModelInfo, ModelSide, connect


def test_both_sides_declare_the_protocols():
    assert isinstance(tiny_vit(), ModelSide)
    assert isinstance(DigitsDataModule(classes=[0, 1, 2], img_size=32), DataSide)
    assert not isinstance(torch.nn.Linear(1, 1), (ModelSide, DataSide))


def test_vision_records_and_a_class_count_that_disagrees():
    model = tiny_vit(3)
    info = model.model_info()
    assert info.tokenizer is None and tuple(info.data_config["input_size"]) == (3, 32, 32)
    data = DigitsDataModule(classes=[0, 1, 2], img_size=32)
    assert data.data_info().num_classes == 3
    connect(model, data)  # agrees: nothing to say
    with pytest.raises(ValueError, match=r"model.num_classes=3 but the data \(DigitsDataModule\) has 5 classes; "
                                         r"set model.init_args.num_classes: 5"):
        connect(model, DigitsDataModule(classes=[0, 1, 2, 3, 4], img_size=32))


def test_a_side_that_does_not_take_part_is_left_alone():
    class OwnData:
        num_classes = 99  # an attribute nobody may probe

    connect(tiny_vit(3), OwnData())
    connect(object(), DigitsDataModule(classes=[0, 1, 2], img_size=32))


def test_records_are_frozen():
    with pytest.raises(AttributeError):
        DataInfo(name="X").num_classes = 3  # type: ignore[misc]
    with pytest.raises(AttributeError):
        ModelInfo().tokenizer = "x"  # type: ignore[misc]
