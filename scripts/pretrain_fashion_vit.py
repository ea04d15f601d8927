"""Pretrain the small ViT backbone of the ``mnist-vit`` comparison on Fashion-MNIST (cached).

The comparison (``scripts/compare_methods.py``) needs a *pretrained* ViT that has never seen digits, as a ViT
pretrained on ImageNet is transferred to a VTAB task. This trains the digits demo's architecture
(:data:`lit_peft.demo.DEMO_BACKBONE` with :data:`lit_peft.demo.DEMO_MODEL_KWARGS`, 28x28 input) from scratch on the
``fashion-mnist`` asset's pre-training subset (``train.txt``, 10,000 images) and keeps the weights under
``~/.cache/lit_peft/compare/`` keyed by a hash of the recipe, so later runs reuse them. The loop is the same as
the demo's :func:`lit_peft.demo.pretrain_digits_backbone` (AdamW 2e-3, wd 0.05, one-cycle), on other data: that
function hard-codes its ``DigitsDataModule`` and cannot take a dataset without a change to ``lit_peft/demo.py``.

    python scripts/pretrain_fashion_vit.py            # prints the cached path (pretrains first if needed)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

BACKBONE_IMG_SIZE = 28
DEFAULT_EPOCHS = 10


def recipe(epochs: int, seed: int) -> dict:
    import timm

    from lit_peft.demo import DEMO_BACKBONE, DEMO_MODEL_KWARGS
    return {"backbone": DEMO_BACKBONE, "model_kwargs": dict(DEMO_MODEL_KWARGS), "img_size": BACKBONE_IMG_SIZE,
            "data": "fashion-mnist train.txt", "epochs": epochs, "seed": seed, "timm": timm.__version__}


def backbone_path(epochs: int = DEFAULT_EPOCHS, seed: int = 0,
                  cache_dir: str = "~/.cache/lit_peft/compare") -> tuple[Path, dict]:
    r = recipe(epochs, seed)
    digest = hashlib.sha256(json.dumps(r, sort_keys=True).encode()).hexdigest()[:16]
    return Path(os.path.expanduser(cache_dir)) / f"fashion-vit-{digest}.safetensors", r


def pretrain(epochs: int = DEFAULT_EPOCHS, seed: int = 0, cache_dir: str = "~/.cache/lit_peft/compare",
             threads: int | None = None) -> Path:
    """The cached backbone's path; trains it first when it is not cached. Writes ``<path>.json`` (the recipe and
    the held-out accuracy on the 2,000-image ``val.txt``)."""
    path, r = backbone_path(epochs, seed, cache_dir)
    if path.is_file():
        return path
    import timm
    import torch
    from torchvision import transforms

    from lit_peft import assets
    from lit_peft.data import ImageListDataset
    from lit_peft.demo import train_classifier
    from lit_peft.files import atomic_write_text

    if threads:
        torch.set_num_threads(threads)
    root = assets.path("fashion-mnist") / "fashion_mnist"
    torch.manual_seed(seed)
    model = timm.create_model(r["backbone"], pretrained=False, num_classes=10, img_size=r["img_size"],
                              **r["model_kwargs"])
    cfg = timm.data.resolve_data_config({}, model=model)
    tf = transforms.Compose([transforms.Resize((r["img_size"], r["img_size"])), transforms.ToTensor(),
                             transforms.Normalize(cfg["mean"], cfg["std"])])
    train = ImageListDataset(root, "train.txt", tf, num_classes=10)
    val = ImageListDataset(root, "val.txt", tf, num_classes=10)
    gen = torch.Generator().manual_seed(seed)
    train_loader = torch.utils.data.DataLoader(train, batch_size=128, shuffle=True, generator=gen)
    val_loader = torch.utils.data.DataLoader(val, batch_size=256)
    start = time.perf_counter()
    accuracy = train_classifier(model, lambda: train_loader, val_loader, epochs, path)
    info = {**r, "val_acc": accuracy, "seconds": time.perf_counter() - start}
    atomic_write_text(Path(str(path) + ".json"), json.dumps(info, indent=2) + "\n")
    print(f"pretrained {r['backbone']} on Fashion-MNIST in {info['seconds']:.0f}s: held-out accuracy "
          f"{info['val_acc']:.3f} -> {path}", file=sys.stderr)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default="~/.cache/lit_peft/compare")
    args = parser.parse_args(argv)
    print(pretrain(args.epochs, args.seed, args.cache_dir))


if __name__ == "__main__":
    main()
