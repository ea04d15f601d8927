"""``VTABDataModule`` (:mod:`lit_peft.data.vtab`) on generated VTAB-1k folders (solid-colour images, the
``vtab_root`` fixture) and on a stand-in torchvision dataset."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from helpers.data import HALF, make_color_vtab_task, vtab_dm
from lit_peft.data import VTABDataModule
from lit_peft.handover import DataInfo, ModelInfo


# ------------------------------------------------------------------------------------------------------------------
# VTABDataModule (folder layout)
# ------------------------------------------------------------------------------------------------------------------
def test_vtab_datamodule_fit_and_test(vtab_root):
    dm = vtab_dm(vtab_root)
    assert dm.num_classes == 6
    dm.setup("fit")
    assert len(dm.train_set) == 6 and len(dm.val_set) == 3 and dm.test_set is None
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (3, 3, 16, 16) and x.dtype == torch.float32
    assert y.tolist() == [0, 1, 2] and y.dtype == torch.int64
    # solid colours normalised with mean = std = 0.5: 255 -> 1, 0 -> -1
    assert torch.allclose(x[0, 0], torch.ones(16, 16), atol=1e-2)
    assert torch.allclose(x[0, 1], -torch.ones(16, 16), atol=1e-2)
    assert torch.allclose(x[2, 2], torch.ones(16, 16), atol=1e-2)
    batches = list(dm.train_dataloader())  # batch 4, last_batch: pad (the default): 6 images fill 2 full batches
    assert [len(b[1]) for b in batches] == [4, 4] and batches[0][0].shape[1:] == (3, 16, 16)
    dm_partial = vtab_dm(vtab_root, last_batch="partial")
    dm_partial.setup("fit")
    assert [len(b[1]) for b in dm_partial.train_dataloader()] == [4, 2]
    dm_drop = vtab_dm(vtab_root, last_batch="drop")
    dm_drop.setup("fit")
    assert [len(b[1]) for b in dm_drop.train_dataloader()] == [4]
    with pytest.raises(ValueError, match=r"unknown last_batch 'short'.*valid: pad, drop, partial"):
        vtab_dm(vtab_root, last_batch="short")
    dm.setup("test")
    assert len(dm.test_set) == 6
    assert sum(len(b[1]) for b in dm.test_dataloader()) == 6
    assert len(dm.predict_dataloader().dataset) == 6


def test_vtab_final_switch(vtab_root):
    dm = vtab_dm(vtab_root, final=True)
    dm.setup("fit")
    assert len(dm.train_set) == 9  # train800val200
    assert dm.val_set.list_file.name == "test.txt" and len(dm.val_set) == 6
    dm0 = vtab_dm(vtab_root, final=False)
    dm0.setup("validate")
    assert dm0.train_set is None and dm0.val_set.list_file.name == "val200.txt"


def test_vtab_train_loader_seeded_shuffle(vtab_root):
    def order(seed):
        dm = vtab_dm(vtab_root, seed=seed)
        dm.setup("fit")
        loader = dm.train_dataloader()
        return list(loader.sampler), list(loader.sampler)  # two epochs

    a = order(3)
    assert a == order(3)
    assert sorted(set(a[0])) == list(range(6)) and len(a[0]) == 8  # padded to 2 batches of 4 with its first two
    assert a[0][6:] == a[0][:2]
    assert order(4) != a
    dm = vtab_dm(vtab_root)
    dm.setup("fit")
    assert list(dm.val_dataloader().sampler) == list(range(3))  # val not shuffled


def test_vtab_folder_alias(tmp_path):
    make_color_vtab_task(tmp_path, task="cifar")  # the common release names the folder 'cifar'
    dm = vtab_dm(tmp_path, task="cifar100")
    assert dm.task_dir() == tmp_path / "cifar" and dm.num_classes == 100
    dm.setup("fit")
    assert len(dm.train_set) == 6


def test_vtab_normalisation_defaults_and_module_data_config(vtab_root):
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    dm = vtab_dm(vtab_root, mean=None, std=None)
    assert dm.resolve_normalization() == (tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD))
    dm.connect_model(ModelInfo())  # a model that gives no data config: still ImageNet's
    assert dm.resolve_normalization() == (tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD))
    info = ModelInfo(data_config={"mean": HALF, "std": (0.25,) * 3})
    dm.connect_model(info)
    assert dm.connected_model is info
    assert dm.resolve_normalization() == (HALF, (0.25, 0.25, 0.25))
    dm.setup("validate")
    x, _ = next(iter(dm.val_dataloader()))
    assert torch.allclose(x[0, 0], torch.full((16, 16), 2.0), atol=2e-2)  # (1 - 0.5) / 0.25
    # an explicit value wins over the model's
    dm2 = vtab_dm(vtab_root, mean=(0.0, 0.0, 0.0), std=None)
    dm2.connect_model(info)
    assert dm2.resolve_normalization() == ((0.0, 0.0, 0.0), (0.25, 0.25, 0.25))
    with pytest.raises(TypeError, match="takes a lit_peft.handover.ModelInfo"):
        dm2.connect_model({"mean": HALF})


def test_vtab_with_lightning_trainer(vtab_root):
    """Through a real Trainer: setup by the trainer, mean/std from the data config the module hands over."""
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(3 * 16 * 16, 6)
            self.seen = []
            self.data_info: DataInfo | None = None

        def model_info(self) -> ModelInfo:
            return ModelInfo(data_config={"mean": HALF, "std": HALF, "input_size": (3, 16, 16)})

        def connect_data(self, info: DataInfo) -> None:
            self.data_info = info

        def training_step(self, batch, _):
            x, y = batch
            self.seen.append(float(x.max()))
            return torch.nn.functional.cross_entropy(self.head(x.flatten(1)), y)

        def validation_step(self, batch, _):
            x, y = batch
            self.log("val_loss", torch.nn.functional.cross_entropy(self.head(x.flatten(1)), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = Tiny()
    dm = vtab_dm(vtab_root, mean=None, std=None)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert dm.resolve_normalization() == (HALF, HALF)
    assert model.data_info == dm.data_info()
    assert max(model.seen) == pytest.approx(1.0, abs=1e-2)  # 0.5-normalised: ImageNet stats would give > 2


def test_vtab_errors(tmp_path, vtab_root):
    with pytest.raises(ValueError, match=r"unknown VTAB task 'cifar10' \(did you mean 'cifar100'\?\).*smallnorb_ele"):
        VTABDataModule(task="cifar10", data_root=str(tmp_path))
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        VTABDataModule(task="dtd", data_root=str(tmp_path), batch_size=0)
    with pytest.raises(ValueError, match="mean must be three floats"):
        VTABDataModule(task="dtd", data_root=str(tmp_path), mean=(0.5, 0.5))
    # missing data folder: says where it looked and which files were expected
    dm = VTABDataModule(task="dtd", data_root=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=r"no folder .*missing/dtd.*does not exist.*train800\.txt, val200\.txt"):
        dm.setup("fit")
    # missing list file: names it (checked before anything is read)
    (vtab_root / "dmlab" / "val200.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks val200\.txt .*must hold train800\.txt, val200\.txt, "
                                                r"train800val200\.txt, test\.txt"):
        vtab_dm(vtab_root).setup("fit")
    vtab_dm(vtab_root, final=True).setup("fit")  # final does not need val200.txt
    with pytest.raises(RuntimeError, match="the test set is not built"):
        vtab_dm(vtab_root).test_dataloader()


def test_vtab_bad_label_via_datamodule(vtab_root):
    f = vtab_root / "dmlab" / "train800.txt"
    f.write_text(f.read_text().replace("c2_0.png 2", "c2_0.png 7"))
    with pytest.raises(ValueError, match=r"train800\.txt:5: label 7 out of range; valid labels are \[0, 6\)"):
        vtab_dm(vtab_root).setup("fit")


# ------------------------------------------------------------------------------------------------------------------
# VTABDataModule (torchvision source), with a stand-in torchvision dataset
# ------------------------------------------------------------------------------------------------------------------
class FakeCIFAR100(torch.utils.data.Dataset):
    def __init__(self, root, train=True, transform=None, target_transform=None, download=False):
        self.n = 1200 if train else 50
        self.targets = [i % 100 for i in range(self.n)]
        self.transform = transform

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        img = Image.new("RGB", (8, 8), (i % 256, 0, 0))
        return (self.transform(img) if self.transform else img), self.targets[i]


def test_vtab_torchvision_source_split(monkeypatch, tmp_path):
    import torchvision.datasets as tvd

    monkeypatch.setattr(tvd, "CIFAR100", FakeCIFAR100)
    dm = VTABDataModule(task="cifar100", data_root=str(tmp_path), source="torchvision", img_size=8, num_workers=0)
    dm.setup(None)
    tr, va = dm.split_indices["train800"], dm.split_indices["val200"]
    assert len(tr) == 800 and len(va) == 200 and not set(tr) & set(va)
    assert len(dm.train_set) == 800 and len(dm.val_set) == 200 and len(dm.test_set) == 50
    x, y = dm.val_set[0]
    assert x.shape == (3, 8, 8) and y == va[0] % 100
    dm_same = VTABDataModule(task="cifar100", data_root=str(tmp_path), source="torchvision", num_workers=0)
    dm_same.setup("fit")
    assert dm_same.split_indices == dm.split_indices
    dm_other = VTABDataModule(task="cifar100", data_root=str(tmp_path), source="torchvision", seed=7)
    dm_other.setup("fit")
    assert dm_other.split_indices["train800"] != tr
    dm_final = VTABDataModule(task="cifar100", data_root=str(tmp_path), source="torchvision", final=True)
    dm_final.setup("fit")
    assert len(dm_final.train_set) == 1000 and len(dm_final.val_set) == 50


def test_vtab_torchvision_errors(tmp_path):
    with pytest.raises(ValueError, match=r"'dmlab' cannot be built from torchvision.*use source: folder"):
        VTABDataModule(task="dmlab", data_root=str(tmp_path), source="torchvision")
    with pytest.raises(ValueError, match=r"caltech101.*drops the background class"):
        VTABDataModule(task="caltech101", data_root=str(tmp_path), source="torchvision")
    dm = VTABDataModule(task="cifar100", data_root=str(tmp_path), source="torchvision")
    with pytest.raises(FileNotFoundError, match=r"CIFAR100 .*could not be loaded .*Set download: true"):
        dm.setup("fit")


def test_vtab_empty_list_missing_and_truncated_images_fail_at_setup(tmp_path):
    """An empty training list used to train 0 steps and exit 0; a missing or truncated image used to fail only when
    its batch came up. All three now fail at setup, naming the list file (and line) or the image."""
    root = tmp_path / "vtab"
    folder = make_color_vtab_task(root)
    (folder / "train800.txt").write_text("\n")
    with pytest.raises(ValueError, match=r"train800\.txt lists no images"):
        vtab_dm(root).setup("fit")
    make_color_vtab_task(tmp_path / "again")
    folder = tmp_path / "again" / "dmlab"
    (folder / "images" / "test" / "c2_1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of the 6 images listed in .*test\.txt do not exist: .*c2_1\.png "
                                                r"\(line 6\)"):
        vtab_dm(tmp_path / "again").setup("test")
    vtab_dm(tmp_path / "again").setup("fit")   # the training split is whole
    image = folder / "images" / "train800" / "c0_1.png"
    image.write_bytes(image.read_bytes()[:40])   # truncated
    vtab_dm(tmp_path / "again").setup("fit")     # lazily decoded by default ...
    with pytest.raises(OSError, match=r"cannot read image file .*c0_1\.png \(listed at .*train800\.txt:2\)"):
        vtab_dm(tmp_path / "again", verify_images=True).setup("fit")   # ... decoded at setup on request
