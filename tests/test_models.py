"""Weight sources, checkpoint loading (strict, safe), positional mapping, layers, pooling."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import timm
import torch

from featstore import errors
from featstore import load_split, make_transforms, resolve_transform
from featstore.models import (
    FeatureExtractor,
    create_backbone,
    list_layers,
    load_checkpoint_state,
    map_state_dict,
    pool,
)


def _tiny_state(seed=1):
    torch.manual_seed(seed)
    return timm.create_model("test_resnet").state_dict()


def _logits_equal(model_a, model_b):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        return torch.allclose(model_a.forward_features(x), model_b.forward_features(x))


@pytest.mark.parametrize("prefix", ["", "module.", "model.", "module.model."])
@pytest.mark.parametrize("fmt", ["safetensors", "pth", "pth-wrapped"])
def test_checkpoint_loads_strictly_with_wrapper_prefixes(tmp_path, prefix, fmt):
    state = _tiny_state()
    prefixed = {prefix + k: v for k, v in state.items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in prefixed.items()}, str(path))
    else:
        path = tmp_path / "w.pth"
        torch.save({"state_dict": prefixed, "epoch": 3} if fmt == "pth-wrapped" else prefixed, path)
    model, info = create_backbone("test_resnet", "checkpoint", checkpoint=path)
    ref = timm.create_model("test_resnet")
    ref.load_state_dict(state)
    ref.reset_classifier(0)
    ref.eval()
    assert _logits_equal(model, ref)
    assert info.source == "checkpoint" and len(info.sha256) == 64


def test_missing_unexpected_and_misshapen_keys_are_each_reported(tmp_path):
    state = _tiny_state()
    state.pop("conv1.0.weight")
    state["extra.weight"] = torch.zeros(3)
    state["fc.bias"] = torch.zeros(7)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(errors.CheckpointError) as e:
        create_backbone("test_resnet", "checkpoint", checkpoint=path)
    msg = str(e.value)
    assert "1 missing: conv1.0.weight" in msg
    assert "1 unexpected: extra.weight" in msg
    assert "fc.bias: (7,) vs model (1000,)" in msg
    assert "--map positional" in msg


def test_positional_mapping_checks_counts_and_every_shape():
    target = _tiny_state(0)
    renamed = {f"t{i}": v for i, (k, v) in enumerate(_tiny_state(1).items()) if not k.endswith("num_batches_tracked")}
    out = map_state_dict(renamed, target, "positional")
    assert list(out) == list(target)
    for (k, v), src in zip([(k, v) for k, v in out.items() if not k.endswith("num_batches_tracked")], renamed.values()):
        assert torch.equal(v, src)
    fewer = dict(list(renamed.items())[:-1])
    with pytest.raises(errors.CheckpointError, match=r"has \d+ tensors but the model has \d+"):
        map_state_dict(fewer, target, "positional")
    swapped = dict(renamed)
    keys = list(swapped)
    swapped[keys[0]], swapped[keys[1]] = swapped[keys[1]], swapped[keys[0]]
    with pytest.raises(errors.CheckpointError, match="shapes differ"):
        map_state_dict(swapped, target, "positional")
    with pytest.raises(errors.UnknownNameError, match="known: names, positional"):
        map_state_dict(renamed, target, "fuzzy")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_carrying_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _Evil(marker)}, f)
    torch.save({"weights": _Evil(marker)}, tmp_path / "evil2.pth")
    for p in (path, tmp_path / "evil2.pth"):
        with pytest.raises(errors.UnsafeCheckpointError, match="weights_only=True"):
            load_checkpoint_state(p)
    assert not marker.exists()


def test_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(errors.CheckpointError, match="does not exist"):
        load_checkpoint_state(tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(errors.CheckpointError, match="junk.pth"):
        load_checkpoint_state(junk)
    with pytest.raises(errors.InvalidParameterError, match="weights='checkpoint' cannot be used here: it needs --checkpoint FILE"):
        create_backbone("test_resnet", "checkpoint")


def test_broken_checkpoint_files_are_one_error_naming_them(tmp_path):
    """A truncated or garbage safetensors file, NaN / inf weights, and a .pth zip whose members
    inflate far beyond the file (a decompression bomb) are each one CheckpointError naming the
    file, read no further."""
    import zipfile

    from safetensors.torch import save_file

    state = _tiny_state()
    good = tmp_path / "good.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(good))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    for path in (truncated, garbage):
        with pytest.raises(errors.CheckpointError, match=rf"checkpoint '.*{path.name}': cannot be read as safetensors"):
            load_checkpoint_state(path)
    for bad in (float("nan"), float("inf")):
        broken = {k: v.clone() for k, v in state.items()}
        broken["fc.weight"][0, 0] = bad
        path = tmp_path / f"broken{bad}.pth"
        torch.save(broken, path)
        with pytest.raises(errors.CheckpointError, match=r"1 tensors hold NaN or inf \(fc\.weight\)"):
            load_checkpoint_state(path)
    bomb = tmp_path / "bomb.pth"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data/0", b"\x00" * (64 << 20))  # 64 MiB of zeros in a ~64 KiB file
    with pytest.raises(errors.CheckpointError, match=r"inflate to 64 MiB from a 0\.1 MiB file.*decompression bomb"):
        load_checkpoint_state(bomb)


def test_embedded_weights_are_real_imagenet_weights():
    """The mapped tf_efficientnet_lite0 classifies scikit-learn's sample images correctly."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    import featstore.models as m

    model = timm.create_model("tf_efficientnet_lite0")
    state = load_checkpoint_state(m.embedded_weights_path())
    model.load_state_dict(map_state_dict(state, model.state_dict(), "positional"))
    model.eval()
    tspec = resolve_transform(model)
    assert tspec.mean == (0.5, 0.5, 0.5) and tspec.std == (0.5, 0.5, 0.5)
    assert tspec.interpolation == "bicubic" and tspec.input_size == (3, 224, 224) and tspec.crop_pct == 0.875
    eval_tf, _ = make_transforms(tspec)
    with torch.no_grad():
        top = {name: int(model(eval_tf(Image.fromarray(load_sample_image(name)))[None]).argmax())
               for name in ("china.jpg", "flower.jpg")}
    assert top["china.jpg"] in (698, 442)  # palace / bell cote
    assert top["flower.jpg"] == 985  # daisy
    # and the registry's embedded source gives the same backbone, classifier removed
    backbone, info = create_backbone("tf_efficientnet_lite0")
    assert info.source == "embedded" and backbone.num_classes == 0
    with pytest.raises(errors.InvalidParameterError, match="weights='embedded' cannot be used here: embedded weights exist only for model 'tf_efficientnet_lite0'"):
        create_backbone("test_resnet", "embedded")


