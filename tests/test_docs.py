"""The documentation: the site builds in strict mode, and the README's tour runs as written."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import REPO


def test_the_docs_site_builds_in_strict_mode(tmp_path):
    """mkdocs build --strict: a broken link, a missing page or an API reference that does not
    resolve fails the build (what `make docs` runs)."""
    mkdocs = shutil.which("mkdocs", path=os.path.dirname(sys.executable))
    if mkdocs is None:
        pytest.skip("mkdocs is not installed: pip install -e '.[docs]' (make test installs it)")
    proc = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "SubsetProbes" in api and "diffused_redundancy" in api  # generated from the docstrings


def _section(title: str) -> str:
    readme = (REPO / "README.md").read_text()
    text = readme[readme.index(f"## {title}"):]
    return text[:text.index("\n## ", 3)]


def _tour_blocks(title: str = "A tour") -> list[tuple[str, str]]:
    """A README section's fenced blocks in order: (language, text)."""
    return re.findall(r"```(\w+)\n(.*?)```", _section(title), flags=re.S)


def _normal(text: str) -> list[str]:
    """Lines as compared: trailing blanks dropped, every decimal number (rates, sizes, accuracies,
    DR values: they move with the CPU's float rounding) one token; integers, names and group
    keys kept exactly."""
    out = []
    for line in text.strip("\n").splitlines():
        line = re.sub(r"\d+\.\d+", "N", line.rstrip())
        out.append(re.sub(r"\s+", " ", line))
    return out


def _run_blocks(tmp_path, title: str) -> list[str]:
    """Each shell and Python block of a README section, copied as written, run in order in a
    fresh folder (with the project's .venv on the PATH, as `source .venv/bin/activate` puts it);
    every command must succeed and print what the text block after it shows. Their outputs."""
    work = tmp_path / "checkout"
    work.mkdir(exist_ok=True)
    if not (work / "sweeps").exists():
        shutil.copytree(REPO / "sweeps", work / "sweeps")
    venv = REPO / ".venv"
    if not venv.is_dir():
        pytest.skip("the README's commands run in the project's .venv, which `make setup` creates")
    if not (work / ".venv").exists():
        (work / ".venv").symlink_to(venv)
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "VIRTUAL_ENV": str(venv)}
    blocks = _tour_blocks(title)
    outputs = []
    for i, (lang, text) in enumerate(blocks):
        if lang == "text":
            continue
        if lang == "bash":
            proc = subprocess.run(["bash", "-e", "-c", text], cwd=work, capture_output=True, text=True, env=env,
                                  timeout=900)
        else:
            proc = subprocess.run([str(venv / "bin" / "python"), "-c", text], cwd=work, capture_output=True,
                                  text=True, env=env, timeout=900)
        assert proc.returncode == 0, f"block {i} ({lang}) failed:\n{text}\n{proc.stderr[-3000:]}"
        if i + 1 < len(blocks) and blocks[i + 1][0] == "text":
            assert _normal(proc.stdout) == _normal(blocks[i + 1][1]), f"block {i} printed:\n{proc.stdout}"
        outputs.append(proc.stdout)
    return outputs


@pytest.mark.slow
def test_the_readme_tour_runs_as_written_and_prints_what_it_shows(tmp_path):
    blocks = _tour_blocks()
    assert [lang for lang, _ in blocks].count("bash") >= 3 and any(lang == "python" for lang, _ in blocks)
    _run_blocks(tmp_path, "A tour")


