"""The one description of an extraction: what determines a group's features.

An :class:`ExtractionSpec` is written into the group's Zarr attributes and its
:meth:`~ExtractionSpec.key` names the group, so two builds that would produce
different features can never share a group, and a group is never served for a
request it does not match (timm's ``PretrainedCfg`` and dask's ``tokenize`` idea).
"""

from __future__ import annotations

import hashlib
import json
import re
import typing
from typing import Annotated, Any, Literal

from pydantic import Field

from .datasets import parse_dataset_name
from .params import Check, Parameters, SeedValue

__all__ = ["ExtractionSpec", "TransformSpec", "FORMAT_VERSION", "slug", "Dtype", "DTYPES", "Pooling", "POOLINGS",
           "ModelText", "TokenNorm",
           "Limit", "Seed", "Views", "ChunkRows", "Name"]

# Bump when the on-disk layout changes incompatibly.
FORMAT_VERSION = 1

_SLUG_BAD = re.compile(r"[^A-Za-z0-9_.+-]+")

# The types of what determines an extraction, declared once: the build's options and the
# spec recorded with each group both use them.
Dtype = Literal["float16", "float32"]
"""Storage dtype of the features."""
DTYPES = typing.get_args(Dtype)
# avg / max over spatial positions, or over the patch tokens of a token layer (prefix tokens, CLS and
# registers, left out); avg_all over every token (what avg did for tokens before: such groups keep
# their keys); cls the first token; cls+avg both, side by side; flatten every value.
Pooling = Literal["avg", "max", "cls", "flatten", "avg_all", "cls+avg"]
TokenNorm = Literal["none", "final"]
"""How a spatial map (N, C, H, W) or a token sequence (N, T, C) becomes (N, C)."""
POOLINGS = typing.get_args(Pooling)
Limit = Annotated[int, Field(ge=1)] | None
Seed = SeedValue
Views = Annotated[int, Field(ge=0, le=1000)]
ChunkRows = Annotated[int, Field(ge=1, le=1 << 20)]


def _is_name(text) -> bool:
    return isinstance(text, str) and bool(text) and "/" not in text and "\\" not in text and ".." not in text


Name = Annotated[str, Check(_is_name, "a name without path separators or '..'")]
"""A layer (or timm model) name (it becomes part of a group's folder name)."""


def _is_model_name(text) -> bool:
    """The form of a recorded model name; its source need not be installed here (a group a
    third-party source wrote still opens)."""
    from ._sources import parse_model_name

    try:
        parse_model_name(text, registered=False)
    except (ValueError, LookupError):
        return False
    return True


def _describe_model_name() -> str:
    from ._sources import describe_model_names

    return describe_model_names() + "; `featstore layers MODEL` checks one"


ModelText = Annotated[str, Check(_is_model_name, _describe_model_name)]
"""A model name as a group records it: timm's without a prefix, other sources' as SOURCE:NAME."""


def slug(text: str) -> str:
    """A file-name-safe rendering of ``text`` (path separators and ``..`` removed)."""
    out = _SLUG_BAD.sub("-", text).strip("-.")
    out = out.replace("..", ".")
    return out or "x"


class TransformSpec(Parameters):
    """Eval preprocessing, resolved from the model's pretrained config.

    Attributes mirror ``timm.data.resolve_data_config``.
    """

    input_size: Annotated[tuple[int, int, int], Field(strict=False)]
    interpolation: str
    crop_pct: float
    crop_mode: str
    mean: Annotated[tuple[float, float, float], Field(strict=False)]
    std: Annotated[tuple[float, float, float], Field(strict=False)]

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TransformSpec":
        return cls(**d)


# The paper's train-time augmentation (appendix B), used for the extra views.
PAPER_AUGMENTATION = (
    "RandomHorizontalFlip(p=0.5); ColorJitter(brightness=0.25, contrast=0.25, "
    "saturation=0.25, hue=0.25); RandomRotation(degrees=2)"
)
# The released code's (deep-learning-base's TRAIN_TRANSFORMS_TRANSFER_DEFAULT(224)).
ORIGINAL_AUGMENTATION = (
    "RandomResizedCrop(input size); RandomHorizontalFlip(p=0.5); ColorJitter(brightness=0.25, contrast=0.25, "
    "saturation=0.25); RandomRotation(degrees=2)"
)


class ExtractionSpec(Parameters):
    """Everything that determines the features of one group (each field documented below)."""

    model: ModelText
    """The model: a timm architecture name, or SOURCE:NAME (open_clip:ViT-B-32, hf:facebook/dinov2-small, ...)."""
    weights: str
    """Weight source name (embedded, hub, checkpoint, random)."""
    weights_sha256: str
    """Digest of the weights: the file's sha256 for files, else of the state dict."""
    layer: Name
    """pre_logits or a module name of the model."""
    pooling: Pooling | Literal["model"]
    """How a spatial map or token sequence became one vector per image ("model" for pre_logits)."""
    dataset: str
    """Registered dataset name (imagefolder: carries its absolute path)."""
    split: str
    """Split name (train, test, ...)."""
    limit: Limit
    """Stratified, seeded subset size of the split; None = all of it."""
    seed: Seed
    """Seed of the subset and of the augmentation views."""
    views: Views
    """Number of extra augmented passes (train split only)."""
    dtype: Dtype
    """Storage dtype of the features."""
    compute: str
    """float32, or autocast-float16 / autocast-bfloat16 (GPU autocast)."""
    transform: TransformSpec
    """Eval preprocessing."""
    augmentation: str = ""
    """Description of the view augmentation ("" when there are no views)."""
    chunk_rows: Annotated[int, Field(ge=0)] = 0
    """Rows per Zarr chunk."""
    format_version: int = FORMAT_VERSION
    """The on-disk layout's version."""
    extra: Annotated[tuple[tuple[str, str], ...], Field(strict=False)] = ()
    """Further (key, value) facts that determine the features."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (lists for tuples): what the group's attributes record."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExtractionSpec":
        d = dict(d)
        d["transform"] = TransformSpec.from_dict(d["transform"])
        if "extra" in d:  # JSON stores the (key, value) pairs as lists
            d["extra"] = tuple(tuple(pair) for pair in d["extra"])
        return cls(**d)

    def key(self) -> str:
        """sha256 over the canonical JSON of every field: the group's identity."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def group_name(self) -> str:
        """Readable, path-safe group name that ends in the key's first 12 hex digits."""
        parts = [self.model, self.layer, parse_dataset_name(self.dataset).label, self.split]
        return "__".join(slug(p) for p in parts) + "__" + self.key()[:12]

    def diff(self, other: "ExtractionSpec") -> dict[str, tuple[Any, Any]]:
        """Fields that differ between two specs, as ``{name: (self, other)}``."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b.get(k)) for k in a if a[k] != b.get(k)}
