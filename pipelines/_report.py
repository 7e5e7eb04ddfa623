"""`featstore report`: figures (PNG, SVG, PDF, sized for a paper) and one self-contained HTML page
from a sweep: the answer first (one sentence per pairing, the DR table), then the figures with
captions, then the detailed tables folded."""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import Field

from featstore.params import CommaList, OneOf, Parameters, Unique, defaults, validate
import probes
from probes import SELECTION_MODES

from ._analysis import (
    pairing_labels,
    EDGE,
    NOT_REACHED,
    accuracy_curve,
    convergence_notes,
    critical_fraction,
    diffused_redundancy,
    dr_table,
    dr_text,
    effective_fraction,
    inequality_curve,
    interval_note,
    modes_at_equal_k,
    sweep_warnings,
)
from ._bootstrap import COVERS

__all__ = ["write_report", "FIGURES", "ReportOptions"]

# one colour per selection mode (the registry's order), and for explicit index lists
MODE_COLORS = {mode: f"C{i}" for i, mode in enumerate([*SELECTION_MODES, "explicit"])}


def _label(keys, df=None) -> str:
    """A pairing as the page names it: its spec ``name``, else model / layer / dataset (an image
    folder by its own name, not its whole path), and, where the sweep's pairings differ in their
    protocol, the keys they differ in (``pairing_labels``)."""
    names = pairing_labels(df) if df is not None else {}
    if int(keys[0]) in names and names[int(keys[0])][0]:
        return names[int(keys[0])][0]
    dataset = str(keys[3])
    if dataset.startswith("imagefolder:"):
        dataset = "imagefolder:" + Path(dataset.split(":", 1)[1]).name
    protocol = names.get(int(keys[0]), ("", ""))[1]
    return f"{keys[1]} / {keys[2]} / {dataset}" + (f" ({protocol})" if protocol else "")


def _groups(df):
    return list(df.groupby(["group", "model", "layer", "dataset"]).groups)


def _subplots(n, plt, width=3.4, height=2.7):
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False)
    return fig, axes[0]


def _curves(ax, c, one_run_note: bool = True):
    """One line per mode with its interval band; a mode of one run is dashed and says so (its band,
    if any, covers that run's test images only)."""
    for mode, m in c.groupby("mode"):
        m = m.sort_values("fraction")
        color = MODE_COLORS.get(mode)
        single = (m["count"] <= 1).all()
        label = f"{mode} (one run)" if single and one_run_note else mode
        ax.plot(m["fraction"], m["mean"], marker="o", ms=3, label=label, color=color, ls="--" if single else "-")
        if m["low"].notna().any():
            ax.fill_between(m["fraction"], m["low"], m["high"], alpha=0.12 if single else 0.2, color=color, lw=0)


def _fig_accuracy(df, plt):
    curve = accuracy_curve(df)
    groups = _groups(df)
    fig, axes = _subplots(len(groups), plt)
    for ax, keys in zip(axes, groups):
        c = curve[curve["group"] == keys[0]]
        _curves(ax, c)
        full = c["full"].iloc[0] if len(c) else np.nan
        ax.axhline(full, color="k", ls="--", lw=1, label=f"full layer ({full:.3f})")
        if len(c) and c["full_low"].notna().iloc[0]:
            ax.axhspan(c["full_low"].iloc[0], c["full_high"].iloc[0], color="k", alpha=0.08, lw=0)
        ax.set(xscale="log", xlabel="effective fraction k/d (log scale)", ylabel="test accuracy",
               title=f"Accuracy vs fraction\n{_label(keys, df)}")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    return fig


def _dr_metric(df) -> str:
    """The test metric DR is computed from on this page (``ReportOptions.dr_metric``)."""
    return df.attrs.get("dr_metric", "accuracy")


def _words(metric: str) -> str:
    return metric.replace("_", " ")


