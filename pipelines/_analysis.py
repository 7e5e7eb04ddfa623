"""The paper's quantities from a sweep's results table.

* accuracy vs fraction (mean and spread over seeds, absolute and relative to the full layer);
* diffused redundancy DR(δ) = 1 - min{ f : Acc(f) >= δ · Acc(1) } over the evaluated
  fractions, from accuracy (Acc(1) = the full-layer probe) or from CKA (CKA(f) >= δ),
  with a seed-bootstrap interval;
* Gini coefficient and coefficient of variation of per-class accuracies vs fraction;
* modes compared at equal k.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from featstore.errors import InvalidParameterError

__all__ = ["gini", "coefficient_of_variation", "accuracy_curve", "diffused_redundancy", "dr_table",
           "inequality_curve", "modes_at_equal_k", "critical_fraction", "DELTAS"]

DELTAS = tuple(np.round(np.linspace(0.5, 1.0, 51), 3))
GROUP_COLS = ["group", "model", "layer", "dataset"]


def gini(values) -> float:
    """Gini coefficient: Σ_i Σ_j |x_i - x_j| / (2 n² mean); 0 = equal, -> 1 = unequal."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise InvalidParameterError("gini of an empty list")
    mean = x.mean()
    if mean == 0:
        return 0.0
    return float(np.abs(x[:, None] - x[None, :]).sum() / (2 * x.size ** 2 * mean))


def coefficient_of_variation(values) -> float:
    """std / mean (population std), 0 for a zero mean."""
    x = np.asarray(values, dtype=float)
    mean = x.mean()
    return float(x.std() / mean) if mean else 0.0


def _full_reference(df):
    full = df[df["mode"] == "full"]
    return full.groupby("group")["test_accuracy"].mean()


def accuracy_curve(df, metric: str = "test_accuracy"):
    """Mean, std, min, max over seeds of ``metric`` per (group, mode, fraction), and relative to the full layer."""
    sub = df[df["mode"] != "full"]
    keys = GROUP_COLS + ["mode", "fraction", "k"]
    curve = sub.groupby(keys)[metric].agg(["mean", "std", "min", "max", "count"]).reset_index()
    curve["std"] = curve["std"].fillna(0.0)
    full = _full_reference(df)
    curve["full"] = curve["group"].map(full)
    curve["relative"] = curve["mean"] / curve["full"]
    return curve


def _dr_from_curve(fractions: np.ndarray, values: np.ndarray, reference: float, deltas: Sequence[float]):
    order = np.argsort(fractions)
    f, v = fractions[order], values[order]
    out = []
    for d in deltas:
        ok = v >= d * reference
        fmin = f[ok].min() if ok.any() else 1.0  # the full layer always qualifies
        out.append(1.0 - fmin)
    return np.array(out)


def diffused_redundancy(df, mode: str = "random", deltas: Sequence[float] = DELTAS, source: str = "accuracy",
                        n_boot: int = 1000, ci: float = 0.95, random_state: int = 0):
    """DR(δ) per group, from accuracy or CKA, with a seed-bootstrap interval.

    Parameters
    ----------
    df : DataFrame
        ``load_results`` output.
    mode : str
        Selection mode whose curve is used (the paper: ``random``).
    source : {"accuracy", "cka"}
        ``accuracy``: Acc(f) >= δ · Acc(1), Acc(1) the full-layer probe's test accuracy.
        ``cka``: CKA(X_S, X) >= δ.
    n_boot : int
        Bootstrap resamples of the seeds (with replacement); the mean curve and DR are
        recomputed for each.

    Returns
    -------
    DataFrame with columns group, model, layer, dataset, mode, source, delta, dr,
    dr_low, dr_high.
    """
    import pandas as pd

    if source not in ("accuracy", "cka"):
        raise InvalidParameterError(f"source={source!r}; choose 'accuracy' or 'cka'")
    metric = "test_accuracy" if source == "accuracy" else "cka"
    rng = np.random.default_rng(random_state)
    full = _full_reference(df)
    rows = []
    sub = df[df["mode"] == mode]
    if sub.empty:
        raise InvalidParameterError(f"no rows with mode={mode!r}; modes in the results: {sorted(df['mode'].unique())}")
    for keys, g in sub.groupby(GROUP_COLS):
        table = g.pivot_table(index="seed", columns="fraction", values=metric, aggfunc="mean", dropna=False) \
            if g["seed"].notna().any() else g.pivot_table(index=np.zeros(len(g)), columns="fraction", values=metric)
        fractions = table.columns.to_numpy(dtype=float)
        values = table.to_numpy(dtype=float)
        ref = float(full.get(keys[0], np.nan)) if source == "accuracy" else 1.0
        if source == "accuracy" and np.isnan(ref):
            raise InvalidParameterError(f"group {keys[0]} has no full-layer reference row")
        dr = _dr_from_curve(fractions, np.nanmean(values, axis=0), ref, deltas)
        boots = np.empty((n_boot, len(deltas)))
        for b in range(n_boot):
            pick = rng.integers(0, len(values), len(values))
            boots[b] = _dr_from_curve(fractions, np.nanmean(values[pick], axis=0), ref, deltas)
        lo, hi = np.quantile(boots, [(1 - ci) / 2, 1 - (1 - ci) / 2], axis=0)
        for d, v, l, h in zip(deltas, dr, lo, hi):
            rows.append(dict(zip(GROUP_COLS, keys), mode=mode, source=source, delta=float(d), dr=float(v),
                             dr_low=float(l), dr_high=float(h)))
    return pd.DataFrame(rows)


def dr_table(df, deltas: Sequence[float] = (0.8, 0.9, 0.95, 0.99), mode: str = "random", source: str = "accuracy",
             n_boot: int = 1000):
    """DR at a few δ per group, one row per group (the paper tabulates δ = 0.9)."""
    dr = diffused_redundancy(df, mode=mode, deltas=deltas, source=source, n_boot=n_boot)
    dr["value"] = dr.apply(lambda r: f"{r.dr:.3f} [{r.dr_low:.3f}, {r.dr_high:.3f}]", axis=1)
    return dr.pivot_table(index=GROUP_COLS, columns="delta", values="value", aggfunc="first")


def critical_fraction(df, within: float = 0.05, mode: str = "random"):
    """Smallest evaluated fraction whose mean accuracy is within ``within`` (relative) of the full layer."""
    curve = accuracy_curve(df)
    curve = curve[curve["mode"] == mode]
    out = {}
    for keys, g in curve.groupby(GROUP_COLS):
        ok = g[g["relative"] >= 1 - within]
        out[keys] = float(ok["fraction"].min()) if len(ok) else np.nan
    import pandas as pd

    return pd.Series(out, name=f"critical fraction (within {within:.0%} of full)").rename_axis(GROUP_COLS).reset_index()


def inequality_curve(df):
    """Gini and coefficient of variation of each probe's per-class accuracies, averaged over seeds."""
    d = df.copy()
    d["gini"] = d["per_class_accuracy"].apply(gini)
    d["cov"] = d["per_class_accuracy"].apply(coefficient_of_variation)
    keys = GROUP_COLS + ["mode", "fraction"]
    return d.groupby(keys)[["gini", "cov"]].agg(["mean", "std"]).reset_index()


def modes_at_equal_k(df, metric: str = "test_accuracy"):
    """Mean ``metric`` per (group, k) x mode: random vs pca vs pca-least vs randproj vs prefix."""
    sub = df[df["mode"] != "full"]
    return sub.pivot_table(index=GROUP_COLS + ["k"], columns="mode", values=metric, aggfunc="mean")
