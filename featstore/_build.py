"""`featstore build`: run a backbone once over a dataset and write Zarr feature groups.

The pass is crash-safe and resumable. Rows are processed in blocks; each group's
chunk is written (atomically, by zarr's local store) and only then marked in the
group's ``progress`` array; the group's ``state`` becomes ``complete`` only after
every chunk of every view is marked. A build killed at any moment and run again
recomputes only unmarked chunks. This module plans a build (options, sources, the
bad-image check, group keys) and runs it split by split; creating and reopening groups is
``_groups``, the pass itself (loading, the forward, value checks, the writer thread)
``_pass``, a pass shared by many workers ``_distribute``, the preprocessing registry
``_preprocess``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field, create_model

from . import _distribute, datasets, models
from ._decode import Decode, DevicePreprocess
from ._device import Device, resolve_device
from .models import MappingName, WeightSourceName
from ._spec import (
    TokenNorm,
    ChunkRows,
    Dtype,
    ExtractionSpec,
    Limit,
    Name,
    Pooling,
    Seed,
    TransformSpec,
    Views,
)
from ._store import DEFAULT_STORE, META, FeatureStore, Group, _check_writable
from .errors import (
    BadImagesError,
    IncompatibleParametersError,
    InvalidDatasetError,
    StoreNotFoundError,
    UnknownNameError,
)
from .params import Check, CommaList, OneOf, Parameters, PathText, takes
from ._groups import open_target
from ._groups import versions as group_versions
from ._pass import FORWARD_PRECISIONS, run_pass
from ._preprocess import PREPROCESSING, Preprocessing, make_transforms, resolve_transform
from ._launchers import LAUNCHERS
from ._slurm import slurm_fields

# --precision's choices: FORWARD_PRECISIONS's keys
ForwardPrecision = Literal[tuple(FORWARD_PRECISIONS)]

__all__ = ["build", "BuildOptions", "chunk_rows_for", "resolve_transform", "make_transforms", "PREPROCESSING",
           "Preprocessing"]

CHUNK_TARGET_BYTES = 8 << 20  # ~8 MB of uncompressed rows per chunk


def chunk_rows_for(n_neurons: int, dtype: str, target_bytes: int = CHUNK_TARGET_BYTES) -> int:
    """Rows per chunk: a power of two near ``target_bytes`` of whole rows (64..65536).

    Powers of two make the chunks of several layers written in one pass nest, so a
    block of the smallest chunk size always lies inside one chunk of every group.
    """
    itemsize = np.dtype(dtype).itemsize
    rows = max(1, target_bytes // max(1, n_neurons * itemsize))
    return int(min(65536, max(64, 1 << int(np.floor(np.log2(rows))))))





def _is_model_arg(value) -> bool:
    """Text or a module; the text's form and its source are checked by ``parse_model_name`` in
    the plan, whose errors say which part is wrong (an unknown source, a path in a name)."""
    if isinstance(value, str):
        return bool(value)
    import torch

    return isinstance(value, torch.nn.Module)


def _describe_model_arg() -> str:
    from ._sources import describe_model_names

    return describe_model_names() + ", or (from Python) a torch.nn.Module"


ModelArg = Annotated[Any, Check(_is_model_arg, _describe_model_arg)]
"""What ``featstore build --model`` (and ``featstore.build(model=...)``) takes."""


class _BuildOptions(Parameters):

    model: ModelArg = models.EMBEDDED_MODEL
    """The backbone: a timm name, or SOURCE:NAME (open_clip:ViT-B-32@TAG, hf:facebook/dinov2-small or hf:DIR,
    torchvision:resnet50); from Python also a torch.nn.Module (with name= and preprocess=). `featstore layers
    MODEL` lists its layers."""
    weights: WeightSourceName | None = None
    """Weight source: embedded, hub, checkpoint or random (default: embedded for tf_efficientnet_lite0, else hub)."""
    checkpoint: PathText | None = None
    """Checkpoint file for --weights checkpoint (safetensors or a torch state dict)."""
    mapping: Annotated[MappingName, Field(json_schema_extra={"flag": "--map"})] = "names"
    """How checkpoint tensors map onto the model: names or positional."""
    layers: Annotated[tuple[Name, ...], Field(min_length=1, strict=False), CommaList()] = (models.PRE_LOGITS,)
    """Layers, all from one backbone pass: pre_logits and/or module names (comma-separated)."""
    pooling: Pooling = "avg"
    """Pooling of module layers: a spatial map's positions, or a token layer's patch tokens (avg, max), its
    class token (cls), both (cls+avg), every token (avg_all), or everything (flatten)."""
    norm: TokenNorm = "none"
    """For token layers: apply the model's final norm before pooling (final), as its own output does, or not."""
    dataset: datasets.DatasetText = "fashion-mnist"
    """A registered dataset, or SOURCE:WHERE: imagefolder:PATH, hf:PATH_OR_NAME, wds:URL_PATTERN, csv:FILE,
    parquet:FILE (`featstore datasets` lists them)."""
    hf_image_column: Name | None = None
    """hf: datasets: the image column (default: the one Image feature)."""
    hf_label_column: Name | None = None
    """hf: datasets: the label column (default: the one ClassLabel feature)."""
    hf_id_column: Name | None = None
    """hf: datasets: a column of sample ids (default: split/row)."""
    wds_image_key: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    """wds: shards: the image member's extensions, the first present taken (default: jpg;png)."""
    wds_label_key: Annotated[str, Field(min_length=1, max_length=50)] | None = None
    """wds: shards: the label member's extension, its text an integer or a class name (default: cls)."""
    splits: Annotated[tuple[str, ...], Field(min_length=1, strict=False), CommaList()] = ("train", "test")
    """Splits to extract (comma-separated)."""
    root: PathText | None = None
    """Where torchvision datasets live."""
    download: bool = False
    """Let torchvision download the dataset."""
    limit: Limit = None
    """Stratified, seeded subset of N images per split (default: all)."""
    per_class: Limit = None
    """k-shot: a seeded subset of K images of every class per split (an error names the classes with fewer);
    part of the group's key. Not with --limit."""
    seed: Seed = 0
    """Seed of --limit and --views."""
    views: Views = 0
    """Extra augmented passes over the train split."""
    preset: Annotated[str, OneOf(PREPROCESSING, "preprocessing preset")] = "paper"
    """Eval preprocessing and view augmentation: paper (the model's pretrained config, the paper's augmentation)
    or original (the released code's Resize + CenterCrop 224 and RandomResizedCrop views)."""
    dtype: Dtype = "float16"
    """Storage dtype (float16 holds magnitudes up to 65,504: a layer beyond that is refused, naming the fix)."""
    precision: ForwardPrecision | None = None
    """The forward's precision: fp32, or fp16 / bf16 autocast (default: fp16 on CUDA, fp32 on the CPU). Part of
    the group's key; --dtype float32 --precision fp32 gives true float32 features on a GPU (TF32 off)."""
    bad_images: Literal["fail", "skip"] = "fail"
    """Image files that cannot be decoded (empty, truncated, not an image, too large): fail (one error naming
    each, before any group is created) or skip (left out; the group records them, and the policy and the
    skipped set are part of its key)."""
    decode: Decode = "pil"
    """Where the clean pass's JPEG files are decoded and preprocessed: pil (PIL in the DataLoader workers) or
    device (the workers only read the bytes; torchvision decodes batches on the build's device, nvJPEG on CUDA,
    and the model's resize, crop and normalisation run there; what it cannot take, the augmented views and
    non-JPEG files, goes through PIL). Part of the group's key: the pixels differ by rounding."""
    check: Annotated[bool, Field(json_schema_extra={
        "off": "Skip the check of every image file before the pass, for trusted data (a bad file then stops the "
               "pass where it is, resumable)"})] = True
    """Check every image file before the pass (a fast parallel header and reduced-size decode); turn off for
    trusted data (a bad file then stops the pass where it is, resumable)."""
    store: PathText = DEFAULT_STORE
    """Store path or URL."""
    batch_size: Annotated[int, Field(ge=1, le=65536)] | None = None
    """Forward batch size (default: 16 on CPU, 256 on CUDA)."""
    workers: Annotated[int, Field(ge=0, le=256)] | None = None
    """DataLoader worker processes (default: on CPU min(4, cores - 1), the forward needs the rest; on CUDA
    cores - 1, decoding is what feeds the GPU)."""
    device: Device = "auto"
    """auto (cuda when present), cpu, cuda or cuda:N."""
    launcher: Annotated[str, OneOf(LAUNCHERS, "launcher")] = "local"
    """Where the build's workers run: local (this process, or --jobs spawned processes on this machine), joblib,
    dask (a local cluster, or --scheduler) or slurm (the --slurm-* options); every worker fills rows of the same
    groups, each row range once (featstore._distribute)."""
    jobs: Annotated[int, Field(ge=1, le=4096)] | None = None
    """Workers filling the groups together (default: one per --devices entry, else 1)."""
    devices: Annotated[tuple[Device, ...], Field(min_length=1, strict=False), CommaList()] | None = None
    """--launcher local: one worker per device (cuda:0,cuda:1,...), each a spawned process (CUDA never forked)."""
    scheduler: str | None = None
    """--launcher dask: an existing scheduler's address (tcp://host:8786); its workers must reach the store."""
    image_size: Annotated[int, Field(ge=8, le=4096)] | None = None
    """Override the model's input size in pixels (tests, quick looks)."""
    chunk_rows: ChunkRows | None = None
    """Rows per chunk (default: a power of two near 8 MB)."""
    progress: Annotated[bool, Field(json_schema_extra={"off": "No progress bar"})] = True
    """Show a progress bar with images/s."""
    wait: Annotated[bool, Field(json_schema_extra={
        "off": "When another build holds a group, exit with an error naming it instead of waiting"})] = True
    """When another build holds a group, wait for it (else exit with an error)."""
    name: Annotated[Name | None, Field(json_schema_extra={"cli": False})] = None
    """From Python, with model=a torch.nn.Module: the name its groups go by (module:NAME)."""
    preprocess: Annotated[TransformSpec | None, Field(json_schema_extra={"cli": False})] = None
    """From Python, with model=a torch.nn.Module: its eval preprocessing (input_size, interpolation, crop_pct,
    crop_mode, mean, std; a TransformSpec or a dict), recorded in the groups' key."""


