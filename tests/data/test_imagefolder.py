"""``ImageFolderDataModule`` (:mod:`lit_peft.data.imagefolder`) on generated ImageFolder trees (solid-colour images):
labels, the one class mapping of every split, ``item_id``, the validation hold-out, each error, and the run that
``docs/howto/data.md`` shows (``fit`` then ``predict`` through ``python -m lit_peft``, with the page's own YAML)."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
import torch
import yaml

from helpers.cli import REPO, run_cli
from helpers.data import COLORS, HALF, write_image
from lit_peft.data.imagefolder import IMAGE_EXTENSIONS, ImageFolderDataModule

CLASSES = ("cat", "dog", "emu")  # one solid colour each: red, green, blue


def make_tree(root: Path, counts: dict[str, int] | None = None, classes=CLASSES) -> Path:
    """``<root>/<split>/<class>/<i>.png``: ``counts[split]`` solid-colour images per class."""
    counts = counts if counts is not None else {"train": 3, "val": 1, "test": 2}
    for split, n in counts.items():
        for name in classes:
            color = COLORS[CLASSES.index(name) % 3] if name in CLASSES else (90, 90, 90)
            for i in range(n):
                write_image(root / split / name / f"{i}.png", color, size=(7 + i, 9))
    return root


def dm(root: Path, **kw) -> ImageFolderDataModule:
    args = dict(data_root=str(root), img_size=16, batch_size=4, num_workers=0, mean=HALF, std=HALF)
    return ImageFolderDataModule(**{**args, **kw})


# ------------------------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------------------------
def test_labels_classes_item_ids_and_batches(tmp_path):
    root = make_tree(tmp_path / "imgs")
    write_image(root / "train" / "dog" / "deeper" / "grey.JPG", COLORS[1], mode="L")  # nested, upper case, greyscale
    write_image(root / "train" / "cat" / ".hidden.png", COLORS[0])                     # hidden files and folders
    write_image(root / "train" / ".ipynb_checkpoints" / "x.png", COLORS[0])            # are skipped
    (root / "train" / "emu" / "notes.txt").write_text("not an image")
    data = dm(root)
    info = data.data_info()  # no setup needed: the CLI hands this to the model at start-up
    assert (info.num_classes, info.task) == (3, "imgs") and data.class_names == list(CLASSES)

    data.setup("fit")
    assert len(data.train_set) == 10 and len(data.val_set) == 3 and data.test_set is None
    assert data.train_set.targets == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    assert data.train_set.item_id(6) == "train/dog/deeper/grey.JPG"
    x, y = next(iter(data.val_dataloader()))
    assert x.shape == (3, 3, 16, 16) and x.dtype == torch.float32 and y.tolist() == [0, 1, 2]
    for label in range(3):  # solid colours normalised with mean = std = 0.5: 255 -> 1, 0 -> -1
        expected = -torch.ones(3, 16, 16)
        expected[label] = 1
        torch.testing.assert_close(x[label], expected, atol=1e-2, rtol=0)
    assert sum(len(b[1]) for b in data.train_dataloader()) == 12  # 10 images, batch 4, last_batch: pad

    data.setup("predict")
    loader = data.predict_dataloader()
    assert [loader.dataset.item_id(i) for i in range(6)] == [f"test/{c}/{i}.png" for c in CLASSES for i in range(2)]
    assert pickle.loads(pickle.dumps(loader.dataset)).item_id(5) == "test/emu/1.png"  # worker processes


def test_every_split_uses_the_train_folders_mapping(tmp_path):
    root = make_tree(tmp_path, {"train": 2})
    make_tree(tmp_path, {"val": 1, "test": 1}, classes=("cat", "emu"))  # dog is missing from val and test
    data = dm(root)
    data.setup(None)
    for ds in (data.val_set, data.test_set):
        assert ds.class_to_idx == {"cat": 0, "dog": 1, "emu": 2}
        assert ds.targets == [0, 2]  # emu is 2 here as in train, not 1 as torchvision's own ImageFolder would say
        x, y = ds[1]
        assert y == 2 and x[2].mean() > 0.9  # the blue image


def test_val_fraction_holds_out_a_seeded_share_of_each_class(tmp_path):
    root = make_tree(tmp_path, {"train": 4, "test": 1})
    data = dm(root, val_fraction=0.25, seed=3)
    data.setup("fit")
    train, val = data.split_indices["train"], data.split_indices["val"]
    assert len(val) == 3 and len(train) == 9 and set(train).isdisjoint(val) and set(train) | set(val) == set(range(12))
    assert sorted(data.val_set.dataset.targets[i] for i in val) == [0, 1, 2]  # one per class
    assert data.val_set.dataset.item_id(val[0]).startswith("train/")
    again = dm(root, val_fraction=0.25, seed=3)
    again.setup("validate")
    assert again.split_indices == data.split_indices and again.train_set is None
    other = dm(root, val_fraction=0.25, seed=4)
    other.setup("fit")
    assert other.split_indices["val"] != val
    # no validation folder and no hold-out: no validation at all
    none = dm(root)
    none.setup("fit")
    assert none.val_dataloader() == [] and len(none.train_set) == 12


# ------------------------------------------------------------------------------------------------------------------
# errors: each one names what is wrong, before any training
# ------------------------------------------------------------------------------------------------------------------
def test_bad_layouts_fail_with_what_is_wrong(tmp_path):
    def error(root: Path, **kw) -> str:
        with pytest.raises(ValueError) as info:
            dm(root, **kw).data_info()
        return str(info.value)

    assert re.search(r"data_root .*nowhere does not exist; expected .*nowhere/train/<class>/<image>",
                     error(tmp_path / "nowhere"))
    (tmp_path / "file").write_text("x")
    assert "is not a folder" in error(tmp_path / "file")
    make_tree(tmp_path / "a", {"training": 1})
    assert re.search(r"no training folder .*a/train; .* holds: training", error(tmp_path / "a"))
    write_image(tmp_path / "b" / "train" / "0.png", COLORS[0])
    assert "has no class folders (its images lie directly in it" in error(tmp_path / "b")
    make_tree(tmp_path / "c", {"train": 1}, classes=("cat",))
    assert "has 1 class folder ('cat'); a classifier needs at least 2 classes" in error(tmp_path / "c")
    make_tree(tmp_path / "d", {"train": 1})
    (tmp_path / "d" / "train" / "fox").mkdir()
    (tmp_path / "d" / "train" / "fox" / "fox.txt").write_text("x")
    message = error(tmp_path / "d")
    assert f"class folder(s) with no images: {tmp_path / 'd' / 'train' / 'fox'}" in message
    assert all(ext in message for ext in IMAGE_EXTENSIONS)
    make_tree(tmp_path / "e", {"train": 1})
    make_tree(tmp_path / "e", {"test": 1}, classes=("cat", "yak"))
    assert re.search(r"e/test has class folder\(s\) that .*e/train lacks: 'yak'", error(tmp_path / "e"))
    make_tree(tmp_path / "f", {"train": 2, "val": 1})
    assert "use one: val_fraction: 0" in error(tmp_path / "f", val_fraction=0.5)
    assert re.search(r"val_dir: .*valid is not a folder", error(tmp_path / "f", val_dir="valid"))
    assert "would hold out all 2 image(s) of class 'cat'" in _setup_error(tmp_path / "f", val_dir=None,
                                                                          val_fraction=0.75)
    assert "holds out no image" in _setup_error(tmp_path / "f", val_dir=None, val_fraction=0.1)
    with pytest.raises(ValueError, match=r"val_fraction must lie in \[0, 1\)"):
        dm(tmp_path / "f", val_fraction=1.0)
    with pytest.raises(ValueError, match="must name different folders"):
        dm(tmp_path / "f", val_dir="train")


def _setup_error(root: Path, **kw) -> str:
    with pytest.raises(ValueError) as info:
        dm(root, **kw).setup("fit")
    return str(info.value)


def test_test_and_predict_need_the_test_folder(tmp_path):
    root = make_tree(tmp_path, {"train": 1})
    data = dm(root)
    data.setup("fit")
    for call in (data.check_can_test, lambda: data.setup("test"), lambda: data.setup("predict"),
                 data.test_dataloader, data.predict_dataloader):
        with pytest.raises(ValueError, match=r"no test folder to test or predict on \(.*test does not exist\)"):
            call()


def test_unreadable_image_names_its_file(tmp_path):
    root = make_tree(tmp_path, {"train": 1})
    (root / "train" / "dog" / "broken.png").write_bytes(b"not a png")
    data = dm(root)
    data.setup("fit")
    index = data.train_set.samples.index((str(root / "train" / "dog" / "broken.png"), 1))
    with pytest.raises(OSError, match=r"cannot read image file .*dog/broken\.png"):
        data.train_set[index]


def test_model_class_count_must_match_the_folders(tmp_path):
    from helpers.models import tiny_vit
    from lit_peft.handover import connect

    data = dm(make_tree(tmp_path, {"train": 1}))
    with pytest.raises(ValueError, match=r"model.num_classes=2 but the data \(ImageFolderDataModule\) has 3 classes; "
                                         r"set model.init_args.num_classes: 3"):
        connect(tiny_vit(num_classes=2, depth=1), data)


# ------------------------------------------------------------------------------------------------------------------
# the user's path, as docs/howto/data.md shows it
# ------------------------------------------------------------------------------------------------------------------
def docs_config(name: str) -> str:
    """The YAML block of the how-to pages whose first line is ``# <name>``."""
    for page in sorted((REPO / "docs" / "howto").glob("*.md")):
        for block in re.findall(r"```yaml\n(.*?)```", page.read_text(), flags=re.S):
            if block.startswith(f"# {name}\n"):
                return block
    raise AssertionError(f"no yaml block '# {name}' in docs/howto")


