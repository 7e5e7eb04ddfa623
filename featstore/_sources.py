"""Model sources: where a backbone comes from, as one registry of small entries.

A model name's prefix picks the source, parsed once (:func:`parse_model_name`):

``timm`` (no prefix; the default)
    ``resnet50``, ``vit_small_patch16_224``: ``timm.create_model``; pre_logits is
    ``forward_head(forward_features(x), pre_logits=True)``. Group keys of timm models are what
    they always were.
``open_clip:NAME[@TAG]``
    ``open_clip:ViT-B-32@laion2b_s34b_b79k``: ``open_clip.create_model(NAME, pretrained=TAG)``
    (``--weights hub`` needs the tag; ``random`` builds the architecture untrained). Only the
    image tower runs; layers are its modules (``visual.transformer.resblocks.5``); pre_logits is
    ``encode_image(x)``, the image embedding.
``hf:ID_OR_DIR``
    ``hf:facebook/dinov2-small``, ``hf:/models/my-vit``: a transformers vision model
    (``AutoModel``: ViT, DINOv2, CLIP / SigLIP vision towers, ConvNeXt, ...). ``hub`` is
    ``from_pretrained`` (a local directory needs no network), ``random`` is ``from_config``;
    pre_logits is ``pooler_output`` (else the first token of ``last_hidden_state``).
``torchvision:NAME``
    ``torchvision:resnet50``: ``torchvision.models.get_model(NAME, weights=...)`` with its last
    ``Linear`` replaced by the identity (pre_logits); besides module names, graph nodes
    (``layer1.0.add``, ``flatten``) are layers, through torchvision's FX feature extraction.
``module:NAME``
    Any ``torch.nn.Module`` given to :func:`featstore.build` (``model=my_module, name=...,
    preprocess=...``); its weights' digest is part of the group's key.

Third-party sources register an entry point in the ``featstore.model_sources`` group whose
object is a :class:`ModelSource`; the command line sees them too.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import IncompatibleParametersError, InvalidParameterError, UnknownNameError

__all__ = ["ModelSource", "MODEL_SOURCES", "parse_model_name", "ModelName", "Token", "model_sources",
           "ENTRY_POINT_GROUP", "register_module", "describe_model_names"]

ENTRY_POINT_GROUP = "featstore.model_sources"
DEFAULT_SOURCE = "timm"
SEPARATOR = ":"


@dataclass(frozen=True)
class Token:
    """How a source's token outputs are laid out, for token-aware pooling.

    Attributes
    ----------
    prefix : int
        Leading tokens that are not patches (a CLS token, register tokens).
    batch_first : bool
        Whether sequences come as (N, T, C) (else (T, N, C), as some transformers run).
    final_norm : str or None
        The module name of the model's final norm (applied to a block's output with
        ``norm="final"``).
    """

    prefix: int = 0
    batch_first: bool = True
    final_norm: str | None = None


@dataclass(frozen=True)
class ModelName:
    """A parsed model name: its source and the name the source knows it by."""

    source: str
    name: str

    def __str__(self) -> str:
        return self.name if self.source == DEFAULT_SOURCE else f"{self.source}{SEPARATOR}{self.name}"


@dataclass(frozen=True)
class ModelSource:
    """One entry of the model-source registry.

    Attributes
    ----------
    name : str
        The prefix (``open_clip``).
    create : callable
        ``create(name, weights, checkpoint, mapping, seed) -> (module, WeightsInfo, provenance)``:
        the backbone in eval mode, its classifier removed, and a dict saying how it was made
        (library, version, the constructor call).
    final : callable
        ``final(module, x) -> tensor``: the features the source calls pre_logits.
    preprocess : callable
        ``preprocess(module, name, image_size) -> TransformSpec``: the source's own eval
        preprocessing.
    check : callable
        ``check(name)`` raises, naming close matches, when the source has no such model.
    weights : tuple of str
        The weight sources it takes; ``default_weights(name)`` picks one when none is given.
    tokens : callable
        ``tokens(module) -> Token``: its token layout (ViTs), or a default for conv nets.
    extra_layers : callable, optional
        ``extra_layers(module) -> list of str``: layers that are not modules (graph nodes).
    canonical : callable, optional
        ``canonical(name) -> str``: the name as recorded (a local path made absolute).
    layer_root : str, optional
        Only modules under it are layers (open_clip's ``visual``: the text tower never runs).
    paths : bool
        Whether names may hold path separators (a hub id or a local folder).
    python_only : bool
        Its models exist only in the Python process that made them (``module:``).
    description : str
    """

    name: str
    create: Callable
    final: Callable
    preprocess: Callable
    check: Callable
    weights: tuple[str, ...]
    default_weights: Callable[[str], str]
    tokens: Callable = field(default=lambda module: Token())
    extra_layers: Callable | None = None
    canonical: Callable | None = None
    layer_root: str | None = None
    paths: bool = False
    python_only: bool = False
    description: str = ""


def _library_version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return "?"


def _close(name: str, known, what: str, listing: str):
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=8, cutoff=0.6)
    raise UnknownNameError("model", name, close or known[:20],
                           f"{'closest of' if close else 'first 20 of'} {len(known)} {what}; {listing}")


@contextlib.contextmanager
def _seeded(seed: int):
    """The library's constructor under ``seed`` (the caller's random state kept), its
    "no pretrained weights loaded" log lines held back: random weights were asked for."""
    import torch

    quiet = logging.getLogger()
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        quiet.setLevel(level)


def _imagenet(size: int, image_size: int | None, crop_pct: float = 0.875, interpolation: str = "bilinear",
              mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
    from ._spec import TransformSpec

    size = int(image_size or size)
    return TransformSpec(input_size=(3, size, size), interpolation=interpolation, crop_pct=float(crop_pct),
                         crop_mode="center", mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std))


def _load_file_weights(module, checkpoint, mapping, origin: str):
    """Load a checkpoint file into ``module`` (strict, code-free); its file digest."""
    from .models import file_sha256, load_checkpoint_state, map_state_dict

    state = load_checkpoint_state(checkpoint)
    module.load_state_dict(map_state_dict(state, module.state_dict(), mapping, repr(str(checkpoint))))
    return file_sha256(checkpoint), f"{Path(checkpoint).resolve()} ({origin}, mapping={mapping})"


def _weights_info(source: str, weights: str, module, description: str, sha256: str | None = None):
    from .models import WeightsInfo, state_dict_sha256

    return WeightsInfo(weights, sha256 or state_dict_sha256(module.state_dict()), description)


def _refuse_checkpoint_without(weights, checkpoint):
    if checkpoint and weights != "checkpoint":
        raise IncompatibleParametersError(key="checkpoint", value=str(checkpoint),
                                          reason=f"it is loaded with --weights checkpoint, not --weights {weights}")
    if weights == "checkpoint" and not checkpoint:
        raise IncompatibleParametersError(key="weights", value="checkpoint",
                                          reason="it needs --checkpoint FILE (.safetensors or .pth)")


# ----------------------------------------------------------------------------- timm


def _timm_create(name, weights, checkpoint, mapping, seed):
    from .models import _create_timm

    model, info = _create_timm(name, weights, checkpoint, mapping, seed)
    import timm

    call = f"timm.create_model({name!r}, pretrained={weights == 'hub'})"
    return model, info, {"library": "timm", "version": timm.__version__, "constructor": call}


def _timm_final(module, x):
    return module.forward_head(module.forward_features(x), pre_logits=True)


def _timm_preprocess(module, name, image_size):
    from ._preprocess import resolve_transform

    return resolve_transform(module, image_size)


def _timm_tokens(module) -> Token:
    return Token(prefix=int(getattr(module, "num_prefix_tokens", 0) or 0), batch_first=True,
                 final_norm="norm" if hasattr(module, "norm") and module.norm is not None else None)


def _timm_weights(name):
    from .models import default_weights

    return default_weights(name)


# ----------------------------------------------------------------------------- open_clip


def _open_clip():
    from ._extras import require

    return require("open_clip", "--model open_clip:...")


def _split_tag(name: str) -> tuple[str, str | None]:
    arch, _, tag = name.partition("@")
    return arch, tag or None


def _open_clip_check(name):
    oc = _open_clip()
    arch, _ = _split_tag(name)
    if arch not in oc.list_models():
        _close(arch, oc.list_models(), "open_clip architectures", "list them with "
               "`python -c 'import open_clip; print(open_clip.list_models())'`")


def _open_clip_create(name, weights, checkpoint, mapping, seed):
    oc = _open_clip()
    arch, tag = _split_tag(name)
    _refuse_checkpoint_without(weights, checkpoint)
    if weights == "hub" and not tag:
        raise IncompatibleParametersError(key="weights", value="hub", reason=(
            f"open_clip weights are named by a tag: --model open_clip:{arch}@TAG (the tags: "
            f"open_clip.list_pretrained_tags_by_model({arch!r}))"))
    pretrained = tag if weights == "hub" else None
    with _seeded(seed):
        model = oc.create_model(arch, pretrained=pretrained)
    sha = description = None
    if weights == "checkpoint":
        sha, description = _load_file_weights(model, checkpoint, mapping, "open_clip state dict")
    model.eval()
    description = description or (f"open_clip {arch} pretrained={tag}" if pretrained else
                                  f"open_clip {arch}, random init, seed {seed}")
    call = f"open_clip.create_model({arch!r}, pretrained={pretrained!r})"
    return model, _weights_info("open_clip", weights, model, description, sha), {
        "library": "open_clip_torch", "version": _library_version("open_clip_torch"), "constructor": call}


def _open_clip_final(module, x):
    return module.encode_image(x)


def _open_clip_preprocess(module, name, image_size):
    cfg = getattr(module.visual, "preprocess_cfg", None) or {}
    size = cfg.get("size", getattr(module.visual, "image_size", 224))
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = cfg.get("mean", getattr(module.visual, "image_mean", (0.48145466, 0.4578275, 0.40821073)))
    std = cfg.get("std", getattr(module.visual, "image_std", (0.26862954, 0.26130258, 0.27577711)))
    return _imagenet(size, image_size, crop_pct=1.0, interpolation=cfg.get("interpolation", "bicubic"), mean=mean,
                     std=std)


def _open_clip_tokens(module) -> Token:
    visual = module.visual
    transformer = getattr(visual, "transformer", None)
    if transformer is None:  # a conv tower (ModifiedResNet, timm trunks)
        return Token()
    return Token(prefix=1 if getattr(visual, "class_embedding", None) is not None else 0,
                 batch_first=bool(getattr(transformer, "batch_first", True)),
                 final_norm="visual.ln_post" if hasattr(visual, "ln_post") else None)


# ----------------------------------------------------------------------------- Hugging Face


def _transformers():
    from ._extras import require

    return require("transformers", "--model hf:...")


def _hf_canonical(name: str) -> str:
    path = Path(name).expanduser()
    return str(path.resolve()) if (path.is_dir() or name.startswith((".", "/", "~"))) else name


def _hf_check(name):
    path = Path(name).expanduser()
    if name.startswith((".", "/", "~")) and not (path / "config.json").is_file():
        raise InvalidParameterError(key="model", value=f"hf:{name}",
                                    expected="hf:DIR of a saved transformers model (a folder with config.json), "
                                             "or hf:ORG/NAME of the Hugging Face hub")


def _hf_create(name, weights, checkpoint, mapping, seed):
    tf = _transformers()
    _refuse_checkpoint_without(weights, checkpoint)
    with _seeded(seed):
        if weights == "hub":
            model = tf.AutoModel.from_pretrained(name)
            call = f"transformers.AutoModel.from_pretrained({name!r})"
        else:
            config = tf.AutoConfig.from_pretrained(name)
            model = tf.AutoModel.from_config(config)
            call = f"transformers.AutoModel.from_config(AutoConfig.from_pretrained({name!r}))"
    model = getattr(model, "vision_model", model) if hasattr(model, "vision_model") and \
        hasattr(model, "text_model") else model  # a CLIP / SigLIP pair: its vision tower
    sha = description = None
    if weights == "checkpoint":
        sha, description = _load_file_weights(model, checkpoint, mapping, "transformers state dict")
    model.eval()
    made = {}
    if float(getattr(model.config, "mask_ratio", 0) or 0) > 0:  # MAE: every patch, in order (see _hf_final)
        made["masking"] = f"mask_ratio {model.config.mask_ratio} set to 0: every patch token, in image order"
        model.config.mask_ratio = 0.0
    description = description or (f"transformers {type(model).__name__} from {name}" if weights == "hub" else
                                  f"transformers {type(model).__name__} from the config of {name}, random init, "
                                  f"seed {seed}")
    return model, _weights_info("hf", weights, model, description, sha), {
        "library": "transformers", "version": tf.__version__, "constructor": call,
        "class": type(model).__name__, **made}


def _hf_final(module, x):
    """What the model's image-classification head reads: ``pooler_output`` where the pooler is
    the model's own pooling (CLIP's and DINOv2's normed class token, ConvNeXt's normed mean,
    ResNet's average), else the first token of ``last_hidden_state`` (ViT's and BEiT's
    classifiers read that: their ``pooler`` is a separate dense+tanh layer that is not)."""
    import inspect

    import torch

    kwargs = {}
    if "noise" in inspect.signature(module.forward).parameters:  # MAE shuffles patches by this noise
        side = x.shape[-1] // int(getattr(module.config, "patch_size", 16))
        kwargs["noise"] = torch.arange(side * side, device=x.device, dtype=torch.float32).expand(x.shape[0], -1)
    out = module(pixel_values=x, **kwargs)
    pooled = getattr(out, "pooler_output", None)
    pooler = getattr(module, "pooler", None)
    if pooled is not None and not hasattr(pooler, "dense"):
        return pooled.flatten(1)
    hidden = out.last_hidden_state
    return hidden[:, 0] if hidden.ndim == 3 else hidden.mean(dim=(2, 3))


# PIL's resampling codes, as a processor's ``resample`` writes them
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


def _hf_processor_config(name: str) -> dict | None:
    """The model's ``preprocessor_config.json`` (a local folder's, or the hub's from the local
    cache or the hub), or None when the model has none."""
    import json

    path = Path(name).expanduser() / "preprocessor_config.json"
    if not path.is_file() and not name.startswith((".", "/", "~")):
        try:
            from transformers.utils import cached_file

            found = cached_file(name, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
        except (OSError, ValueError):
            found = None
        path = Path(found) if found else path
    return json.loads(path.read_text()) if path.is_file() else None


def _hf_preprocess(module, name, image_size):
    """The model's own processor settings (mean, std, resize, crop, resampling) when it has a
    ``preprocessor_config.json``; ImageNet's otherwise, at the config's image size."""
    config = module.config
    size = getattr(config, "image_size", 224)
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean, std, crop_pct, interpolation = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0.875, "bicubic"
    proc = _hf_processor_config(name)
    if proc:
        mean, std = proc.get("image_mean", mean), proc.get("image_std", std)
        interpolation = _PIL_RESAMPLE.get(proc.get("resample"), interpolation)
        resize = proc.get("size") or {}
        resize = resize.get("shortest_edge", resize.get("height")) if isinstance(resize, dict) else resize
        crop = proc.get("crop_size") if proc.get("do_center_crop", "crop_size" in proc) else None
        crop = crop.get("height", crop.get("shortest_edge")) if isinstance(crop, dict) else crop
        crop = crop or resize or size
        size, crop_pct = int(crop), (float(crop) / float(resize) if resize else 1.0)
    return _imagenet(size, image_size, crop_pct=crop_pct, interpolation=interpolation, mean=mean, std=std)


def _hf_tokens(module) -> Token:
    config = module.config
    if getattr(config, "model_type", "") in ("convnext", "convnextv2", "resnet", "regnet"):
        return Token()
    registers = int(getattr(config, "num_register_tokens", 0) or 0)
    has_cls = getattr(config, "model_type", "") not in ("siglip_vision_model", "siglip")
    norm = next((n for n in ("layernorm", "post_layernorm") if hasattr(module, n)), None)
    return Token(prefix=int(has_cls) + registers, batch_first=True, final_norm=norm)


# ----------------------------------------------------------------------------- torchvision


def _tv_check(name):
    import torchvision

    known = torchvision.models.list_models()
    if name not in known:
        _close(name, known, "torchvision models", "list them with "
               "`python -c 'import torchvision; print(torchvision.models.list_models())'`")


def _drop_classifier(model):
    """Replace the last Linear (the classifier) by the identity: the forward gives pre_logits."""
    import torch

    last = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            last = name
    if last is None:
        return model
    parent = model.get_submodule(last.rsplit(".", 1)[0]) if "." in last else model
    setattr(parent, last.rsplit(".", 1)[-1], torch.nn.Identity())
    return model


def _tv_create(name, weights, checkpoint, mapping, seed):
    import torchvision

    _refuse_checkpoint_without(weights, checkpoint)
    with _seeded(seed):
        model = torchvision.models.get_model(name, weights="DEFAULT" if weights == "hub" else None)
    sha = description = None
    if weights == "checkpoint":
        sha, description = _load_file_weights(model, checkpoint, mapping, "torchvision state dict")
    model = _drop_classifier(model).eval()
    description = description or (f"torchvision {name} DEFAULT weights" if weights == "hub" else
                                  f"torchvision {name}, random init, seed {seed}")
    call = f"torchvision.models.get_model({name!r}, weights={'DEFAULT' if weights == 'hub' else None!r})"
    return model, _weights_info("torchvision", weights, model, description, sha), {
        "library": "torchvision", "version": torchvision.__version__, "constructor": call}


def _tv_preprocess(module, name, image_size):
    return _imagenet(224, image_size, crop_pct=224 / 256)


def _tv_extra_layers(module) -> list[str]:
    """The model's FX graph nodes whose value is a tensor (a residual ``add``, ``flatten``,
    ViT's class-token ``getitem``), in graph order, named as ``create_feature_extractor``
    takes them. The input, shapes, sizes, tuples and ``None`` are left out: the graph is run
    once on a zero image at the model's input size, and only tensor values are kept."""
    import torch
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    training = module.training
    try:
        _, nodes = get_graph_node_names(module.eval(), suppress_diff_warning=True)
        modules = {n for n, _ in module.named_modules()}
        candidates = [n for n in nodes[1:] if n not in modules]  # nodes[0] is the input
        if not candidates:
            return []
        size = _tv_preprocess(module, None, None).input_size
        with torch.no_grad():
            values = create_feature_extractor(module, return_nodes={n: n for n in candidates})(
                torch.zeros((1,) + tuple(size)))
    finally:
        module.train(training)
    return [n for n in candidates if torch.is_tensor(values.get(n))]


