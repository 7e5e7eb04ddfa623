"""Nothing read is other than what the build wrote: missing, damaged, swapped or foreign chunks,
removed groups, all-zero layers, edited metadata, and one bad group among good ones."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import zarr

import featstore
import probes
from featstore import errors

from .conftest import run_cli


@pytest.fixture
def built(tmp_path, tiny):
    """A store with two complete groups (train, test; float32, chunks of 8 rows) and its arrays."""
    store = tmp_path / "s.zarr"
    groups = featstore.build(**tiny, splits="train,test", store=store, dtype="float32")
    train = [g for g in groups if g.spec.split == "train"][0]
    return store, train, train.numpy()


def _chunk(store, g, c=0):
    return store / g.name / "features" / "c" / str(c) / "0"


def _every_read(g):
    """Each way a user or a sweep reads features."""
    return {"numpy": lambda: g.numpy(), "dask": lambda: g.dask().compute(), "features[:]": lambda: g.features[:],
            "features[rows]": lambda: g.features[6:10], "iter_blocks": lambda: list(g.iter_blocks()),
            "read_columns": lambda: g.read_columns([0, 3]),
            "probes": lambda: probes.SubsetProbes(fractions=(0.5,), seeds=(0,), epochs=1, device="cpu").fit(g),
            "cka": lambda: probes.subset_cka(g, [np.arange(5)])}


def test_a_missing_chunk_is_never_read_as_zeros_by_any_path(built):
    store, g, _ = built
    _chunk(store, g, 1).unlink()
    for name, read in _every_read(featstore.open(store).group(g.name)).items():
        with pytest.raises(errors.CorruptGroupError, match=r"features: chunk 1 \(rows 8\.\.16\) is missing"):
            read()
    problems = featstore.open(store).group(g.name).verify()
    assert any("chunk 1 (rows 8..16) is missing" in p for p in problems)
    assert run_cli("verify", "--store", store).returncode == 1


def test_a_flipped_bit_a_swapped_chunk_and_a_foreign_chunk_are_caught_by_their_hash(built, tmp_path, tiny):
    """Each chunk's content hash is recorded at build time and checked by every read and by
    verify: a one-bit flip inside a chunk, two chunks swapped within the group, another group's
    chunk copied in (all decodable, finite and the right size) are each named."""
    store, g, X = built
    original = {c: _chunk(store, g, c).read_bytes() for c in (0, 1)}

    def flipped_bit():  # a bit of the compressed payload: zstd's own frame check may or may not see it
        data = bytearray(original[0])
        data[len(data) // 2] ^= 0x01
        return bytes(data)

    (other,) = featstore.build(**{**tiny, "seed": 7}, splits="train", store=tmp_path / "o.zarr", dtype="float32")
    foreign = (tmp_path / "o.zarr" / other.name / "features" / "c" / "0" / "0").read_bytes()
    for name, (c0, c1) in {"one-bit flip": (flipped_bit(), original[1]), "swapped": (original[1], original[0]),
                           "foreign": (foreign, original[1])}.items():
        _chunk(store, g, 0).write_bytes(c0)
        _chunk(store, g, 1).write_bytes(c1)
        h = featstore.open(store).group(g.name)
        problems = h.verify()
        assert problems and all(("does not hold what the build wrote" in p or "unreadable" in p) for p in problems), name
        with pytest.raises(errors.CorruptGroupError, match="does not hold what the build wrote|unreadable"):
            h.numpy()
    _chunk(store, g, 0).write_bytes(original[0])
    _chunk(store, g, 1).write_bytes(original[1])
    h = featstore.open(store).group(g.name)
    assert h.verify() == [] and np.array_equal(h.numpy(), X)  # restored: sound again


def test_a_removed_groups_open_handle_raises_instead_of_reading_zeros(built):
    store, g, _ = built
    h = featstore.open(store).group(g.name)
    featstore.FeatureStore(store, mode="a").remove([g.name])
    for name, read in _every_read(h).items():
        with pytest.raises(errors.GroupNotFoundError, match="it was removed after it was opened"):
            read()


def test_a_legitimately_all_zero_layer_is_written_and_verifies(tmp_path, tiny):
    """A dead layer (every value 0, which zarr would skip as the fill value): every chunk is
    written, so verify passes and reads return the zeros as data."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    state = timm.create_model("test_resnet").state_dict()
    for key in ("layer4.0.bn2.weight", "layer4.0.bn2.bias", "layer4.0.downsample.2.weight",
                "layer4.0.downsample.2.bias"):
        state[key] = torch.zeros_like(state[key])
    path = tmp_path / "dead.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    (g,) = featstore.build(**{**tiny, "weights": "checkpoint", "checkpoint": path}, splits="test",
                           store=tmp_path / "s.zarr")
    assert g.is_complete and g.verify() == []
    assert not g.numpy().any() and len(list((tmp_path / "s.zarr" / g.name / "features" / "c").rglob("*"))) > 0


def _edit_json(path, edit):
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("what, edit, message", [
    ("features/zarr.json", lambda d: d.update(data_type="int16"), "features: dtype int16, the spec says float32"),
    ("features/zarr.json", lambda d: d.update(shape=[5000, 1000]), "features: shape (5000, 1000), the spec says"),
    ("zarr.json", lambda d: d["attributes"]["featstore"].update(n_samples=10**12),
     "features: shape (30, 96), the spec says (1000000000000, 96)"),
    ("zarr.json", lambda d: d["attributes"]["featstore"].update(n_neurons=7), "the spec says (30, 7)"),
], ids=["dtype", "shape", "n_samples", "n_neurons"])
def test_arrays_edited_against_their_spec_refuse_to_open_and_hide_nothing(built, what, edit, message):
    """The group refuses to open (one error naming the disagreement, nothing allocated); `ls`
    lists the other group and names this one; verify fails naming it; `rm` removes it."""
    store, g, _ = built
    _edit_json(store / g.name / what, edit)
    with pytest.raises(errors.StaleGroupError, match=r"its arrays disagree with its recorded spec \(.*"
                                                     + message.replace("(", r"\(").replace(")", r"\)")):
        featstore.open(store).group(g.name)
    _the_bad_group_affects_only_itself(store, g.name)


def test_a_truncated_group_document_or_a_copy_under_another_name_affects_only_itself(built):
    store, g, _ = built
    shutil.copytree(store / g.name, store / f"{g.name}.bak")
    _the_bad_group_affects_only_itself(store, f"{g.name}.bak")
    doc = store / g.name / "zarr.json"
    doc.write_text(doc.read_text()[: len(doc.read_text()) // 2])
    with pytest.raises(errors.CorruptGroupError, match="its metadata cannot be read"):
        featstore.open(store).group(g.name)
    _the_bad_group_affects_only_itself(store, g.name)


def _the_bad_group_affects_only_itself(store, bad: str):
    good = [n for n in featstore.open(store).group_names() if n != bad and not n.endswith(".bak")]
    listed = run_cli("ls", "--store", store)
    assert listed.returncode == 0 and all(n in listed.stdout for n in good), listed
    assert bad in listed.stdout and "unreadable" in listed.stdout and f"featstore rm {bad}" in listed.stderr
    assert all(featstore.open(store).group(n).verify() == [] for n in good)
    verified = run_cli("verify", "--store", store)
    assert verified.returncode == 1 and f"FAIL {bad}" in verified.stdout and "Traceback" not in verified.stderr
    assert f"{len(good)} of {len(good) + 1} group(s) verified" in verified.stdout
    removed = run_cli("rm", bad, "--store", store)
    assert removed.returncode == 0 and bad not in featstore.open(store).group_names(), removed.stderr