def _fig_dr(df, plt):
    fig, ax = plt.subplots(figsize=(3.4, 2.7))
    for i, source in enumerate((_dr_metric(df), "cka")):
        if source == "cka" and df["cka"].isna().all():
            continue
        dr = diffused_redundancy(df, mode="random" if "random" in set(df["mode"]) else df["mode"][df["mode"] != "full"].iloc[0],
                                 source=source)  # the table's bootstrap: the same resamples, the same bands
        for j, (keys, g) in enumerate(dr.groupby(["group", "model", "layer", "dataset"])):
            ax.plot(g["delta"], g["dr"], color=f"C{j}", ls="-" if source != "cka" else ":",
                    label=f"{_label(keys, df)} ({_words(source)})")
            # the band only where the estimate exists (a δ not reached has no DR to put a band around)
            band = g["dr"].notna() & g["dr_low"].notna()
            ax.fill_between(g["delta"], g["dr_low"].where(band), g["dr_high"].where(band), color=f"C{j}", alpha=0.15,
                            lw=0)
            edge = g[g["censored"] == EDGE]  # reached at the smallest evaluated fraction: a lower bound
            if len(edge):
                ax.plot(edge["delta"], edge["dr"], ls="none", marker="^", ms=4, color=f"C{j}",
                        label=f"≥: reached at the smallest fraction ({_words(source)})")
    ax.set(xlabel=f"δ (fraction of the full layer's {_words(_dr_metric(df))} / CKA to keep)",
           ylabel="diffused redundancy DR(δ)",
           title="Diffused redundancy vs δ (further out = more redundant)", ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def _fig_cka(df, plt):
    if df["cka"].isna().all():
        return None
    curve = accuracy_curve(df, metric="cka")
    groups = _groups(df)
    fig, axes = _subplots(len(groups), plt)
    est = df["cka_estimator"].dropna().iloc[0]
    for ax, keys in zip(axes, groups):
        _curves(ax, curve[curve["group"] == keys[0]])
        ax.set(xscale="log", xlabel="effective fraction k/d (log scale)", ylabel=f"linear CKA with the full layer ({est})",
               title=f"CKA(subset, layer) vs fraction\n{_label(keys, df)}", ylim=(0, 1.02))
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    return fig


def _fig_inequality(df, plt):
    ineq = inequality_curve(df)
    fig, axes = _subplots(2, plt, width=3.0)
    several = ineq["group"].nunique() > 1
    for keys, g in ineq.groupby(["group", "model", "layer", "dataset"]):
        for mode, m in g.groupby("mode"):
            m = m.sort_values("fraction")
            for ax, col in zip(axes, ("gini", "cov")):
                err = np.clip([np.nan_to_num(m[col] - m[f"{col}_low"]), np.nan_to_num(m[f"{col}_high"] - m[col])],
                              0, None)
                single = (m["count"] <= 1).all()
                label = (f"{_label(keys, df)}: {mode}" if several else mode) + (" (one run)" if single else "")
                ax.errorbar(m["fraction"], m[col], yerr=err, marker="o", ms=3, capsize=2, label=label,
                            color=MODE_COLORS.get(mode), ls="--" if single else "-")
    # the noise floor of each pairing's test set (at each fraction's mean accuracy over its modes)
    labelled = False
    for _, g in ineq.groupby("group"):
        floor = g.groupby("fraction")[["floor_gini", "floor_cov"]].mean().reset_index()
        if floor["floor_gini"].notna().any():
            for ax, col in zip(axes, ("floor_gini", "floor_cov")):
                ax.plot(floor["fraction"], floor[col], color="0.45", ls=":", lw=1,
                        label=None if labelled else "test-set noise floor")
            labelled = True
    for ax, name in zip(axes, ("Gini coefficient", "coefficient of variation")):
        ax.set(xscale="log", xlabel="effective fraction k/d (log scale)", ylabel=f"{name}",
               title=f"Per-class accuracy: {name}")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    return fig


def _fig_classwise(df, plt):
    sub = df[df["mode"].isin(["random", "full"])] if "random" in set(df["mode"]) else df
    sub = sub.assign(fraction=effective_fraction(sub))
    fractions = np.array(sorted(sub["fraction"].unique()))
    wanted = [0.005, 0.02, 0.1, 0.5, 1.0]
    picks = sorted({float(fractions[np.argmin(np.abs(np.log(fractions) - np.log(w)))]) for w in wanted})
    groups = _groups(df)
    fig, axes = _subplots(len(groups), plt, width=3.6)
    for ax, keys in zip(axes, groups):
        g = sub[sub["group"] == keys[0]]
        data, labels = [], []
        for f in picks:
            rows = g[np.isclose(g["fraction"], f)]
            if len(rows):
                values = np.concatenate([np.asarray(p, dtype=float) for p in rows["per_class_accuracy"]])
                data.append(values[~np.isnan(values)])  # classes absent from the test split have none
                labels.append(f"{f:g}")
        ax.boxplot(data, showfliers=True)
        ax.set_xticks(range(1, len(labels) + 1), labels)
        ax.set(xlabel="effective fraction k/d", ylabel="per-class test accuracy (all seeds)",
               title=f"Class-wise accuracy distribution\n{_label(keys, df)}")
        ax.grid(alpha=0.3)
    return fig


def _fig_modes(df, plt):
    table = modes_at_equal_k(df).reset_index()
    groups = _groups(df)
    fig, axes = _subplots(len(groups), plt)
    for ax, keys in zip(axes, groups):
        t = table[table["group"] == keys[0]].sort_values("k")
        for mode in [c for c in t.columns if c in MODE_COLORS]:
            ax.plot(t["k"], t[mode], marker="o", ms=3, label=mode, color=MODE_COLORS[mode])
        ax.set(xscale="log", xlabel="number of neurons / directions k (log scale)", ylabel="mean test accuracy",
               title=f"Selection modes at equal k\n{_label(keys, df)}")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    return fig


def _dr_at(df, delta: float = 0.9):
    """DR(delta) of random neurons per pairing, in the sweep's order (None without random rows); the
    bootstrap is ``dr_table``'s (same resamples), so the page's sentence, figures and table agree."""
    if "random" not in set(df["mode"]):
        return None
    return diffused_redundancy(df, deltas=(delta,), source=_dr_metric(df)).sort_values("group").reset_index(drop=True)


def _error_bars(g):
    """matplotlib's (below, above) error bars of the DR intervals: a percentile interval may lie
    on one side of its estimate (then no bar on the other), never a negative length."""
    return np.clip([np.nan_to_num(g["dr"] - g["dr_low"]), np.nan_to_num(g["dr_high"] - g["dr"])], 0, None)


def _fig_depth(df, plt):
    """DR(0.9) across the layers of one model (a ``layers = [...]`` group), in the spec's order."""
    dr = _dr_at(df)
    if dr is None:
        return None
    series = [(keys, g) for keys, g in dr.groupby(["model", "dataset"], sort=False) if g["layer"].nunique() > 1]
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(3.4, 2.7))
    for j, ((model, dataset), g) in enumerate(series):
        x = np.arange(len(g))
        ax.errorbar(x, g["dr"], yerr=_error_bars(g), marker="o", capsize=3, color=f"C{j}",
                    label=f"{model} / {dataset}")
        ax.set_xticks(x, g["layer"], rotation=30, ha="right")
    ax.set(xlabel="layer (in the spec's order)", ylabel="DR(0.9), random neurons",
           title="Diffused redundancy across depth", ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def _fig_pairings(df, plt):
    """DR(0.9) of every pairing side by side (models, layers, datasets compared), with intervals."""
    dr = _dr_at(df)
    if dr is None or len(dr) < 2:
        return None
    fig, ax = plt.subplots(figsize=(max(3.4, 0.55 * len(dr) + 1.2), 2.9))
    x = np.arange(len(dr))
    models = list(dict.fromkeys(dr["model"]))
    ax.bar(x, dr["dr"].fillna(0), yerr=_error_bars(dr), capsize=3,
           color=[f"C{models.index(m)}" for m in dr["model"]])
    ax.set_xticks(x, [_tick(r, df) for r in dr.itertuples()], fontsize=5.5)
    ax.set(ylabel="DR(0.9), random neurons", title="Diffused redundancy compared (one bar per pairing)",
           ylim=(0, 1.02))
    ax.grid(alpha=0.3, axis="y")
    return fig


def _tick(r, df) -> str:
    """A pairing's bar label: its spec name, or model / layer / dataset (and its protocol), one per line."""
    import textwrap

    name, protocol = pairing_labels(df).get(int(r.group), ("", ""))
    if name:
        return textwrap.fill(name, 16)
    return "\n".join([str(r.model), str(r.layer), str(r.dataset)] + ([protocol] if protocol else []))


def _fig_overlaid(df, plt):
    """Every pairing's random-neuron accuracy relative to its own full layer, on one axis."""
    if "random" not in set(df["mode"]) or df["group"].nunique() < 2:
        return None
    curve = accuracy_curve(df)
    curve = curve[curve["mode"] == "random"]
    fig, ax = plt.subplots(figsize=(3.4, 2.7))
    for j, (keys, c) in enumerate(curve.groupby(["group", "model", "layer", "dataset"])):
        c = c.sort_values("fraction")
        ax.plot(c["fraction"], c["relative"], marker="o", ms=2.5, color=f"C{j}", label=_label(keys, df))
    ax.axhline(0.9, color="k", ls=":", lw=0.8, label="90% of the full layer")
    ax.set(xscale="log", xlabel="effective fraction k/d (log scale)", ylabel="accuracy / full layer's",
           title="Random neurons, every pairing")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return fig


# name -> figure maker (df, pyplot) -> Figure, or None when the results hold nothing for it
FIGURES = {"accuracy_vs_fraction": _fig_accuracy, "dr_vs_delta": _fig_dr, "cka_vs_fraction": _fig_cka,
           "inequality_vs_fraction": _fig_inequality, "classwise_accuracy": _fig_classwise,
           "modes_compared": _fig_modes, "accuracy_overlaid": _fig_overlaid, "dr_across_depth": _fig_depth,
           "dr_compared": _fig_pairings}

# what to look for in each figure: its caption on the page
CAPTIONS = {
    "accuracy_vs_fraction": "Probe accuracy on k of d neurons against k/d (mean over seeds; bands: 95% bootstrap "
                            "intervals over seeds and test images); the black dashed line and grey band are the whole "
                            "layer. Dashed curves are one run (pca, prefix): their band covers test images only. "
                            "Diffused redundancy: random neurons reach the whole layer at a small fraction.",
    "dr_vs_delta": "DR(δ): the share of neurons that can go while keeping δ of the whole layer's accuracy (solid) or "
                   "CKA (dotted), with 95% bootstrap bands (seeds and test images; CKA: seeds); a resample that never "
                   "reaches δ counts at DR's lower bound, 0. Triangles are lower bounds (reached at the smallest "
                   "fraction evaluated).",
    "cka_vs_fraction": "Linear CKA between each subset and the whole layer: how much of the layer's representation a "
                       "subset already carries.",
    "inequality_vs_fraction": "Gini and coefficient of variation of the per-class accuracies (95% bootstrap intervals "
                              "over seeds and test images): small subsets that keep the mean can still hurt some "
                              "classes. The dotted line is the test set's noise floor: what equal true accuracy in "
                              "every class would show on these class sizes.",
    "classwise_accuracy": "Per-class accuracy at a few fractions (all seeds): which classes pay for a smaller subset.",
    "modes_compared": "Selection modes at equal k: random neurons against principal directions, least-variance "
                      "directions, random projections and the first k neurons.",
    "accuracy_overlaid": "Every pairing's random-neuron curve relative to its own whole layer, on one axis.",
    "dr_across_depth": "DR(0.9) layer by layer, in the spec's order, with 95% bootstrap intervals.",
    "dr_compared": "DR(0.9) of every model / layer / dataset pairing side by side.",
}
# figures that compare pairings: their own section when the sweep has several
COMPARISONS = ("accuracy_overlaid", "dr_across_depth", "dr_compared")

FigureFormat = Literal["png", "svg", "pdf"]
FigureName = Annotated[str, OneOf(FIGURES, "report figure")]


class ReportOptions(Parameters):
    """What ``featstore report`` writes: ``write_report``'s keywords and its command line's options."""

    formats: Annotated[tuple[FigureFormat, ...], Field(min_length=1, strict=False), CommaList(), Unique()] = ("png",)
    """Files written for each figure (comma-separated: png, svg, pdf); the page embeds PNG whatever they are."""
    figure: FigureName | None = None
    """Write this one figure alone (in each of --formats), not the page."""
    progress: Annotated[bool, Field(json_schema_extra={"off": "No progress bar over the figures"})] = True
    """Show a progress bar over the figures (each bootstraps its intervals: seconds apiece)."""
    dr_metric: Annotated[str, OneOf(probes.METRICS, "metric")] = "accuracy"
    """The probes' test metric DR(δ) is computed from (probes.METRICS; the subsets' against the full layer's):
    accuracy (the paper), balanced_accuracy (mean per-class accuracy, the Pets and Flowers convention),
    macro_f1 or top5_accuracy. The page's sentence, DR figure and table use it."""


# sized for one column of a two-column paper (3.4 in wide), text at 8 pt, fonts kept as text
PAPER_STYLE = {"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 6,
               "xtick.labelsize": 7, "ytick.labelsize": 7, "lines.linewidth": 1.1, "axes.linewidth": 0.6,
               "grid.linewidth": 0.4, "legend.frameon": False, "pdf.fonttype": 42, "ps.fonttype": 42,
               "svg.fonttype": "none", "savefig.bbox": "tight", "savefig.pad_inches": 0.02}
PNG_DPI = 200


def _render(df, names, out: Path, formats, progress: bool = False) -> dict[str, bytes]:
    """Draw each figure (paper style), write it in every format, return its PNG bytes."""
    import io

    import matplotlib
    from tqdm.auto import tqdm

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pngs = {}
    with matplotlib.rc_context(PAPER_STYLE):
        for name in tqdm(names, desc="report figures", unit="figure", disable=not progress, dynamic_ncols=True):
            fig = FIGURES[name](df, plt)
            if fig is None:
                continue
            fig.tight_layout()
            for fmt in formats:  # each file written whole or not at all: a full disk never leaves half a figure
                buf = io.BytesIO()
                fig.savefig(buf, format=fmt, dpi=PNG_DPI, metadata={"Creator": "featstore report"}
                            if fmt in ("pdf", "svg") else None)
                _write(out / f"{name}.{fmt}", buf.getvalue())
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=PNG_DPI)
            pngs[name] = buf.getvalue()
            plt.close(fig)
    return pngs


