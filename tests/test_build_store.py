"""featstore build -> Zarr groups -> reads: content, resume after SIGKILL, locks, staleness."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch
import zarr

import featstore
from featstore import errors
from featstore import make_transforms, resolve_transform
from featstore.datasets import load_split, stratified_subset
from featstore.models import FeatureExtractor, create_backbone

from .conftest import REPO, run_cli


def _reference_features(tiny, split, layers=("pre_logits",), limit=None, seed=0):
    """The slow, obvious way: transform each image, run the model one image at a time."""
    model, _ = create_backbone(tiny["model"], tiny["weights"], seed=seed)
    tspec = resolve_transform(model, tiny["image_size"])
    eval_tf, _ = make_transforms(tspec)
    src = load_split(tiny["dataset"], split)
    idx = stratified_subset(src.targets, limit, seed)
    ex = FeatureExtractor(model, list(layers))
    out = {layer: [] for layer in layers}
    with torch.no_grad():
        for i in idx:
            feats = ex(eval_tf(src.image(i))[None])
            for layer in layers:
                out[layer].append(feats[layer][0].numpy())
    return {k: np.stack(v) for k, v in out.items()}, src.targets[idx]


def test_build_writes_groups_equal_to_a_direct_forward_pass(tmp_path, tiny):
    store = tmp_path / "s.zarr"
    groups = featstore.build(**tiny, layers="pre_logits,layer3", splits="train,test", dtype="float32", store=store)
    assert len(groups) == 4  # 2 layers x 2 splits
    s = featstore.open(store)
    assert len(s.groups()) == 4
    for layer in ("pre_logits", "layer3"):
        g = s.group(layer=layer, split="train")
        ref, labels = _reference_features(tiny, "train", [layer])
        X = g.numpy()
        assert X.shape == ref[layer].shape == (g.n_samples, g.n_neurons)
        np.testing.assert_allclose(X, ref[layer], rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(g.labels, labels)
        assert g.spec.layer == layer and g.spec.split == "train" and g.state == "complete"
        assert g.classes == ["class_0", "class_1", "class_2"]
        assert g.verify() == []
    # the train/test split of a plain tree is seeded, disjoint and complete
    ids_train = set(s.group(layer="pre_logits", split="train").sample_ids)
    ids_test = set(s.group(layer="pre_logits", split="test").sample_ids)
    assert not ids_train & ids_test and len(ids_train | ids_test) == 36


def test_notebook_reads_zarr_numpy_dask_and_blocks(tmp_path, tiny):
    store = tmp_path / "s.zarr"
    featstore.build(**tiny, splits="train", store=store)
    g = featstore.open(store).group(model="test_resnet", dataset=tiny["dataset"], split="train")
    z = g.features  # indexes like the zarr array, each chunk read checked
    assert z.dtype == np.float16 and z.chunks == (8, g.n_neurons) and z.shape == (g.n_samples, g.n_neurons)
    assert isinstance(g.raw("features"), zarr.Array)  # the zarr array itself, for zarr's own API
    X = g.numpy()
    np.testing.assert_array_equal(z[:], X)
    np.testing.assert_array_equal(z[3:17, [5, 2, 90]], X[3:17][:, [5, 2, 90]])
    np.testing.assert_array_equal(z[9], X[9])
    np.testing.assert_array_equal(z[:, 4], X[:, 4])
    np.testing.assert_array_equal(z[np.array([29, 0, 8])], X[[29, 0, 8]])
    assert z[5, 7] == X[5, 7] and z[4:4].shape == (0, g.n_neurons)
    np.testing.assert_array_equal(g.dask().compute(), X)
    blocks = list(g.iter_blocks(block_rows=7))
    np.testing.assert_array_equal(np.concatenate([b for _, b, _ in blocks]), X)
    np.testing.assert_array_equal(np.concatenate([y for _, _, y in blocks]), g.labels)
    assert [start for start, _, _ in blocks] == list(range(0, g.n_samples, 7))
    assert g.spec.model == "test_resnet" and g.spec.transform.input_size == (3, 32, 32)


def test_limit_is_stratified_seeded_and_recorded(tmp_path, tiny):
    store = tmp_path / "s.zarr"
    (g,) = featstore.build(**tiny, splits="train", limit=9, seed=3, store=store)
    assert g.n_samples == 9 and g.spec.limit == 9 and g.spec.seed == 3
    assert np.bincount(g.labels).tolist() == [3, 3, 3]
    (again,) = featstore.build(**tiny, splits="train", limit=9, seed=3, store=tmp_path / "t.zarr")
    np.testing.assert_array_equal(g.sample_ids, again.sample_ids)
    (other,) = featstore.build(**tiny, splits="train", limit=9, seed=4, store=store)
    assert other.name != g.name  # another subset is another group, never the same one


def test_views_are_augmented_seeded_and_reproducible(tmp_path, tiny):
    (g,) = featstore.build(**tiny, splits="train", views=2, store=tmp_path / "a.zarr")
    assert g.n_views == 2 and g.spec.augmentation.startswith("RandomHorizontalFlip")
    clean, v1, v2 = g.numpy(0), g.numpy(1), g.numpy(2)
    assert clean.shape == v1.shape == v2.shape
    assert not np.array_equal(clean, v1) and not np.array_equal(v1, v2)
    np.testing.assert_array_equal(g.dask(view=2).compute(), v2)
    # same views whatever the batch size and worker count: seeded per (view, sample)
    (h,) = featstore.build(**{**tiny, "batch_size": 3, "workers": 2}, splits="train", views=2,
                           store=tmp_path / "b.zarr")
    np.testing.assert_allclose(h.numpy(2).astype(np.float32), v2.astype(np.float32), atol=2e-3)
    with pytest.raises(errors.InvalidParameterError, match=r"view: expected 0 \(clean\) or 1\.\.2 \(augmented\)"):
        g.view(3)
    # the test split never gets views
    (t,) = featstore.build(**tiny, splits="test", views=2, store=tmp_path / "a.zarr")
    assert t.n_views == 0


def test_spec_change_gives_another_group_and_tampering_fails_loudly(tmp_path, tiny):
    store = tmp_path / "s.zarr"
    (a,) = featstore.build(**tiny, splits="test", store=store)
    (b,) = featstore.build(**tiny, splits="test", store=store, dtype="float32")
    (c,) = featstore.build(**{**tiny, "image_size": 40}, splits="test", store=store)
    assert len({a.name, b.name, c.name}) == 3
    # editing the recorded spec (e.g. by hand) makes the group refuse to open
    zg = zarr.open_group(str(store / a.name), mode="a")
    meta = zg.attrs["featstore"]
    meta["spec"]["transform"]["input_size"] = [3, 64, 64]
    zg.attrs["featstore"] = meta
    with pytest.raises(errors.StaleGroupError, match="attributes were changed"):
        featstore.open(store).group(a.name)
    s = featstore.open(store)
    assert {g.name for g in s.groups()} == {b.name, c.name}  # the others are still listed ...
    assert "attributes were changed" in s.unreadable[a.name]  # ... and the tampered one is named


def test_rebuilding_a_complete_group_does_nothing(tmp_path, tiny, capsys):
    store = tmp_path / "s.zarr"
    (a,) = featstore.build(**tiny, splits="test", store=store)
    mtime = (store / a.name / "features" / "c" / "0" / "0").stat().st_mtime_ns
    (b,) = featstore.build(**tiny, splits="test", store=store)
    assert b.name == a.name
    assert (store / a.name / "features" / "c" / "0" / "0").stat().st_mtime_ns == mtime
    assert "already complete" in capsys.readouterr().err


# ---------------------------------------------------------------- crash safety


def _cli_args(tiny, store, extra=()):
    return ["build", "--model", tiny["model"], "--weights", "random", "--dataset", tiny["dataset"],
            "--image-size", "32", "--batch-size", "4", "--workers", "0", "--chunk-rows", "8",
            "--layers", "pre_logits,layer2", "--views", "1", "--splits", "train", "--store", store,
            "--no-progress", *extra]


def _main(*args):
    """``featstore ARGS`` in this process: (exit code, stdout)."""
    import contextlib
    import io

    from featstore.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([str(a) for a in args])
    return code, out.getvalue()


def _arrays(store):
    s = featstore.open(store)
    out = {}
    for g in s.groups():
        out[(g.spec.layer, g.spec.split)] = (g.numpy(0), g.numpy(1) if g.n_views else None,
                                             g.labels, g.sample_ids)
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, image_folder):
    tiny = {"model": "test_resnet", "dataset": f"imagefolder:{image_folder}"}
    store = tmp_path_factory.mktemp("ref") / "s.zarr"
    run_cli(*_cli_args(tiny, store), check=True)
    return tiny, _arrays(store)


# one kill at each kind of point (the random-moment test below covers the rest of the pass):
# a group created but not renamed in, a chunk written but not marked, a chunk marked with others
# before it, and before / between the groups' final complete metadata writes
@pytest.mark.parametrize("fault", ["group-created:2", "chunk-data:1", "chunk-mark:3", "finish:1", "finish:2"])
def test_sigkill_then_rerun_equals_uninterrupted_build(tmp_path, uninterrupted, fault):
    tiny, ref = uninterrupted
    store = tmp_path / "s.zarr"
    killed = run_cli(*_cli_args(tiny, store), env={"FEATSTORE_FAULT": fault})
    assert killed.returncode == -9, killed.stderr  # it really died by SIGKILL
    # whatever was left is never listed or opened as complete
    s = featstore.open(store) if (store / "zarr.json").exists() else None
    if s is not None:
        complete = {g.spec.layer for g in s.groups()}
        partial = [g for g in s.groups(include_incomplete=True) if not g.is_complete]
        assert len(complete) + len(partial) <= 2
        for g in partial:
            with pytest.raises(errors.IncompleteGroupError, match="Re-run the same"):
                s.group(g.name)
            with pytest.raises(errors.IncompleteGroupError):
                g.features
        code, out = _main("ls", "--json", "--store", store)
        assert code == 0 and all(r["state"] == "complete" for r in json.loads(out))
    # the same command again finishes the job (here in this process: a fresh interpreter's start
    # adds nothing the kill above did not already test)
    assert _main(*_cli_args(tiny, store))[0] == 0
    got = _arrays(store)
    assert got.keys() == ref.keys()
    for key in ref:
        for a, b in zip(got[key], ref[key]):
            np.testing.assert_array_equal(a, b)
    assert _main("verify", "--store", store)[0] == 0
    assert not list(store.rglob("*.partial"))


def test_resume_recomputes_only_unfinished_chunks(tmp_path, uninterrupted):
    tiny, _ = uninterrupted
    store = tmp_path / "s.zarr"
    run_cli(*_cli_args(tiny, store), env={"FEATSTORE_FAULT": "chunk-mark:4"})
    s = featstore.open(store)
    (g,) = [g for g in s.groups(include_incomplete=True) if g.spec.layer == "pre_logits"]
    done_before = zarr.open_array(str(store / g.name / "progress"))[:].sum()
    assert done_before >= 2  # marks alternate between the two layer groups
    chunk = store / g.name / "features" / "c" / "0" / "0"
    mtime = chunk.stat().st_mtime_ns
    assert _main(*_cli_args(tiny, store))[0] == 0
    assert chunk.stat().st_mtime_ns == mtime  # the finished chunk was not rewritten


def _marked_chunks(store) -> int:
    """Chunks recorded done in every group's progress array (each marked chunk is one file)."""
    return sum(1 for p in store.glob("*/progress/c/*/*") if p.is_file())


