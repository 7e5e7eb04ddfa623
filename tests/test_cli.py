"""The command line: ls/info/verify/layers, and bad input that changes nothing on disk."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

import featstore
from featstore import errors
from featstore.cli import main

from .conftest import run_cli, tree_listing


def _tiny_args(image_folder, store, *extra):
    return ["build", "--model", "test_resnet", "--weights", "random", "--dataset", f"imagefolder:{image_folder}",
            "--image-size", "32", "--workers", "0", "--store", str(store), "--no-progress", *extra]


@pytest.fixture
def built(tmp_path, image_folder):
    store = tmp_path / "s.zarr"
    assert main(_tiny_args(image_folder, store, "--chunk-rows", "8")) == 0
    return store


def test_ls_info_verify(built, capsys):
    capsys.readouterr()
    assert main(["ls", "--store", str(built), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["split"] for r in rows} == {"train", "test"}
    for r in rows:
        assert r["state"] == "complete" and r["dtype"] == "float16" and r["n_neurons"] == 96
        assert r["bytes_on_disk"] > 0 and r["model"] == "test_resnet" and r["layer"] == "pre_logits"
    assert main(["ls", "--store", str(built)]) == 0
    table = capsys.readouterr().out
    assert "SHAPE" in table and "30x96" in table and "complete" in table
    name = rows[0]["name"]
    assert main(["info", name, "--store", str(built)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["spec"]["model"] == "test_resnet" and info["key"].startswith(name[-12:])
    assert info["provenance"]["versions"]["torch"] and info["provenance"]["weights"]["sha256"]
    assert main(["verify", "--store", str(built)]) == 0
    assert "2 of 2 group(s) verified" in capsys.readouterr().out


def test_verify_names_a_missing_or_corrupt_chunk(built, capsys):
    s = featstore.open(built)
    g = s.group(split="train")
    chunk = built / g.name / "features" / "c" / "1" / "0"
    chunk.unlink()
    other = s.group(split="test")
    (built / other.name / "features" / "c" / "0" / "0").write_bytes(b"garbage")
    capsys.readouterr()
    assert main(["verify", "--store", str(built)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL {g.name}" in out and "chunk 1" in out and "missing" in out and str(chunk) in out
    assert f"FAIL {other.name}" in out and "unreadable" in out
    with pytest.raises(errors.CorruptGroupError, match=str(built / g.name)):
        g.check_readable()


def test_verify_finds_nan_and_bad_labels(built, capsys):
    s = featstore.open(built)
    g = s.group(split="test")
    z = zarr.open_group(str(built / g.name), mode="a")
    z["features"][2, 5] = np.nan
    z["labels"][0] = 7
    problems = featstore.open(built).group(split="test").verify()
    assert any("NaN/Inf" in p and "row 2" in p for p in problems)
    assert any("labels: 1 outside 0..2" in p for p in problems)


def test_layers_command(capsys):
    assert main(["layers", "resnet50"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert rows[0] == ["pre_logits", "1x2048", "2048"]  # name, output shape on one image, width
    assert ["layer3.5.act3", "1x1024x14x14", "1024"] in rows
    assert main(["layers", "resnet5"]) == 2
    assert "Unknown model 'resnet5'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        # options checked against BuildOptions by featstore itself (argparse only collects text)
        (["--dataset", "imagenet-xl"], "--dataset: expected a registered dataset (cifar10, cifar100, digits, "
                                       "fashion-mnist, flowers102, oxford-pets) or SOURCE:WHERE (imagefolder:PATH, hf:PATH_OR_NAME, "
                                       "wds:URL_PATTERN, csv:FILE, parquet:FILE); got 'imagenet-xl'"),
        (["--dataset", "../../etc"], "--dataset: expected a registered dataset"),
        (["--limit", "0"], "--limit: expected an integer >= 1; got 0 (integer)"),
        (["--limit", "-3"], "--limit: expected an integer >= 1; got -3 (integer)"),
        (["--limit", "ten"], "--limit: expected an integer >= 1; got 'ten' (string)"),
        (["--chunk-rows", "0.5"], "--chunk-rows: expected an integer in [1, 1048576]; got '0.5' (string)"),
        (["--image-size", "4"], "--image-size: expected an integer in [8, 4096]; got 4 (integer)"),
        (["--weights", "magic"], "--weights: Unknown weight source 'magic'; known: checkpoint, embedded, hub, random"),
        (["--map", "fuzzy"], "--map: Unknown weight mapping 'fuzzy'; known: names, positional"),
        (["--dtype", "float64"], "--dtype: expected one of 'float16', 'float32'; got 'float64' (string)"),
        (["--pooling", "mean"], "--pooling: expected one of 'avg', 'max', 'cls', 'flatten', 'avg_all', 'cls+avg'; got 'mean'"),
        (["--device", "tpu"], "--device: expected one of 'auto', 'cpu', 'cuda' or 'cuda:N'; got 'tpu'"),
        (["--layers", "../x"], "--layers[0]: expected a name without path separators or '..'; got '../x'"),
        (["--splits", ""], "--splits: expected a non-empty list"),
        # checks that need the model or the dataset
        (["--model", "resnet_nope"], "Unknown model 'resnet_nope'"),
        (["--layers", "layer9"], "Unknown layer 'layer9' for test_resnet; known: "),
        (["--splits", "validation"], "Unknown split 'validation' for dataset 'imagefolder:"),
        (["--weights", "checkpoint"], "weights='checkpoint' cannot be used here: it needs --checkpoint FILE"),
    ],
)
def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path, image_folder, capsys, extra, message):
    store = tmp_path / "s.zarr"
    args = _tiny_args(image_folder, store) + extra
    if "--model" in extra:  # later flags win in argparse: replace the model
        args[args.index("test_resnet")] = extra[1]
    assert main(args) == 2  # featstore's own check: argparse would exit with a usage message
    err = capsys.readouterr().err
    assert err.startswith("featstore build: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert tree_listing(tmp_path) == []  # nothing half-written


def test_every_build_option_is_a_declared_parameter():
    """The command line's build options are BuildOptions' fields, with its defaults: none is
    declared twice."""
    import argparse

    from featstore.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    dests = {a.dest for a in sub.choices["build"]._actions} - {"help"}
    python_only = {name for name, f in featstore.BuildOptions.model_fields.items()
                   if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("cli") is False}
    assert python_only == {"name", "preprocess"}  # a module's name and preprocessing: from Python only
    # --spec names a file of builds these options apply to: the command's, not a build option
    assert dests - {"spec"} == set(featstore.BuildOptions.model_fields) - python_only
    assert main.__module__ == "featstore.cli"
    help_text = " ".join(sub.choices["build"].format_help().split())
    assert "(default: float16)" in help_text and "--no-progress" in help_text and "--map" in help_text


def test_checkpoint_that_does_not_fit_changes_nothing(tmp_path, image_folder):
    import torch

    bad = tmp_path / "ckpt"
    bad.mkdir()
    torch.save({"w": torch.zeros(3)}, bad / "other.pth")
    store = tmp_path / "s.zarr"
    proc = run_cli(*_tiny_args(image_folder, store, "--weights", "checkpoint", "--checkpoint", bad / "other.pth"))
    assert proc.returncode == 2 and "does not fit the model" in proc.stderr and "1 unexpected: w" in proc.stderr
    assert not store.exists()


def test_unwritable_or_foreign_store_paths(tmp_path, image_folder, capsys):
    from featstore.cli import main  # in this process: the exit code and the message, without a new interpreter

    def cli(*args):
        code = main([str(a) for a in args])
        return code, capsys.readouterr().err

    afile = tmp_path / "a_file"
    afile.write_text("x")
    code, err = cli(*_tiny_args(image_folder, afile / "s.zarr"))
    assert code == 2 and "cannot be written: " in err and "is a file" in err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    before = tree_listing(foreign)
    code, err = cli(*_tiny_args(image_folder, foreign))
    assert code == 2 and "is not a featstore store: a non-empty directory that featstore did not write" in err
    assert tree_listing(foreign) == before
    other_zarr = tmp_path / "other.zarr"
    zarr.open_group(str(other_zarr), mode="w").create_array("x", shape=(2,), dtype="f4")
    before = tree_listing(other_zarr)
    code, err = cli(*_tiny_args(image_folder, other_zarr))
    assert code == 2 and "Zarr hierarchy that featstore did not write" in err
    assert tree_listing(other_zarr) == before
    with pytest.raises(errors.StoreNotFoundError, match="No feature store at"):
        featstore.open(tmp_path / "missing.zarr")
    assert not issubclass(errors.StoreNotFoundError, errors.GroupNotFoundError)  # a missing store is not a missing group
    assert issubclass(errors.StoreNotFoundError, FileNotFoundError)


def test_lookup_errors_are_actionable(built):
    s = featstore.open(built)
    with pytest.raises(errors.AmbiguousGroupError, match="2 groups match"):
        s.group(model="test_resnet")
    with pytest.raises(errors.GroupNotFoundError, match="No group matching {'model': 'resnet50'}"):
        s.group(model="resnet50")
    with pytest.raises(errors.UnknownKeyError, match="Unknown key query modle"):
        s.group(modle="x")
    with pytest.raises(errors.GroupNotFoundError, match="No group 'nope'"):
        s.group("nope")


def test_the_parameter_reference_is_generated_from_the_declarations():
    """docs/parameters.md is `make docs`' output: a changed parameter, default or choice shows
    up there, and this test fails until the file is regenerated."""
    import pipelines
    from pipelines._reference import parameters_markdown

    from .conftest import REPO

    assert (REPO / "docs" / "parameters.md").read_text() == parameters_markdown()
    text = parameters_markdown()
    for flag in featstore.params.flags(featstore.BuildOptions).values():
        assert flag[2:] in text  # --no-progress for progress
    for name in list(pipelines.SweepSpec.model_fields) + list(pipelines.SweepSpec.model_fields["probe"].annotation.model_fields):
        assert f"`{name}`" in text or f".{name}`" in text


def test_messages_name_only_flags_that_exist():
    """Every --flag the code mentions (messages, help) is an option of some featstore command."""
    import argparse
    import re

    from featstore.cli import build_parser

    from .conftest import REPO

    known = {o for a in build_parser()._actions for o in a.option_strings}  # featstore --version, --help
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                known |= {o for a in sub._actions for o in a.option_strings}
    outside = {"--nthreads", "--name",  # dask's own worker flags, quoted in comments and docs
               "--time", "--gres"}  # SLURM's sbatch flags
    mentioned = {}
    for path in [*REPO.glob("featstore/*.py"), *REPO.glob("probes/*.py"), *REPO.glob("pipelines/*.py")]:
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9](?![\w-])", path.read_text()):
            mentioned.setdefault(flag, path.name)
    unknown = {f: where for f, where in mentioned.items() if f not in known and f not in outside}
    assert not unknown, unknown
    assert {"--store", "--weights", "--map", "--checkpoint", "--incomplete"} <= set(mentioned)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(limit="5"), errors.InvalidParameterError, "build.limit: expected an integer >= 1 (or left out); got '5' (string)"),
    (dict(progress="false"), errors.InvalidParameterError, "build.progress: expected true or false; got 'false' (string)"),
    (dict(limt=5), errors.UnknownKeyError, "Unknown key build.limt (= 5); allowed here: bad_images, batch_size, check, checkpoint"),
    (dict(layers=["pre_logits", "../x"]), errors.InvalidParameterError, "build.layers[1]: expected a name without"),
])
def test_build_keywords_are_checked_like_the_options(tmp_path, tiny, kwargs, error, message):
    import inspect

    with pytest.raises(error) as e:
        featstore.build(**{**tiny, "store": tmp_path / "s.zarr", **kwargs})
    assert message in str(e.value)
    assert tree_listing(tmp_path) == []
    sig = inspect.signature(featstore.build)
    assert list(sig.parameters)[:-1] == list(featstore.BuildOptions.model_fields)  # and log=
    assert all(sig.parameters[n].default == f.default for n, f in featstore.BuildOptions.model_fields.items())