def _write(path: Path, data: bytes) -> None:
    """One report file, atomically: the previous one stays whole if this write fails."""
    from featstore.fileio import atomic_write

    atomic_write(path, data, consequence="the report's previous files are as they were")


def _answers(df) -> list[str]:
    """One sentence per pairing: the share of random neurons that keeps 90% of the whole layer's
    accuracy, DR(0.9) with its interval (or why there is none: not reached, or a full layer that
    random subsets beat beyond the interval)."""
    if "random" not in set(df["mode"]):
        return []
    dr = _dr_at(df)
    metric = _dr_metric(df)
    words = _words(metric)
    full = df[df["mode"] == "full"].groupby("group")[probes.METRICS[metric].column].mean()
    width = df.groupby("group")["n_neurons"].first()
    suspicious, unconverged = sweep_warnings(df), convergence_notes(df)
    out = []
    for r in dr.itertuples():
        where = f"<b>{html.escape(_label((r.group, r.model, r.layer, r.dataset), df))}</b>: "
        d, acc = int(width[r.group]), full.get(r.group, np.nan)
        if r.group in suspicious:
            out.append(where + html.escape(suspicious[r.group]) + ".")
            continue
        if r.censored == NOT_REACHED:
            out.append(where + f"no random subset smaller than the {d} neurons keeps 90% of the full layer's {words} "
                               f"({acc:.3f}) on this grid: DR(0.9) not reached.")
            continue
        share, k = f"{100 * r.fraction:.3g}%", max(1, int(round(r.fraction * d)))
        bound = " (the smallest fraction evaluated, so DR is a lower bound)" if r.censored == EDGE else ""
        text = dr_text(r.dr, r.dr_low, r.dr_high, r.censored, r.covers, r.reached)
        note = f" Note: {html.escape(unconverged[r.group])}." if r.group in unconverged else ""
        out.append(where + f"a random {share} of the {d} neurons ({k}) keeps 90% of the full layer's {words} "
                           f"({acc:.3f}){bound}: <b>DR(0.9) = {html.escape(text)}</b> "
                           f"(interval over {COVERS[r.covers]}, {r.n_seeds} seeds).{note}")
    return out


