"""Named protocols: sets of SubsetProbes parameter values (selection and training) a
researcher picks by name. A preset only supplies values; every value still goes through the
declarations, and a value given explicitly wins over the preset's.

``paper``
    The paper's text (appendix B): the declared defaults.
``original``
    The released code (nvedant07/diffused-redundancy with deep-learning-base), where it
    differs from the text: seeds 1-5, weight decay per dataset (5e-4 CIFAR-10/100, 1e-4
    otherwise), validation every 5 epochs, each seed's own minibatch order, training on
    augmented passes only, its 90/10 ``random_split`` after ``seed_everything(0)``, and its
    random-projection matrix for a seed. Its augmentation
    and eval preprocessing are ``featstore build --preset original``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from featstore.params import validate

from ._engine import Protocol
from ._selection import Selection

__all__ = ["Preset", "PRESETS", "preset"]

# deep-learning-base's dataset_metadata.py, by featstore's dataset names
ORIGINAL_WEIGHT_DECAY = {"cifar10": 5e-4, "cifar100": 5e-4, "flowers102": 1e-4, "oxford-pets": 1e-4}


def _paper(dataset: str | None) -> dict[str, Any]:
    return {}


def _original(dataset: str | None) -> dict[str, Any]:
    return dict(seeds=(1, 2, 3, 4, 5), randproj_distribution="original",
                weight_decay=ORIGINAL_WEIGHT_DECAY.get(dataset or "", 1e-4), val_every=5,
                minibatch_order="per-seed", train_passes="views", select_epoch="best", val_split="random_split",
                random_state=0, val_fraction=0.1)


@dataclass(frozen=True)
class Preset:
    """One named protocol.

    Attributes
    ----------
    name : str
    values : callable
        ``values(dataset) -> {parameter: value}``, the Selection and Protocol values it sets
        (per dataset where the protocol depends on it).
    description : str
    """

    name: str
    values: Callable[[str | None], dict]
    description: str


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("paper", _paper, "the paper's text (appendix B): the declared defaults"),
    Preset("original", _original, "the released code: seeds 1-5, weight decay per dataset, validation every 5 "
                                  "epochs, per-seed minibatch order, augmented passes only, its randproj matrix"),
)}


def preset(name: str, dataset: str | None = None, **overrides) -> dict[str, Any]:
    """Every Selection and Protocol parameter under preset ``name`` (for ``dataset``), with
    ``overrides`` on top, checked against the declarations.

    >>> est = probes.SubsetProbes(**probes.preset("original", dataset="cifar10"), device="cuda")
    """
    from featstore.errors import UnknownNameError

    if name not in PRESETS:
        raise UnknownNameError("preset", name, PRESETS)
    values = {**PRESETS[name].values(dataset), **overrides}
    selection = validate(Selection, {k: v for k, v in values.items() if k in Selection.model_fields},
                         prefix="preset.")
    protocol = validate(Protocol, {k: v for k, v in values.items() if k in Protocol.model_fields}, prefix="preset.")
    unknown = set(values) - set(Selection.model_fields) - set(Protocol.model_fields)
    if unknown:
        from featstore.errors import UnknownKeyError

        name = sorted(unknown)[0]
        raise UnknownKeyError(key=f"preset.{name}", value=values[name],
                              allowed=list(Selection.model_fields) + list(Protocol.model_fields))
    return {**selection.model_dump(), **protocol.model_dump()}