def test_external_sigkill_at_random_moments(tmp_path, uninterrupted):
    """Kill the real process from outside at arbitrary moments of its pass, not at chosen points:
    each kill lands after this run marked a chunk and before the build finished (checked)."""
    import subprocess
    import sys

    tiny, ref = uninterrupted
    store = tmp_path / "s.zarr"
    rng = np.random.default_rng(0)
    total = sum(2 * -(-len(a) // 8) for a, *_ in ref.values())  # 1 + 1 view, chunks of 8 rows, per group
    before = 0
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "featstore.cli", *map(str, _cli_args(tiny, store))],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while _marked_chunks(store) <= before and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # until this run has written a chunk: it is in the middle of its pass
        time.sleep(float(rng.uniform(0.0, 0.05)))
        proc.kill()
        proc.wait()
        after = _marked_chunks(store)
        assert proc.returncode == -9, "the build ended before the kill"
        assert before < after < total, (before, after, total)  # killed mid-pass, after writing chunks
        before = after
    run_cli(*_cli_args(tiny, store), check=True)
    got = _arrays(store)
    for key in ref:
        for a, b in zip(got[key], ref[key]):
            np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- concurrency


def test_second_build_waits_or_exits_with_a_clear_message(tmp_path, tiny):
    store = tmp_path / "s.zarr"
    fs = featstore.FeatureStore(store, mode="a")
    # find the group name the build will use by building once elsewhere
    (g,) = featstore.build(**tiny, splits="test", store=tmp_path / "probe.zarr")
    with fs.lock([g.name]):
        with pytest.raises(errors.GroupLockedError, match="is being built by pid"):
            featstore.build(**tiny, splits="test", store=store, wait=False)
        assert featstore.open(store).groups(include_incomplete=True) == []
        messages = []
        result = {}

        def waiter():
            result["groups"] = featstore.build(**tiny, splits="test", store=store, log=messages.append)

        t = threading.Thread(target=waiter)
        t.start()
        deadline = time.monotonic() + 120  # the waiter loads the model first; a busy CI machine is slow
        while not any("waiting" in m for m in messages) and t.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert t.is_alive() and any("waiting" in m for m in messages), messages
        assert featstore.open(store).groups() == []  # nothing complete while it waits
    t.join(60)
    assert result["groups"][0].is_complete


def test_two_concurrent_builds_of_one_group_do_not_corrupt_it(tmp_path, uninterrupted):
    import subprocess
    import sys

    tiny, ref = uninterrupted
    store = tmp_path / "s.zarr"
    procs = [subprocess.Popen([sys.executable, "-m", "featstore.cli", *map(str, _cli_args(tiny, store))],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert any("already complete" in err for _, err in outs)
    got = _arrays(store)
    for key in ref:
        for a, b in zip(got[key], ref[key]):
            np.testing.assert_array_equal(a, b)


_RACE = """
import os, sys, time
import zarr  # imported before the start line, so every process reaches the root at once
from featstore import FeatureStore
go = float(sys.argv[2])
late = time.time() > go
while time.time() < go:
    pass
FeatureStore(sys.argv[1], mode="a")
print("late" if late else "on time")
"""


def test_many_processes_creating_one_new_store_all_succeed(tmp_path):
    """The root is created atomically: no process sees another's half-made root (a CI failure once).

    Every process spins until one instant; a trial where a process arrived after it raced no
    one and does not count. Too few trials that raced skip the test, saying so."""
    import subprocess
    import sys
    import time

    raced = 0
    for trial in range(8):
        store = tmp_path / f"s{trial}.zarr"
        go = time.time() + 1.5 + trial  # later start lines when a busy machine is slow to start processes
        procs = [subprocess.Popen([sys.executable, "-c", _RACE, str(store), str(go)], cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(6)]
        outs = [p.communicate(timeout=60) for p in procs]
        assert [p.returncode for p in procs] == [0] * 6, [e for _, e in outs]
        assert sorted(e.name for e in store.iterdir()) == ["zarr.json"]
        assert featstore.open(store).groups() == []
        raced += all(o.strip() == "on time" for o, _ in outs)
        if raced == 2:  # two real races of six processes (each trial costs seconds of process starts)
            return
    pytest.skip(f"only {raced} of 8 trials had all 6 processes at the start line (machine too busy to race)")


def test_store_with_a_root_write_in_flight_is_not_foreign(tmp_path):
    store = tmp_path / "s.zarr"
    store.mkdir()
    (store / ".zarr.json.0123456789ab.tmp").write_text("{")  # another process is writing the root
    featstore.FeatureStore(store, mode="a")
    assert featstore.open(store).groups() == []
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(errors.NotAFeatureStoreError, match="non-empty directory"):
        featstore.FeatureStore(tmp_path / "other", mode="a")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_build_on_cuda_matches_cpu(tmp_path, tiny):
    """The GPU build (autocast float16) gives the CPU's features within float16 rounding,
    in its own group: the compute precision is part of the key."""
    kw = dict(tiny, dtype="float32", splits="train")
    (cpu,) = featstore.build(**kw, store=tmp_path / "s.zarr", device="cpu")
    (gpu,) = featstore.build(**kw, store=tmp_path / "s.zarr", device="cuda")
    assert gpu.name != cpu.name and gpu.spec.compute == "autocast-float16" and gpu.provenance["device"].startswith("cuda")
    a, b = cpu.numpy(), gpu.numpy()
    np.testing.assert_array_equal(cpu.labels, gpu.labels)
    np.testing.assert_allclose(b, a, rtol=0.02, atol=0.02 * np.abs(a).max())
    assert gpu.verify() == []


def test_original_preset_preprocesses_as_the_released_code(tmp_path, image_folder):
    """`--preset original`: eval = Resize(224) + CenterCrop(224) + ImageNet normalisation, views =
    RandomResizedCrop(224), flip, ColorJitter(.25, .25, .25), rotation 2 (deep-learning-base's
    TEST_TRANSFORMS_DEFAULT / TRAIN_TRANSFORMS_TRANSFER_DEFAULT), written out here literally."""
    import torchvision.transforms as T
    from PIL import Image

    from featstore import PREPROCESSING

    model, _ = create_backbone("test_resnet", "random")
    t = PREPROCESSING["original"].transform(model, None)
    eval_tf, view_tf = make_transforms(t, PREPROCESSING["original"].augmentation)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    released_eval = T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor(), T.Normalize(mean, std)])
    released_train = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ColorJitter(.25, .25, .25),
                                T.RandomRotation(2), T.ToTensor(), T.Normalize(mean, std)])
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 260, 3), dtype=np.uint8))
    torch.testing.assert_close(eval_tf(img), released_eval(img))
    torch.manual_seed(4)
    a = view_tf(img)
    torch.manual_seed(4)
    torch.testing.assert_close(a, released_train(img))
    # a build with the preset records it, so it is another group than the default
    tiny = dict(model="test_resnet", weights="random", dataset=f"imagefolder:{image_folder}", workers=0,
                progress=False, splits="train", image_size=32, store=tmp_path / "s.zarr")
    (g,) = featstore.build(**tiny, preset="original", views=1)
    (h,) = featstore.build(**tiny, views=1)
    assert g.name != h.name and g.spec.transform.crop_pct == 1.0 and g.spec.transform.mean == mean
    assert g.spec.augmentation.startswith("RandomResizedCrop") and h.spec.augmentation.startswith("RandomHorizontalFlip")