def _progress_html(results_dir, df) -> str:
    """A warning when the sweep is not finished: its tasks done of the total, the runs per curve."""
    from ._sweep import sweep_progress

    progress = sweep_progress(results_dir)
    if progress is None or progress["done"] == progress["total"]:
        return ""
    runs = df[df["mode"] != "full"].groupby("mode")["seed"].nunique()
    seeds = ", ".join(f"{m}: {max(int(n), 1)}" for m, n in runs.items())
    missing = ", ".join(progress["missing"][:5]) + (" ..." if len(progress["missing"]) > 5 else "")
    return (f"<p class='warn'><b>Unfinished sweep:</b> {progress['done']} of {progress['total']} tasks done (runs per "
            f"curve: {html.escape(seeds)}); every number below comes from the tasks done so far. Missing: "
            f"{html.escape(missing)}. Re-run the sweep to finish it.</p>")


def _dr_html(df, source: str | None = None) -> str:
    """DR(δ) per pairing (from ``source``, default the page's DR metric): model / layer / dataset,
    then one column per δ; censored values marked; a caption says what the intervals cover."""
    t = dr_table(df, source=source or _dr_metric(df))
    note = interval_note(t.attrs.get("covers", []))
    t = t.reset_index()
    keys = ["model", "layer", "dataset"] + (["pairing"] if "pairing" in t.columns else [])
    deltas = [c for c in t.columns if c not in ("group", *keys)]
    head = "".join(f"<th>{h}</th>" for h in [*keys, *(f"δ = {d:g}" for d in deltas)])
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(r[c]))}</td>" for c in [*keys, *deltas])
                   + "</tr>" for _, r in t.iterrows())
    return (f"<div class='wide'><table class='dr'><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>"
            f"<p class='src'>{html.escape(note)}</p>")


