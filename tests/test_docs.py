"""The documentation: the site builds in strict mode, and the README's tour runs as written."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

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


def _tour_blocks() -> list[tuple[str, str]]:
    """The README tour's fenced blocks in order: (language, text)."""
    readme = (REPO / "README.md").read_text()
    tour = readme[readme.index("## A tour"):]
    tour = tour[:tour.index("\n## ", 3)]
    return re.findall(r"```(\w+)\n(.*?)```", tour, flags=re.S)


def _normal(text: str) -> list[str]:
    """Lines as compared: trailing blanks dropped, every decimal number (rates, sizes, accuracies,
    DR values: they move with the CPU's float rounding) one token; integers, names and group
    keys kept exactly."""
    out = []
    for line in text.strip("\n").splitlines():
        line = re.sub(r"\d+\.\d+", "N", line.rstrip())
        out.append(re.sub(r"\s+", " ", line))
    return out


@pytest.mark.slow
def test_the_readme_tour_runs_as_written_and_prints_what_it_shows(tmp_path):
    """Each shell and Python block of the README's tour, copied as written, run in order in a
    fresh folder (with the project's .venv on the PATH, as `source .venv/bin/activate` puts it):
    every command succeeds and prints what the block after it shows."""
    work = tmp_path / "checkout"
    work.mkdir()
    shutil.copytree(REPO / "sweeps", work / "sweeps")
    venv = REPO / ".venv"
    if not venv.is_dir():
        pytest.skip("the tour runs in the project's .venv, which `make setup` creates")
    (work / ".venv").symlink_to(venv)
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "VIRTUAL_ENV": str(venv)}
    blocks = _tour_blocks()
    assert [lang for lang, _ in blocks].count("bash") >= 3 and any(lang == "python" for lang, _ in blocks)
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
