"""The distribution: its name, extras that agree with the code, a wheel that installs by itself."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import tomllib

import pytest

import featstore
from featstore import errors

from .conftest import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    import re

    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_the_distribution_and_its_extras_agree_with_the_code():
    """pyproject's extras install exactly the modules featstore.EXTRAS names in its errors; the
    distribution is not PyPI's other "featstore"; a LICENSE and an SPDX license."""
    project = PYPROJECT["project"]
    assert project["name"] == featstore.DISTRIBUTION == "featstore-redundancy"
    assert project["license"] == "MIT" and (REPO / "LICENSE").read_text().startswith("MIT License")
    from importlib.metadata import packages_distributions

    extras = project["optional-dependencies"]
    provides = packages_distributions()  # import name -> the distributions that install it
    for extra, modules in featstore.EXTRAS.items():
        installed = {_name(r) for r in extras[extra]}
        for module in modules:
            dists = {d.lower().replace("_", "-") for d in provides.get(module, [module])}
            assert dists & installed, (extra, module, dists, installed)
    assert set(featstore.EXTRAS) <= set(_name(e) for e in extras["all"][0].split("[")[1].rstrip("]").split(","))


def test_a_missing_optional_module_is_one_error_naming_the_extra(monkeypatch, tmp_path):
    import importlib

    real = importlib.import_module

    def without_matplotlib(name, *a, **k):
        if name.split(".")[0] == "matplotlib":
            raise ImportError(f"No module named {name!r}")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", without_matplotlib)
    import pipelines

    (tmp_path / "sweep.json").write_text("{}")
    with pytest.raises(errors.MissingDependencyError,
                       match=r"featstore report needs matplotlib, which is not installed: pip install "
                             r"'featstore-redundancy\[report\]'"):
        pipelines.write_report(tmp_path)


@pytest.mark.slow
def test_the_wheel_installs_by_itself_into_a_fresh_venv(tmp_path):
    """Build the wheel, install it (not editable) into a new virtual environment, and from
    outside the checkout run `featstore --version`, `featstore datasets` and import each package:
    they come from the installed wheel (its dependencies from this environment's site-packages)."""
    import shutil

    source = tmp_path / "source"  # a copy of what the wheel is made of: the build writes nothing into the checkout
    for rel in ("featstore", "probes", "pipelines"):
        shutil.copytree(REPO / rel, source / rel, ignore=shutil.ignore_patterns("__pycache__"))
    for rel in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / rel, source / rel)
    dist = tmp_path / "dist"
    built = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist),
                            str(source)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = dist.glob("featstore_redundancy-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   timeout=300)
    env = {"PYTHONPATH": sysconfig.get_paths()["purelib"], "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
           "HOME": str(tmp_path)}
    run = lambda *args: subprocess.run(list(args), capture_output=True, text=True, cwd=tmp_path, env=env,  # noqa: E731
                                       timeout=300)
    version = run(str(venv / "bin" / "featstore"), "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"featstore {featstore.__version__}", version.stderr
    listed = run(str(venv / "bin" / "featstore"), "datasets")
    assert listed.returncode == 0 and "fashion-mnist" in listed.stdout, listed.stderr
    where = run(str(py), "-c", "import featstore, probes, pipelines; print(featstore.__file__, probes.__file__, "
                               "pipelines.__file__)")
    assert where.returncode == 0, where.stderr
    assert all(str(venv) in path for path in where.stdout.split()), where.stdout  # the wheel's, not the checkout's