BuildOptions = create_model(
    "BuildOptions", __base__=_BuildOptions,
    __doc__="Everything ``featstore build`` takes, declared once: ``featstore.build``'s keywords and the command "
            "line's options both come from here. ``slurm_*`` are :class:`featstore._slurm.SlurmOptions` for "
            "--launcher slurm (its jobs are --jobs).",
    **slurm_fields("", leave_out=("jobs",)))
BuildOptions.__module__ = __name__


def default_workers(device: str) -> int:
    """DataLoader workers when --workers is not given: on CPU the forward pass needs the cores,
    so at most 4 decode; on a GPU decoding is the bottleneck, so every core but the main one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, cores - 1) if device.startswith("cuda") else max(0, min(4, cores - 1))


@dataclass
class _Plan:
    """Everything a build needs, resolved and checked before anything is written."""

    options: BuildOptions
    dataset: str  # canonical: imagefolder paths absolute
    device: str
    batch_size: int
    workers: int
    backbone: object
    weights: models.WeightsInfo
    extractor: models.FeatureExtractor
    transform: TransformSpec
    widths: dict[str, int]  # neurons per layer
    sources: dict[str, datasets.ImageSource]  # per split
    skipped: dict[str, list[tuple[str, str]]]  # per split: (sample id, reason) of the files left out
    decoder: object = None  # _decode.DevicePreprocess with decode="device"
    model_name: str = ""  # as the groups record it (a source prefix; a local path absolute)
    model_provenance: dict | None = None  # library, version, constructor call, preprocessing
    identity: dict = field(default_factory=dict)  # per split: what besides its name determines its rows
    dropped: dict = field(default_factory=dict)  # per split: source positions the check left out (skip)

    @property
    def precision(self) -> str:
        return self.options.precision or ("fp16" if self.device.startswith("cuda") else "fp32")

    @property
    def compute(self) -> str:
        """What the group records of the forward's precision (``ExtractionSpec.compute``)."""
        return FORWARD_PRECISIONS[self.precision][0]