# ----------------------------------------------------------------------------- modules given from Python

# modules handed to featstore.build in this process, by name (a module is not text)
_MODULES: dict[str, tuple[Any, Any]] = {}


def register_module(name: str, module, preprocess) -> str:
    """Make a ``torch.nn.Module`` buildable as ``module:NAME`` in this process."""
    _MODULES[name] = (module, preprocess)
    return f"module{SEPARATOR}{name}"


def _module_check(name):
    if name not in _MODULES:
        raise InvalidParameterError(key="model", value=f"module:{name}", expected=(
            "a torch.nn.Module passed to featstore.build(model=module, name=..., preprocess=...) (module: names "
            "exist only in the Python process that passed them)"))


def _module_create(name, weights, checkpoint, mapping, seed):
    import torch

    module, _ = _MODULES[name]
    if weights not in ("module", None):
        raise IncompatibleParametersError(key="weights", value=weights,
                                          reason="a module brings its own weights (weights='module')")
    module.eval()
    return module, _weights_info("module", "module", module, f"a {type(module).__name__} given from Python"), {
        "library": "torch", "version": torch.__version__, "constructor": f"{type(module).__module__}."
                                                                        f"{type(module).__qualname__}(...)"}


def _module_final(module, x):
    return module(x)


def _module_preprocess(module, name, image_size):
    from ._spec import TransformSpec

    spec = _MODULES[name][1]
    spec = spec if isinstance(spec, TransformSpec) else TransformSpec(**dict(spec))
    if image_size is not None:
        spec = spec.model_copy(update={"input_size": (spec.input_size[0], image_size, image_size)})
    return spec


