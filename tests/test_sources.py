"""Model sources beyond timm: open_clip, Hugging Face transformers, torchvision and a
torch.nn.Module from Python. Every group's features are compared with the library's own
forward on the same weights and the same preprocessed images (hooks or the library's own
feature extraction, never featstore's extractor); bad names are one error; timm keys are
what they always were."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import featstore
from featstore import errors
from featstore._preprocess import make_transforms
from featstore.datasets import load_split

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _images(g, image_folder):
    """The group's samples as its eval transform makes them, stacked in the group's order."""
    eval_tf, _ = make_transforms(g.spec.transform)
    src = load_split(f"imagefolder:{image_folder}", g.spec.split)
    return torch.stack([eval_tf(src.image(i)) for i in g.sample_index])


def _hooked(module, names, call):
    """Outputs of the named submodules of ``module`` during ``call()`` (plain forward hooks)."""
    out, handles = {}, []
    for name in names:
        def hook(_m, _inputs, output, name=name):
            out[name] = output[0] if isinstance(output, tuple) else output
        handles.append(module.get_submodule(name).register_forward_hook(hook))
    try:
        with torch.no_grad():
            result = call()
    finally:
        for h in handles:
            h.remove()
    return result, out


def _build(tmp_path, image_folder, **kw):
    args = dict(dataset=f"imagefolder:{image_folder}", splits="test", workers=0, progress=False, dtype="float32",
                store=tmp_path / "s.zarr")
    return {g.spec.layer: g for g in featstore.build(**{**args, **kw})}


# ----------------------------------------------------------------------------- torchvision


def test_torchvision_model_module_and_graph_node_layers_equal_its_own_forward(tmp_path, image_folder):
    import torchvision
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(5)
    model = torchvision.models.resnet18(num_classes=1000).eval()
    torch.save(model.state_dict(), tmp_path / "r18.pt")
    groups = _build(tmp_path, image_folder, model="torchvision:resnet18", weights="checkpoint",
                    checkpoint=tmp_path / "r18.pt", layers="pre_logits,layer2,layer1.0.add,flatten", image_size=64)
    assert groups["pre_logits"].spec.model == "torchvision:resnet18"
    prov = groups["pre_logits"].provenance["model"]
    assert prov["library"] == "torchvision" and "get_model('resnet18'" in prov["constructor"]
    x = _images(groups["pre_logits"], image_folder)
    with torch.no_grad():
        nodes = create_feature_extractor(model, {"layer1.0.add": "add", "flatten": "flat", "layer2": "l2"})(x)
        head = model.fc
        model.fc = torch.nn.Identity()
        pre = model(x)
        model.fc = head
    np.testing.assert_allclose(groups["pre_logits"].numpy(), pre.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(groups["flatten"].numpy(), nodes["flat"].numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(groups["layer1.0.add"].numpy(), nodes["add"].mean(dim=(2, 3)).numpy(), rtol=1e-4,
                               atol=1e-4)
    np.testing.assert_allclose(groups["layer2"].numpy(), nodes["l2"].mean(dim=(2, 3)).numpy(), rtol=1e-4, atol=1e-4)
    assert groups["layer1.0.add"].shape[1] == 64 and groups["pre_logits"].shape[1] == 512


def test_layers_command_lists_graph_nodes_with_shapes_and_widths(capsys):
    from featstore import models

    model, _ = models.create_backbone("torchvision:resnet18", "random")
    rows = {name: (shape, d) for name, shape, d in models.describe_layers(model, "torchvision:resnet18")}
    assert rows["pre_logits"] == ((1, 512), 512)
    assert rows["layer1.0.add"] == ((1, 64, 56, 56), 64) and rows["layer4"] == ((1, 512, 7, 7), 512)
    assert "x" not in rows  # the input placeholder is not a layer
    from featstore.cli import main

    assert main(["layers", "torchvision:resnet18"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["LAYER", "OUTPUT", "(one", "image)", "D"]
    assert any(line.split() == ["layer3.1.add", "1x256x14x14", "256"] for line in lines)


# ----------------------------------------------------------------------------- open_clip


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny open_clip architecture registered under a test name (open_clip's own config registry)."""
    open_clip = pytest.importorskip("open_clip", reason="the [models] extra (open-clip-torch) is not installed")
    d = tmp_path_factory.mktemp("clipcfg")
    cfg = {"embed_dim": 24, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8,
                                           "head_width": 16},
           "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}
    (d / "featstore-tiny-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(d / "featstore-tiny-clip.json")
    torch.manual_seed(6)
    model = open_clip.create_model("featstore-tiny-clip").eval()
    torch.save(model.state_dict(), d / "clip.pt")
    return model, d / "clip.pt"


def test_open_clip_image_tower_layers_and_embedding_equal_its_own_forward(tmp_path, image_folder, tiny_clip):
    model, ckpt = tiny_clip
    block = "visual.transformer.resblocks.1"
    groups = _build(tmp_path, image_folder, model="open_clip:featstore-tiny-clip", weights="checkpoint",
                    checkpoint=ckpt, layers=f"pre_logits,{block}")
    cls = _build(tmp_path, image_folder, model="open_clip:featstore-tiny-clip", weights="checkpoint",
                 checkpoint=ckpt, layers=block, pooling="cls", norm="final")[block]
    g = groups["pre_logits"]
    # open_clip's own preprocessing: its image size, its mean and std, bicubic
    assert g.spec.transform.input_size == (3, 32, 32) and g.spec.transform.interpolation == "bicubic"
    assert g.spec.transform.mean == pytest.approx(model.visual.image_mean)
    x = _images(g, image_folder)
    embedding, hooked = _hooked(model, [block], lambda: model.encode_image(x))
    np.testing.assert_allclose(g.numpy(), embedding.numpy(), rtol=1e-4, atol=1e-4)
    tokens = hooked[block]  # (N, 1 + patches, width): a class token, then 16 patches
    assert tokens.shape[1] == 17
    np.testing.assert_allclose(groups[block].numpy(), tokens[:, 1:].mean(dim=1).numpy(), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        want = model.visual.ln_post(tokens)[:, 0]
    np.testing.assert_allclose(cls.numpy(), want.numpy(), rtol=1e-4, atol=1e-4)
    assert groups[block].spec.group_name() != cls.spec.group_name()


def test_open_clip_text_tower_is_not_a_layer(tiny_clip):
    from featstore import models

    model, _ = tiny_clip
    names = models.list_layers(model, "open_clip:featstore-tiny-clip")
    assert "visual.transformer.resblocks.0" in names and not any(n.startswith("transformer.") for n in names)
    with pytest.raises(errors.UnknownNameError, match="featstore layers open_clip:featstore-tiny-clip"):
        models.FeatureExtractor(model, ["transformer.resblocks.0"], model_name="open_clip:featstore-tiny-clip")


def test_open_clip_hub_weights_need_a_tag(tiny_clip):
    from featstore import models

    with pytest.raises(errors.IncompatibleParametersError, match="@TAG"):
        models.create_backbone("open_clip:featstore-tiny-clip", "hub")


# ----------------------------------------------------------------------------- Hugging Face


@pytest.fixture(scope="module")
def tiny_hf_vit(tmp_path_factory):
    """A tiny ViT saved as transformers saves models, with its own preprocessor config
    (mean and std 0.5, bilinear: not ImageNet's, so reading them is tested)."""
    tf = pytest.importorskip("transformers", reason="the [models] extra (transformers) is not installed")
    d = tmp_path_factory.mktemp("hfvit")
    torch.manual_seed(7)
    config = tf.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64)
    model = tf.ViTModel(config).eval()
    model.save_pretrained(d)
    tf.ViTImageProcessor(size={"height": 32, "width": 32}, resample=2, image_mean=[0.5] * 3,
                         image_std=[0.5] * 3).save_pretrained(d)
    return model, d


def test_hf_local_model_layers_and_pre_logits_equal_its_own_forward(tmp_path, image_folder, tiny_hf_vit):
    model, d = tiny_hf_vit
    block = "layers.1"  # transformers 5 names (4 had encoder.layer.1)
    groups = _build(tmp_path, image_folder, model=f"hf:{d}", layers=f"pre_logits,{block}")
    g = groups["pre_logits"]
    assert g.spec.model == f"hf:{d.resolve()}" and g.spec.weights == "hub"
    t = g.spec.transform
    assert t.mean == pytest.approx((0.5,) * 3) and t.interpolation == "bilinear" and t.input_size == (3, 32, 32)
    x = _images(g, image_folder)
    out, hooked = _hooked(model, [block], lambda: model(pixel_values=x))
    # ViT's classifier reads the normed class token; its pooler (dense + tanh) is not pre_logits
    np.testing.assert_allclose(g.numpy(), out.last_hidden_state[:, 0].numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(groups[block].numpy(), hooked[block][:, 1:].mean(dim=1).numpy(), rtol=1e-4,
                               atol=1e-4)
    assert g.provenance["model"]["class"] == "ViTModel"


def test_hf_random_weights_come_from_the_config_alone(tmp_path, image_folder, tiny_hf_vit):
    _, d = tiny_hf_vit
    a = _build(tmp_path, image_folder, model=f"hf:{d}", weights="random", seed=1)["pre_logits"]
    hub = featstore.open(tmp_path / "s.zarr").group(model=f"hf:{d.resolve()}", weights="random")
    assert hub.name == a.name and "random init" in a.provenance["weights"]["description"]


def test_hf_folder_without_a_config_is_one_error(tmp_path, capsys):
    from featstore.cli import main

    assert main(["build", "--model", f"hf:{tmp_path}/nothing", "--dataset", "digits", "--store",
                 str(tmp_path / "s.zarr")]) == 2
    assert "hf:DIR of a saved transformers model (a folder with config.json)" in capsys.readouterr().err
    assert not (tmp_path / "s.zarr").exists()


def test_hf_mae_sees_every_patch_in_order(tmp_path, image_folder):
    """ViTMAEModel masks 75% of the patches at random even in eval: featstore sets its mask ratio
    to 0 and its shuffle noise to the identity, so features are every patch, deterministic."""
    tf = pytest.importorskip("transformers", reason="the [models] extra (transformers) is not installed")
    from featstore import models

    d = tmp_path / "mae"
    tf.ViTMAEConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64).save_pretrained(d)
    model, _ = models.create_backbone(f"hf:{d}", "random")
    rows = {n: shape for n, shape, _ in models.describe_layers(model, f"hf:{d}")}
    assert rows["embeddings"] == (1, 17, 32)  # the class token and all 16 patches
    a = _build(tmp_path, image_folder, model=f"hf:{d}", weights="random", layers="layers.1", pooling="flatten")
    g = a["layers.1"]
    assert "mask_ratio 0.75 set to 0" in g.provenance["model"]["masking"]
    x = _images(g, image_folder)
    reference = model  # the same random init (seed 0): the same weights as the group's
    assert g.spec.weights_sha256 == models.state_dict_sha256(reference.state_dict())
    reference.config.mask_ratio = 0.0
    noise = torch.arange(16, dtype=torch.float32).expand(len(x), -1)  # HF's own way to fix the order
    _, hooked = _hooked(reference, ["layers.1"], lambda: reference(pixel_values=x, noise=noise))
    np.testing.assert_allclose(g.numpy(), hooked["layers.1"].flatten(1).numpy(), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- a module from Python


def test_a_module_from_python_builds_with_its_name_and_preprocessing(tmp_path, image_folder):
    torch.manual_seed(8)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten())
    prep = dict(input_size=(3, 24, 24), interpolation="bilinear", crop_pct=1.0, crop_mode="center",
                mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    groups = _build(tmp_path, image_folder, model=net, name="tinynet", preprocess=prep, layers="pre_logits,1")
    g = groups["pre_logits"]
    assert g.spec.model == "module:tinynet" and g.spec.transform.std == pytest.approx((0.25,) * 3)
    x = _images(g, image_folder)
    _, hooked = _hooked(net, ["1"], lambda: net(x))
    with torch.no_grad():
        np.testing.assert_allclose(g.numpy(), net(x).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(groups["1"].numpy(), hooked["1"].mean(dim=(2, 3)).numpy(), rtol=1e-5, atol=1e-5)
    # other weights, same name: another group (the weights' digest is in the key), both kept
    with torch.no_grad():
        net[0].weight.mul_(2)
    h = _build(tmp_path, image_folder, model=net, name="tinynet", preprocess=prep)["pre_logits"]
    assert h.name != g.name and len(featstore.open(tmp_path / "s.zarr").find(model="module:tinynet", layer="pre_logits")) == 2
    with pytest.raises(errors.IncompatibleParametersError, match="preprocess="):
        featstore.build(model=net, name="x", dataset=f"imagefolder:{image_folder}", store=tmp_path / "t.zarr")
    assert not (tmp_path / "t.zarr").exists()


# ----------------------------------------------------------------------------- names


@pytest.mark.parametrize("model, message", [
    ("nosuch:thing", "Unknown model source 'nosuch'"),
    ("torchvision:resnet181", "resnet18"),  # close matches named
    ("torchvision:../x", "a name without path separators or '..'"),
    ("module:mine", "exist only in the Python process that passed them"),
    ("open_clip:NoSuchArch", "open_clip architectures"),
])
def test_bad_model_names_are_one_error_before_any_work(tmp_path, capsys, model, message):
    from featstore.cli import main

    assert main(["build", "--model", model, "--dataset", "digits", "--store", str(tmp_path / "s.zarr")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("extra, message", [
    (["--pooling", "cls"], "pooling='cls' cannot be used here: it does not apply to an output of shape (1, 32, 8, 8) "
                           "(a spatial map); choose avg, max, flatten"),
    (["--norm", "final"], "test_resnet has no final norm to apply to its layers"),
    (["--layers", "layer9"], "Unknown layer 'layer9' for test_resnet"),
])
def test_a_layer_option_the_model_cannot_take_is_one_error_before_any_work(tmp_path, capsys, extra, message):
    from featstore.cli import main

    args = ["build", "--model", "test_resnet", "--weights", "random", "--dataset", "digits", "--layers", "layer1",
            "--image-size", "32", "--store", str(tmp_path / "s.zarr")]
    assert main(args + extra) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s.zarr").exists()


def test_unknown_source_lists_the_registered_ones():
    from featstore._sources import parse_model_name

    with pytest.raises(errors.UnknownNameError) as e:
        parse_model_name("clip:ViT-B-32")
    for source in ("timm", "open_clip", "hf", "torchvision", "module"):
        assert source in str(e.value)


@pytest.mark.parametrize("model, layer, pooling, key", [
    ("test_resnet", "pre_logits", "avg", "8ebc8de7ba6c"),
    ("test_resnet", "layer1", "avg", "70e57ee7f349"),
    ("test_vit", "blocks.0", "cls", "c91c6c2728df"),
])
def test_timm_group_keys_are_what_they_always_were(model, layer, pooling, key):
    """The literal keys the release before model sources gave these builds (digits, random
    weights): the same options find the same groups, so existing stores keep their work."""
    from featstore._build import BuildOptions, _plan, _specs

    plan = _plan(BuildOptions(model=model, weights="random", dataset="digits", splits="test", layers=layer,
                              pooling=pooling, workers=0, progress=False,
                              **({"image_size": 32} if model == "test_resnet" else {})))
    try:
        assert _specs(plan, "test")[layer].group_name() == f"{model}__{layer}__digits__test__{key}"
    finally:
        plan.extractor.close()


def test_token_average_over_patches_is_a_new_key():
    """avg on a ViT block now leaves the class token out: another number, so another key than
    the earlier release's all-token average (bff71be61954), which stays what it was."""
    from featstore._build import BuildOptions, _plan, _specs

    plan = _plan(BuildOptions(model="test_vit", weights="random", dataset="digits", splits="test", layers="blocks.0",
                              pooling="avg", workers=0, progress=False))
    try:
        spec = _specs(plan, "test")["blocks.0"]
    finally:
        plan.extractor.close()
    assert not spec.group_name().endswith("bff71be61954") and ("tokens", "patch (1 prefix tokens left out)") in spec.extra


def test_a_source_whose_library_is_missing_names_the_models_extra(monkeypatch):
    import importlib

    from featstore import models

    real = importlib.import_module

    def without_open_clip(name, *a, **k):
        if name.split(".")[0] == "open_clip":
            raise ImportError(f"No module named {name!r}")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", without_open_clip)
    with pytest.raises(errors.MissingDependencyError, match=r"needs open_clip, which is not installed: pip install "
                                                            r"'featstore-redundancy\[models\]'"):
        models.create_backbone("open_clip:ViT-B-32", "random")


def test_a_container_the_forward_never_calls_is_one_error(tiny_hf_vit):
    from featstore import models

    model, d = tiny_hf_vit
    rows = {n: shape for n, shape, _ in models.describe_layers(model, f"hf:{d}")}
    assert rows["layers"] is None and rows["layers.0"] == (1, 17, 32)  # a ModuleList is not called
    extractor = models.FeatureExtractor(model, ["layers"], model_name=f"hf:{d}")
    with pytest.raises(errors.InvalidParameterError, match="never calls layers"):
        extractor(torch.zeros(1, 3, 32, 32))
    extractor.close()


def test_a_third_party_source_from_an_entry_point_is_seen_by_the_command_line(tmp_path):
    """A package that declares a ``featstore.model_sources`` entry point (here a dist-info
    folder on PYTHONPATH, as pip would install it) adds a source the CLI builds from."""
    import subprocess
    import sys

    (tmp_path / "mysource.py").write_text('''
import torch
from featstore._sources import ModelSource
from featstore._spec import TransformSpec
from featstore.models import WeightsInfo, state_dict_sha256


def create(name, weights, checkpoint, mapping, seed):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten()).eval()
    return net, WeightsInfo("random", state_dict_sha256(net.state_dict()), f"mine {name}, seed {seed}"), {
        "library": "mysource", "version": "0.1", "constructor": f"mysource.create({name!r})"}


SOURCE = ModelSource(
    "mine", create, lambda m, x: m(x),
    lambda m, n, size: TransformSpec(input_size=(3, size or 16, size or 16), interpolation="bilinear", crop_pct=1.0,
                                     crop_mode="center", mean=(0.5,) * 3, std=(0.5,) * 3),
    lambda n: None, ("random",), lambda n: "random", description="a test source")
''')
    info = tmp_path / "mysource-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mysource\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[featstore.model_sources]\nmine = mysource:SOURCE\n")
    env = {"PYTHONPATH": f"{tmp_path}:{Path(featstore.__file__).parents[1]}", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "featstore.cli", "build", "--model", "mine:net", "--dataset", "digits",
                           "--splits", "test", "--limit", "20", "--layers", "pre_logits,0", "--no-progress",
                           "--store", str(tmp_path / "s.zarr")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # this process has no such source: the group still opens and reads (the model is not needed)
    g = featstore.open(tmp_path / "s.zarr").group(model="mine:net", layer="0")
    assert g.shape == (20, 5) and g.provenance["model"]["constructor"] == "mysource.create('net')"
    assert np.isfinite(g.numpy()).all()