@takes(BuildOptions, extra=("log",))
def build(o: BuildOptions, log=None) -> list[Group]:
    """Extract features once and write one group per (layer, split).

    Every keyword below is declared once, in :class:`BuildOptions` (the command line's
    options come from the same declarations), and checked before any work: a bad value is
    one error naming the keyword, and nothing is written. Resumable: call it again after an
    interruption.

    {parameters}
    log : callable, optional
        Receives status lines (default: printed to stderr).

    Returns
    -------
    list of Group
        The complete groups, one per (layer, split).
    """
    say = log or (lambda msg: print(msg, file=sys.stderr))
    o = _with_module(o)
    o = _distribute.check_launch(o)
    # a shared build's coordinator plans on the CPU when its workers take GPUs: CUDA stays untouched here
    plan = _plan(o, device="cpu" if _distribute.distributed(o) and _distribute.worker_kind(o) == "cuda" else None)
    # under --bad-images fail a group's key does not depend on the check, so only the images the
    # pass will read are checked: the split's subset (--limit, --per-class), less the rows that
    # partial groups already hold; a no-op rebuild reads no image, a resumed one only what it needs
    rows = None
    if o.bad_images == "fail":
        try:
            existing = FeatureStore(o.store, mode="r")
        except StoreNotFoundError:
            existing = None
        rows = {split: _rows_to_read(plan, existing, split) for split in o.splits}
    _check_sources(plan, rows)  # before the store is created: a bad file changes nothing on disk
    fs = FeatureStore(o.store, mode="a")
    built: list[Group] = []
    try:
        for split in o.splits:
            built += _extract(plan, fs, split, _specs(plan, split), say)
    finally:
        plan.extractor.close()
    return built