def test_a_wide_flattened_layer_splits_its_chunks_by_column_and_reads_back_equal(tmp_path, tiny, monkeypatch):
    """A flattened feature map wider than WIDE_COLUMNS (lowered here to 64) is stored in chunks
    of WIDE_CHUNK_COLUMNS columns; it reads back equal to the module's own flattened output; a
    column subset reads only the chunks holding it (a missing chunk of other columns does not
    matter, one of its own is named); verify names a missing column chunk."""
    import featstore._groups as build_mod  # where a group's chunk layout is decided
    from featstore.models import FeatureExtractor

    monkeypatch.setattr(build_mod, "WIDE_COLUMNS", 64)
    monkeypatch.setattr(build_mod, "WIDE_CHUNK_COLUMNS", 48)
    kw = dict(tiny, dtype="float32", splits="test", layers="layer1", pooling="flatten")
    (g,) = featstore.build(**kw, store=tmp_path / "s.zarr")
    arr = zarr.open_group(str(tmp_path / "s.zarr" / g.name), mode="r")["features"]
    d = g.n_neurons
    assert d > 64 and arr.chunks == (g.spec.chunk_rows, 48)
    model, _ = create_backbone(tiny["model"], tiny["weights"])
    model.eval()
    eval_tf, _ = make_transforms(g.spec.transform)
    src = load_split(tiny["dataset"], "test")
    with torch.no_grad():
        out = FeatureExtractor(model, ["layer1"], pooling="flatten")(
            torch.stack([eval_tf(src.image(i)) for i in g.sample_index]))
    want = out["layer1"].numpy()
    stored = g.numpy()
    # the forward above batches the images differently from the build: another kernel path,
    # so it agrees to float32 rounding; reads of the store are compared with the store exactly
    np.testing.assert_allclose(stored, want, rtol=1e-5, atol=1e-5)
    cols = np.random.default_rng(0).permutation(d)[:30]
    np.testing.assert_array_equal(g.read_columns(cols), stored[:, cols])
    assert g.verify() == []
    victim = tmp_path / "s.zarr" / g.name / "features" / "c" / "0" / "1"  # row chunk 0, columns 48..95
    victim.unlink()
    np.testing.assert_array_equal(g.read_columns(np.arange(0, 48)), stored[:, :48])  # never needed that chunk
    with pytest.raises(errors.CorruptGroupError, match=r"chunk 0 \(rows 0\.\.\d+, columns 48\.\.96\) is missing"):
        g.read_columns(np.array([3, 50]))
    assert any("columns 48..96) is missing" in p for p in g.verify())
