"""`featstore report`: PNG figures and one self-contained HTML page from a sweep."""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path

import numpy as np

from probes import SELECTION_MODES

from ._analysis import (
    EDGE,
    accuracy_curve,
    critical_fraction,
    diffused_redundancy,
    dr_table,
    effective_fraction,
    inequality_curve,
    modes_at_equal_k,
)

__all__ = ["write_report", "FIGURES"]

# one colour per selection mode (the registry's order), and for explicit index lists
MODE_COLORS = {mode: f"C{i}" for i, mode in enumerate([*SELECTION_MODES, "explicit"])}


def _label(keys) -> str:
    return f"{keys[1]} / {keys[2]} / {keys[3]}"


def _groups(df):
    return list(df.groupby(["group", "model", "layer", "dataset"]).groups)


def _subplots(n, plt, width=6.0, height=4.2):
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False)
    return fig, axes[0]


def _fig_accuracy(df, plt):
    curve = accuracy_curve(df)
    groups = _groups(df)
    fig, axes = _subplots(len(groups), plt)
    for ax, keys in zip(axes, groups):
        c = curve[curve["group"] == keys[0]]
        for mode, m in c.groupby("mode"):
            m = m.sort_values("fraction")
            color = MODE_COLORS.get(mode)
            ax.plot(m["fraction"], m["mean"], marker="o", ms=3, label=mode, color=color)
            ax.fill_between(m["fraction"], m["min"], m["max"], alpha=0.2, color=color)
        full = c["full"].iloc[0] if len(c) else np.nan
        ax.axhline(full, color="k", ls="--", lw=1, label=f"full layer ({full:.3f})")
        ax.set(xscale="log", xlabel="effective fraction k/d (log scale)", ylabel="test accuracy",
               title=f"Accuracy vs fraction\n{_label(keys)}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    return fig


def _fig_dr(df, plt):
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, source in enumerate(("accuracy", "cka")):
        if source == "cka" and df["cka"].isna().all():
            continue
        dr = diffused_redundancy(df, mode="random" if "random" in set(df["mode"]) else df["mode"][df["mode"] != "full"].iloc[0],
                                 source=source, n_boot=200)
        for j, (keys, g) in enumerate(dr.groupby(["group", "model", "layer", "dataset"])):
            ax.plot(g["delta"], g["dr"], color=f"C{j}", ls="-" if source == "accuracy" else ":",
                    label=f"{_label(keys)} ({source})")
            ax.fill_between(g["delta"], g["dr_low"], g["dr_high"], color=f"C{j}", alpha=0.15)
            edge = g[g["censored"] == EDGE]  # reached at the smallest evaluated fraction: a lower bound
            if len(edge):
                ax.plot(edge["delta"], edge["dr"], ls="none", marker="^", ms=4, color=f"C{j}",
                        label=f"≥: reached at the smallest fraction ({source})")
    ax.set(xlabel="δ (fraction of the full layer's accuracy / CKA to keep)", ylabel="diffused redundancy DR(δ)",
           title="Diffused redundancy vs δ (further out = more redundant)", ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def _fig_cka(df, plt):
    if df["cka"].isna().all():
        return None
    curve = accuracy_curve(df, metric="cka")
    groups = _groups(df)
    fig, axes = _subplots(len(groups), plt)
    est = df["cka_estimator"].dropna().iloc[0]
    for ax, keys in zip(axes, groups):
        c = curve[curve["group"] == keys[0]]
        for mode, m in c.groupby("mode"):
            m = m.sort_values("fraction")
            ax.plot(m["fraction"], m["mean"], marker="o", ms=3, label=mode, color=MODE_COLORS.get(mode))
            ax.fill_between(m["fraction"], m["min"], m["max"], alpha=0.2, color=MODE_COLORS.get(mode))
        ax.set(xscale="log", xlabel="effective fraction k/d (log scale)", ylabel=f"linear CKA with the full layer ({est})",
               title=f"CKA(subset, layer) vs fraction\n{_label(keys)}", ylim=(0, 1.02))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    return fig


def _fig_inequality(df, plt):
    ineq = inequality_curve(df[df["mode"] != "full"])
    fig, axes = _subplots(2, plt)
    for keys, g in ineq.groupby(["group", "model", "layer", "dataset"]):
        for mode, m in g.groupby("mode"):
            m = m.sort_values("fraction")
            for ax, col in zip(axes, ("gini", "cov")):
                ax.errorbar(m["fraction"], m[(col, "mean")], yerr=m[(col, "std")].fillna(0), marker="o", ms=3,
                            capsize=2, label=f"{_label(keys)} {mode}", color=MODE_COLORS.get(mode))
    for ax, name in zip(axes, ("Gini coefficient", "coefficient of variation")):
        ax.set(xscale="log", xlabel="effective fraction k/d (log scale)", ylabel=f"{name} of per-class accuracy",
               title=f"Inequality across classes: {name}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    return fig


def _fig_classwise(df, plt):
    sub = df[df["mode"].isin(["random", "full"])] if "random" in set(df["mode"]) else df
    sub = sub.assign(fraction=effective_fraction(sub))
    fractions = np.array(sorted(sub["fraction"].unique()))
    wanted = [0.005, 0.02, 0.1, 0.5, 1.0]
    picks = sorted({float(fractions[np.argmin(np.abs(np.log(fractions) - np.log(w)))]) for w in wanted})
    groups = _groups(df)
    fig, axes = _subplots(len(groups), plt, width=7.0)
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
               title=f"Class-wise accuracy distribution\n{_label(keys)}")
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
               title=f"Selection modes at equal k\n{_label(keys)}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    return fig


def _dr_at(df, delta: float = 0.9):
    """DR(delta) of random neurons per pairing, in the sweep's order (None without random rows)."""
    if "random" not in set(df["mode"]):
        return None
    return diffused_redundancy(df, deltas=(delta,), n_boot=200).sort_values("group").reset_index(drop=True)


def _error_bars(g):
    return [np.nan_to_num(g["dr"] - g["dr_low"]), np.nan_to_num(g["dr_high"] - g["dr"])]


def _fig_depth(df, plt):
    """DR(0.9) across the layers of one model (a ``layers = [...]`` group), in the spec's order."""
    dr = _dr_at(df)
    if dr is None:
        return None
    series = [(keys, g) for keys, g in dr.groupby(["model", "dataset"], sort=False) if g["layer"].nunique() > 1]
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for j, ((model, dataset), g) in enumerate(series):
        x = np.arange(len(g))
        ax.errorbar(x, g["dr"], yerr=_error_bars(g), marker="o", capsize=3, color=f"C{j}",
                    label=f"{model} / {dataset}")
        ax.set_xticks(x, g["layer"], rotation=30, ha="right")
    ax.set(xlabel="layer (shallow to deep, as the spec lists them)", ylabel="DR(0.9), random neurons",
           title="Diffused redundancy across depth", ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _fig_pairings(df, plt):
    """DR(0.9) of every pairing side by side (models, layers, datasets compared), with intervals."""
    dr = _dr_at(df)
    if dr is None or len(dr) < 2:
        return None
    fig, ax = plt.subplots(figsize=(max(6.5, 0.9 * len(dr) + 2), 4.5))
    x = np.arange(len(dr))
    models = list(dict.fromkeys(dr["model"]))
    ax.bar(x, dr["dr"].fillna(0), yerr=_error_bars(dr), capsize=3,
           color=[f"C{models.index(m)}" for m in dr["model"]])
    ax.set_xticks(x, [f"{m}\n{l}\n{d}" for m, l, d in zip(dr["model"], dr["layer"], dr["dataset"])], fontsize=7)
    ax.set(ylabel="DR(0.9), random neurons", title="Diffused redundancy compared (one bar per pairing)",
           ylim=(0, 1.02))
    ax.grid(alpha=0.3, axis="y")
    return fig


# name -> figure maker (df, pyplot) -> Figure, or None when the results hold nothing for it
FIGURES = {"accuracy_vs_fraction": _fig_accuracy, "dr_vs_delta": _fig_dr, "cka_vs_fraction": _fig_cka,
           "inequality_vs_fraction": _fig_inequality, "classwise_accuracy": _fig_classwise,
           "modes_compared": _fig_modes, "dr_across_depth": _fig_depth, "dr_compared": _fig_pairings}


def write_report(results_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Render every figure (PNG) and ``report.html`` (figures embedded) for a sweep.

    Returns the HTML file's path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ._sweep import load_results

    df = load_results(results_dir)
    if df.empty:
        from featstore.errors import ResultsNotFoundError

        raise ResultsNotFoundError(path=str(results_dir), hint="no task has completed yet")
    out = Path(out) if out else Path(results_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, make in FIGURES.items():
        fig = make(df, plt)
        if fig is None:
            continue
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written[name] = path
    has_random = "random" in set(df["mode"])
    tables = []
    if has_random:
        tables.append(("Diffused redundancy DR(δ) from accuracy, random neurons (mean over seeds, "
                       "95% seed-bootstrap interval)", dr_table(df).to_html()))
        if not df["cka"].isna().all():
            est = df["cka_estimator"].dropna().iloc[0]
            tables.append((f"DR(δ) from CKA ({est} estimator)", dr_table(df, source="cka").to_html()))
        tables.append(("Critical fraction: smallest evaluated fraction within 5% of the full layer",
                       critical_fraction(df).to_html(index=False)))
    curve = accuracy_curve(df)
    tables.append(("Accuracy vs fraction (over seeds)",
                   curve.round(4).to_html(index=False, max_rows=400)))
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>featstore report</title>",
             "<style>body{font-family:sans-serif;max-width:1300px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;font-size:12px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px}"
             "img{max-width:100%;border:1px solid #eee;margin:0.5em 0}</style></head><body>",
             "<h1>Diffused redundancy report</h1>",
             f"<p>{len(df)} probes from {df['task'].nunique()} tasks; groups: "
             + ", ".join(html.escape(f"{m}/{l}/{d}") for m, l, d in df[["model", "layer", "dataset"]].drop_duplicates().itertuples(index=False))
             + f"; modes: {', '.join(sorted(df['mode'].unique()))}. Results: <code>{html.escape(str(results_dir))}</code></p>"]
    for title, table in tables:
        parts += [f"<h2>{html.escape(title)}</h2>", table]
    for name, path in written.items():
        data = base64.b64encode(path.read_bytes()).decode()
        parts += [f"<h2>{html.escape(name.replace('_', ' '))}</h2>", f"<img alt='{name}' src='data:image/png;base64,{data}'>"]
    parts.append("</body></html>")
    page = out / "report.html"
    page.write_text("\n".join(parts))
    return page
