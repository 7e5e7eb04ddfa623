"""The one description of an extraction: what determines a group's features.

An :class:`ExtractionSpec` is written into the group's Zarr attributes and its
:meth:`~ExtractionSpec.key` names the group, so two builds that would produce
different features can never share a group, and a group is never served for a
request it does not match (timm's ``PretrainedCfg`` and dask's ``tokenize`` idea).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidParameterError

__all__ = ["ExtractionSpec", "TransformSpec", "FORMAT_VERSION", "slug"]

# Bump when the on-disk layout changes incompatibly.
FORMAT_VERSION = 1

_SLUG_BAD = re.compile(r"[^A-Za-z0-9_.+-]+")


def slug(text: str) -> str:
    """A file-name-safe rendering of ``text`` (path separators and ``..`` removed)."""
    out = _SLUG_BAD.sub("-", text).strip("-.")
    out = out.replace("..", ".")
    return out or "x"


@dataclass(frozen=True)
class TransformSpec:
    """Eval preprocessing, resolved from the model's pretrained config.

    Attributes mirror ``timm.data.resolve_data_config``.
    """

    input_size: tuple[int, int, int]
    interpolation: str
    crop_pct: float
    crop_mode: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_size": list(self.input_size),
            "interpolation": self.interpolation,
            "crop_pct": float(self.crop_pct),
            "crop_mode": self.crop_mode,
            "mean": [float(m) for m in self.mean],
            "std": [float(s) for s in self.std],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TransformSpec":
        return cls(
            input_size=tuple(int(v) for v in d["input_size"]),
            interpolation=str(d["interpolation"]),
            crop_pct=float(d["crop_pct"]),
            crop_mode=str(d["crop_mode"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
        )


# The paper's train-time augmentation (appendix B), used for the extra views.
PAPER_AUGMENTATION = (
    "RandomHorizontalFlip(p=0.5); ColorJitter(brightness=0.25, contrast=0.25, "
    "saturation=0.25, hue=0.25); RandomRotation(degrees=2)"
)


@dataclass(frozen=True)
class ExtractionSpec:
    """Everything that determines the features of one group.

    Attributes
    ----------
    model : str
        timm architecture name.
    weights : str
        Weight source name (``embedded``, ``hub``, ``checkpoint``, ``random``).
    weights_sha256 : str
        Digest of the weights: the file's sha256 for files, else of the state dict.
    layer : str
        ``pre_logits`` or a module name of the model.
    pooling : str
        How a spatial map or token sequence becomes one vector per image.
    dataset : str
        Registered dataset name (``imagefolder:`` carries its absolute path).
    split : str
        Split name (``train``, ``test``, ...).
    limit : int or None
        Stratified, seeded subset size of the split; None = all of it.
    seed : int
        Seed of the subset and of the augmentation views.
    views : int
        Number of extra augmented passes (train split only).
    dtype : str
        Storage dtype of the features, ``float16`` or ``float32``.
    compute : str
        ``float32`` or ``autocast-float16`` / ``autocast-bfloat16`` (GPU autocast).
    transform : TransformSpec
        Eval preprocessing.
    augmentation : str
        Description of the view augmentation ("" when ``views == 0``).
    chunk_rows : int
        Rows per Zarr chunk.
    """

    model: str
    weights: str
    weights_sha256: str
    layer: str
    pooling: str
    dataset: str
    split: str
    limit: int | None
    seed: int
    views: int
    dtype: str
    compute: str
    transform: TransformSpec
    augmentation: str = ""
    chunk_rows: int = 0
    format_version: int = FORMAT_VERSION
    extra: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.dtype not in ("float16", "float32"):
            raise InvalidParameterError(
                f"dtype={self.dtype!r} is not supported; choose float16 or float32"
            )
        if self.limit is not None and self.limit <= 0:
            raise InvalidParameterError(
                f"limit={self.limit!r} must be a positive number of images (or None for all)"
            )
        if self.views < 0:
            raise InvalidParameterError(f"views={self.views!r} must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["transform"] = self.transform.to_dict()
        d["extra"] = [list(kv) for kv in self.extra]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExtractionSpec":
        d = dict(d)
        d["transform"] = TransformSpec.from_dict(d["transform"])
        d["extra"] = tuple(tuple(kv) for kv in d.get("extra", ()))
        return cls(**d)

    def key(self) -> str:
        """sha256 over the canonical JSON of every field: the group's identity."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def group_name(self) -> str:
        """Readable, path-safe group name that ends in the key's first 12 hex digits."""
        parts = [self.model, self.layer, self.dataset.split(":", 1)[0], self.split]
        return "__".join(slug(p) for p in parts) + "__" + self.key()[:12]

    def diff(self, other: "ExtractionSpec") -> dict[str, tuple[Any, Any]]:
        """Fields that differ between two specs, as ``{name: (self, other)}``."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b.get(k)) for k in a if a[k] != b.get(k)}