def _with_module(o: BuildOptions) -> BuildOptions:
    """A torch.nn.Module given as ``model``: registered under ``module:NAME`` (its name and its
    preprocessing required), so the rest of the build reads it like any source's model."""
    from ._sources import register_module

    if isinstance(o.model, str):
        for key in ("name", "preprocess"):
            if getattr(o, key) is not None and not o.model.startswith("module:"):
                raise IncompatibleParametersError(key=key, value=str(getattr(o, key))[:60],
                                                  reason="it names a torch.nn.Module given as model=; this model is "
                                                         f"{o.model!r}")
        return o
    missing = [k for k in ("name", "preprocess") if getattr(o, k) is None]
    if missing:
        raise IncompatibleParametersError(
            key="model", value=type(o.model).__name__,
            reason=f"a torch.nn.Module needs {' and '.join(k + '=' for k in missing)}: the name its groups go by, and "
                   f"its eval preprocessing (input_size, interpolation, crop_pct, crop_mode, mean, std)")
    return o.model_copy(update={"model": register_module(o.name, o.model, o.preprocess)})


def _plan(o: BuildOptions, device: str | None = None) -> _Plan:
    """Resolve and check everything that needs more than the options' own types: the dataset
    and its splits, the device (``device``: another than --device's, for a shared build's
    coordinator), the store path, the backbone and its layers. Writes nothing."""
    import torch

    if o.per_class is not None and o.limit is not None:
        raise IncompatibleParametersError(key="per_class", value=str(o.per_class),
                                          reason=f"--limit {o.limit} also picks the images; give one of them")
    dataset = check_dataset(o)
    device = device or resolve_device(o.device)
    _check_writable(str(o.store))
    if "://" in str(o.store):
        _check_url_store(str(o.store))
    FeatureStore.check_foreign(str(o.store))
    from ._sources import parse_model_name

    parsed = parse_model_name(o.model)
    source = models._source(parsed)
    model_name = str(type(parsed)(parsed.source, source.canonical(parsed.name) if source.canonical else parsed.name))
    made: dict = {}
    backbone, winfo = models.create_backbone(model_name, o.weights, o.checkpoint, o.mapping, seed=o.seed,
                                             provenance=made)
    extractor = models.FeatureExtractor(backbone, list(o.layers), o.pooling, model_name, norm=o.norm)
    tspec = PREPROCESSING[o.preset].transform(backbone, o.image_size) if o.preset != "paper" else \
        source.preprocess(backbone, parsed.name, o.image_size)
    if winfo.normalization is not None and (tspec.mean, tspec.std) != winfo.normalization:
        # the checkpoint was trained behind its own normaliser: preprocess as it expects (recorded
        # in the group's spec, so these features are never mistaken for the default's)
        tspec = tspec.model_copy(update={"mean": winfo.normalization[0], "std": winfo.normalization[1]})
    # probe the output widths with one tiny forward pass (cheap, catches bad layers early)
    with torch.no_grad():
        widths = {k: int(v.shape[1]) for k, v in extractor(torch.zeros((1,) + tuple(tspec.input_size))).items()}
    sources = {split: datasets.load_split(dataset, split, o.root, o.download, o.bad_images, _source_options(o))
               for split in o.splits}
    for split, src in sources.items():
        if len(src) == 0:
            raise InvalidDatasetError(dataset=dataset, problem=f"split {split!r} is empty")
    identity = {split: datasets.dataset_identity(dataset, split, _source_options(o)) for split in o.splits}
    decoder = None
    if o.decode == "device":
        no_files = [split for split, src in sources.items() if src.files is None]
        if no_files:
            raise IncompatibleParametersError(
                key="decode", value="device",
                reason=f"{dataset} ({', '.join(no_files)}) is not read from image files; build it with --decode pil")
        decoder = DevicePreprocess(make_transforms(tspec, PREPROCESSING[o.preset].augmentation)[0], device)
    # channels_last is ~2x faster for these convnets on CPU and the norm on GPU
    backbone.to(device=device, memory_format=torch.channels_last)
    # the preprocessing and provenance go with the model: how it was made, and how its inputs were
    made["preprocessing"] = tspec.to_dict()
    return _Plan(o, dataset, device, o.batch_size or (256 if device.startswith("cuda") else 16),
                 o.workers if o.workers is not None else default_workers(device),
                 backbone, winfo, extractor, tspec, widths, sources, {}, decoder, model_name, made, identity)