# ----------------------------------------------------------------------------- the registry

MODEL_SOURCES: dict[str, ModelSource] = {s.name: s for s in (
    ModelSource("timm", _timm_create, _timm_final, _timm_preprocess, lambda n: __import__(
        "featstore.models", fromlist=["check_model_name"]).check_model_name(n),
        ("embedded", "hub", "checkpoint", "random"), _timm_weights, _timm_tokens,
        description="timm architectures (the default: no prefix)"),
    ModelSource("open_clip", _open_clip_create, _open_clip_final, _open_clip_preprocess, _open_clip_check,
                ("hub", "checkpoint", "random"), lambda n: "hub" if "@" in n else "random", _open_clip_tokens,
                layer_root="visual",
                description="open_clip's CLIP models, image tower (NAME@TAG picks pretrained weights)"),
    ModelSource("hf", _hf_create, _hf_final, _hf_preprocess, _hf_check, ("hub", "checkpoint", "random"),
                lambda n: "hub", _hf_tokens, canonical=_hf_canonical, paths=True,
                description="Hugging Face transformers vision models (a hub id or a local directory)"),
    ModelSource("torchvision", _tv_create, _module_final, _tv_preprocess, _tv_check, ("hub", "checkpoint", "random"),
                lambda n: "hub", extra_layers=_tv_extra_layers,
                description="torchvision's model zoo (graph nodes are layers too)"),
    ModelSource("module", _module_create, _module_final, _module_preprocess, _module_check, ("module",),
                lambda n: "module", python_only=True, description="a torch.nn.Module given to featstore.build from Python"),
)}