TINY_VIT = ["--model.init_args.backbone", "vit_tiny_patch16_224", "--model.init_args.pretrained", "false",
            "--model.init_args.img_size", "16", "--data.init_args.img_size", "16",
            "--model.init_args.model_kwargs", "{patch_size: 4, embed_dim: 32, depth: 1, num_heads: 2}"]


def test_docs_config_without_a_test_folder_stops_before_training(tmp_path, monkeypatch):
    """``test_after_fit: final`` (the page's config) with no ``test/`` folder: the CLI stops before the fit."""
    from lit_peft.cli import main

    (tmp_path / "my_images.yaml").write_text(docs_config("my_images.yaml"))
    root = make_tree(tmp_path / "my_images", {"train": 1})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"test_after_fit: final would fail after the whole fit: "
                                         r"ImageFolderDataModule: no test folder to test or predict on"):
        main(["fit", "--config", "my_images.yaml", *TINY_VIT, "--data.init_args.data_root", str(root),
              "--trainer.accelerator", "cpu"])
    assert not (tmp_path / "runs" / "my_images" / "version_0" / "checkpoints").exists()


def test_docs_image_folder_config_fits_and_predicts_through_the_cli(tmp_path):
    """The page's ``my_images.yaml`` and its two commands, with a tiny randomly initialised ViT instead of the
    pretrained ViT-B (no hub here), the data root of a generated tree, 2 steps (one epoch of 9 images) and the
    CPU; then runs.md's loading of the merged model with timm."""
    config = yaml.safe_load(docs_config("my_images.yaml"))
    assert config["data"]["class_path"] == "lit_peft.data.ImageFolderDataModule"
    (tmp_path / "my_images.yaml").write_text(docs_config("my_images.yaml"))
    root = make_tree(tmp_path / "my_images")
    overrides = [*TINY_VIT, "--data.init_args.data_root", str(root), "--data.init_args.num_workers", "0",
                 "--data.init_args.batch_size", "5", "--trainer.max_steps", "2", "--trainer.accelerator", "cpu",
                 "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false"]
    out = run_cli("fit", "--config", "my_images.yaml", *overrides, cwd=tmp_path)
    assert "ImageFolderDataModule: 3 classes; train 9 images" in out and "validation 3 images" in out, out[-3000:]
    run = tmp_path / "runs" / "my_images" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "merged" / "model.safetensors").is_file()
    metrics = (run / "metrics.csv").read_text()
    assert all(column in metrics for column in ("train_loss", "val_acc", "test_acc")), metrics

    out = run_cli("predict", "--config", "my_images.yaml", "--ckpt_path",
                  "runs/my_images/version_0/checkpoints/last.ckpt", *overrides, cwd=tmp_path)
    match = re.search(r"PredictionWriter: 6 predictions written to (\S+)", out)
    assert match, out[-3000:]
    assert Path(match.group(1)) == Path("runs/my_images/version_1/predictions.jsonl")  # the next version folder
    rows = [json.loads(line) for line in (tmp_path / match.group(1)).read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"test/{c}/{i}.png" for c in CLASSES for i in range(2)]
    assert all(r["prediction"] in (0, 1, 2) and len(r["probabilities"]) == 3 for r in rows)

    # runs.md: the merged model, loaded by timm from the folder alone, gives the predictions of the adapted model
    import timm
    from PIL import Image

    from lit_peft.data import eval_transform

    model = timm.create_model(f"local-dir:{run / 'merged'}", pretrained=True).eval()
    config = timm.data.resolve_data_config({}, model=model)
    assert config["input_size"] == (3, 16, 16)
    transform = eval_transform(config["input_size"][-1], config["mean"], config["std"])
    images = torch.stack([transform(Image.open(root / r["id"])) for r in rows])
    with torch.no_grad():
        probabilities = model(images).softmax(-1)
    torch.testing.assert_close(probabilities, torch.tensor([r["probabilities"] for r in rows]), atol=1e-5, rtol=1e-4)
