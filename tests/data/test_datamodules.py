"""What every image data module shares (:mod:`lit_peft.data.base`, :mod:`lit_peft.data.transforms`): the data record
without setup, the hand-over with the model (normalisation from its data config), setup under a Trainer without a
model, and signatures that are config schemas."""

from __future__ import annotations

import pytest

from helpers.data import HALF, vtab_dm
from lit_peft.data import DigitsDataModule, FewShotDataModule, VTABDataModule, resolve_normalization
from lit_peft.handover import DataInfo, DataSide, ModelInfo, connect


def test_resolve_normalization_function():
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    assert resolve_normalization(None, None) == (tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD))
    assert resolve_normalization(None, None, {"mean": HALF}) == (HALF, tuple(IMAGENET_DEFAULT_STD))
    assert resolve_normalization(HALF, None, {"mean": (0.0,) * 3, "std": HALF}) == (HALF, HALF)
    with pytest.raises(TypeError, match="data_config must be a mapping"):
        resolve_normalization(None, None, object())  # e.g. a trainer, as the old signature took


def test_image_data_info_without_setup(tmp_path):
    for dm, expected in [
        (VTABDataModule(task="dtd", data_root=str(tmp_path)), DataInfo("VTABDataModule", task="dtd", num_classes=47)),
        (FewShotDataModule(dataset="food101", data_root=str(tmp_path)),
         DataInfo("FewShotDataModule", task="food101", num_classes=101)),
        (DigitsDataModule(classes=[3, 1]), DataInfo("DigitsDataModule", task="digits", num_classes=2)),
    ]:
        assert isinstance(dm, DataSide)
        assert dm.data_info() == expected and dm.connected_model is None
        assert dm.task == expected.task and dm.num_classes == expected.num_classes


class FakeModel:
    """The model side of the hand-over (what ``AdaptedModule`` offers), without a network."""

    def __init__(self, info: ModelInfo) -> None:
        self.info = info
        self.data: DataInfo | None = None

    def model_info(self) -> ModelInfo:
        return self.info

    def connect_data(self, info: DataInfo) -> None:
        self.data = info


def test_connect_hands_both_records_over(vtab_root):
    dm = vtab_dm(vtab_root, mean=None, std=None)
    model = FakeModel(ModelInfo(data_config={"mean": HALF, "std": HALF}))
    connect(model, dm)
    assert model.data == DataInfo("VTABDataModule", task="dmlab", num_classes=6)
    assert dm.resolve_normalization() == (HALF, HALF)
    connect(model, dm)  # idempotent
    assert dm.connected_model == model.info


def test_setup_with_a_trainer_without_model(vtab_root):
    import lightning as L

    dm = vtab_dm(vtab_root, mean=None, std=None)
    dm.trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False)
    dm.setup("validate")  # no model attached to the trainer yet: nothing to connect, no error
    assert dm.connected_model is None and len(dm.val_set) == 3


# ------------------------------------------------------------------------------------------------------------------
# config schema
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cls, args",
    [
        (VTABDataModule, ["--data.task=dtd", "--data.data_root=/d", "--data.mean=[0.5,0.5,0.5]"]),
        (FewShotDataModule, ["--data.dataset=flowers102", "--data.data_root=/d", "--data.shots=5"]),
        (DigitsDataModule, ["--data.classes=[0,1,2]"]),
    ],
)
def test_signatures_are_config_schemas(cls, args):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "data")
    cfg = parser.parse_args(args)
    init = parser.instantiate_classes(cfg)
    assert isinstance(init.data, cls)
    assert init.data.hparams  # save_hyperparameters records the config in checkpoints
