"""Eval preprocessing and augmented views: the preprocessing registry (``--preset``).

A group records its eval preprocessing as a :class:`TransformSpec` and its views' recipe as
a string (``ExtractionSpec.augmentation``); :func:`make_transforms` turns both into the
torchvision callables the build's pass runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ._spec import ORIGINAL_AUGMENTATION, PAPER_AUGMENTATION, TransformSpec
from .errors import InvalidParameterError, UnknownNameError

__all__ = ["resolve_transform", "make_transforms", "Preprocessing", "PREPROCESSING"]


def resolve_transform(model, image_size: int | None = None) -> TransformSpec:
    """Eval preprocessing from the model's pretrained config (timm's resolve_data_config)."""
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=model)
    size = tuple(int(v) for v in cfg["input_size"])
    if image_size is not None:
        if image_size < 8:
            raise InvalidParameterError(key="image_size", value=image_size, expected="an integer >= 8 (pixels)")
        size = (size[0], int(image_size), int(image_size))
    return TransformSpec(
        input_size=size,
        interpolation=str(cfg.get("interpolation", "bicubic")),
        crop_pct=float(cfg.get("crop_pct", 0.875)),
        crop_mode=str(cfg.get("crop_mode", "center")),
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
    )


def _released_transform(model, image_size: int | None = None) -> TransformSpec:
    """The released code's eval preprocessing: Resize(224) + CenterCrop(224) (bilinear), then the
    ImageNet mean and std (its model wrapper normalises), whatever the model's config says."""
    import timm.data

    size = int(image_size or 224)
    return TransformSpec(input_size=(3, size, size), interpolation="bilinear", crop_pct=1.0, crop_mode="center",
                         mean=tuple(float(v) for v in timm.data.IMAGENET_DEFAULT_MEAN),
                         std=tuple(float(v) for v in timm.data.IMAGENET_DEFAULT_STD))


def _paper_views(t: TransformSpec, eval_tf):
    from torchvision import transforms as T

    return T.Compose([T.RandomHorizontalFlip(), T.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.25, hue=0.25),
                      T.RandomRotation(degrees=2), eval_tf])


def _released_views(t: TransformSpec, eval_tf):
    from torchvision import transforms as T

    return T.Compose([T.RandomResizedCrop(t.input_size[1:]), T.RandomHorizontalFlip(),
                      T.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.25), T.RandomRotation(degrees=2),
                      T.ToTensor(), T.Normalize(t.mean, t.std)])


@dataclass(frozen=True)
class Preprocessing:
    """One entry of the preprocessing registry (``featstore build --preset``).

    Attributes
    ----------
    name : str
    transform : callable
        ``transform(model, image_size) -> TransformSpec``: the eval preprocessing.
    augmentation : str
        The augmented views' recipe, recorded in each group's spec (its identity).
    views : callable
        ``views(transform_spec, eval_tf) -> callable``: the view transform on PIL images.
    description : str
    """

    name: str
    transform: Callable
    augmentation: str
    views: Callable
    description: str


PREPROCESSING: dict[str, Preprocessing] = {p.name: p for p in (
    Preprocessing("paper", resolve_transform, PAPER_AUGMENTATION, _paper_views,
                  "the model's pretrained eval config (timm); views: the paper's flip, ColorJitter(.25 x 4), "
                  "rotation 2, then the eval preprocessing"),
    Preprocessing("original", _released_transform, ORIGINAL_AUGMENTATION, _released_views,
                  "the released code's: Resize(224) + CenterCrop(224), ImageNet mean/std; views: "
                  "RandomResizedCrop(224), flip, ColorJitter(.25, .25, .25), rotation 2"),
)}


def make_transforms(t: TransformSpec, augmentation: str = PAPER_AUGMENTATION):
    """(eval transform, augmented-view transform) as torchvision callables on PIL images.

    ``augmentation`` is a recipe recorded in a group's spec (``ExtractionSpec.augmentation``).
    """
    import timm.data

    eval_tf = timm.data.create_transform(
        input_size=t.input_size,
        is_training=False,
        interpolation=t.interpolation,
        mean=t.mean,
        std=t.std,
        crop_pct=t.crop_pct,
        crop_mode=t.crop_mode,
    )
    recipes = {p.augmentation: p for p in PREPROCESSING.values()}
    if augmentation not in recipes:
        raise UnknownNameError("augmentation recipe", augmentation, recipes)
    return eval_tf, recipes[augmentation].views(t, eval_tf)
