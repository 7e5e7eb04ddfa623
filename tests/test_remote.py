"""Stores on object storage, against a real S3 API on loopback (moto's server)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import featstore
from featstore import errors
from featstore.cli import main

from .conftest import run_cli

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def local_store(tmp_path_factory, image_folder):
    store = tmp_path_factory.mktemp("remote") / "s.zarr"
    featstore.build("test_resnet", weights="random", dataset=f"imagefolder:{image_folder}", image_size=32,
                    workers=0, progress=False, store=store, dtype="float32", chunk_rows=8)
    return store


def _equal(a: featstore.Group, b: featstore.Group) -> None:
    assert a.spec == b.spec and a.classes == b.classes
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.sample_ids, b.sample_ids)


def test_push_then_open_reads_equal_to_local(local_store, s3, capsys):
    bucket, _ = s3
    url = f"{bucket}/features.zarr"
    assert main(["push", str(local_store), url, "--no-progress"]) == 0
    assert "2 group(s) pushed" in capsys.readouterr().out
    local, remote = featstore.open(local_store), featstore.open(url)
    assert remote.group_names() == local.group_names()
    for name in local.group_names():
        _equal(local.group(name), remote.group(name))
    assert main(["verify", "--store", url]) == 0
    assert "2 of 2 group(s) verified" in capsys.readouterr().out
    assert main(["ls", "--store", url, "--json"]) == 0
    assert {r["name"] for r in json.loads(capsys.readouterr().out)} == set(local.group_names())
    # a second push finds them there and uploads nothing
    assert main(["push", str(local_store), url, "--no-progress"]) == 0
    assert "0 group(s) pushed" in capsys.readouterr().out


def test_interrupted_push_shows_no_partial_group_and_resumes(local_store, s3):
    bucket, _ = s3
    url = f"{bucket}/features.zarr"
    name = featstore.open(local_store).group_names()[0]
    killed = run_cli("push", local_store, url, name, "--no-progress", env={"FEATSTORE_FAULT": "push-file:3"})
    assert killed.returncode == -9, killed.stderr  # SIGKILLed after its third file, before the metadata
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    uploaded = fs.find(url.removeprefix("s3://") + f"/{name}")
    assert len(uploaded) == 3  # three files of the group are there ...
    assert featstore.open(url).group_names() == []  # ... and no group is visible
    done = run_cli("push", local_store, url, name, "--no-progress", check=True)
    assert "1 group(s) pushed" in done.stdout
    _equal(featstore.open(local_store).group(name), featstore.open(url).group(name))


def test_a_chunk_deleted_on_the_store_is_named_by_every_read_and_a_push_restores_it(local_store, s3, capsys):
    """A chunk removed at the URL: verify names it (exit 1), reads refuse it instead of serving
    zeros, and a re-push uploads what the URL lacks ("restored"), not "already there"."""
    import fsspec

    bucket, _ = s3
    url = f"{bucket}/lossy.zarr"
    assert main(["push", str(local_store), url, "--no-progress"]) == 0
    name = featstore.open(local_store).group(split="train").name  # 30 rows: chunks of 8 rows 0..3
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.rm(url.removeprefix("s3://") + f"/{name}/features/c/1/0")
    capsys.readouterr()
    assert main(["verify", "--store", url]) == 1
    out = capsys.readouterr().out
    assert f"FAIL {name}" in out and "features: chunk 1 (rows 8..16) is missing" in out
    for read in (lambda g: g.numpy(), lambda g: g.dask().compute(), lambda g: g.features[8:9]):
        with pytest.raises(errors.CorruptGroupError, match="chunk 1 .* is missing"):
            read(featstore.open(url).group(name))
    assert main(["push", str(local_store), url, "--no-progress"]) == 0
    assert f"restored 1 file(s) {name}" in capsys.readouterr().out
    assert main(["verify", "--store", url]) == 0
    _equal(featstore.open(local_store).group(name), featstore.open(url).group(name))


def test_missing_bucket_and_wrong_credentials_are_one_clear_error(local_store, s3, monkeypatch, capsys):
    bucket, _ = s3
    assert main(["push", str(local_store), "s3://no-such-bucket-x/f.zarr", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "the bucket does not exist" in err and "Traceback" not in err and err.count("\n") == 1
    with pytest.raises(errors.RemoteStoreError, match="the bucket does not exist"):
        featstore.open("s3://no-such-bucket-x/f.zarr")
    with pytest.raises(errors.StoreNotFoundError):
        featstore.open(f"{bucket}/nothing-here.zarr")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    import fsspec

    fsspec.filesystem("s3").clear_instance_cache()
    assert main(["push", str(local_store), f"{bucket}/f.zarr", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "the credentials were refused" in err and "signature" in err and "Traceback" not in err
    assert main(["ls", "--store", f"{bucket}/f.zarr"]) == 2
    assert "the credentials were refused" in capsys.readouterr().err
    fsspec.filesystem("s3").clear_instance_cache()


def test_storage_options_on_the_command_line(local_store, s3, monkeypatch, capsys):
    bucket, server = s3
    url = f"{bucket}/features.zarr"
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var)
    opts = ["--storage-option", f"endpoint_url={server['endpoint']}", "--storage-option", f"key={server['key']}",
            "--storage-option", f"secret={server['secret']}"]
    assert main(["push", str(local_store), url, "--no-progress", *opts]) == 0
    capsys.readouterr()
    assert main(["ls", "--store", url, *opts]) == 0
    assert featstore.open(url, storage_options={"endpoint_url": server["endpoint"], "key": server["key"],
                                                "secret": server["secret"]}).group_names()
    assert main(["push", str(local_store), url, "--storage-option", "novalue"]) == 2
    assert "--storage-option: expected KEY=VALUE; got 'novalue'" in capsys.readouterr().err


SPEC = """
store = "{store}"
[[groups]]
model = "test_resnet"
layer = "pre_logits"
dataset = "{dataset}"
[selection]
modes = ["random"]
fractions = [0.25, 1.0]
seeds = [0, 1]
[probe]
epochs = 2
batch_size = 8
[metrics]
cka = true
"""


def test_a_dask_sweep_reads_the_store_from_s3(local_store, s3, tmp_path, image_folder):
    """Workers in other processes read the groups from the URL (credentials from their
    environment); the rows equal a local sweep on the local store."""
    from pipelines import run_sweep

    bucket, _ = s3
    url = f"{bucket}/features.zarr"
    featstore.remote.push(local_store, url, progress=False)
    (tmp_path / "local.toml").write_text(SPEC.format(store=local_store, dataset=f"imagefolder:{image_folder}"))
    (tmp_path / "remote.toml").write_text(SPEC.format(store=url, dataset=f"imagefolder:{image_folder}"))
    here = run_sweep(tmp_path / "local.toml", tmp_path / "a", launcher="local", progress=False)
    there = run_sweep(tmp_path / "remote.toml", tmp_path / "b", launcher="dask", workers=2, progress=False)
    cols = ["mode", "fraction", "k", "seed", "draw"]
    here, there = (d.sort_values(cols).reset_index(drop=True) for d in (here, there))
    assert len(here) == len(there) == 2 + 2 * 2
    assert set(there["train_group"]) == set(here["train_group"])
    np.testing.assert_array_equal(here["test_accuracy"], there["test_accuracy"])
    np.testing.assert_allclose(here["cka"], there["cka"], rtol=1e-9)
