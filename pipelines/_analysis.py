"""The paper's quantities from a sweep's results table.

* accuracy vs fraction (mean and spread over seeds, absolute and relative to the full layer);
* diffused redundancy DR(δ) = 1 - min{ f : Acc(f) >= δ · Acc(1) } over the evaluated
  effective fractions f = k/d, from accuracy (Acc(1) = the full-layer probes) or from CKA
  (CKA(f) >= δ), with a seed-bootstrap interval and censoring marked;
* Gini coefficient and coefficient of variation of per-class accuracies vs fraction;
* modes compared at equal k.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

from featstore.errors import InvalidParameterError, MissingKeyError, UnknownNameError

__all__ = ["gini", "coefficient_of_variation", "accuracy_curve", "diffused_redundancy", "dr_table", "dr_text",
           "effective_fraction", "inequality_curve", "modes_at_equal_k", "critical_fraction", "DELTAS"]

DELTAS = tuple(np.round(np.linspace(0.5, 1.0, 51), 3))
GROUP_COLS = ["group", "model", "layer", "dataset"]


def _defined(values) -> np.ndarray:
    """The values that are numbers: a class absent from the evaluated split has NaN accuracy
    and takes no part in an inequality measure."""
    x = np.asarray(values, dtype=float)
    return x[~np.isnan(x)]


def gini(values) -> float:
    """Gini coefficient: Σ_i Σ_j |x_i - x_j| / (2 n² mean) over the defined values (NaN left
    out); 0 = equal, -> 1 = unequal."""
    x = _defined(values)
    if x.size == 0:
        raise InvalidParameterError(key="values", value=list(values), expected="at least one number that is not NaN")
    mean = x.mean()
    if mean == 0:
        return 0.0
    return float(np.abs(x[:, None] - x[None, :]).sum() / (2 * x.size ** 2 * mean))


def coefficient_of_variation(values) -> float:
    """std / mean (population std) over the defined values (NaN left out), 0 for a zero mean."""
    x = _defined(values)
    mean = x.mean()
    return float(x.std() / mean) if mean else 0.0


FULL_LAYER = "full"  # the mode of the full-layer reference rows
SOURCES = {"accuracy": "test_accuracy", "cka": "cka"}  # what DR(δ) is computed from
EDGE, NOT_REACHED = "at grid edge", "not reached"  # the two ways a DR value is censored


def effective_fraction(df):
    """k / d of each row: the fraction a probe really saw. Several small nominal fractions give
    the same k (d = 512: 0.0005, 0.001 and 0.002 are all k = 1), and a PCA draw clamped at
    the train split's rank sees fewer directions than it asked for."""
    return df["k"] / df["n_neurons"]


def _full_reference(df):
    full = df[df["mode"] == FULL_LAYER]
    return full.groupby("group")["test_accuracy"].mean()


def accuracy_curve(df, metric: str = "test_accuracy"):
    """Mean, std, min, max over seeds of ``metric`` per (group, mode, k), at the effective
    fraction k/d, and relative to the full layer (the mean of its reference rows)."""
    sub = df[df["mode"] != FULL_LAYER].assign(fraction=lambda d: effective_fraction(d))
    keys = GROUP_COLS + ["mode", "fraction", "k"]
    curve = sub.groupby(keys)[metric].agg(["mean", "std", "min", "max", "count"]).reset_index()
    curve["std"] = curve["std"].fillna(0.0)
    full = _full_reference(df)
    curve["full"] = curve["group"].map(full)
    curve["relative"] = curve["mean"] / curve["full"]
    return curve


def _dr_from_curve(fractions: np.ndarray, values: np.ndarray, reference: float, deltas: Sequence[float]):
    """(DR per δ, censoring per δ) of one curve: DR = 1 - the smallest evaluated fraction whose
    value reaches δ x reference. Reached at the smallest evaluated fraction, the true critical
    fraction may be smaller still: DR is a lower bound (``at grid edge``). Reached nowhere: NaN
    (``not reached``)."""
    order = np.argsort(fractions)
    f, v = fractions[order], values[order]
    reached, censored = [], []
    for d in deltas:
        ok = np.nan_to_num(v, nan=-np.inf) >= d * reference
        if not ok.any():
            reached.append(np.nan)
            censored.append(NOT_REACHED)
            continue
        first = int(np.argmax(ok))
        reached.append(f[first])
        censored.append(EDGE if first == 0 else "")
    reached = np.array(reached)
    return 1.0 - reached, censored, reached


def _seed_tables(g, full, metric: str):
    """(seeds x effective fractions values, per-seed full-layer references or None) of one group."""
    g = g.assign(effective=effective_fraction(g))
    seeded = g["seed"].notna().any()
    index = g["seed"] if seeded else np.zeros(len(g))
    table = g.pivot_table(index=index, columns="effective", values=metric, aggfunc="mean", dropna=False)
    refs = None
    if seeded and len(full) and full["seed"].notna().all():
        per_seed = full.groupby("seed")["test_accuracy"].mean()
        if set(table.index) <= set(per_seed.index):
            refs = per_seed.loc[table.index].to_numpy(dtype=float)
    return table, refs


