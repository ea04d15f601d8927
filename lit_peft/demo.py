"""The built-in demo (``python -m lit_peft fit --config demo.yaml``): transfer learning on real data, on a CPU.

scikit-learn ships 1,797 real 8×8 handwritten digits. A small ViT is first trained from scratch on digits 0–4
(the "pretrained backbone", cached on disk keyed by its recipe, so later runs skip it), then that backbone is
fine-tuned with an adapter on digits 5–9 — a new task with a new head — exactly as a ViT pretrained on ImageNet
is transferred to a VTAB task. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from safetensors.torch import save_file

from .files import atomic_write
from .data import DigitsDataModule
from .modules.vision import ViTClassifier

DEMO_BACKBONE = "vit_tiny_patch16_224"
DEMO_MODEL_KWARGS = {"patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3}


def pretrain_digits_backbone(path: Path, backbone: str, model_kwargs: dict[str, Any], img_size: int,
                             classes: list[int], epochs: int, seed: int) -> float:
    """Train ``backbone`` from scratch on ``classes`` of the digits and save its weights to ``path``; returns the
    held-out accuracy. A plain PyTorch loop: this is the demo's stand-in for a hub checkpoint."""
    torch.manual_seed(seed)
    model = timm.create_model(backbone, pretrained=False, num_classes=len(classes), img_size=img_size,
                              **model_kwargs)
    config = timm.data.resolve_data_config({}, model=model)
    data = DigitsDataModule(classes=classes, img_size=img_size, seed=seed, batch_size=64, num_workers=0,
                            mean=config["mean"], std=config["std"])
    data.setup("fit")
    with pretraining_progress(epochs) as progress:
        return train_classifier(model, data.train_dataloader, data.val_dataloader(), epochs, path, progress)


@contextmanager
def pretraining_progress(epochs: int, lines: int = 6):
    """A ``progress(epoch, loss)`` for :func:`train_classifier` that shows the demo's pretraining: a rich bar in a
    terminal (rank 0), and about ``lines`` printed lines (every one in a log file too)."""
    from rich import get_console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    every = max(1, epochs // max(1, lines))
    console = get_console()
    show = rank_zero_only.rank == 0
    bar = Progress(TextColumn("demo: pretraining"), BarColumn(), TextColumn("epoch {task.completed}/{task.total}"),
                   TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                   console=console, transient=True, disable=not (show and console.is_terminal))
    start = time.perf_counter()
    with bar:
        task = bar.add_task("pretraining", total=epochs, loss="–")

        def progress(epoch: int, loss: float) -> None:
            bar.update(task, completed=epoch, loss=f"{loss:.3f}")
            if show and (epoch % every == 0 or epoch == epochs):
                console.print(f"demo: pretraining epoch {epoch}/{epochs} · loss {loss:.3f} · "
                              f"{time.perf_counter() - start:.0f} s", highlight=False, markup=False, soft_wrap=True)

        yield progress


def train_classifier(model: torch.nn.Module, train_loader: Callable[[], Iterable], val_loader: Iterable,
                     epochs: int, path: Path, progress: Callable[[int, float], None] | None = None) -> float:
    """Train ``model`` from scratch (AdamW 2e-3, one-cycle schedule) on the batches of ``train_loader()`` (called
    once per epoch), save its weights to ``path`` and return its accuracy on ``val_loader``: the demo's (and the
    comparison harness's) stand-in for a hub checkpoint. ``progress(epoch, mean loss)`` is called after each
    epoch (1-based)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    steps = epochs * len(train_loader())
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    model.train()
    for epoch in range(epochs):
        total = count = 0.0
        for images, labels in train_loader():
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(labels)
            count += len(labels)
        if progress is not None:
            progress(epoch + 1, total / max(1.0, count))
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for images, labels in val_loader:
            correct += int((model(images).argmax(-1) == labels).sum())
            total += len(labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    return correct / max(1, total)


class DigitsDemoClassifier(ViTClassifier):
    """:class:`ViTClassifier` whose backbone is the demo's small ViT pretrained on digits ``pretrain_classes``.

    Args:
        pretrain_classes: digits the backbone is pretrained on (disjoint from the fine-tuning digits).
        pretrain_epochs: epochs of that pretraining.
        cache_dir: where the pretrained backbone is kept (keyed by a hash of its recipe).
        seed: seed of the pretraining.
        **kwargs: :class:`ViTClassifier` arguments (``backbone``, ``num_classes``, ``img_size``, ``model_kwargs``,
            ``adapter``, ``optimizer``, ...).
    """

    def __init__(self, pretrain_classes: list[int] = [0, 1, 2, 3, 4],  # noqa: B006 - the config schema
                 pretrain_epochs: int = 60, cache_dir: str = "~/.cache/lit_peft/demo", seed: int = 0, **kwargs):
        if kwargs.pop("checkpoint_path", None) is not None or kwargs.pop("pretrained", False):
            raise ValueError("DigitsDemoClassifier builds its own pretrained backbone; leave checkpoint_path and "
                             "pretrained unset (use ViTClassifier for other weights)")
        kwargs.setdefault("backbone", DEMO_BACKBONE)
        kwargs.setdefault("model_kwargs", dict(DEMO_MODEL_KWARGS))
        kwargs.setdefault("img_size", 32)
        recipe = {"backbone": kwargs["backbone"], "model_kwargs": kwargs["model_kwargs"],
                  "img_size": kwargs["img_size"], "classes": list(pretrain_classes), "epochs": pretrain_epochs,
                  "seed": seed, "timm": timm.__version__}
        digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
        path = Path(os.path.expanduser(cache_dir)) / f"digits-backbone-{digest}.safetensors"
        if not path.is_file():
            rank_zero_info(f"demo: pretraining the backbone on digits {list(pretrain_classes)} "
                           f"({pretrain_epochs} epochs, cached at {path}) ...")
            start = time.perf_counter()
            accuracy = pretrain_digits_backbone(path, kwargs["backbone"], kwargs["model_kwargs"], kwargs["img_size"],
                                                list(pretrain_classes), pretrain_epochs, seed)
            rank_zero_info(f"demo: backbone pretrained in {time.perf_counter() - start:.0f}s, held-out accuracy on "
                           f"digits {list(pretrain_classes)}: {accuracy:.3f}")
        else:
            rank_zero_info(f"demo: using the cached pretrained backbone {path}")
        super().__init__(checkpoint_path=str(path), **kwargs)