def _curve_html(df) -> str:
    """The per-fraction accuracy table pivoted: fractions as rows, modes as columns, the mean over
    runs with its bootstrap interval ("(one run)" where nothing was resampled)."""
    curve = accuracy_curve(df)
    parts = []

    def value(r):
        if r.low != r.low:
            return f"{r.mean:.3f} (one run)"
        return f"{r.mean:.3f} [{r.low:.3f}, {r.high:.3f}]" + ("†" if r.covers == "test" else "")

    for keys, c in curve.groupby(["group", "model", "layer", "dataset"]):
        c = c.assign(value=[value(r) for r in c.itertuples()])
        t = c.pivot_table(index="fraction", columns="mode", values="value", aggfunc="first").sort_index()
        head = "<th>k/d</th>" + "".join(f"<th>{html.escape(m)}</th>" for m in t.columns)
        rows = "".join(f"<tr><td>{f:.4g}</td>" + "".join(f"<td>{'' if v != v else v}</td>" for v in r) + "</tr>"
                       for f, r in zip(t.index, t.to_numpy()))
        full, lo, hi = c["full"].iloc[0], c["full_low"].iloc[0], c["full_high"].iloc[0]
        band = f" [{lo:.3f}, {hi:.3f}]" if lo == lo else ""
        parts.append(f"<p>{html.escape(_label(keys, df))}: full layer {full:.3f}{band}</p><div class='wide'><table><thead>"
                     f"<tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>")
    return "".join(parts) + f"<p class='src'>{html.escape(interval_note(sorted(set(curve['covers']))))}</p>"


