"""The sweep spec: a TOML file validated against declarations the sweep does not own.

Every key of a spec comes from a declaration elsewhere, so a parameter has one name,
one type, one range and one default wherever it appears:

``[[groups]]``
    Query keys of the store (``featstore.QUERY_KEYS``), typed by the
    :class:`featstore.ExtractionSpec` fields they select on; ``train`` / ``test`` tables
    hold the keys that may differ between the two splits (:data:`SPLIT_KEYS`).
``[selection]``
    ``modes`` (a list of :class:`probes.Selection`'s ``mode``) and the rest of
    :class:`probes.Selection` (``fractions``, ``seeds``, ``randproj_distribution``).
``[probe]``
    Exactly :class:`probes.Protocol`, the estimator's training parameters.
``[metrics]``
    ``accuracy``, ``cka``, and ``cka_`` + each field of :class:`probes.CKAOptions`.
``[slurm]``
    Exactly :class:`SlurmOptions`: where ``--launcher slurm`` runs (not part of the key).

The content hash (:meth:`SweepSpec.key`) covers every value with the defaults filled in,
so a changed default gives another key and a resumed sweep never mixes two protocols.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, create_model, field_validator, model_validator

import probes
from featstore import DEFAULT_STORE, QUERY_KEYS, BuildOptions, DatasetText, ExtractionSpec, parse_dataset_name
from featstore.datasets import DATASETS
from featstore.errors import SpecNotFoundError, SpecSyntaxError
from featstore.params import OneOf, Parameters, PathText, Rule, Unique, field_type, validate

from featstore._slurm import SlurmOptions

__all__ = ["SweepSpec", "GroupTable", "load_spec", "SPLIT_KEYS", "GROUP_KEYS", "SPLIT_ONLY_FIELDS", "CKA_PREFIX"]

# Query keys a [[groups]] table's train / test sub-tables set: they may differ between the
# two groups of one pairing. The rest of the store's query keys describe the pairing.
SPLIT_KEYS = ("split", "limit", "views")
GROUP_KEYS = tuple(k for k in QUERY_KEYS if k not in SPLIT_KEYS)
# ExtractionSpec fields that may differ between a pairing's train and test groups: the split
# keys, and what follows from them (views bring an augmentation; chunk rows follow n).
SPLIT_ONLY_FIELDS = frozenset(SPLIT_KEYS) | {"augmentation", "chunk_rows"}
CKA_PREFIX = "cka_"


def _query_fields(keys) -> dict[str, Any]:
    """Optional fields typed as the ExtractionSpec fields they select on (None: any)."""
    return {k: (field_type(ExtractionSpec, k) | None,
                Field(default=None, description=ExtractionSpec.model_fields[k].description)) for k in keys}


SplitTable = create_model("SplitTable", __base__=Parameters, __doc__="Keys of one split's group.",
                          **_query_fields(SPLIT_KEYS))


ProbeOverrides = create_model(
    "ProbeOverrides", __base__=Parameters,
    __doc__="A [[groups]] table's own [probe] keys: probes.Protocol's, each optional; they win over [probe].",
    **{k: (field_type(probes.Protocol, k) | None, Field(default=None, description=f.description))
       for k, f in probes.Protocol.model_fields.items()})


TestTable = create_model(
    "TestTable", __base__=SplitTable, __doc__="Keys of the test group, which may come from another dataset.",
    dataset=(DatasetText | None, Field(default=None, description="Evaluate on another dataset with the same "
                                                                 "classes (ImageNetV2 for an ImageNet probe).")),
    class_map=(str | None, Field(default=None, description="How its classes map onto train's: by-name (default: the "
                                                           "same names), by-index (each class folder's name is the "
                                                           "index of a train class, as ImageNetV2's 0..999), or a JSON "
                                                           "file {its class: train's class}.")))


class GroupTable(create_model("_GroupQuery", __base__=Parameters, **_query_fields(GROUP_KEYS))):
    """One ``[[groups]]`` table: a (train, test) pairing of cached feature groups."""

    model: field_type(ExtractionSpec, "model")
    """timm architecture of both groups."""
    dataset: DatasetText
    """Dataset of both groups."""
    layer: field_type(ExtractionSpec, "layer") = BuildOptions.model_fields["layers"].default[0]
    """Layer of both groups (the build's default layer when omitted)."""
    layers: Annotated[tuple[field_type(ExtractionSpec, "layer"), ...], Field(strict=False), Unique()] = ()
    """Several layers of the model instead of one: one pairing per layer, in this order (a depth trend; build
    them in one pass with --layers)."""
    train: SplitTable = SplitTable()
    """Keys of the train group only (split, limit, views)."""
    test: TestTable = TestTable()
    """Keys of the test group only (split, limit, views), and dataset / class_map to evaluate on another dataset."""
    val: SplitTable | None = None
    """The validation group's keys (val = { split = "val" }): it picks each probe's best epoch, and all of train
    trains. Default: the dataset's official val split when the registry has one (flowers102), else a seeded
    share of train."""
    probe: ProbeOverrides = ProbeOverrides()
    """This pairing's own protocol keys ([groups.probe] or probe = {...}), over [probe] and the preset."""
    name: Annotated[str, Field(min_length=1, max_length=80)] | None = None
    """What the report calls this pairing in its figures and sentences (say "SGD, released schedule"): default,
    model / layer / dataset, and the protocol keys where the sweep's pairings differ in them."""
    preset_dataset: Annotated[str, OneOf(probes.ORIGINAL_SCHEDULES, "dataset with a released schedule")] | None = None
    """Which dataset's values of a per-dataset preset this pairing takes (the original preset's released
    schedules, probes.ORIGINAL_SCHEDULES): default, its dataset's registry name; an image folder names its own
    (imagenet, places365)."""

    @model_validator(mode="after")
    def _layer_or_layers(self):
        if self.layers and "layer" in self.model_fields_set:
            raise Rule(f"it names layer = {self.layer!r} and layers = {list(self.layers)}: give one of them")
        return self

    def pairings(self) -> list["GroupTable"]:
        """The table itself, or one copy per layer of ``layers``."""
        if not self.layers:
            return [self]
        return [self.model_copy(update={"layer": layer, "layers": ()}) for layer in self.layers]

    def query(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in GROUP_KEYS if getattr(self, k) is not None}

    def train_query(self) -> dict[str, Any]:
        return {**self.query(), "split": "train", **self.train.model_dump(exclude_none=True)}

    def test_query(self) -> dict[str, Any]:
        return {**self.query(), "split": "test", **self.test.model_dump(exclude_none=True, exclude={"class_map"})}

    def class_map(self) -> str | None:
        """How the test classes map onto train's: None when both come from one dataset."""
        if self.test.dataset is None or self.test.dataset == self.dataset:
            return None
        return self.test.class_map or "by-name"

    def val_query(self) -> dict[str, Any] | None:
        """The validation group's query, or None (a seeded share of train validates)."""
        if self.val is not None:
            return {**self.query(), "split": "val", **self.val.model_dump(exclude_none=True)}
        parsed = parse_dataset_name(self.dataset)
        if not parsed.source and parsed.name in DATASETS and "val" in DATASETS[parsed.name].splits:
            return {**self.query(), "split": "val"}  # the registry's official validation split
        return None

    def label(self) -> str:
        return f"{self.model}/{self.layer}/{self.dataset}"


def _selection_fields() -> dict[str, Any]:
    declared = probes.Selection.model_fields
    mode = field_type(probes.Selection, "mode")
    fields = {"modes": (Annotated[tuple[mode, ...], Field(min_length=1, strict=False), Unique()],
                        Field(default=(declared["mode"].default,),
                              description="Selection modes, each trained and scored with every seed it takes."))}
    fields.update({k: (field_type(probes.Selection, k), Field(default=f.default, description=f.description,
                                                              validate_default=f.validate_default))
                   for k, f in declared.items() if k != "mode"})
    return fields


SelectionTable = create_model("SelectionTable", __base__=Parameters,
                              __doc__="The [selection] table: probes.Selection with a list of modes.",
                              __validators__={"fractions_or_sizes": field_validator("sizes")(probes.fractions_or_sizes)},
                              **_selection_fields())

MetricsTable = create_model(
    "MetricsTable", __base__=Parameters, __doc__="The [metrics] table: what each task measures.",
    accuracy=(bool, Field(default=True, description="Report each probe's test accuracy.")),
    cka=(bool, Field(default=True, description="Compute each subset's CKA with the whole layer.")),
    **{CKA_PREFIX + k: (field_type(probes.CKAOptions, k), Field(default=f.default, description=f.description))
       for k, f in probes.CKAOptions.model_fields.items()})


class SweepSpec(Parameters):
    """A parsed, validated sweep spec (see :func:`load_spec`)."""

    store: PathText = DEFAULT_STORE
    """The feature store (a path or URL); --store overrides it."""
    preset: Annotated[str, OneOf(probes.PRESETS, "preset")] = "paper"
    """Named protocol supplying the [selection] and [probe] values the spec does not write (probes.PRESETS):
    paper (the declared defaults) or original (the released code's, per dataset)."""
    groups: Annotated[tuple[GroupTable, ...], Field(min_length=1, strict=False)]
    """One [[groups]] table per (train, test) pairing of cached groups."""
    selection: SelectionTable = SelectionTable()
    """Which neurons or directions the probes see."""
    probe: probes.Protocol = probes.Protocol()
    """How each probe is trained (probes.Protocol)."""
    metrics: MetricsTable = MetricsTable()
    """What is measured."""
    slurm: SlurmOptions = SlurmOptions()
    """Where --launcher slurm runs the tasks (pipelines.SlurmOptions; the --slurm-* options override it). Not
    part of the spec's key: it changes where rows are computed, not what they are."""

    @field_validator("groups")
    @classmethod
    def _no_repeated_pairing(cls, groups):
        seen = {}
        for i, g in enumerate(groups):
            for p in g.pairings():
                key = json.dumps(p.model_dump(mode="json"), sort_keys=True)
                if key in seen:
                    raise Rule(f"groups[{i}] repeats the pairing {p.label()} of groups[{seen[key]}]: it would run "
                               f"twice; remove one (or give them different keys)")
                seen[key] = i
        return groups

    def pairings(self) -> list[GroupTable]:
        """The (train, test) pairings the sweep runs: each [[groups]] table, a ``layers`` table
        expanded to one per layer. Results' ``group`` column indexes this list."""
        return [p for g in self.groups for p in g.pairings()]

    def cka_options(self) -> dict[str, Any]:
        """The [metrics] cka_* keys as probes.CKAOptions keywords."""
        return {k: getattr(self.metrics, CKA_PREFIX + k) for k in probes.CKAOptions.model_fields}

    def selection_for(self) -> "SelectionTable":
        """[selection] as run: the preset's values under the ones the spec writes."""
        base = probes.preset(self.preset)
        written = self.selection.model_dump(include=self.selection.model_fields_set)
        return SelectionTable(**{**{k: base[k] for k in SelectionTable.model_fields if k in base}, **written})

    def protocol_for(self, group: GroupTable) -> probes.Protocol:
        """[probe] as run for one pairing: the preset's values for its dataset, under the ones
        [probe] writes, under the pairing's own [groups.probe]."""
        base = probes.preset(self.preset, group.preset_dataset or parse_dataset_name(group.dataset).label)
        written = self.probe.model_dump(include=self.probe.model_fields_set)
        own = group.probe.model_dump(exclude_none=True)  # the pairing's [groups.probe]
        return probes.Protocol(**{**{k: base[k] for k in probes.Protocol.model_fields}, **written, **own})

    def to_dict(self) -> dict[str, Any]:
        """The spec as written (defaults filled in) and as it runs (the preset resolved per pairing)."""
        d = self.model_dump(mode="json")
        d["resolved"] = {"selection": self.selection_for().model_dump(mode="json"),
                         "probe": [self.protocol_for(g).model_dump(mode="json") for g in self.pairings()]}
        return d

    def key(self) -> str:
        """sha256 of everything that determines the results, defaults included (not the store path nor
        the [slurm] table)."""
        d = self.to_dict()
        d.pop("store")
        d.pop("slurm")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def load_spec(source: str | os.PathLike | dict, store: str | None = None) -> SweepSpec:
    """Parse and validate a sweep spec from a TOML file (or an equivalent dict).

    Every problem is one error naming the key path (``probe.momentum``), the value, its
    type and what is expected, before any work; strings are never taken for numbers or
    booleans. Example::

        store = "data/featstore.zarr"

        [[groups]]
        model = "tf_efficientnet_lite0"
        layer = "pre_logits"
        dataset = "fashion-mnist"
        train = { limit = 5000 }      # keys of one split's group: split, limit, views
        test = { limit = 1000 }

        [selection]
        modes = ["random", "prefix", "pca", "randproj"]
        fractions = [0.01, 0.1, 0.5, 1.0]   # default: the paper's 22
        seeds = [0, 1, 2, 3, 4]

        [probe]
        epochs = 50                   # any probes.Protocol parameter

        [metrics]
        accuracy = true
        cka = true
        cka_estimator = "biased"      # or "unbiased", "minibatch"
    """
    if isinstance(source, dict):
        raw = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise SpecNotFoundError(path=str(path))
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise SpecSyntaxError(path=str(path), reason=str(e)) from None
        _relative_to(raw, path.resolve().parent)
    if store is not None:
        raw["store"] = store  # as the user typed it: relative to the working directory
    return validate(SweepSpec, raw)


def _relative_to(raw: dict, folder: Path) -> None:
    from featstore.datasets import resolve_dataset_path

    """A spec file's relative paths (its store, image folders, class-map files) as written from
    the file's own folder, as a build file's are: the spec means the same from any directory."""
    def resolve(text):
        if not isinstance(text, str) or "://" in text or Path(text).expanduser().is_absolute():
            return text
        return str((folder / text).resolve())

    if "store" in raw:
        raw["store"] = resolve(raw["store"])
    for table in raw.get("groups", []) if isinstance(raw.get("groups"), list) else []:
        if not isinstance(table, dict):
            continue
        tables = [table] + [table[k] for k in ("train", "test", "val") if isinstance(table.get(k), dict)]
        for t in tables:
            if isinstance(t.get("dataset"), str):
                t["dataset"] = resolve_dataset_path(t["dataset"], folder)
            if isinstance(t.get("class_map"), str) and t["class_map"] not in ("by-name", "by-index"):
                t["class_map"] = resolve(t["class_map"])