def test_unknown_model_and_weight_source_list_choices():
    with pytest.raises(errors.UnknownNameError, match="Unknown model 'resnet5'.*resnet50"):
        create_backbone("resnet5")
    with pytest.raises(errors.InvalidParameterError, match="path separators"):
        create_backbone("../resnet50")
    with pytest.raises(errors.UnknownNameError, match="known: checkpoint, embedded, hub, random"):
        create_backbone("test_resnet", "imagenet")


def test_layers_listing_and_unknown_layer_message():
    model = timm.create_model("resnet50", pretrained=False)
    names = list_layers(model)
    assert names[0] == "pre_logits" and "layer3.5.act3" in names and "layer4" in names
    with pytest.raises(errors.UnknownNameError) as e:
        FeatureExtractor(model, ["layer9"], model_name="resnet50")
    msg = str(e.value)
    assert "Unknown layer 'layer9' for resnet50" in msg and "layer1" in msg and "featstore layers resnet50" in msg


def test_several_layers_from_one_pass_equal_separate_passes():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet").eval()
    model.reset_classifier(0)
    x = torch.randn(3, 3, 32, 32)
    both = FeatureExtractor(model, ["layer2", "pre_logits", "layer1.0.act2"])
    with torch.no_grad():
        out = both(x)
        feats = model.forward_features(x)
        np.testing.assert_allclose(out["pre_logits"], model.forward_head(feats, pre_logits=True), atol=1e-6)
        np.testing.assert_allclose(out["layer2"], model.layer2(model.layer1(model.maxpool(model.act1(model.bn1(
            model.conv1(x)))))).mean(dim=(2, 3)), atol=1e-5)
    both.close()
    only_early = FeatureExtractor(model, ["layer1"])  # stops the pass early, same values
    with torch.no_grad():
        early = only_early(x)["layer1"]
        only_early.close()
        assert out["layer1.0.act2"].shape == (3, 32)
        np.testing.assert_allclose(early, model.layer1(model.maxpool(model.act1(
            model.bn1(model.conv1(x))))).mean(dim=(2, 3)), atol=1e-6)