def _figure_html(name: str, png: bytes) -> str:
    data = base64.b64encode(png).decode()
    return (f"<figure id='fig-{name}'><img alt='{name.replace('_', ' ')}' src='data:image/png;base64,{data}'>"
            f"<figcaption><b>{html.escape(name.replace('_', ' '))}.</b> {html.escape(CAPTIONS[name])}</figcaption>"
            f"</figure>")


STYLE = ("body{font-family:system-ui,sans-serif;max-width:1240px;margin:1em auto;padding:0 1em;color:#222}"
         "h1{font-size:1.45em;margin:.2em 0}h2{font-size:1.15em;margin:1.2em 0 .4em}"
         ".src{color:#666;font-size:12px;margin:.2em 0 .8em}"
         ".top{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1.05fr);gap:1.2em;align-items:start}"
         ".answer{font-size:15px;line-height:1.4;margin:.3em 0 .7em}"
         ".figs{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(520px,100%),1fr));gap:1.2em}"
         "figure{margin:0}figure img{width:100%;height:auto;border:1px solid #eee}"
         "figcaption{font-size:12.5px;color:#444;margin-top:.3em}"
         "table{border-collapse:collapse;font-size:12px;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px}"
         "th{background:#f4f4f4}details{margin:.6em 0}summary{cursor:pointer;font-weight:600}"
         ".warn{background:#fff4e5;border-left:4px solid #f0a020;padding:.4em .6em;font-size:14px}"
         ".wide{overflow-x:auto;max-width:100%}"
         # a phone: one column, the answer above its figure; figures scale, tables scroll in their box
         "@media (max-width:800px){.top{grid-template-columns:minmax(0,1fr)}body{padding:0 .5em}}")