def test_the_readme_datasets_section_runs_offline_and_every_source_gives_the_same_features(tmp_path, monkeypatch,
                                                                                          capsys):
    """The section's Python block writes the digits as a folder, a manifest, an HF dataset and
    shards; its commands (argv to featstore's main in this process) build each: the four give
    the same features and labels bit for bit, and the k-shot group K images of each class."""
    import shlex

    import featstore
    from featstore.cli import main

    pytest.importorskip("datasets", reason="the [data] extra (make test installs it)")
    pytest.importorskip("webdataset", reason="the [data] extra (make test installs it)")
    monkeypatch.chdir(tmp_path)
    blocks = _tour_blocks("Datasets")
    assert [lang for lang, _ in blocks] == ["python", "bash"]
    exec(blocks[0][1], {})
    lines = blocks[1][1].strip().splitlines()
    for line in lines:
        argv = shlex.split(line)
        assert argv[0] == "featstore", line
        assert main(argv[1:]) == 0, (line, capsys.readouterr().err[-2000:])
    store = featstore.open(tmp_path / "data" / "datasets.zarr")
    sources = {"imagefolder", "csv", "hf", "wds"}
    for split in ("train", "test"):
        groups = {g.spec.dataset.split(":")[0]: g for g in store.find(split=split) if "per_class" not in
                  dict(g.spec.extra)}
        assert set(groups) == sources
        ref = groups["imagefolder"]
        for name, g in groups.items():
            np.testing.assert_array_equal(g.numpy(), ref.numpy(), err_msg=name)
            np.testing.assert_array_equal(g.labels, ref.labels, err_msg=name)
    (k_shot,) = [g for g in store.find(split="train") if "per_class" in dict(g.spec.extra)]
    assert np.bincount(k_shot.labels).tolist() == [5] * 10


def test_the_readme_cluster_section_runs_a_shared_build_and_a_build_spec(tmp_path, monkeypatch, capsys):
    """Its commands as written (argv to featstore's main here; the shared build's workers are
    real spawned processes): two workers build the demo's test images, the spec builds the
    depth experiment's groups, all complete."""
    import shlex

    import featstore
    from featstore.cli import main

    if not Path(datasets_path := "/usr/share/datasets/fashion-mnist").exists():
        pytest.skip(f"Fashion-MNIST files not at {datasets_path} (make setup installs them)")
    monkeypatch.chdir(tmp_path)
    shutil.copytree(REPO / "sweeps", tmp_path / "sweeps")
    (bash,) = [text for lang, text in _tour_blocks("On a cluster") if lang == "bash"]
    for line in bash.strip().splitlines():
        argv = shlex.split(line)
        assert argv[0] == "featstore", line
        assert main(argv[1:]) == 0, (line, capsys.readouterr().err[-2000:])
    s = featstore.open(tmp_path / "data" / "cluster.zarr")
    # three layers x two splits; the shared build's group is the spec's pre_logits test group
    assert len(s.groups()) == 3 * 2 and all(g.n_samples == 64 for g in s.groups())
    assert "builds[1] tf_efficientnet_lite0 fashion-mnist:test limit 64 (3 group(s))" in capsys.readouterr().out
    assert [g.name for g in s.groups(include_incomplete=True)] == [g.name for g in s.groups()]


def test_the_readme_models_section_runs_offline_for_every_source(tmp_path, monkeypatch, capsys):
    """One build per source (timm, open_clip, torchvision, hf from a saved config, a module
    from Python), each command as written (its argv given to featstore's main in this process,
    to spare five interpreter starts; the tour test runs its commands in a real shell); the
    store then holds a group of each source; the pooling table is the registry's."""
    import shlex

    import featstore
    from featstore._sources import model_sources
    from featstore.cli import main
    from featstore.models import pooling_table

    assert pooling_table() in _section("Models") and pooling_table() in (REPO / "docs" / "models.md").read_text()
    monkeypatch.chdir(tmp_path)
    for lang, text in _tour_blocks("Models"):
        if lang == "bash":
            for line in text.strip().splitlines():
                argv = shlex.split(line)
                if argv[0] == "featstore":
                    assert main(argv[1:]) == 0, (line, capsys.readouterr().err[-2000:])
                else:
                    assert argv[:2] == ["python", "-c"], line
                    exec(argv[2], {})
        else:
            exec(text, {})
    out = capsys.readouterr().out
    assert "module-tiny-cnn__pre_logits__digits__test__" in out and "(40, 16)" in out
    groups = featstore.open(tmp_path / "data" / "models.zarr").find()
    assert {g.provenance["model"]["source"] for g in groups} == set(model_sources())
    assert all(g.n_samples == 40 for g in groups)