def check_dataset(o: BuildOptions) -> str:
    """The dataset's canonical name, its source options and every split to build checked
    (a folder that exists, a split it has); reads no image."""
    datasets.check_source_options(o.dataset, _source_options(o))
    dataset = datasets.canonical_dataset_name(o.dataset)
    valid_splits = datasets.dataset_splits(dataset, _source_options(o))
    for split in o.splits:
        if split not in valid_splits:
            raise UnknownNameError("split", split, valid_splits, context=f"dataset {dataset!r}")
    return dataset


def _check_url_store(url: str) -> None:
    """A build straight to object storage: S3 (its build locks are conditional writes, which
    s3fs speaks), the bucket there and the credentials taken; one error before any work."""
    from .remote import remote_fs

    if not url.startswith(("s3://", "s3a://")):
        raise IncompatibleParametersError(key="store", value=url, reason=(
            "a build writes to a local path or an s3:// URL (its locks are S3 conditional writes); build locally "
            "and `featstore push` to other object stores"))
    remote_fs(url)


def _source_options(o: BuildOptions) -> dict:
    """The dataset-source options (``--hf-image-column``, ...) as the sources read them."""
    from ._datasources import SOURCE_OPTIONS

    return {key: getattr(o, key) for key in SOURCE_OPTIONS}


