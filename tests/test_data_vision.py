"""Tests of the vision data layer on data the tests generate (no downloads) and on sklearn's shipped digits."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lit_peft.data import (
    FEWSHOT_DATASETS,
    VTAB_TASKS,
    DigitsDataModule,
    FewShotDataModule,
    ImageListDataset,
    VTABDataModule,
    resolve_normalization,
    sample_per_class,
)
from lit_peft.handover import DataInfo, DataSide, ModelInfo, connect

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]  # one solid colour per class
HALF = (0.5, 0.5, 0.5)


# ------------------------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------------------------


def _write_image(path: Path, color, size=(12, 9), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, color)
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path)


def make_vtab_task(root: Path, task: str = "dmlab", counts=None) -> Path:
    """A tiny prepared VTAB-1k task folder: 3 classes, solid-colour images, the four list files."""
    counts = counts or {"train800": 2, "val200": 1, "test": 2}  # per class
    folder = root / task
    lines: dict[str, list[str]] = {}
    for split, n in counts.items():
        lines[split] = []
        for c, color in enumerate(COLORS):
            for i in range(n):
                rel = f"images/{split}/c{c}_{i}.png"
                # one grayscale and one odd-sized image to exercise the RGB conversion / resize
                mode = "L" if (split == "train800" and c == 1 and i == 0) else "RGB"
                _write_image(folder / rel, color, size=(7 + i, 11), mode=mode)
                lines[split].append(f"{rel} {c}")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, ls in lines.items():
        (folder / f"{split}.txt").write_text("\n".join(ls) + "\n")
    return folder


@pytest.fixture()
def vtab_root(tmp_path: Path) -> Path:
    make_vtab_task(tmp_path)
    return tmp_path


def vtab_dm(root: Path, **kw) -> VTABDataModule:
    args = dict(task="dmlab", data_root=str(root), img_size=16, batch_size=4, num_workers=0, mean=HALF, std=HALF)
    args.update(kw)
    return VTABDataModule(**args)


# ------------------------------------------------------------------------------------------------------------------
# task table
# ------------------------------------------------------------------------------------------------------------------


def test_vtab_task_table():
    assert list(VTAB_TASKS) == [
        "cifar100", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397",
        "patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy",
        "clevr_count", "clevr_dist", "dmlab", "kitti_dist", "dsprites_loc", "dsprites_ori", "smallnorb_azi",
        "smallnorb_ele",
    ]
    assert list(VTAB_TASKS.values()) == [100, 102, 47, 102, 37, 10, 397, 2, 10, 45, 5, 8, 6, 6, 4, 16, 16, 18, 9]
    assert FEWSHOT_DATASETS == {"cifar100": 100, "food101": 101, "flowers102": 102, "resisc45": 45}


# ------------------------------------------------------------------------------------------------------------------
# ImageListDataset
# ------------------------------------------------------------------------------------------------------------------


def test_image_list_dataset_reads_layout(vtab_root):
    folder = vtab_root / "dmlab"
    ds = ImageListDataset(folder, "train800.txt", transform=None, num_classes=6)
    assert len(ds) == 6
    assert Counter(ds.targets) == {0: 2, 1: 2, 2: 2}
    img, label = ds[2]  # the grayscale one (class 1, index 0)
    assert label == 1 and img.mode == "RGB" and len(set(img.getpixel((0, 0)))) == 1  # grey
    img0, _ = ds[0]
    assert img0.mode == "RGB" and img0.getpixel((0, 0)) == (255, 0, 0)


def test_image_list_dataset_paths_with_spaces_and_blank_lines(tmp_path):
    _write_image(tmp_path / "my images" / "a b.png", (0, 0, 0))
    (tmp_path / "list.txt").write_text("\nmy images/a b.png 1\n\n")
    ds = ImageListDataset(tmp_path, "list.txt", num_classes=2)
    assert ds.samples == [("my images/a b.png", 1)]


def test_image_list_dataset_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found: .*nope"):
        ImageListDataset(tmp_path / "nope", "train800.txt")


def test_image_list_dataset_missing_list_file(vtab_root):
    with pytest.raises(FileNotFoundError, match=r"list file not found: .*train900\.txt.*train800\.txt"):
        ImageListDataset(vtab_root / "dmlab", "train900.txt")


@pytest.mark.parametrize(
    "line, pattern",
    [
        ("just_a_path.png", r"train800\.txt:3: malformed line 'just_a_path\.png'"),
        ("images/x.png cat", r"train800\.txt:3: malformed line .*label 'cat' is not an integer"),
    ],
)
def test_image_list_dataset_malformed_line(vtab_root, line, pattern):
    f = vtab_root / "dmlab" / "train800.txt"
    lines = f.read_text().splitlines()
    lines.insert(2, line)
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=pattern):
        ImageListDataset(vtab_root / "dmlab", "train800.txt", num_classes=6)


@pytest.mark.parametrize("label", [6, -1])
def test_image_list_dataset_bad_label(vtab_root, label):
    f = vtab_root / "dmlab" / "val200.txt"
    lines = f.read_text().splitlines()
    lines[1] = f"images/val200/c1_0.png {label}"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"val200\.txt:2: label {label} out of range; valid labels are \[0, 6\)"):
        ImageListDataset(vtab_root / "dmlab", "val200.txt", num_classes=6)


def test_image_list_dataset_unreadable_and_missing_image(vtab_root):
    folder = vtab_root / "dmlab"
    (folder / "images/test/c2_1.png").write_bytes(b"this is not an image")
    (folder / "images/test/c0_0.png").unlink()
    ds = ImageListDataset(folder, "test.txt", num_classes=6)  # listing is fine; images load lazily
    with pytest.raises(OSError, match=r"cannot read image file .*c2_1\.png \(listed at .*test\.txt:6\)"):
        ds[5]
    with pytest.raises(FileNotFoundError, match=r"image file not found: .*c0_0\.png \(listed at .*test\.txt:1\)"):
        ds[0]


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
    batches = list(dm.train_dataloader())
    assert sum(len(b[1]) for b in batches) == 6 and batches[0][0].shape[1:] == (3, 16, 16)
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
    assert sorted(a[0]) == list(range(6))
    assert order(4) != a
    dm = vtab_dm(vtab_root)
    dm.setup("fit")
    assert list(dm.val_dataloader().sampler) == list(range(3))  # val not shuffled


def test_vtab_folder_alias(tmp_path):
    make_vtab_task(tmp_path, task="cifar")  # the common release names the folder 'cifar'
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


# ------------------------------------------------------------------------------------------------------------------
# sample_per_class
# ------------------------------------------------------------------------------------------------------------------


def test_sample_per_class_counts_and_disjoint():
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(5), [20, 13, 12, 30, 15]))
    tr, va = sample_per_class(labels, shots=10, val_shots=2, seed=42)
    assert Counter(labels[tr].tolist()) == {c: 10 for c in range(5)}
    assert Counter(labels[va].tolist()) == {c: 2 for c in range(5)}
    assert not set(tr) & set(va) and len(set(tr)) == 50
    # accepts a tensor and a list
    assert sample_per_class(torch.as_tensor(labels), 10, 2, 42) == (tr, va)
    assert sample_per_class(labels.tolist(), 10, 2, 42) == (tr, va)


def test_sample_per_class_seeds():
    labels = np.repeat(np.arange(4), 50)
    a = sample_per_class(labels, 10, 2, seed=42)
    assert a == sample_per_class(labels, 10, 2, seed=42)
    b = sample_per_class(labels, 10, 2, seed=123)
    assert a[0] != b[0] and a[1] != b[1]


def test_sample_per_class_too_few():
    labels = np.array([0] * 12 + [1] * 5 + [2] * 12)
    with pytest.raises(ValueError, match=r"class 1 \('dog'\) has 5"):
        sample_per_class(labels, 10, 2, 0, class_names=["cat", "dog", "emu"])
    with pytest.raises(ValueError, match=r"class 3 has 0"):
        sample_per_class(np.array([0] * 12 + [1] * 12 + [2] * 12), 10, 2, 0, num_classes=4)
    with pytest.raises(ValueError, match=r"out of range; valid labels are \[0, 2\)"):
        sample_per_class(np.array([0] * 12 + [1] * 12 + [2] * 12), 10, 2, 0, num_classes=2)
    with pytest.raises(ValueError, match="shots must be an integer >= 1"):
        sample_per_class(labels, 0, 2, 0)


# ------------------------------------------------------------------------------------------------------------------
# FewShotDataModule over a generated ImageFolder layout
# ------------------------------------------------------------------------------------------------------------------


def make_imagefolder(root: Path, dataset: str, n_classes: int, n_train: int, n_test: int) -> Path:
    base = root / dataset
    for c in range(n_classes):
        for split, n in (("train", n_train), ("test", n_test)):
            for i in range(n):
                _write_image(base / split / f"class_{c:03d}" / f"{i}.png", (c * 5 % 256, i * 40 % 256, 0), size=(6, 6))
    return base


def test_fewshot_imagefolder(tmp_path):
    make_imagefolder(tmp_path, "resisc45", 45, n_train=5, n_test=2)
    kw = dict(dataset="resisc45", data_root=str(tmp_path), shots=3, val_shots=1, img_size=16, batch_size=32,
              num_workers=0, mean=HALF, std=HALF)
    dm = FewShotDataModule(**kw)
    assert dm.num_classes == 45 and dm.data_source() == "imagefolder"
    dm.setup("fit")
    assert len(dm.train_set) == 45 * 3 and len(dm.val_set) == 45
    train_labels = [dm.train_set.dataset.targets[i] for i in dm.train_set.indices]
    assert Counter(train_labels) == {c: 3 for c in range(45)}
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 3, 16, 16) and y.max() < 45 and x.min() >= -1.0 - 1e-4 and x.max() <= 1.0 + 1e-4
    dm.setup("test")
    assert len(dm.test_set) == 90
    # deterministic per seed, different across seeds
    dm2 = FewShotDataModule(**kw)
    dm2.setup("fit")
    assert dm2.split_indices == dm.split_indices
    dm3 = FewShotDataModule(**{**kw, "seed": 123})
    dm3.setup("fit")
    assert dm3.split_indices["train"] != dm.split_indices["train"]
    # too few images per class: names the class folder
    with pytest.raises(ValueError, match=r"class 0 \('class_000'\) has 5"):
        FewShotDataModule(**{**kw, "shots": 5}).setup("fit")


def test_fewshot_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown few-shot dataset 'food100' \(did you mean 'food101'\?\)"):
        FewShotDataModule(dataset="food100", data_root=str(tmp_path))
    make_imagefolder(tmp_path, "cifar100", 3, n_train=4, n_test=1)
    dm = FewShotDataModule(dataset="cifar100", data_root=str(tmp_path), shots=2, val_shots=1, num_workers=0)
    with pytest.raises(ValueError, match=r"has 3 class folders, but cifar100 has 100 classes"):
        dm.setup("fit")
    (tmp_path / "flowers102" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"lacks its test/ folder"):
        FewShotDataModule(dataset="flowers102", data_root=str(tmp_path)).setup("fit")
    with pytest.raises(FileNotFoundError, match=r"food101 \(train split\) not found .*Set download: true"):
        FewShotDataModule(dataset="food101", data_root=str(tmp_path / "none")).setup("fit")


# ------------------------------------------------------------------------------------------------------------------
# DigitsDataModule
# ------------------------------------------------------------------------------------------------------------------


def test_digits_counts_labels_and_values():
    from sklearn.datasets import load_digits

    n_expected = int(np.isin(load_digits().target, [5, 6, 7, 8, 9]).sum())
    dm = DigitsDataModule(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    assert dm.num_classes == 5
    dm.setup("fit")
    dm.setup("test")
    sizes = {s: len(getattr(dm, f"{s}_set")) for s in ("train", "val", "test")}
    assert sum(sizes.values()) == n_expected
    assert abs(sizes["test"] - 0.2 * n_expected) <= 1 and abs(sizes["val"] - 0.2 * n_expected) <= 2
    for split in ("train", "val", "test"):
        x, y = getattr(dm, f"{split}_set").tensors
        assert x.shape[1:] == (3, 32, 32) and y.dtype == torch.int64
        assert set(y.tolist()) == set(range(5))  # stratified: every class in every split
        assert x.min() >= 0.0 and x.max() <= 1.0 and torch.equal(x[:, 0], x[:, 2])
    all_idx = np.concatenate(list(dm.split_indices.values()))
    assert len(np.unique(all_idx)) == n_expected
    # labels follow the order of ``classes``
    images, labels, keep = dm.load_arrays()
    assert (load_digits().target[keep] == np.array([5, 6, 7, 8, 9])[labels]).all()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 3, 32, 32)


def test_digits_split_determinism_and_normalisation():
    a, b, c = DigitsDataModule(seed=0), DigitsDataModule(seed=0), DigitsDataModule(seed=1)
    for dm in (a, b, c):
        dm.setup(None)
    assert all(np.array_equal(a.split_indices[k], b.split_indices[k]) for k in ("train", "val", "test"))
    assert not np.array_equal(a.split_indices["test"], c.split_indices["test"])
    # ImageNet defaults without a trainer: a blank pixel normalises to -mean/std per channel
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    x, _ = a.train_set.tensors
    expected_min = torch.tensor([-m / s for m, s in zip(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
    assert torch.allclose(x.amin(dim=(0, 2, 3)), expected_min, atol=1e-5)
    small = DigitsDataModule(classes=[3, 0], img_size=8)
    small.setup("validate")
    assert small.num_classes == 2 and small.train_set is None and small.val_set.tensors[0].shape[1:] == (3, 8, 8)


def test_digits_errors():
    with pytest.raises(ValueError, match=r"classes must be digits in 0\.\.9, got \[10\]"):
        DigitsDataModule(classes=[1, 10])
    with pytest.raises(ValueError, match=r"must not repeat a digit, got \[1\]"):
        DigitsDataModule(classes=[1, 1, 2])
    with pytest.raises(ValueError, match="val_fraction \\+ test_fraction must be < 1"):
        DigitsDataModule(val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match="unknown stage 'train'"):
        DigitsDataModule().setup("train")


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
