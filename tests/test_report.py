"""`featstore report`: the answer first, figures in PNG/SVG/PDF, one figure alone, and the page in
a real browser (headless Chromium): every image decodes, the answer and the accuracy figure are
on the first screen of a 1300 x 900 window."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET

import numpy as np
import pytest

import pipelines
import probes
from featstore import errors
from pipelines._report import CAPTIONS, FIGURES

from .conftest import run_cli
from .test_sweep import SPEC, reference, spec_file, sweep_store  # noqa: F401 (fixtures)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def report(tmp_path_factory, reference):
    out = tmp_path_factory.mktemp("report")
    page = pipelines.write_report(reference.attrs["out"], out, formats=("png", "svg", "pdf"))
    return page


def test_the_page_opens_with_the_answer_then_figures_then_folded_tables(report):
    text = report.read_text()
    answer = re.search(r"<p class='answer'>(.*?)</p>", text).group(1)
    assert re.search(r"a random [\d.]+% of the 96 neurons \(\d+\) keeps 90% of the full layer's accuracy "
                     r"\(0\.\d{3}\).*DR\(0\.9\) = (≥ )?0\.\d{3} \[0\.\d{3}, 0\.\d{3}\]", answer), answer
    cell = re.findall(r"<td>(.*?)</td>", text[text.index("<table class='dr'>"):])[4]  # δ = 0.9 of the DR table
    assert f"DR(0.9) = {cell}" in answer  # the sentence and the table: one estimate, one interval
    first_table, first_figure = text.index("<table"), text.index("<figure")
    assert text.index("class='answer'") < first_table < text.index("<h2>Figures</h2>") < text.index("<details>")
    dr_head = re.search(r"<table class='dr'><thead><tr>(.*?)</tr>", text).group(1)
    assert re.findall(r"<th>(.*?)</th>", dr_head) == ["model", "layer", "dataset", "δ = 0.8", "δ = 0.9", "δ = 0.95",
                                                      "δ = 0.99"]  # no index noise
    assert first_figure < text.index("<h2>Figures</h2>")  # the accuracy figure beside the answer
    details = text[text.index("<h2>Details</h2>"):]
    assert re.search(r"<td>0\.\d{3} \[0\.\d{3}, 0\.\d{3}\]</td>", details)  # the mean with its interval
    assert "<th>k/d</th><th>pca</th><th>random</th>" in details  # pivoted: modes as columns
    for name in re.findall(r"<figure id='fig-(\w+)'>", text):
        assert CAPTIONS[name] in html.unescape(text)
    assert "src='http" not in text and "href='http" not in text  # self-contained


def test_every_figure_is_written_as_png_svg_and_pdf(report):
    out = report.parent
    written = sorted(p.stem for p in out.glob("*.png"))
    assert written and set(written) <= set(FIGURES)
    for name in written:
        ET.parse(out / f"{name}.svg")  # well-formed SVG
        svg = (out / f"{name}.svg").read_text()
        assert "<text" in svg  # fonts kept as text (svg.fonttype none), editable in a paper
        assert (out / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"
        from PIL import Image

        with Image.open(out / f"{name}.png") as im:
            assert im.width <= 1500  # one paper column at 200 dpi, a few panels at most


def test_one_figure_alone_and_bad_options(tmp_path, reference):
    path = pipelines.write_report(reference.attrs["out"], tmp_path / "one", figure="dr_vs_delta", formats=("svg",))
    assert path == tmp_path / "one" / "dr_vs_delta.svg" and sorted(p.name for p in (tmp_path / "one").iterdir()) == \
        ["dr_vs_delta.svg"]
    r = run_cli("report", reference.attrs["out"], "--out", str(tmp_path / "cli"), "--figure", "cka_vs_fraction",
                "--formats", "pdf,png")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == ["cka_vs_fraction.pdf", "cka_vs_fraction.png"]
    for args, expected in ((["--formats", "png,eps"], "--formats"), (["--figure", "nope"], "--figure"),
                           (["--formats", "png,png"], "--formats"), (["--dr-metric", "f1"], "--dr-metric")):
        r = run_cli("report", reference.attrs["out"], "--out", str(tmp_path / "bad"), *args)
        assert r.returncode == 2 and expected in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "bad").exists()
    with pytest.raises(errors.IncompatibleParametersError, match="hold nothing for it"):
        pipelines.write_report(reference.attrs["out"], tmp_path / "none", figure="dr_across_depth")


def test_dr_from_another_metric_is_that_metric_of_the_subsets_against_the_full_layers(tmp_path, reference):
    """dr_metric: DR(δ) = 1 - the smallest k/d whose mean macro F1 over seeds reaches δ x the full
    layer's mean macro F1, computed here by hand from the rows; the page says so."""
    df = reference
    dr = pipelines.diffused_redundancy(df, deltas=(0.5, 0.8, 0.9, 0.95), source="macro_f1", n_boot=50)
    for (group, delta), row in dr.set_index(["group", "delta"]).iterrows():
        g = df[df["group"] == group]
        full = g[g["mode"] == "full"]["test_macro_f1"].mean()
        random = g[g["mode"] == "random"].drop_duplicates(["seed", "k"])
        curve = random.groupby("k")["test_macro_f1"].mean()
        reached = curve[curve >= delta * full]
        if len(reached):
            assert row["dr"] == pytest.approx(1 - reached.index.min() / g["n_neurons"].iloc[0]), (group, delta)
        else:
            assert np.isnan(row["dr"]) and row["censored"] == "not reached"
    assert (df["test_macro_f1"] - df["test_accuracy"]).abs().max() > 0.01  # the metrics differ here: it can tell
    page = pipelines.write_report(df.attrs["out"], tmp_path / "macro_f1", dr_metric="macro_f1",
                                  progress=False).read_text()
    assert "<h2>DR(δ) from macro f1, random neurons</h2>" in page
    assert "keeps 90% of the full layer's macro f1" in page
    with pytest.raises(errors.InvalidParameterError, match="dr_metric"):
        pipelines.write_report(df.attrs["out"], tmp_path / "bad", dr_metric="f1")
    assert not (tmp_path / "bad").exists()