def _is_complete(fs: FeatureStore, spec: ExtractionSpec) -> bool:
    z = fs.raw_group(spec.group_name())
    return z is not None and z.attrs.asdict().get(META, {}).get("state") == "complete"


def _subset(plan: _Plan, src) -> np.ndarray:
    """Positions of the split's images a build takes: all, --limit's stratified subset or
    --per-class's k of every class (seeded)."""
    o = plan.options
    if o.per_class is not None:
        return datasets.per_class_subset(src.targets, o.per_class, o.seed, src.classes, plan.dataset)
    return datasets.stratified_subset(src.targets, o.limit, o.seed)


def _rows_to_read(plan: _Plan, existing: FeatureStore | None, split: str) -> np.ndarray:
    """Positions (in the split's source) of the images the pass over ``split`` still reads:
    its subset's rows that some group of the split does not hold yet (every view of their
    chunk done); none when every group is complete."""
    index = _subset(plan, plan.sources[split])
    todo = np.zeros(len(index), dtype=bool)
    for spec in _specs(plan, split).values():
        z = existing.raw_group(spec.group_name()) if existing is not None else None
        meta = z.attrs.asdict().get(META, {}) if z is not None else {}
        if meta.get("state") == "complete":
            continue
        if z is None or "progress" not in z.array_keys() or int(z["progress"].shape[1]) * spec.chunk_rows < len(index):
            return index  # not started (or not resumable as it is): every row
        chunk_done = z["progress"][:].astype(bool).all(axis=0)
        todo |= ~np.repeat(chunk_done, spec.chunk_rows)[:len(index)]
    return index[todo]


def _check_sources(plan: _Plan, rows: dict | None = None) -> None:
    """Check the image files of the splits to build (``rows``: per split, the positions to check;
    None: all of them): under ``fail`` every bad file of every split in one error, before any
    group is created; under ``skip`` they are left out and recorded (``plan.skipped``, part of
    the groups' keys)."""
    o, sources = plan.options, plan.sources

    def check(split, src):
        positions = np.arange(len(src)) if rows is None else np.asarray(rows[split], dtype=int)
        if not len(positions):  # every group of the split is complete: nothing to read
            return []
        found = datasets.check_images([src.files[i] for i in positions], progress=o.progress,
                                      label=f"checking {split} images")
        return [(int(positions[i]), why) for i, why in found]

    bad = {split: check(split, src) for split, src in sources.items() if o.check and src.files}
    if o.bad_images == "fail" and any(bad.values()):  # every bad file of every split, in one error
        raise BadImagesError(
            dataset=plan.dataset,
            files=[f"{sources[split].files[i]}: {why}" for split, found in bad.items() for i, why in found],
            fix="Nothing was built. Remove or replace them, or build with --bad-images skip to leave them out "
                "(recorded with the group)")
    for split, src in sources.items():  # what the sources left out themselves (a missing shard)
        if src.skipped:
            plan.skipped[split] = list(src.skipped)
    for split, found in bad.items():
        if found:
            plan.dropped[split] = [i for i, _ in found]
            plan.skipped[split] = plan.skipped.get(split, []) + [(sources[split].sample_ids[i], why)
                                                                 for i, why in found]
            sources[split] = sources[split].without([i for i, _ in found])
    for split, src in sources.items():
        if len(src) == 0:
            raise InvalidDatasetError(dataset=plan.dataset, problem=f"split {split!r} is empty")


