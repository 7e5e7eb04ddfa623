"""What a build may write: finite values within the storage dtype, float16's resolution, the forward's precision."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

import featstore
from featstore import errors, make_transforms, resolve_transform
from featstore.datasets import load_split
from featstore.models import FeatureExtractor, create_backbone

CHANNEL = 7  # the pre_logits neuron the checkpoints below edit


def _checkpoint(tmp_path, name, bias, spread, shortcut_bias=0.0):
    """test_resnet's seeded random weights with pre_logits neuron CHANNEL set to about ``bias``:
    its last block adds bn2 (weight 0, bias ``bias``) to the shortcut scaled by ``spread``."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    state = {k: v.clone() for k, v in timm.create_model("test_resnet").state_dict().items()}
    state["layer4.0.bn2.weight"][CHANNEL] = 0.0
    state["layer4.0.bn2.bias"][CHANNEL] = bias
    state["layer4.0.downsample.2.weight"][CHANNEL] *= spread
    state["layer4.0.downsample.2.bias"][CHANNEL] = shortcut_bias
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def _with(tiny, ckpt, **kw):
    """The tiny build's keywords with the checkpoint's weights."""
    return {**tiny, "weights": "checkpoint", "checkpoint": ckpt, "splits": "test", **kw}


def _float64_forward(checkpoint, tiny, split="test"):
    """The model's own forward in float64, one image at a time: an independent reference."""
    model, _ = create_backbone("test_resnet", "checkpoint", checkpoint=checkpoint)
    model = model.double().eval()
    eval_tf, _ = make_transforms(resolve_transform(model, tiny["image_size"]))
    src = load_split(tiny["dataset"], split)
    ex = FeatureExtractor(model, ["pre_logits"])
    with torch.no_grad():
        return np.stack([ex(eval_tf(src.image(i))[None].double())["pre_logits"][0].numpy() for i in range(len(src))])


def test_float16_overflow_is_refused_before_writing_and_float32_keeps_it(tmp_path, tiny):
    """A neuron at ~1e5 (beyond float16's 65,504): the float16 build stops with one error naming
    the layer, the largest value and the fix, writes no chunk and lists nothing complete; the
    float32 build of the same weights equals a float64 forward."""
    ckpt = _checkpoint(tmp_path, "big", bias=1.0e5, spread=1.0)
    store = tmp_path / "s.zarr"
    kw = _with(tiny, ckpt, store=store)
    with pytest.raises(errors.Float16OverflowError,
                       match=rf"layer pre_logits holds values beyond float16's range \(largest \|value\| 1\d{{5}}(\.\d+)? "
                             rf"> 65504, neuron {CHANNEL}.*--dtype float32"):
        featstore.build(**kw)
    s = featstore.open(store)
    assert s.groups() == []
    (partial,) = s.groups(include_incomplete=True)
    assert zarr.open_array(str(store / partial.name / "progress"))[:].sum() == 0  # no chunk marked
    assert not list((store / partial.name / "features").rglob("c/*/*"))  # and none written
    (g,) = featstore.build(**kw, dtype="float32")
    want = _float64_forward(ckpt, tiny)
    assert want[:, CHANNEL].min() > 65504
    np.testing.assert_allclose(g.numpy(), want, rtol=2e-5, atol=1e-5)


def test_a_forward_that_overflows_float32_stops_the_build_naming_the_layer(tmp_path, tiny):
    """Finite weights whose sum overflows float32 (inf): one error naming the layer, nothing complete."""
    ckpt = _checkpoint(tmp_path, "huge", bias=3.0e38, spread=1.0, shortcut_bias=3.0e38)  # their sum: inf
    with pytest.raises(errors.NonFiniteFeaturesError, match=r"layer pre_logits gave \d+ NaN/inf values in rows 0\.\.5"):
        featstore.build(**_with(tiny, ckpt, store=tmp_path / "s.zarr", dtype="float32"))
    assert featstore.open(tmp_path / "s.zarr").groups() == []


def test_nan_checkpoint_weights_are_refused_at_load(tmp_path, tiny):
    ckpt = _checkpoint(tmp_path, "nan", bias=float("nan"), spread=1.0)
    with pytest.raises(errors.CheckpointError, match=r"1 tensors hold NaN or inf \(layer4\.0\.bn2\.bias\)"):
        featstore.build(**_with(tiny, ckpt, store=tmp_path / "s.zarr"))
    assert not (tmp_path / "s.zarr").exists()  # refused before the store was touched


def test_a_neuron_float16_stores_coarsely_is_reported_and_recorded(tmp_path, tiny):
    """Mean ~600, tiny spread (a massive-activation dimension): float16's step there is 0.5, so
    the stored column takes a few distinct values; the build says so, names the neuron and
    records it; other neurons keep their spread."""
    ckpt = _checkpoint(tmp_path, "massive", bias=600.0, spread=0.02)
    said = []
    (g,) = featstore.build(**_with(tiny, ckpt, store=tmp_path / "s.zarr"), log=said.append)
    stored = g.numpy()
    assert len(np.unique(stored[:, CHANNEL])) < 8  # the property the warning is about, counted directly
    record = g.float16_coarse
    assert record["examples"][0]["neuron"] == CHANNEL and record["examples"][0]["float16_step"] == 0.5
    assert record["neurons"] < g.n_neurons // 4  # the rest of the layer is fine
    assert any(f"for {record['neurons']} of {g.n_neurons} neurons of layer pre_logits (neuron {CHANNEL}: mean 6" in m
               and "--dtype float32" in m for m in said), said
    (f32,) = featstore.build(**_with(tiny, ckpt, store=tmp_path / "s.zarr", dtype="float32"), log=said.append)
    assert f32.float16_coarse is None and len(np.unique(f32.numpy()[:, CHANNEL])) > len(np.unique(stored[:, CHANNEL]))


@pytest.mark.parametrize("precision, compute", [(None, "float32"), ("fp32", "float32"), ("bf16", "autocast-bfloat16")])
def test_the_forward_precision_is_part_of_the_group_key(tmp_path, tiny, precision, compute):
    """--precision picks the forward's precision; it is recorded (ExtractionSpec.compute) and in
    the key, so bf16 features never pass for float32 ones; the CPU default stays float32 (the
    same group as without the option)."""
    store = tmp_path / "s.zarr"
    (default,) = featstore.build(**tiny, splits="test", store=store, dtype="float32")
    (g,) = featstore.build(**tiny, splits="test", store=store, dtype="float32", precision=precision)
    assert g.spec.compute == compute
    assert (g.name == default.name) == (compute == "float32")
    if precision == "bf16":  # bf16 autocast really ran: within bf16's rounding of the fp32 features, not equal
        diff = np.abs(g.numpy() - default.numpy())
        assert 0 < diff.max() < 0.05 * np.abs(default.numpy()).max()


def test_an_older_groups_float16_inf_is_named_as_overflow_with_the_fix(tmp_path, tiny):
    """A float16 group holding inf (written before builds checked overflow): verify names the
    overflow and --dtype float32, never "rebuild" alone (which reproduces the inf)."""
    (g,) = featstore.build(**tiny, splits="test", store=tmp_path / "s.zarr")
    arr = zarr.open_array(str(tmp_path / "s.zarr" / g.name / "features"), mode="r+")
    block = arr[:8]
    block[3, 5] = np.inf
    arr[:8] = block
    (problem,) = g.verify()
    assert "chunk 0 holds 1 NaN/Inf values (first at row 3, neuron 5); float16 overflow" in problem
    assert "--dtype float32" in problem
