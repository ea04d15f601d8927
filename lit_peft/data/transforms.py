"""Image transforms and normalisation of the vision data modules.

Mean/std: explicit values win; a ``None`` is taken from the data config the model handed over
(:class:`~lit_peft.handover.ModelInfo` ``data_config``: timm's resolved data config of the backbone being trained),
else from timm's ImageNet defaults (:func:`resolve_normalization`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image
from torchvision import transforms as T


class ToRGB:
    """PIL image → RGB PIL image (grayscale, palette, RGBA, CMYK inputs all become 3-channel)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == "RGB" else img.convert("RGB")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class _SubtractLabel:
    """Target transform ``y -> y - offset`` (picklable, for worker processes)."""

    def __init__(self, offset: int) -> None:
        self.offset = offset

    def __call__(self, y: int) -> int:
        return int(y) - self.offset


def eval_transform(img_size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """The VTAB / few-shot transform: RGB, resize to ``img_size``×``img_size`` (bicubic), tensor, normalise.

    No augmentation, no crop: the protocols of both papers resize the whole image.
    """
    return T.Compose(
        [
            ToRGB(),
            T.Resize((img_size, img_size), interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.ToTensor(),
            T.Normalize(mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std)),
        ]
    )


def _check_norm_arg(name: str, value: Sequence[float] | None) -> tuple[float, float, float] | None:
    if value is None:
        return None
    try:
        vals = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be three floats (one per RGB channel) or null, got {value!r}") from None
    if len(vals) != 3:
        raise ValueError(f"{name} must be three floats (one per RGB channel) or null, got {len(vals)}: {value!r}")
    if name == "std" and any(v <= 0 for v in vals):
        raise ValueError(f"std must be positive in every channel, got {vals}")
    return vals  # type: ignore[return-value]


def resolve_normalization(
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    data_config: Mapping[str, Any] | None = None,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) to normalise with.

    Explicit values win; a ``None`` is filled from ``data_config`` (timm's resolved data config of the backbone
    being trained, as the model hands it over in :class:`~lit_peft.handover.ModelInfo`) when it has that key, else
    from timm's ImageNet defaults.
    """
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    if data_config is not None and not isinstance(data_config, Mapping):
        raise TypeError(f"data_config must be a mapping (timm's resolved data config) or None, got "
                        f"{type(data_config).__name__}")
    cfg = data_config
    if mean is None:
        mean = cfg["mean"] if cfg is not None and cfg.get("mean") is not None else IMAGENET_DEFAULT_MEAN
    if std is None:
        std = cfg["std"] if cfg is not None and cfg.get("std") is not None else IMAGENET_DEFAULT_STD
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)