def test_pooling_modes():
    fmap = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    assert torch.equal(pool(fmap, "avg"), fmap.mean(dim=(2, 3)))
    assert torch.equal(pool(fmap, "max"), fmap.amax(dim=(2, 3)))
    assert pool(fmap, "flatten").shape == (2, 12)
    from featstore._sources import Token

    tokens = torch.randn(2, 5, 4)
    one = Token(prefix=1)  # a class token first, then 4 patches
    assert torch.equal(pool(tokens, "cls", one), tokens[:, 0])
    assert torch.allclose(pool(tokens, "avg", one), tokens[:, 1:].mean(dim=1))  # patches only
    assert torch.allclose(pool(tokens, "avg_all", one), tokens.mean(dim=1))  # what avg did before
    assert torch.allclose(pool(tokens, "cls+avg", one), torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], 1))
    assert torch.allclose(pool(tokens.transpose(0, 1), "avg", Token(prefix=1, batch_first=False)),
                          tokens[:, 1:].mean(dim=1))  # a sequence-first model's tokens
    with pytest.raises(errors.InvalidParameterError, match="pooling='cls' cannot be used here: it does not apply to an output of shape"):
        pool(fmap, "cls")
    with pytest.raises(errors.IncompatibleParametersError, match="no class token"):
        pool(tokens, "cls", Token(prefix=0))


def test_vit_class_token_and_token_mean():
    torch.manual_seed(0)
    model = timm.create_model("test_vit").eval()
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        tokens = model.blocks[-1](model.blocks[:-1](model.norm_pre(model._pos_embed(model.patch_embed(x)))))
        cls = FeatureExtractor(model, ["blocks.1"] if len(model.blocks) == 2 else [f"blocks.{len(model.blocks) - 1}"], "cls")(x)
        mean = FeatureExtractor(model, [f"blocks.{len(model.blocks) - 1}"], "avg")(x)
        everything = FeatureExtractor(model, [f"blocks.{len(model.blocks) - 1}"], "avg_all")(x)
    k = model.num_prefix_tokens
    np.testing.assert_allclose(list(cls.values())[0], tokens[:, 0], atol=1e-5)
    np.testing.assert_allclose(list(mean.values())[0], tokens[:, k:].mean(dim=1), atol=1e-5)  # patch tokens only
    np.testing.assert_allclose(list(everything.values())[0], tokens.mean(dim=1), atol=1e-5)