def _specs(plan: _Plan, split: str) -> dict[str, ExtractionSpec]:
    """One ExtractionSpec per layer of ``split``: what names and identifies each group."""
    o = plan.options
    n_views = o.views if split == "train" else 0
    return {layer: ExtractionSpec(
        model=plan.model_name,
        weights=plan.weights.source,
        weights_sha256=plan.weights.sha256,
        layer=layer,
        pooling="model" if layer == models.PRE_LOGITS else o.pooling,
        dataset=plan.dataset,
        split=split,
        limit=o.limit,
        seed=o.seed,
        views=n_views,
        dtype=o.dtype,
        compute=plan.compute,
        transform=plan.transform,
        augmentation=PREPROCESSING[o.preset].augmentation if n_views else "",
        chunk_rows=o.chunk_rows or chunk_rows_for(plan.widths[layer], o.dtype),
        extra=_skip_record(o.bad_images, plan.skipped.get(split, [])) + ((("decode", o.decode),) if o.decode != "pil" else ())
        + _token_record(plan, layer) + plan.identity.get(split, ())
        + ((("per_class", str(o.per_class)),) if o.per_class is not None else ()),
    ) for layer in o.layers}


def _token_record(plan: _Plan, layer: str) -> tuple[tuple[str, str], ...]:
    """What a token layer adds to its group's key: avg / max over the patch tokens only (before,
    avg took every token: such groups keep their keys, and their features are what pooling
    avg_all gives now), and the final norm when applied. Nothing for maps and vectors."""
    o, record = plan.options, ()
    if layer == models.PRE_LOGITS or len(plan.extractor.shapes.get(layer, ())) != 3:
        return record
    if o.pooling in ("avg", "max") and plan.extractor.token_prefix(layer) > 0:
        record += (("tokens", f"patch ({plan.extractor.token_prefix(layer)} prefix tokens left out)"),)
    if o.norm == "final":
        record += (("norm", "final"),)
    return record


def _skip_record(policy: str, skipped: list[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """What the skip policy adds to a group's key: the policy and a digest of the skipped set
    (so a rebuild under the other policy, or with other files bad, is another group). The
    default policy adds nothing, so default builds keep their keys."""
    import hashlib

    if policy == "fail":
        return ()
    digest = hashlib.sha256("\n".join(sorted(sid for sid, _ in skipped)).encode()).hexdigest()[:16]
    return (("bad_images", policy), ("skipped", f"{len(skipped)} files, sha256 {digest}"))


def _extract(plan: _Plan, fs: FeatureStore, split: str, specs: dict[str, ExtractionSpec], say) -> list[Group]:
    """Under the groups' build locks: create or resume each group of ``split``, then one
    backbone pass over whatever rows and views are still missing."""
    o = plan.options
    if _distribute.distributed(o):
        return _distribute.extract_many(plan, fs, split, specs, say)
    src = plan.sources[split]
    index = _subset(plan, src)
    names = [s.group_name() for s in specs.values()]

    def on_wait(name, holder):
        say(f"featstore: group {name} is being built by {holder}; waiting for it to finish ...")

    with fs.lock(names, wait=o.wait, on_wait=on_wait) as guard:
        fs.reopen()
        targets = []
        versions = group_versions(plan.model_provenance)
        for layer, spec in specs.items():
            t = open_target(fs, spec, src, index, plan.widths[layer], versions, plan.weights, plan.device,
                             plan.skipped.get(split, []), plan.model_provenance)
            if t is None:
                say(f"featstore: {spec.group_name()} is already complete")
            else:
                targets.append((layer, t))
        if targets:
            eval_tf, aug_tf = make_transforms(plan.transform, PREPROCESSING[o.preset].augmentation)
            run_pass(plan.extractor, plan.backbone, targets, src, index, eval_tf, aug_tf, o.seed,
                      specs[o.layers[0]].views, plan.batch_size, plan.workers, plan.device, o.progress,
                      f"{o.model}:{plan.dataset}:{split}", plan.decoder, plan.precision, say, guard=guard)
        fs.reopen()
        groups = [fs.group(name) for name in names]
        built = {t.spec.group_name() for _, t in targets}
        for g in groups:  # what this call wrote, for its summary line (the others were already complete)
            g.built_now = g.name in built
        return groups