_REPORT = defaults(ReportOptions)


def write_report(results_dir: str | os.PathLike, out: str | os.PathLike | None = None, *,
                 formats=_REPORT["formats"], figure: str | None = _REPORT["figure"],
                 progress: bool = _REPORT["progress"], dr_metric: str = _REPORT["dr_metric"]) -> Path:
    """Write a sweep's figures (``formats``: png, svg, pdf) and ``report.html``: one self-contained
    page (images inline), the answer first, then the figures, then the detailed tables (folded).

    ``formats`` and ``figure`` are declared in :class:`ReportOptions`. With ``figure``: only that
    figure's files. Returns the page's path (or, with ``figure``, its first file).
    """
    import json

    o = validate(ReportOptions, dict(formats=formats, figure=figure, progress=progress, dr_metric=dr_metric),
                 prefix="write_report.")
    from featstore import require_extra

    require_extra("matplotlib", "featstore report")

    from ._sweep import load_results

    df = load_results(results_dir)
    df.attrs["dr_metric"] = o.dr_metric
    if df.empty:
        from featstore.errors import ResultsNotFoundError

        raise ResultsNotFoundError(path=str(results_dir), hint="no task has completed yet")
    if probes.METRICS[o.dr_metric].column not in df.columns:
        from featstore.errors import IncompatibleParametersError

        raise IncompatibleParametersError(key="dr_metric", value=o.dr_metric,
                                          reason=f"these results hold no {probes.METRICS[o.dr_metric].column} column "
                                                 f"(a sweep of an older featstore): run the sweep again to compute it")
    out = Path(out) if out else Path(results_dir) / "report"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from featstore.errors import WriteFailedError

        raise WriteFailedError(path=str(out), reason=e.strerror or str(e),
                               consequence="no report was written; give --out a writable folder") from None
    if o.figure is not None:
        if not _render(df, [o.figure], out, o.formats, o.progress):
            from featstore.errors import IncompatibleParametersError

            raise IncompatibleParametersError(key="figure", value=o.figure,
                                              reason="these results hold nothing for it (see the page for the "
                                                     "figures they have)")
        return out / f"{o.figure}.{o.formats[0]}"
    pngs = _render(df, list(FIGURES), out, o.formats, o.progress)
    meta_path = Path(results_dir) / "sweep.json"
    spec = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    store = spec.get("spec", {}).get("store", "?")
    n_groups = df["group"].nunique()
    parts = ["<!doctype html><html lang='en'><head><meta charset='utf-8'>",
             "<meta name='viewport' content='width=device-width, initial-scale=1'>",
             f"<title>featstore report: {html.escape(str(results_dir))}</title><style>{STYLE}</style></head><body>",
             "<h1>Diffused redundancy" + (f" across {n_groups} pairings" if n_groups > 1 else "") + "</h1>",
             f"<p class='src'>{len(df)} probes from {df['task'].nunique()} tasks; modes "
             f"{html.escape(', '.join(sorted(set(df['mode']) - {'full'})))}. Results <code>{html.escape(str(results_dir))}"
             f"</code> (spec key {html.escape(str(spec.get('key', '?'))[:12])}), features from <code>"
             f"{html.escape(str(store))}</code>.</p>"]
    answers = _answers(df)
    left = "".join(f"<p class='answer'>{a}</p>" for a in answers) or \
        "<p class='answer'>No random-neuron probes in these results: the DR table needs mode 'random'.</p>"
    left = _progress_html(results_dir, df) + left
    if answers:
        left += (f"<h2>DR(δ) from {_words(o.dr_metric)}, random neurons</h2><p class='src'>mean over seeds [95% bootstrap "
                 "interval]; ≥: reached at the smallest fraction evaluated</p>" + _dr_html(df))
    first = "accuracy_vs_fraction"
    parts.append(f"<section class='top'><div id='answer'>{left}</div>"
                 + (_figure_html(first, pngs[first]) if first in pngs else "") + "</section>")
    rest = [n for n in pngs if n != first and not (n in COMPARISONS and n_groups > 1)]
    parts.append("<h2>Figures</h2><div class='figs'>" + "".join(_figure_html(n, pngs[n]) for n in rest) + "</div>")
    compared = [n for n in COMPARISONS if n in pngs and n_groups > 1]
    if compared:
        parts.append("<h2>Comparisons across pairings</h2><div class='figs'>"
                     + "".join(_figure_html(n, pngs[n]) for n in compared) + "</div>")
    parts.append("<h2>Details</h2>")
    if answers:
        if not df["cka"].isna().all():
            est = df["cka_estimator"].dropna().iloc[0]
            parts.append(f"<details><summary>DR(δ) from CKA ({html.escape(str(est))} estimator)</summary>"
                         + _dr_html(df, source="cka") + "</details>")
        parts.append("<details><summary>Critical fraction: the smallest evaluated fraction within 5% of the full "
                     "layer</summary><div class='wide'>"
                     + critical_fraction(df).to_html(index=False, float_format="{:.4g}".format) + "</div></details>")
    parts.append("<details><summary>Accuracy at every fraction (mean over runs [95% bootstrap interval])</summary>"
                 + _curve_html(df) + "</details>")
    files = ", ".join(f"<code>{n}.{{{','.join(o.formats)}}}</code>" for n in pngs)
    parts.append(f"<p class='src'>Figure files beside this page: {files}.</p></body></html>")
    page = out / "report.html"
    _write(page, "\n".join(parts).encode())
    return page
