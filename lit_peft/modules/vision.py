"""Image classification with a timm ViT backbone and a pluggable adapter (VTAB-1K, few-shot, the digits demo)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from ..files import atomic_write, atomic_write_folder
from ..handover import DataInfo, ModelInfo
from .base import AdaptedModule


def _check_pretrained_source(backbone: str) -> None:
    """Fail in seconds when timm's pretrained weights for ``backbone`` are neither cached nor fetchable."""
    from timm.models import get_pretrained_cfg

    from ..hub import check_model_source

    cfg = get_pretrained_cfg(backbone)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if repo:
        check_model_source(repo, argument=f"model.init_args.pretrained (timm {backbone})",
                           filenames=("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"),
                           instead="Give model.init_args.checkpoint_path: a local weights file (.safetensors, .pth "
                                   "or .bin) instead of pretrained: true.")


def create_backbone(backbone: str, num_classes: int, pretrained: bool = False, checkpoint_path: str | None = None,
                    img_size: int | None = None, model_kwargs: dict[str, Any] | None = None) -> torch.nn.Module:
    """``timm.create_model`` with hub weights (``pretrained``) or a local weights file (``checkpoint_path``).

    A local file goes through timm's own pretrained loader (``pretrained_cfg_overlay={"file": ...}``), so the
    head is re-initialised for ``num_classes`` and position embeddings are resized for ``img_size``, exactly as
    with hub weights.
    """
    kwargs = dict(model_kwargs or {})
    if img_size is not None:
        kwargs["img_size"] = img_size
    if checkpoint_path is not None:
        if not os.path.isfile(checkpoint_path):
            raise FileNotFoundError(f"model.checkpoint_path {checkpoint_path} does not exist (expected a .safetensors,"
                                    f" .pth or .bin weights file for {backbone})")
        return timm.create_model(backbone, pretrained=True, num_classes=num_classes,
                                 pretrained_cfg_overlay={"file": os.path.abspath(checkpoint_path)}, **kwargs)
    if pretrained and timm.is_model(backbone):
        _check_pretrained_source(backbone)
    try:
        return timm.create_model(backbone, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(f"model.backbone {backbone!r} is not a timm model; see timm.list_models()") from err
        raise


class ViTClassifier(AdaptedModule):
    """A timm ViT classifier whose head is always trained and whose backbone carries the adapter.

    Args:
        backbone: timm model name, e.g. ``vit_large_patch14_dinov2`` (BOFT VTAB) or
            ``vit_base_patch16_224.augreg_in21k`` (SVFT few-shot).
        num_classes: classes of the task (size of the new head).
        pretrained: load timm's pretrained weights (from the hub cache).
        checkpoint_path: a local weights file to start from instead (machines without a hub).
        img_size: input resolution, when it differs from the backbone's default.
        model_kwargs: extra ``timm.create_model`` arguments (e.g. a small ``embed_dim``/``depth`` for tests).
        **kwargs: the arguments every module shares (``adapter``, ``optimizer``, ``head_lr``, ``lr_schedule``, …,
            the ``fsdp_*`` options), see :class:`~lit_peft.modules.base.AdaptedModule`; each ViT block is one FSDP
            shard unit.
    """

    def __init__(self, backbone: str = "vit_base_patch16_224", num_classes: int = 10, pretrained: bool = False,
                 checkpoint_path: str | None = None, img_size: int | None = None,
                 model_kwargs: dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.backbone = backbone
        self.num_classes = num_classes
        self.img_size = img_size
        self.model_kwargs = dict(model_kwargs or {})
        self.model = create_backbone(backbone, num_classes, pretrained, checkpoint_path, img_size, model_kwargs)
        config = timm.data.resolve_data_config({}, model=self.model)
        size = getattr(getattr(self.model, "patch_embed", None), "img_size", None)
        if size is not None:
            config["input_size"] = (3, *size)
        self.data_config = config
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def model_info(self) -> ModelInfo:
        return ModelInfo(data_config=self.data_config)

    def connect_data(self, info: DataInfo) -> None:
        if info.num_classes is not None and info.num_classes != self.num_classes:
            raise ValueError(f"model.num_classes={self.num_classes} but the data ({info.name}) has "
                             f"{info.num_classes} classes; set model.init_args.num_classes: {info.num_classes}")

    def head_names(self) -> list[str]:
        head = self.model.get_classifier()
        return [name for name, module in self.model.named_modules() if module is head and name]

    def shard_units(self) -> list[torch.nn.Module]:
        """FSDP2 shards each transformer block of the ViT (``self.model.blocks``) on its own."""
        blocks = getattr(self.model, "blocks", None)
        return list(blocks) if blocks is not None else super().shard_units()

    def plain_model_kwargs(self) -> dict[str, Any]:
        """``timm.create_model`` arguments that rebuild this backbone's architecture (no weights)."""
        kwargs = {"num_classes": self.num_classes, **self.model_kwargs}
        if self.img_size is not None:
            kwargs["img_size"] = self.img_size
        return kwargs

    def build_plain_model(self) -> torch.nn.Module:
        with torch.device("meta"):
            return timm.create_model(self.backbone, pretrained=False, **self.plain_model_kwargs())

    def model_outputs(self, model: torch.nn.Module, batch) -> torch.Tensor:
        return model(batch[0])

    def save_merged_model(self, model: torch.nn.Module, folder: Path) -> None:
        """timm's own folder layout (``timm.models.save_for_hf``): ``config.json`` (architecture, num_classes, the
        model arguments, pretrained_cfg) and ``model.safetensors``, so ``timm.create_model("local-dir:<folder>",
        pretrained=True)`` rebuilds the merged model with nothing else; plus ``model_config.json`` naming the backbone
        and its ``create_model`` arguments (``timm.create_model(backbone, **kwargs).load_state_dict`` works too)."""
        model = model.cpu()
        atomic_write_folder(folder, lambda tmp: timm.models.save_for_hf(model, str(tmp), safe_serialization=True),
                            merge=True)
        config = {"library": "timm", "backbone": self.backbone, "create_model_kwargs": self.plain_model_kwargs()}
        atomic_write(folder / "model_config.json", lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False, sync_dist=True)
        return self.checked_loss(loss, batch_idx)

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        logits = self(images)
        self.val_acc(logits, labels)
        self.log("val_loss", F.cross_entropy(logits, labels), prog_bar=True, sync_dist=True)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def test_step(self, batch, batch_idx):
        images, labels = batch
        logits = self(images)
        self.test_acc(logits, labels)
        self.log("test_loss", F.cross_entropy(logits, labels), sync_dist=True)
        self.log("test_acc", self.test_acc)

    def predict_step(self, batch, batch_idx):
        """One ``{"prediction": class index, "probabilities": softmax}`` per image (``PredictionWriter`` adds the
        image's index and path)."""
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        probabilities = self(images).float().softmax(dim=-1)
        return [{"prediction": int(p.argmax()), "probabilities": p.tolist()} for p in probabilities]