def diffused_redundancy(df, mode: str = "random", deltas: Sequence[float] = DELTAS, source: str = "accuracy",
                        n_boot: int = 1000, ci: float = 0.95, random_state: int = 0):
    """DR(δ) per group, from accuracy or CKA, on effective fractions, with a seed-bootstrap interval.

    Parameters
    ----------
    df : DataFrame
        ``load_results`` output.
    mode : str
        Selection mode whose curve is used (the paper: ``random``).
    source : {"accuracy", "cka"}
        ``accuracy``: Acc(f) >= δ · Acc(1), Acc(1) the full-layer probes' test accuracy.
        ``cka``: CKA(X_S, X) >= δ.
    n_boot : int
        Bootstrap resamples of the seeds (with replacement). When the full layer was trained
        under each seed, each resample takes the picked seeds' references too, so the
        interval carries the reference's own seed noise.

    Returns
    -------
    DataFrame with columns group, model, layer, dataset, mode, source, delta, dr, dr_low,
    dr_high, censored ("" / "at grid edge": DR is a lower bound / "not reached": DR is NaN),
    fraction (the effective fraction reached), n_seeds.
    """
    import pandas as pd

    if source not in SOURCES:
        raise UnknownNameError("DR source", source, SOURCES)
    metric = SOURCES[source]
    rng = np.random.default_rng(random_state)
    rows = []
    sub = df[df["mode"] == mode]
    if sub.empty:
        raise InvalidParameterError(key="mode", value=mode,
                                    expected="a mode with rows in the results: " + ", ".join(sorted(df["mode"].unique())))
    for keys, g in sub.groupby(GROUP_COLS):
        full = df[(df["mode"] == FULL_LAYER) & (df["group"] == keys[0])]
        if source == "accuracy" and full.empty:
            raise MissingKeyError(key=f"group {keys[0]} full-layer rows", expected="the sweep's reference task rows")
        table, refs = _seed_tables(g, full, metric)
        fractions = table.columns.to_numpy(dtype=float)
        values = table.to_numpy(dtype=float)
        fixed = float(full["test_accuracy"].mean()) if source == "accuracy" else 1.0

        def reference(pick):
            return float(np.mean(refs[pick])) if (refs is not None and source == "accuracy") else fixed

        everyone = np.arange(len(values))
        dr, censored, reached = _dr_from_curve(fractions, np.nanmean(values, axis=0), reference(everyone), deltas)
        boots = np.empty((n_boot, len(deltas)))
        for b in range(n_boot):
            pick = rng.integers(0, len(values), len(values))
            boots[b] = _dr_from_curve(fractions, np.nanmean(values[pick], axis=0), reference(pick), deltas)[0]
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a δ no resample reaches: NaN bounds
            lo, hi = np.nanquantile(boots, [(1 - ci) / 2, 1 - (1 - ci) / 2], axis=0)
        for d, v, l, h, c, f in zip(deltas, dr, lo, hi, censored, reached):
            rows.append(dict(zip(GROUP_COLS, keys), mode=mode, source=source, delta=float(d), dr=float(v),
                             dr_low=float(l), dr_high=float(h), censored=c, fraction=float(f),
                             n_seeds=len(values)))
    return pd.DataFrame(rows)


def dr_text(dr: float, low: float, high: float, censored: str) -> str:
    """One DR value as people read it: "0.900 [0.900, 0.925]", "≥ 0.999 [...]", "not reached"."""
    if censored == NOT_REACHED:
        return "not reached"
    return f"{'≥ ' if censored == EDGE else ''}{dr:.3f} [{low:.3f}, {high:.3f}]"


def dr_table(df, deltas: Sequence[float] = (0.8, 0.9, 0.95, 0.99), mode: str = "random", source: str = "accuracy",
             n_boot: int = 1000):
    """DR at a few δ per group, one row per group (the paper tabulates δ = 0.9); a value reached
    at the smallest evaluated fraction reads "≥ x", one reached nowhere "not reached"."""
    dr = diffused_redundancy(df, mode=mode, deltas=deltas, source=source, n_boot=n_boot)
    dr["value"] = [dr_text(r.dr, r.dr_low, r.dr_high, r.censored) for r in dr.itertuples()]
    return dr.pivot_table(index=GROUP_COLS, columns="delta", values="value", aggfunc="first")


def critical_fraction(df, within: float = 0.05, mode: str = "random"):
    """Smallest evaluated effective fraction whose mean accuracy is within ``within`` (relative) of
    the full layer."""
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
    d = df.assign(fraction=lambda x: effective_fraction(x))
    d["gini"] = d["per_class_accuracy"].apply(gini)
    d["cov"] = d["per_class_accuracy"].apply(coefficient_of_variation)
    keys = GROUP_COLS + ["mode", "fraction"]
    return d.groupby(keys)[["gini", "cov"]].agg(["mean", "std"]).reset_index()


def modes_at_equal_k(df, metric: str = "test_accuracy"):
    """Mean ``metric`` per (group, k) x mode: random vs pca vs pca-least vs randproj vs prefix."""
    sub = df[df["mode"] != "full"]
    return sub.pivot_table(index=GROUP_COLS + ["k"], columns="mode", values=metric, aggfunc="mean")
