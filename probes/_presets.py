"""Named protocols: sets of SubsetProbes parameter values (selection and training) a
researcher picks by name. A preset only supplies values; every value still goes through the
declarations, and a value given explicitly wins over the preset's.

``paper``
    The paper's text (appendix B): the declared defaults.
``original``
    The released code (nvedant07/diffused-redundancy with deep-learning-base), where it
    differs from the text: seeds 1-5, the schedule of the released script for the dataset
    (:data:`ORIGINAL_SCHEDULES`: epochs, lr step, batch size, weight decay, and which images
    validation scored), validation every 5 epochs, each seed's own minibatch order, training
    on augmented passes only, its 90/10 ``random_split`` after ``seed_everything(0)``, and its
    random-projection matrix for a seed. Its augmentation and eval preprocessing are
    ``featstore build --preset original``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from featstore.params import validate

from ._engine import Protocol
from ._selection import Selection

__all__ = ["Preset", "PRESETS", "preset", "ReleasedSchedule", "ORIGINAL_SCHEDULES"]

@dataclass(frozen=True)
class ReleasedSchedule:
    """How the released code trained the probes of one downstream dataset.

    Attributes
    ----------
    dataset : str
        featstore's name for it (a registry name; ``imagenet`` / ``places365`` for image folders,
        chosen with a sweep's ``preset_dataset``).
    epochs, lr_step, batch_size : int
        The script's epochs, step_lr and batch_size arguments.
    weight_decay : float
        ``DATASET_PARAMS[dataset]["weight_decay"]`` of deep-learning-base's ``dataset_metadata.py``
        (the finetuning script passes ``training_params_dataset=args.finetuning_dataset``).
    val_transform : {"augmented", "clean"}
        Which images validation scored: a ``random_split`` of the train set keeps the train
        transform (a ``Subset`` never replaces it), so augmented views; an official validation
        split is read with the test transform, so clean images.
    source : str
        The released file(s) each value comes from.
    """

    dataset: str
    epochs: int
    lr_step: int
    batch_size: int
    weight_decay: float
    val_transform: str
    source: str

    def values(self) -> dict[str, Any]:
        return dict(epochs=self.epochs, lr_step=self.lr_step, batch_size=self.batch_size,
                    weight_decay=self.weight_decay, val_transform=self.val_transform)


_SCRIPTS = "nvedant07/diffused-redundancy scripts/"
_METADATA = "; weight decay: nvedant07/deep-learning-base datasets/dataset_metadata.py"
ORIGINAL_SCHEDULES: dict[str, ReleasedSchedule] = {s.dataset: s for s in (
    ReleasedSchedule("cifar10", 100, 20, 256, 5e-4, "augmented",
                     _SCRIPTS + "finetuning_imagenet-resnet50nonrob-cifar10.sh" + _METADATA),
    ReleasedSchedule("cifar100", 100, 20, 256, 5e-4, "augmented",
                     _SCRIPTS + "finetuning_imagenet-resnet50nonrob-cifar100.sh" + _METADATA),
    ReleasedSchedule("flowers102", 100, 20, 256, 1e-4, "clean",
                     _SCRIPTS + "finetuning_imagenet-resnet50nonrob-flowers.sh" + _METADATA + " ('flowers')"),
    ReleasedSchedule("oxford-pets", 100, 20, 256, 1e-4, "augmented",
                     _SCRIPTS + "finetuning_imagenet-resnet50nonrob-oxford-pets.sh" + _METADATA
                     + " ('oxford-iiit-pets')"),
    ReleasedSchedule("places365", 50, 5, 1024, 5e-4, "augmented",
                     _SCRIPTS + "finetuning_imagenet-resnet50nonrob-places365-slurm-1.sh (fractions 0.0005 to 0.003; "
                                "places365.sh ran the full layer and 0.0005 for 100 epochs, step 20)" + _METADATA),
    ReleasedSchedule("imagenet", 10, 1, 512, 1e-4, "augmented",
                     _SCRIPTS + "finetuning_imagenet-resnet50nonrob-imagenet.sh (ResNet18's script: 25 epochs, "
                                "step 5)" + _METADATA),
)}
"""The released schedule of each downstream dataset (ResNet50's scripts); a dataset without one
keeps the declared defaults of those values under the ``original`` preset."""


def _paper(dataset: str | None) -> dict[str, Any]:
    return {}


def _original(dataset: str | None) -> dict[str, Any]:
    schedule = ORIGINAL_SCHEDULES.get(dataset or "")
    return dict(seeds=(1, 2, 3, 4, 5), randproj_distribution="original", val_every=5,
                minibatch_order="per-seed", train_passes="views", select_epoch="best", val_split="random_split",
                random_state=0, val_fraction=0.1, **(schedule.values() if schedule else {}))


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
    Preset("original", _original, "the released code: seeds 1-5, its schedule per dataset (epochs, lr step, batch "
                                  "size, weight decay, augmented or clean validation), validation every 5 epochs, "
                                  "per-seed minibatch order, augmented passes only, its randproj matrix"),
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