def test_robustness_library_checkpoint_builds_the_models_own_features(tmp_path, image_folder):
    """Salman et al.'s robust models as the robustness library saves them: {'model': {module.model.*,
    module.attacker.model.*, module.normalizer.*}, 'epoch': ...}. The stored features equal the
    model's own forward on the same weights, behind the checkpoint's own normaliser."""
    import featstore

    torch.manual_seed(3)
    model = timm.create_model("test_resnet")
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    inner = {**{f"module.model.{k}": v for k, v in model.state_dict().items()},
             **{f"module.attacker.model.{k}": v.clone() for k, v in model.state_dict().items()},
             "module.normalizer.new_mean": torch.tensor(mean).view(3, 1, 1),
             "module.normalizer.new_std": torch.tensor(std).view(3, 1, 1),
             "module.attacker.normalize.new_mean": torch.tensor(mean).view(3, 1, 1)}
    path = tmp_path / "robust.pt"
    torch.save({"model": inner, "epoch": torch.tensor(90)}, path)
    (g,) = featstore.build("test_resnet", weights="checkpoint", checkpoint=path, dataset=f"imagefolder:{image_folder}",
                           splits="test", image_size=32, workers=0, progress=False, dtype="float32",
                           store=tmp_path / "s.zarr")
    assert g.spec.transform.mean == pytest.approx(mean) and g.spec.transform.std == pytest.approx(std)
    assert "adapters=robustness" in g.provenance["weights"]["description"]
    _assert_timm_features(g, model, image_folder)
    # two checkpoints of one model in one store: a prefix of the weights' sha256 picks one
    torch.manual_seed(4)
    other = timm.create_model("test_resnet")
    torch.save({"model": {**{f"module.model.{k}": v for k, v in other.state_dict().items()},
                          "module.attacker.x": torch.zeros(1)}}, tmp_path / "robust2.pt")
    (h,) = featstore.build("test_resnet", weights="checkpoint", checkpoint=tmp_path / "robust2.pt",
                           dataset=f"imagefolder:{image_folder}", splits="test", image_size=32, workers=0,
                           progress=False, dtype="float32", store=tmp_path / "s.zarr")
    s = featstore.open(tmp_path / "s.zarr")
    with pytest.raises(errors.AmbiguousGroupError, match="weights_sha256="):
        s.group(model="test_resnet", split="test")
    assert s.group(model="test_resnet", split="test", weights_sha256=h.spec.weights_sha256[:10]).name == h.name
    # a layout no adapter knows still lists every missing and unexpected key
    torch.save({"model": {f"module.net.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "odd.pt")
    with pytest.raises(errors.CheckpointError, match=r"does not fit the model: \d+ missing: .* \| \d+ unexpected: net\.conv1"):
        create_backbone("test_resnet", "checkpoint", tmp_path / "odd.pt")


def test_torchvision_vgg_classifier_becomes_timms_conv_mlp():
    """torchvision's Linear layers on the flattened 7 x 7 map and the adapter's 7 x 7 / 1 x 1
    convolutions compute the same function (checked on small shapes)."""
    from featstore.models import CHECKPOINT_ADAPTERS

    rng = torch.Generator().manual_seed(0)
    C, H, hidden, classes = 8, 7, 16, 5
    tv = {"features.0.weight": torch.randn(C, 3, 3, 3, generator=rng), "features.0.bias": torch.randn(C, generator=rng),
          "classifier.0.weight": torch.randn(hidden, C * H * H, generator=rng), "classifier.0.bias": torch.randn(hidden),
          "classifier.3.weight": torch.randn(hidden, hidden, generator=rng), "classifier.3.bias": torch.randn(hidden),
          "classifier.6.weight": torch.randn(classes, hidden, generator=rng), "classifier.6.bias": torch.randn(classes)}
    target = {"features.0.weight": tv["features.0.weight"], "features.0.bias": tv["features.0.bias"],
              "pre_logits.fc1.weight": torch.empty(hidden, C, H, H), "pre_logits.fc1.bias": torch.empty(hidden),
              "pre_logits.fc2.weight": torch.empty(hidden, hidden, 1, 1), "pre_logits.fc2.bias": torch.empty(hidden),
              "head.fc.weight": torch.empty(classes, hidden), "head.fc.bias": torch.empty(classes)}
    adapter = CHECKPOINT_ADAPTERS["torchvision-vgg"]
    assert adapter.detect(tv, target)
    out, _ = adapter.adapt(tv, target)
    assert set(out) == set(target) and all(out[k].shape == target[k].shape for k in target)
    x = torch.randn(2, C, H, H, generator=rng)
    F = torch.nn.functional
    linear = F.linear(F.relu(F.linear(x.flatten(1), tv["classifier.0.weight"], tv["classifier.0.bias"])),
                      tv["classifier.3.weight"], tv["classifier.3.bias"])
    conv = F.conv2d(F.relu(F.conv2d(x, out["pre_logits.fc1.weight"], out["pre_logits.fc1.bias"])),
                    out["pre_logits.fc2.weight"], out["pre_logits.fc2.bias"]).flatten(1)
    torch.testing.assert_close(conv, linear, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out["head.fc.weight"], tv["classifier.6.weight"])


@pytest.mark.slow
def test_torchvision_vgg_checkpoint_builds_the_models_own_features(tmp_path, image_folder):
    """A VGG11 saved with torchvision's key layout (classifier.0/3/6 as Linear layers) loads
    through the adapter; the stored features equal timm's own forward on the same weights."""
    import featstore

    torch.manual_seed(5)
    model = timm.create_model("vgg11")
    tv = {}
    for k, v in model.state_dict().items():  # timm's names and shapes back to torchvision's
        for timm_name, tv_name in (("pre_logits.fc1", "classifier.0"), ("pre_logits.fc2", "classifier.3"),
                                   ("head.fc", "classifier.6")):
            if k.startswith(timm_name + "."):
                k, v = tv_name + k[len(timm_name):], (v.flatten(1) if v.dim() == 4 else v)
        tv[k] = v
    assert tv["classifier.0.weight"].shape == (4096, 25088)
    torch.save(tv, tmp_path / "vgg11_torchvision.pth")
    del tv
    (g,) = featstore.build("vgg11", weights="checkpoint", checkpoint=tmp_path / "vgg11_torchvision.pth",
                           dataset=f"imagefolder:{image_folder}", splits="test", image_size=64, workers=0,
                           progress=False, dtype="float32", store=tmp_path / "s.zarr")
    assert "adapters=torchvision-vgg" in g.provenance["weights"]["description"]
    _assert_timm_features(g, model, image_folder)


def _assert_timm_features(g, model, image_folder) -> None:
    """The group's features equal timm's own pre-logits forward of ``model`` on its images."""
    model.reset_classifier(0)
    model.eval()
    eval_tf, _ = make_transforms(g.spec.transform)
    src = load_split(f"imagefolder:{image_folder}", "test")
    with torch.no_grad():
        want = np.stack([model.forward_head(model.forward_features(eval_tf(src.image(i))[None]), pre_logits=True)[0]
                         .numpy() for i in g.sample_index])
    np.testing.assert_allclose(g.numpy(), want, rtol=1e-4, atol=1e-4)
