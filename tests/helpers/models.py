"""Small models the tests build, and random non-initial adapter values for them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_peft.adapters import adapted_layers, find_strategy

WIDTH = 64  # embed dim of make_vit's ViT; qkv is 64 -> 192 (parts of 64 rows), fc1 64 -> 256, fc2 256 -> 64
#: ``model_kwargs`` of the tiny ``ViTClassifier`` / timm ViT (width 32) of the module, CLI and hand-over tests
TINY = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def make_vit(seed: int | None = 0, bias_std: float | None = None) -> nn.Module:
    """A tiny timm ViT in eval mode: 2 blocks, width :data:`WIDTH`, 8×8 patches of 32×32 images, 5 classes.

    ``seed``: ``torch.manual_seed(seed)`` first (``None``: the caller has seeded). ``bias_std``: every linear's bias
    redrawn from ``N(0, bias_std²)`` afterwards (non-zero biases; ``None``: timm's initialisation)."""
    timm = pytest.importorskip("timm")
    if seed is not None:
        torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8,
                              embed_dim=WIDTH, depth=2, num_heads=2)
    if bias_std is not None:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.Linear) and m.bias is not None:
                    m.bias.normal_(0, bias_std)
    return model.eval()


def tiny_vit(num_classes: int = 3, depth: int = 2, **kwargs):
    """A ``ViTClassifier`` on the tiny ViT (:data:`TINY`, ``depth`` blocks) for 32×32 images; ``kwargs`` go to it."""
    from lit_peft.modules import ViTClassifier

    return ViTClassifier(backbone="vit_tiny_patch16_224", num_classes=num_classes, img_size=32,
                         model_kwargs={**TINY, "depth": depth}, **kwargs)


class Stack(nn.Module):
    """A small stack of linears (``layers.0``, ``layers.1``, ...) with GELUs between them."""

    def __init__(self, widths, seed: int = 0, bias: bool = True):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(widths[:-1], widths[1:]))
        self.eval()

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == 0 else layer(F.gelu(x))
        return x


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0, std: float = 0.1, *, absolute: bool = False) -> None:
    """Random values for every adapter tensor, so that the adapters change the function (independent per layer and
    per part), drawn from ``torch.Generator().manual_seed(seed)``.

    ``absolute=False``: noise ``N(0, std²)`` in each tensor's dtype; scale-like tensors (``scale``, ``magnitude``,
    ``lambda_d``) are multiplied by ``1 + noise``, biases get it added, every other tensor is replaced by it; the
    strategy's trainable modules are replaced by such noise too (so a save/load round trip is not trivial).

    ``absolute=True``: values that do not depend on the initial ones, drawn in float64: ``scale`` ``1 + 0.2·N``,
    ``magnitude`` ``|N| + 0.5``, ``gate``, ``lambda_d`` and ``lambda_b`` ``N``, ``bias`` ``0.3·N``, every other
    tensor (skew, values, lora_A, lora_B) ``std·N``; trainable modules are left alone.
    """
    gen = torch.Generator().manual_seed(seed)
    for layer in adapted_layers(model).values():
        for name, p in layer.adapters.named_parameters():
            leaf = name.rpartition(".")[2]
            if absolute:
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
                if leaf == "scale":
                    value = 1 + 0.2 * noise
                elif leaf == "magnitude":
                    value = noise.abs() + 0.5
                elif leaf == "gate":
                    value = noise
                elif leaf == "lambda_d" or leaf == "lambda_b":
                    value = noise
                elif leaf == "bias":
                    value = 0.3 * noise
                else:  # skew, values, lora_A, lora_B
                    value = std * noise
                p.copy_(value.to(p.dtype))
                continue
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype) * std
            if leaf in ("scale", "magnitude", "lambda_d"):  # multiplicative: stay near the initial value
                p.mul_(1 + noise)
            elif leaf == "bias":
                p.add_(noise)
            else:
                p.copy_(noise)
    if absolute:
        return
    strategy = find_strategy(model)
    if strategy is not None:
        for name in strategy.trainable_module_names(model):
            for p in model.get_submodule(name).parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


def randomize_adapters(model: nn.Module, seed: int = 1) -> None:
    """Random values for every trainable tensor of a model (e.g. a ``transformers`` one): ``scale`` and
    ``magnitude`` tensors × ``(1 + 0.1·N)``, every other one ``0.2·N``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=gen, dtype=param.dtype)
                if name.endswith(("scale", "magnitude")):
                    param.mul_(1 + 0.1 * noise)
                else:
                    param.copy_(0.2 * noise)