def _chromium(*args, timeout=180, size="1300,900"):
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--window-size={size}", *args], capture_output=True, text=True, timeout=timeout)


def test_the_report_on_a_phone_sized_screen(report):
    """400 x 800 (an iframe of that size: headless Chromium's windows are at least 500 wide): one
    column (the answer above its figure), figures as wide as the screen, nothing wider than the
    screen (tables scroll inside their own box)."""
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed: `apt-get install chromium` as root (make test does)")
    check = """<script>addEventListener('load', () => {
      const box = s => document.querySelector(s).getBoundingClientRect();
      const wide = [...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right >
                    innerWidth + 1 && !e.closest('.wide')).map(e => e.tagName + '.' + e.className).slice(0, 5);
      parent.postMessage(JSON.stringify({scroll: document.documentElement.scrollWidth, width: innerWidth,
                                         wide: wide, answer: box('#answer'),
                                         figure: box('#fig-accuracy_vs_fraction img')}), '*');
    });</script>"""
    probe = report.parent / "probe_phone.html"
    probe.write_text(report.read_text().replace("</body>", check + "</body>"))
    frame = report.parent / "phone.html"
    frame.write_text("<!doctype html><html><body style='margin:0'><pre id='featstore-check'></pre>"
                     "<iframe src='probe_phone.html' width='400' height='800' style='border:0'></iframe><script>"
                     "addEventListener('message', e => document.getElementById('featstore-check').textContent = e.data)"
                     "</script></body></html>")
    dom = _chromium("--virtual-time-budget=15000", "--dump-dom", frame.as_uri())
    found = re.search(r'<pre id="featstore-check">(.+?)</pre>', dom.stdout)
    assert found, dom.stderr[-2000:]
    r = json.loads(html.unescape(found.group(1)))
    assert r["width"] == 400 and r["scroll"] <= r["width"], r  # nothing runs off the right edge
    assert not r["wide"], r
    assert r["figure"]["top"] >= r["answer"]["bottom"] - 1, r  # one column: the figure below the answer
    assert r["figure"]["width"] >= 0.85 * r["width"], r  # the figure scales to the screen


