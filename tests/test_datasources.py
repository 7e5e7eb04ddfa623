"""Dataset sources beyond image folders: Hugging Face datasets, webdataset shards (local and on
a real S3 API), CSV/parquet manifests, k-shot subsets and third-party sources.

Every source is written here, offline, from the same images as one image-folder tree, and
must give that tree's features and labels bit for bit: the rows come in the same order, so
the batches hold the same images and the same kernels run on them.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import featstore
from featstore import errors
from featstore.cli import main

from .conftest import make_image_folder, tree_listing

pytest.importorskip("datasets", reason="the [data] extra: pip install -e '.[data]' (make test installs it)")
pytest.importorskip("webdataset", reason="the [data] extra: pip install -e '.[data]' (make test installs it)")

CLASSES = ["class_0", "class_1", "class_2"]
BUILD = dict(model="test_resnet", weights="random", image_size=32, batch_size=5, workers=0, progress=False,
             chunk_rows=8, layers="pre_logits", dtype="float32")
SHARD_SIZE = 5  # not a multiple of chunk_rows: a chunk's rows straddle two shards


def _rows(tree: Path):
    """(path relative to tree's parent, class name, split) of every image, in the image folder's order."""
    from featstore._imagefolder import load_imagefolder

    out = []
    for split in ("train", "test"):
        src = load_imagefolder(tree, split)
        out += [(os.path.relpath(f, tree.parent), src.classes[t], split) for f, t in zip(src.files, src.targets)]
    return out


def write_shards(folder: Path, tree: Path, rows, per_shard: int = SHARD_SIZE) -> list[Path]:
    """webdataset shards {split}-NNN.tar of ``per_shard`` samples: png + cls (the class index)."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for split in ("train", "test"):
        sel = [r for r in rows if r[2] == split]
        for s in range(-(-len(sel) // per_shard)):
            path = folder / f"{split}-{s:03d}.tar"
            with wds.TarWriter(str(path)) as w:
                for j, (p, label, _) in enumerate(sel[per_shard * s: per_shard * (s + 1)]):
                    w.write({"__key__": f"{split}{per_shard * s + j:04d}", "png": (tree.parent / p).read_bytes(),
                             "cls": CLASSES.index(label)})
            written.append(path)
    return written


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """One image tree and the same images as a CSV and a parquet manifest, a saved HF
    DatasetDict and webdataset shards; the tree's reference build."""
    import datasets
    import pandas as pd

    root = tmp_path_factory.mktemp("sources")
    tree = make_image_folder(root / "tree", split_dirs=True)
    rows = _rows(tree)
    with open(root / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split"])
        w.writerows(rows)
    pd.DataFrame(rows, columns=["path", "label", "split"]).to_parquet(root / "manifest.parquet")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES),
                                  "name": datasets.Value("string")})
    datasets.DatasetDict({split: datasets.Dataset.from_dict(
        {"image": [{"bytes": (root / p).read_bytes(), "path": None} for p, _, s in rows if s == split],
         "label": [CLASSES.index(lab) for _, lab, s in rows if s == split],
         "name": [Path(p).stem + "-" + lab for p, lab, s in rows if s == split]}, features=features)
        for split in ("train", "test")}).save_to_disk(str(root / "hf"))
    write_shards(root / "shards", tree, rows)
    ref_store = root / "ref.zarr"
    ref = {g.spec.split: g for g in featstore.build(dataset=f"imagefolder:{tree}", store=ref_store, **BUILD)}
    return {"root": root, "tree": tree, "rows": rows, "ref": ref,
            "names": {"imagefolder": f"imagefolder:{tree}", "csv": f"csv:{root / 'manifest.csv'}",
                      "parquet": f"parquet:{root / 'manifest.parquet'}", "hf": f"hf:{root / 'hf'}",
                      "wds": f"wds:{root / 'shards'}/{{split}}-*.tar"}}


@pytest.fixture(autouse=True)
def _shard_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATSTORE_CACHE", str(tmp_path / "cache"))  # each test indexes its shards afresh


@pytest.mark.parametrize("source", ["csv", "parquet", "hf", "wds"])
def test_each_source_gives_the_image_folders_features_and_labels_bit_for_bit(tmp_path, sources, source):
    built = {g.spec.split: g for g in featstore.build(dataset=sources["names"][source], store=tmp_path / "s.zarr",
                                                     **BUILD)}
    assert set(built) == {"train", "test"}  # each source's own splits
    for split, g in built.items():
        ref = sources["ref"][split]
        assert g.is_complete and g.shape == ref.shape
        np.testing.assert_array_equal(g.numpy(), ref.numpy())
        np.testing.assert_array_equal(g.labels, ref.labels)
        # class names: the ClassLabel's, the manifest's label values; shards carry integer cls
        assert g.classes == (["0", "1", "2"] if source == "wds" else CLASSES)
        assert g.verify() == []
        ids = list(g.sample_ids)
        if source == "hf":
            assert ids == [f"{split}/{i}" for i in range(len(ids))]
        elif source == "wds":
            assert ids == [f"{split}{i:04d}" for i in range(len(ids))]
        else:
            assert ids == [p for p, _, s in sources["rows"] if s == split]
    assert run_main("verify", "--store", tmp_path / "s.zarr")[0] == 0


def run_main(*args):
    """``featstore ARGS`` in this process: (exit code, stdout + stderr)."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue()


def test_hf_columns_by_name_and_an_id_column(tmp_path, sources):
    (g,) = featstore.build(dataset=sources["names"]["hf"], splits="test", store=tmp_path / "s.zarr",
                           hf_image_column="image", hf_label_column="label", hf_id_column="name", **BUILD)
    np.testing.assert_array_equal(g.numpy(), sources["ref"]["test"].numpy())
    assert list(g.sample_ids) == [Path(p).stem + "-" + lab for p, lab, s in sources["rows"] if s == "test"]
    assert dict(g.spec.extra)["columns"] == "image=image, label=label, id=name"


def test_the_group_key_covers_the_sources_identity(tmp_path, sources):
    """An edited manifest, a changed shard, another HF column: another group, never the old rows."""
    import shutil

    store = tmp_path / "s.zarr"
    manifest = tmp_path / "m.csv"
    shutil.copy(sources["root"] / "manifest.csv", manifest)
    rel = {p: os.path.relpath(sources["root"] / p, tmp_path) for p, _, _ in sources["rows"]}
    manifest.write_text(manifest.read_text().replace("tree/", os.path.relpath(sources["tree"], tmp_path) + "/"))
    assert all(Path(tmp_path / r).is_file() for r in rel.values())
    (a,) = featstore.build(dataset=f"csv:{manifest}", splits="test", store=store, **BUILD)
    extra = dict(a.spec.extra)
    assert extra["manifest"].startswith("sha256 ")
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(lines[:-1]) + "\n")  # one image fewer
    (b,) = featstore.build(dataset=f"csv:{manifest}", splits="test", store=store, **BUILD)
    assert b.name != a.name and len(b) == len(a) - 1

    shards = tmp_path / "shards"
    write_shards(shards, sources["tree"], sources["rows"])
    (c,) = featstore.build(dataset=f"wds:{shards}/{{split}}-*.tar", splits="test", store=store, **BUILD)
    assert "shards" in dict(c.spec.extra) and "members" in dict(c.spec.extra)
    write_shards(shards, sources["tree"], sources["rows"], per_shard=3)  # the same samples, re-sharded
    (d,) = featstore.build(dataset=f"wds:{shards}/{{split}}-*.tar", splits="test", store=store, **BUILD)
    assert d.name != c.name
    np.testing.assert_array_equal(d.numpy(), c.numpy())

    (e,) = featstore.build(dataset=sources["names"]["hf"], splits="test", store=store, **BUILD)
    assert "fingerprint" in " ".join(f"{k} {v}" for k, v in e.spec.extra)
    (f,) = featstore.build(dataset=sources["names"]["hf"], splits="test", store=store, hf_id_column="name", **BUILD)
    assert f.name != e.name


# ----------------------------------------------------------------------------- webdataset shards


def _shard_reads():
    from featstore import _shards

    return _shards.SHARD_READS


def test_a_shard_build_killed_mid_pass_resumes_reading_only_the_rows_left(tmp_path, sources):
    """SIGKILL after the second chunk is marked; the re-run in this process reads each row still
    missing exactly once (--no-check: without it the check before the pass reads them once
    more), touches no shard whose rows are all done, and gives the uninterrupted build's group."""
    store = tmp_path / "s.zarr"
    name = sources["names"]["wds"]
    args = ["build", "--model", "test_resnet", "--weights", "random", "--dataset", name, "--splits", "train",
            "--image-size", "32", "--batch-size", "4", "--workers", "0", "--chunk-rows", "8", "--layers",
            "pre_logits", "--dtype", "float32", "--no-progress", "--store", store]
    env = {**os.environ, "FEATSTORE_FAULT": "chunk-mark:2", "PYTHONPATH": str(Path(featstore.__file__).parents[1])}
    killed = subprocess.run([sys.executable, "-m", "featstore.cli", *map(str, args)], capture_output=True, text=True,
                            env=env, timeout=300)
    assert killed.returncode == -9, killed.stderr
    (partial,) = featstore.open(store).groups(include_incomplete=True)
    assert not partial.is_complete
    import zarr

    done = zarr.open_array(str(store / partial.name / "progress"))[:].min(axis=0)  # (views, chunks): no views
    assert done[:2].all() and not done.all()
    _shard_reads().clear()
    assert run_main(*args, "--no-check")[0] == 0
    reads = dict(_shard_reads())
    n = len(sources["ref"]["train"])
    first_undone = int(np.argmin(done)) * 8
    shards = sorted((sources["root"] / "shards").glob("train-*.tar"))
    expected = {}
    for row in range(n):
        if not done[row // 8]:
            url = str(shards[row // SHARD_SIZE])
            expected[url] = expected.get(url, 0) + 1
    assert first_undone >= 16
    assert reads == expected  # every row left read once; shards of done rows not at all (their index is cached)
    g = featstore.open(store).group(split="train")
    np.testing.assert_array_equal(g.numpy(), sources["ref"]["train"].numpy())
    np.testing.assert_array_equal(g.labels, sources["ref"]["train"].labels)
    assert g.verify() == []


def test_shards_read_by_many_workers_come_in_shard_order(tmp_path, sources):
    opts = {**BUILD, "workers": 2}
    (g,) = featstore.build(dataset=sources["names"]["wds"], splits="train", store=tmp_path / "s.zarr", **opts)
    np.testing.assert_array_equal(g.numpy(), sources["ref"]["train"].numpy())
    assert list(g.sample_ids) == [f"train{i:04d}" for i in range(len(g))]


def _copy_shards(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_a_truncated_or_missing_shard_is_one_error_naming_it_or_a_recorded_skip(tmp_path, sources, capsys):
    shards = _copy_shards(sources["root"] / "shards", tmp_path / "shards")
    bad = shards / "test-000.tar"
    bad.write_bytes(bad.read_bytes()[:1500])  # cut inside the second member
    store = tmp_path / "s.zarr"
    base = ["build", "--model", "test_resnet", "--weights", "random", "--splits", "test", "--image-size", "32",
            "--workers", "0", "--no-progress", "--store", store]
    code, out = run_main(*base, "--dataset", f"wds:{shards}/{{split}}-*.tar")
    assert code == 2 and str(bad) in out and "Traceback" not in out
    assert "--bad-images skip" in out
    assert tree_listing(store) == []  # nothing on disk changed
    # a range naming a shard that is not there
    code, out = run_main(*base, "--dataset", f"wds:{shards}/{{split}}-{{001..003}}.tar")
    assert code == 2 and str(shards / "test-003.tar") in out and "missing" in out
    assert tree_listing(store) == []
    # under --bad-images skip: the rest is built and the shard's absence recorded with the group
    with pytest.warns(UserWarning, match="test-000.tar"):
        (g,) = featstore.build(dataset=f"wds:{shards}/{{split}}-*.tar", splits="test", store=store,
                               bad_images="skip", **BUILD)
    n = len(sources["ref"]["test"])
    assert len(g) == n - SHARD_SIZE
    assert [s["sample"] for s in g.skipped] == [str(bad)] and "not a complete tar shard" in g.skipped[0]["reason"]
    np.testing.assert_array_equal(g.numpy(), sources["ref"]["test"].numpy()[SHARD_SIZE:])


def test_a_shard_changed_after_indexing_is_never_read_as_another_member(tmp_path, sources):
    from featstore import _shards

    shards = _copy_shards(sources["root"] / "shards", tmp_path / "shards")
    url = str(shards / "test-000.tar")
    index = _shards.index_shard(url, "cls")
    assert index["names"][:4] == ["test0000.cls", "test0000.png", "test0001.cls", "test0001.png"]
    member = _shards.TarMember(url, index["offsets"][3], index["sizes"][3], index["names"][3])
    assert member.read() == (sources["tree"].parent / [p for p, _, s in sources["rows"] if s == "test"][1]) \
        .read_bytes()
    write_shards(tmp_path / "other", sources["tree"], sources["rows"], per_shard=2)
    (tmp_path / "other" / "test-000.tar").write_bytes(b"\0" * 1024 + (tmp_path / "other" / "test-000.tar").read_bytes())
    os.replace(tmp_path / "other" / "test-000.tar", url)  # same name, its members moved
    with pytest.raises(OSError, match="changed since it was indexed"):
        _shards.TarMember(url, index["offsets"][3], index["sizes"][3], index["names"][3]).read()


@pytest.mark.s3
def test_shards_on_s3_build_the_same_group(tmp_path, sources, s3):
    import fsspec

    bucket, _ = s3
    fs = fsspec.filesystem("s3")
    for p in sorted((sources["root"] / "shards").glob("*.tar")):
        fs.put_file(str(p), f"{bucket}/shards/{p.name}")
    built = {g.spec.split: g for g in featstore.build(dataset=f"wds:{bucket}/shards/{{split}}-*.tar",
                                                     store=tmp_path / "s.zarr", **BUILD)}
    assert set(built) == {"train", "test"}
    for split, g in built.items():
        np.testing.assert_array_equal(g.numpy(), sources["ref"][split].numpy())
        np.testing.assert_array_equal(g.labels, sources["ref"][split].labels)
    assert any(u.startswith("s3://") for u in _shard_reads())


# ----------------------------------------------------------------------------- k-shot subsets


@pytest.mark.parametrize("source", ["imagefolder", "csv", "hf", "wds"])
def test_per_class_takes_k_images_of_every_class_on_every_source(tmp_path, sources, source):
    (g,) = featstore.build(dataset=sources["names"][source], splits="train", per_class=3,
                           store=tmp_path / "s.zarr", **BUILD)
    assert np.bincount(g.labels).tolist() == [3, 3, 3]
    assert ("per_class", "3") in g.spec.extra and g.summary()["per_class"] == 3
    code, out = run_main("ls", "--store", tmp_path / "s.zarr")
    assert code == 0 and " 3/class " in out  # featstore ls's LIMIT column says it is a k-shot group
    full = sources["ref"]["train"]
    rows = g.sample_index
    np.testing.assert_array_equal(g.labels, full.labels[rows])
    # the same seeded choice of rows on every source
    (ref,) = [x for x in featstore.build(dataset=sources["names"]["imagefolder"], splits="train", per_class=3,
                                         store=tmp_path / "r.zarr", **BUILD)]
    np.testing.assert_array_equal(rows, ref.sample_index)
    np.testing.assert_allclose(g.numpy(), full.numpy()[rows], rtol=1e-5, atol=1e-6)  # other batches: a tolerance


def test_per_class_errors_name_the_short_classes_and_the_limit(tmp_path, sources):
    store = tmp_path / "s.zarr"
    base = ["build", "--model", "test_resnet", "--weights", "random", "--dataset", sources["names"]["csv"],
            "--splits", "test", "--no-progress", "--store", store]
    code, out = run_main(*base, "--per-class", "5")
    assert code == 2 and "--per-class 5" in out and "class_0 (4)" in out and "Traceback" not in out
    code, out = run_main(*base, "--per-class", "2", "--limit", "6")
    assert code == 2 and "per_class" in out and "limit" in out
    code, out = run_main(*base, "--per-class", "two")
    assert code == 2 and "per_class" in out.replace("-", "_")
    assert tree_listing(store) == []


# ----------------------------------------------------------------------------- options, listing, plugins


@pytest.mark.parametrize("extra, message", [
    (["--hf-image-column", "picture"], "'picture'"),
    (["--hf-label-column", "picture"], "hf_label_column"),
    (["--hf-image-column", "label"], "an Image column"),
    (["--hf-label-column", "image"], "a ClassLabel, integer or string column"),
    (["--hf-id-column", "nope"], "hf_id_column"),
    (["--wds-image-key", "jpg"], "wds_image_key"),
])
def test_a_source_option_it_cannot_use_is_one_error_before_any_work(tmp_path, sources, extra, message):
    store = tmp_path / "s.zarr"
    code, out = run_main("build", "--model", "test_resnet", "--weights", "random", "--dataset",
                         sources["names"]["hf"], "--splits", "test", "--no-progress", "--store", store, *extra)
    assert code == 2 and message in out and "Traceback" not in out, out
    assert tree_listing(store) == []


def test_shard_members_missing_are_named_with_the_options_that_pick_them(tmp_path, sources):
    code, out = run_main("build", "--model", "test_resnet", "--weights", "random", "--dataset",
                         sources["names"]["wds"], "--splits", "test", "--no-progress", "--store",
                         tmp_path / "s.zarr", "--wds-image-key", "jpg")
    assert code == 2 and "no image member (jpg)" in out and "--wds-image-key" in out


def test_datasets_command_lists_sources_and_their_options():
    code, out = run_main("datasets")
    assert code == 0
    for prefix in ("imagefolder:", "hf:", "wds:", "csv:", "parquet:"):
        assert prefix in out
    for option in ("--hf-image-column", "--hf-label-column", "--hf-id-column", "--wds-image-key", "--wds-label-key"):
        assert option in out


def test_third_party_sources_and_datasets_from_entry_points_reach_the_command_line(tmp_path):
    """A package declaring ``featstore.datasets`` entry points (a dist-info folder on PYTHONPATH,
    as pip would install it): one a source prefix, one a named dataset; both listed by
    ``featstore datasets`` and built by ``featstore build``."""
    (tmp_path / "mydata.py").write_text('''
import numpy as np
from PIL import Image
from featstore._datasources import DatasetSource
from featstore._images import ImageSource
from featstore.datasets import DatasetEntry


def _images(n, shade):
    return [Image.fromarray(np.full((16, 16, 3), (shade + 17 * i) % 256, np.uint8)) for i in range(n)]


def load(where, split, options, bad_images):
    imgs = _images(int(where), 40 if split == "train" else 90)
    return ImageSource(lambda i: imgs[i], np.arange(len(imgs)) % 2, ["even", "odd"],
                       [f"{split}-{i}" for i in range(len(imgs))], description=f"gradient {where}")


SOURCE = DatasetSource("gradient", lambda where, options: ("train", "test"), load, lambda where: str(int(where)),
                       paths=False, example="gradient:N", description="N grey images")
ENTRY = DatasetEntry("greys", ("test",), loader=lambda split, root, download: load("6", split, {}, "fail"),
                     description="six grey images")
''')
    info = tmp_path / "mydata-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mydata\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[featstore.datasets]\ngradient = mydata:SOURCE\ngreys = mydata:ENTRY\n")
    env = {"PYTHONPATH": f"{tmp_path}:{Path(featstore.__file__).parents[1]}", "PATH": "/usr/bin:/bin"}
    script = ("import sys; from featstore.cli import main\n"
              "assert main(['datasets']) == 0\n"
              "common = ['--model', 'test_resnet', '--weights', 'random', '--image-size', '32', '--workers', '0',"
              " '--no-progress', '--store', sys.argv[1]]\n"
              "assert main(['build', '--dataset', 'gradient:8', '--splits', 'test', *common]) == 0\n"
              "assert main(['build', '--dataset', 'greys', '--splits', 'test', *common]) == 0\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "s.zarr")], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "gradient:N" in proc.stdout and "N grey images" in proc.stdout and "greys" in proc.stdout
    s = featstore.open(tmp_path / "s.zarr")
    assert s.group(dataset="gradient:8").shape[0] == 8
    assert list(s.group(dataset="greys").sample_ids) == [f"test-{i}" for i in range(6)]


def test_unknown_source_prefix_lists_the_registered_ones(tmp_path):
    code, out = run_main("build", "--model", "test_resnet", "--weights", "random", "--dataset", "zip:/x.zip",
                         "--no-progress", "--store", tmp_path / "s.zarr")
    assert code == 2 and "zip" in out and "wds:" in out and "hf:" in out and "Traceback" not in out


# ----------------------------------------------------------------------------- a sweep on each source


@pytest.mark.parametrize("source", ["csv", "hf", "wds"])
def test_a_sweep_runs_on_each_source(tmp_path, sources, source):
    from pipelines import load_results

    store = tmp_path / "s.zarr"
    featstore.build(dataset=sources["names"][source], store=store, **BUILD)
    spec = tmp_path / "spec.toml"
    spec.write_text(f'''
store = "{store}"

[[groups]]
model = "test_resnet"
layer = "pre_logits"
dataset = "{sources["names"][source]}"

[selection]
modes = ["random"]
fractions = [0.25, 0.5]
seeds = [0]

[probe]
epochs = 2
batch_size = 8
''')
    code, out = run_main("sweep", spec, "--out", tmp_path / "out")
    assert code == 0, out
    res = load_results(tmp_path / "out")
    assert set(res["mode"]) >= {"random"} and set(res["fraction"]) >= {0.25, 0.5}
    assert res["test_accuracy"].between(0, 1).all()
    assert set(res["train_group"]) == {featstore.open(store).group(split="train").name}


def test_an_hf_folder_of_parquet_files_by_split_and_a_folder_that_holds_none(tmp_path, sources):
    """A folder of parquet files, as the hub lays them out (data/train-*.parquet): its splits
    from the file names; a folder with no dataset in it is one error, found without walking it."""
    import datasets

    d = datasets.load_from_disk(str(sources["root"] / "hf"))
    (tmp_path / "pq" / "data").mkdir(parents=True)
    for split in ("train", "test"):
        d[split].to_parquet(str(tmp_path / "pq" / "data" / f"{split}-00000-of-00001.parquet"))
    (g,) = featstore.build(dataset=f"hf:{tmp_path / 'pq'}", splits="test", store=tmp_path / "s.zarr", **BUILD)
    np.testing.assert_array_equal(g.numpy(), sources["ref"]["test"].numpy())
    (tmp_path / "none" / "a" / "b").mkdir(parents=True)
    code, out = run_main("build", "--model", "test_resnet", "--weights", "random", "--dataset",
                         f"hf:{tmp_path / 'none'}", "--no-progress", "--store", tmp_path / "t.zarr")
    assert code == 2 and "neither a dataset saved with save_to_disk" in out and "Traceback" not in out
    assert tree_listing(tmp_path / "t.zarr") == []
