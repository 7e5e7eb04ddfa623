"""A newcomer's first hour: the friction points of issue 26, each asserted."""

from __future__ import annotations

import argparse
import pydoc

import numpy as np
import pandas as pd
import pytest

import featstore
import pipelines
import probes
from featstore import errors

from .conftest import run_cli


def test_evaluate_or_score_before_fit_is_not_fitted_and_score_is_the_full_layers(tmp_path):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(200, 8)).astype(np.float32), rng.integers(0, 2, 200)
    est = probes.SubsetProbes(fractions=(0.5,), seeds=(0,), epochs=2, device="cpu", verbose=False)
    for call in (lambda: est.evaluate(X, y), lambda: est.score(X, y), lambda: est.predict(X)):
        with pytest.raises(errors.NotFittedError):
            call()
    est.fit(X, y)
    res = est.evaluate(X, y)
    assert est.score(X, y) == pytest.approx(res[res["mode"] == "full"]["test_accuracy"].mean())


def test_a_group_is_an_array_numpy_scikit_learn_and_torch_take(tmp_path, tiny):
    """shape, dtype, len, np.asarray(g) (float32: float16 storage, float32 reads), scikit-learn's
    fit on a group, numpy(dtype=None) as stored, iter_blocks(dtype=...)."""
    import torch
    from sklearn.linear_model import LogisticRegression

    (g,) = featstore.build(**tiny, splits="train", store=tmp_path / "s.zarr")
    assert g.spec.dtype == "float16" and g.shape == (g.n_samples, g.n_neurons) and len(g) == g.n_samples
    X = np.asarray(g)
    assert X.dtype == np.float32 and X.shape == g.shape and g.dtype == np.float32
    assert g.numpy().dtype == np.float32 and g.numpy(dtype=None).dtype == np.float16
    np.testing.assert_array_equal(g.numpy(dtype=None).astype(np.float32), X)
    assert all(b.dtype == np.float64 for _, b, _ in g.iter_blocks(dtype=np.float64))
    assert LogisticRegression(max_iter=200).fit(g, g.labels).score(g, g.labels) > 0.5
    assert torch.as_tensor(np.asarray(g)).shape == g.shape


def test_every_command_says_what_it_does_and_featstore_has_a_version():
    from featstore.cli import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subs.choices.items():
        assert sub.description and len(sub.description) > 40, name
    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"featstore {featstore.__version__}"
    help_text = run_cli("build", "--help").stdout
    assert "turn off:" not in help_text and "Skip the check of every image file" in help_text


def test_help_of_the_public_callables_is_short_and_lists_the_parameters():
    text = pydoc.render_doc(featstore.build, renderer=pydoc.plaintext)
    assert "Parameters" in text and "limit : an integer >= 1 (or left out), default None" in text
    assert "BuildOptions`` (" not in text  # no pointer elsewhere
    options = pydoc.render_doc(featstore.BuildOptions, renderer=pydoc.plaintext)
    # pydantic's own dump ran to ~950 characters a field (33k); ours is a line or two each
    assert len(options) < 250 * len(featstore.BuildOptions.model_fields) and "dtype : one of 'float16', 'float32', default 'float16'" in options
    assert "model_validate_json" not in options  # pydantic's own methods are not listed


def test_ls_shows_the_limit_and_a_failed_query_lists_what_tells_groups_apart(tmp_path, tiny):
    store = tmp_path / "s.zarr"
    featstore.build(**tiny, splits="test", store=store)
    featstore.build(**tiny, splits="test", limit=6, store=store)
    listed = run_cli("ls", "--store", store, check=True).stdout
    assert listed.splitlines()[0].split() == ["GROUP", "SHAPE", "DTYPE", "LIMIT", "VIEWS", "SIZE", "STATE"]
    assert {line.split()[3] for line in listed.splitlines()[1:]} == {"all", "6"}
    s = featstore.open(store)
    with pytest.raises(errors.AmbiguousGroupError) as e:
        s.group(split="test")
    assert "(limit=6, views=0, weights=random, dtype=float16)" in str(e.value) and "(limit=all, views=0," in str(e.value)
    with pytest.raises(errors.GroupNotFoundError, match=r"test_resnet/pre_logits/imagefolder:.*/test \(limit=6,"):
        s.group(split="test", limit=7)