def describe_model_names() -> str:
    """What a model name may be, from the registry: ``a timm model name, or SOURCE:NAME
    (open_clip:, hf:, ...)``."""
    # the sources known so far, without loading entry points: this runs while featstore's
    # modules are being defined (help texts), and a third-party source imports featstore
    prefixed = [f"{name}{SEPARATOR}" for name, s in MODEL_SOURCES.items()
                if name != DEFAULT_SOURCE and not s.python_only]
    return f"a {DEFAULT_SOURCE} model name, or SOURCE{SEPARATOR}NAME ({', '.join(prefixed)})"


_ENTRY_POINTS_READ: list = [None]  # the sys.path the entry points were last read under


def model_sources() -> dict[str, ModelSource]:
    """The registry with third-party sources (entry points ``featstore.model_sources``) added.
    The installed distributions are scanned once per ``sys.path`` (a scan reads every
    dist-info's metadata: ~30 ms, and every group a sweep opens parses its model name)."""
    import sys
    from importlib.metadata import entry_points

    if _ENTRY_POINTS_READ[0] == sys.path:
        return MODEL_SOURCES
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in MODEL_SOURCES:
            source = ep.load()
            MODEL_SOURCES[source.name] = source
    _ENTRY_POINTS_READ[0] = list(sys.path)
    return MODEL_SOURCES


def parse_model_name(text, registered: bool = True) -> ModelName:
    """Split ``source:name`` (no prefix: timm), checking its form, not that the model exists.

    The one place that reads the prefix. ``registered=False`` accepts a source this process
    does not know (a group a third-party source wrote opens, and its features read, without
    that package)."""
    if not isinstance(text, str) or not text:
        raise InvalidParameterError(key="model", value=text, expected="a model name (timm), or SOURCE:NAME")
    source, sep, rest = text.partition(SEPARATOR)
    if not sep or os.path.sep in source or "/" in source:
        source, rest = DEFAULT_SOURCE, text
    sources = model_sources()
    if source not in sources and registered:
        raise UnknownNameError("model source", source, sources, context=f"model {text!r}")
    if not rest:
        raise InvalidParameterError(key="model", value=text, expected=f"{source}:NAME with a name")
    if source in sources and not sources[source].paths and ("/" in rest or "\\" in rest or ".." in rest):
        raise InvalidParameterError(key="model", value=text, expected="a name without path separators or '..'"
                                                                      + (" (a hub id or a folder: hf:...)"
                                                                         if source == DEFAULT_SOURCE else ""))
    return ModelName(source, rest)