def test_the_report_in_headless_chromium(report, tmp_path):
    """In a 1300 x 900 window: every image decodes (naturalWidth > 0), the answer sentence and
    the whole accuracy figure lie on the first screen; a screenshot of that screen is taken."""
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed: `apt-get install chromium` as root (make test does)")
    check = """<script>addEventListener('load', () => {
      const imgs = [...document.images];
      const box = s => document.querySelector(s).getBoundingClientRect();
      const r = {images: imgs.length, decoded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
                 answer_top: box('.answer').top, answer_bottom: box('.answer').bottom,
                 figure_top: box('#fig-accuracy_vs_fraction img').top,
                 figure_bottom: box('#fig-accuracy_vs_fraction img').bottom, height: innerHeight, width: innerWidth};
      const pre = document.createElement('pre'); pre.id = 'featstore-check'; pre.textContent = JSON.stringify(r);
      document.body.appendChild(pre);
    });</script>"""
    probe = report.parent / "probe.html"  # beside the page: the same (inline) resources
    probe.write_text(report.read_text().replace("</body>", check + "</body>"))
    dom = _chromium("--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    found = re.search(r'<pre id="featstore-check">(.*?)</pre>', dom.stdout)
    assert found, dom.stderr[-2000:]
    r = json.loads(html.unescape(found.group(1)))
    n_figures = report.read_text().count("<figure ")
    assert r["images"] == n_figures > 0 and r["decoded"] == r["images"], r
    print(r)
    # a 1300 x 900 window: its viewport (the first screen) is 1300 wide and a little under 900 high
    assert r["width"] == 1300 and 780 <= r["height"] <= 900, r
    assert 0 <= r["answer_top"] < r["answer_bottom"] <= r["height"], r
    assert 0 <= r["figure_top"] < r["figure_bottom"] <= r["height"], r
    shot = tmp_path / "first_screen.png"
    s = _chromium(f"--screenshot={shot}", report.as_uri())
    assert shot.exists(), s.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1300, 900)
        assert len(set(im.convert("L").resize((65, 45)).getdata())) > 20  # not a blank page


def test_pairings_under_other_protocols_are_labelled_apart():
    """Pairings of one model, layer and dataset under several protocols (sweeps/paper_protocols.toml)
    read apart on the page: by their spec name, else by the protocol keys they differ in."""
    import json

    import pandas as pd

    from pipelines._report import _label

    sgd = probes.Protocol().model_dump(mode="json")
    rows = [dict(group=0, protocol=sgd, pairing_name=None), dict(group=1, protocol={**sgd, "epochs": 100},
                                                                     pairing_name=None),
            dict(group=2, protocol={**sgd, "solver": "lbfgs"}, pairing_name="L-BFGS, C on validation")]
    df = pd.DataFrame([{**r, "protocol": json.dumps(r["protocol"]), "model": "m", "layer": "l", "dataset": "d"}
                       for r in rows])
    keys = [(g, "m", "l", "d") for g in range(3)]
    assert _label(keys[0], df) == "m / l / d (sgd, epochs 50)"
    assert _label(keys[1], df) == "m / l / d (sgd, epochs 100)"
    assert _label(keys[2], df) == "L-BFGS, C on validation"
    same = df[df["group"] < 1]
    assert _label(keys[0], same) == "m / l / d"  # one protocol: nothing to tell apart