def test_a_specs_relative_paths_are_its_own_folders_and_not_found_names_the_absolute_path(tmp_path, sweep_store,
                                                                                         monkeypatch):
    import shutil

    store, dataset = sweep_store
    project = tmp_path / "project"
    shutil.copytree(store, project / "features.zarr")
    (project / "specs").mkdir()
    spec = project / "specs" / "s.toml"
    spec.write_text(f'store = "../features.zarr"\n[[groups]]\nmodel = "test_resnet"\ndataset = "{dataset}"\n'
                    '[selection]\nmodes = ["prefix"]\nfractions = [0.5]\n[probe]\nepochs = 1\n[metrics]\ncka = false\n')
    monkeypatch.chdir(tmp_path)  # neither the project nor the spec's folder
    assert pipelines.load_spec(spec).store == str(project / "features.zarr")
    df = pipelines.run_sweep(spec, tmp_path / "out", progress=False)
    assert len(df) > 0
    spec.write_text(spec.read_text().replace("../features.zarr", "../missing.zarr"))
    with pytest.raises(errors.StoreNotFoundError, match=rf"\({project / 'missing.zarr'}\)"):
        pipelines.run_sweep(spec, tmp_path / "out2", progress=False)
    with pytest.raises(errors.SpecNotFoundError, match=rf"\({tmp_path / 'nope.toml'}\)"):
        pipelines.load_spec("nope.toml")


def test_a_warning_on_the_command_line_is_one_clean_line(tmp_path, spec_file):
    """The PCA rank clamp during a sweep: one line of the sweep's own, no source line."""
    proc = run_cli("sweep", spec_file, "--out", tmp_path / "out", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "warning" in line.lower()]
    assert lines and all(line.startswith("featstore sweep: warning: mode 'pca'") for line in lines), proc.stderr
    assert "est.fit(" not in proc.stderr and "UserWarning" not in proc.stderr


def test_a_rebuild_of_complete_groups_says_so_and_reads_no_image(tmp_path, tiny, monkeypatch, capsys):
    from featstore.cli import main

    args = ["build", "--model", "test_resnet", "--weights", "random", "--dataset", tiny["dataset"], "--image-size",
            "32", "--workers", "0", "--splits", "test", "--store", str(tmp_path / "s.zarr"), "--no-progress"]
    assert main(args) == 0
    first = capsys.readouterr()
    assert "Built 1 group(s)" in first.out and "img/s" in first.out
    import featstore.datasets as d

    monkeypatch.setattr(d, "check_images", lambda *a, **k: pytest.fail("the images were checked again"))
    assert main(args) == 0
    again = capsys.readouterr()
    assert "Built 0 group(s) in" in again.out and "1 already complete" in again.out
    assert "img/s" not in again.out and "already complete" in again.err


def test_long_steps_say_what_they_do(tmp_path, reference, capsys):
    """featstore layers names what it builds before the seconds it takes; the report shows a
    progress bar over its figures; the depth figure's axis says the order it plots."""
    proc = run_cli("layers", "test_resnet")
    assert proc.returncode == 0 and "building test_resnet with random weights" in proc.stderr
    pipelines.write_report(reference.attrs["out"], tmp_path / "r", figure="accuracy_vs_fraction")
    assert "report figures" in capsys.readouterr().err
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pipelines._report import _fig_depth

    df = reference.copy()
    other = df.assign(group=1, layer="stem")  # a second layer of the same model: a depth series
    fig = _fig_depth(pd.concat([df, other], ignore_index=True), plt)
    assert fig.axes[0].get_xlabel() == "layer (in the spec's order)"
    plt.close(fig)
