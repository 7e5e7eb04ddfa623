"""The paper's quantities from a sweep's results table.

* accuracy vs fraction (mean over seeds with an interval, absolute and relative to the full layer);
* diffused redundancy DR(δ) = 1 - min{ f : Acc(f) >= δ · Acc(1) } over the evaluated
  effective fractions f = k/d, from accuracy (Acc(1) = the full-layer probes) or from CKA
  (CKA(f) >= δ), with an interval and censoring marked;
* Gini coefficient and coefficient of variation of per-class accuracies vs fraction, with an
  interval and the binomial noise floor of the test set;
* modes compared at equal k.

Every interval comes from one bootstrap (``_bootstrap``): seeds and test images resampled
together by default, the same resamples for a pairing's table, sentence and figures. Fractions
that floor to the same k are one point per seed (``distinct_draws``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

import probes
from featstore.errors import IncompatibleParametersError, InvalidParameterError, MissingKeyError, UnknownNameError
from featstore.params import defaults, validate

from ._bootstrap import (
    COVERS,
    BootstrapOptions,
    Resamples,
    binomial_floor,
    cov_rows,
    covers,
    curve_samples,
    distinct_draws,
    gini_rows,
    per_class_samples,
    reference_of,
    runs_of,
)

__all__ = ["gini", "coefficient_of_variation", "accuracy_curve", "diffused_redundancy", "dr_table", "dr_text",
           "effective_fraction", "inequality_curve", "modes_at_equal_k", "critical_fraction", "DELTAS",
           "sweep_warnings", "convergence_notes", "pairing_labels"]

DELTAS = tuple(np.round(np.linspace(0.5, 1.0, 51), 3))
GROUP_COLS = ["group", "model", "layer", "dataset"]
_BOOT = defaults(BootstrapOptions)


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
# what DR(δ) is computed from: a test metric of the probes (probes.METRICS; the paper's: accuracy) against the
# full layer's, or CKA with the whole layer
SOURCES = {**{name: m.column for name, m in probes.METRICS.items()}, "cka": "cka"}
METRIC_COLUMNS = tuple(m.column for m in probes.METRICS.values())
EDGE, NOT_REACHED = "at grid edge", "not reached"  # the two ways a DR value is censored


def effective_fraction(df):
    """k / d of each row: the fraction a probe really saw. Several small nominal fractions give
    the same k (d = 512: 0.0005, 0.001 and 0.002 are all k = 1), and a PCA draw clamped at
    the train split's rank sees fewer directions than it asked for."""
    return df["k"] / df["n_neurons"]


def _options(n_boot, ci, random_state, over) -> BootstrapOptions:
    return validate(BootstrapOptions, dict(n_boot=n_boot, ci=ci, random_state=random_state, over=over),
                    prefix="bootstrap.")


def _labels(df, group) -> np.ndarray | None:
    """The test labels of a pairing (train's class indices), when the results recorded them."""
    labels = df.attrs.get("test_labels", {}).get(int(group))
    return None if labels is None else np.asarray(labels)


def _n_test(runs, reference) -> int | None:
    if runs.correct is not None:
        return int(runs.correct.shape[-1])
    if reference is not None and reference.correct is not None:
        return int(reference.correct.shape[-1])
    return None


def _pairings(df, mode: str | None = None, metric: str = "test_accuracy"):
    """(keys, the pairing's distinct draws of ``mode`` (or every selection mode), its Reference of
    ``metric``)."""
    draws = distinct_draws(df)
    for keys, g in draws.groupby(GROUP_COLS):
        full = g[g["mode"] == FULL_LAYER]
        sub = g[g["mode"] != FULL_LAYER] if mode is None else g[g["mode"] == mode]
        if len(sub):
            yield keys, sub, reference_of(full, metric if metric in METRIC_COLUMNS else "test_accuracy")


def accuracy_curve(df, metric: str = "test_accuracy", *, n_boot: int = _BOOT["n_boot"], ci: float = _BOOT["ci"],
                   random_state: int = _BOOT["random_state"], over: str = _BOOT["over"]):
    """Per (group, mode, k), at the effective fraction k/d: the mean of ``metric`` over the runs
    (seeds), its sd (NaN for one run: no spread to show), min, max, the runs (``count``), a
    bootstrap interval of the mean (``low``, ``high``; what it covers: ``covers``), and for
    accuracy the full layer (``full`` with ``full_low`` / ``full_high``) and the mean relative
    to it (``relative`` with its interval); so for every test metric column (``probes.METRICS``),
    the full layer's own value of that metric. Repeated k are one point per seed (``fractions``
    lists the nominal fractions)."""
    import pandas as pd

    o = _options(n_boot, ci, random_state, over)
    out = []
    for keys, sub, reference in _pairings(df, metric=metric):
        for mode, rows in sub.groupby("mode"):
            runs = runs_of(rows, metric)
            ref = reference if metric in METRIC_COLUMNS else None
            boot = Resamples(o, keys[0], _n_test(runs, ref))
            curves, refs = curve_samples(runs, ref, boot, metric)
            low, high = boot.interval(curves)
            kind = covers(runs, ref, o, metric)
            if kind == "":
                low = high = np.full(len(runs.k), np.nan)  # one run, nothing resampled: no interval
            with np.errstate(all="ignore"):
                mean = np.nanmean(runs.values, axis=0) if runs.n_runs else np.full(len(runs.k), np.nan)
            full = float(np.mean(reference.values)) if reference is not None else np.nan
            full_low = full_high = np.nan
            rel_low = rel_high = np.full(len(runs.k), np.nan)
            if refs is not None:
                full_low, full_high = boot.interval(refs)
                if len(reference.values) == 1 and kind not in ("seeds+test", "test"):
                    full_low = full_high = np.nan
                if kind:
                    with np.errstate(all="ignore"):  # a resample whose reference scores 0 (a tiny test set)
                        relative = curves / refs[:, None]
                    rel_low, rel_high = boot.interval(relative)
            for j, k in enumerate(runs.k):
                col = runs.values[:, j]
                defined = col[~np.isnan(col)]
                out.append(dict(zip(GROUP_COLS, keys), mode=mode, fraction=float(runs.fractions[j]), k=int(k),
                                mean=float(mean[j]), std=float(np.std(defined, ddof=1)) if len(defined) > 1 else np.nan,
                                min=float(defined.min()) if len(defined) else np.nan,
                                max=float(defined.max()) if len(defined) else np.nan, count=int(len(defined)),
                                low=float(low[j]), high=float(high[j]), covers=kind, full=full,
                                full_low=float(full_low), full_high=float(full_high),
                                relative=float(mean[j] / full) if full == full and full else np.nan,
                                relative_low=float(rel_low[j]), relative_high=float(rel_high[j]),
                                fractions=runs.nominal[j]))
    columns = GROUP_COLS + ["mode", "fraction", "k", "mean", "std", "min", "max", "count", "low", "high", "covers",
                            "full", "full_low", "full_high", "relative", "relative_low", "relative_high", "fractions"]
    return pd.DataFrame(out, columns=columns)


def _first_reached(curves: np.ndarray, refs: np.ndarray, fractions: np.ndarray, deltas) -> tuple[np.ndarray, np.ndarray]:
    """(DR (n, D), reached (n, D)) of n curves over ascending ``fractions`` against their
    references: DR = 1 - the smallest fraction whose value reaches δ x reference; a curve
    that never reaches δ has DR at its lower bound, 0."""
    dr = np.empty((len(curves), len(deltas)))
    reached = np.empty((len(curves), len(deltas)), dtype=bool)
    values = np.nan_to_num(curves, nan=-np.inf)
    for i, d in enumerate(deltas):
        ok = values >= d * refs[:, None]
        reached[:, i] = ok.any(axis=1)
        dr[:, i] = np.where(reached[:, i], 1.0 - fractions[np.argmax(ok, axis=1)], 0.0)
    return dr, reached


def diffused_redundancy(df, mode: str = "random", deltas: Sequence[float] = DELTAS, source: str = "accuracy", *,
                        n_boot: int = _BOOT["n_boot"], ci: float = _BOOT["ci"],
                        random_state: int = _BOOT["random_state"], over: str = _BOOT["over"]):
    """DR(δ) per group, from accuracy or CKA, on effective fractions, with a bootstrap interval.

    Parameters
    ----------
    df : DataFrame
        ``load_results`` output.
    mode : str
        Selection mode whose curve is used (the paper: ``random``).
    source : str
        ``accuracy`` (the paper): Acc(f) >= δ · Acc(1), Acc(1) the full-layer probes' test
        accuracy; any other metric of ``probes.METRICS`` (``balanced_accuracy``, ``macro_f1``,
        ``top5_accuracy``) the same way with that metric of the subsets and of the full layer
        (a report's ``dr_metric``); ``cka``: CKA(X_S, X) >= δ.
    n_boot, ci, random_state, over
        The bootstrap (:class:`BootstrapOptions`): by default seeds and test images resampled
        together; a resample that never reaches δ counts with DR at its lower bound (0), so the
        interval is not conditional on reaching it.

    Returns
    -------
    DataFrame with columns group, model, layer, dataset, mode, source, delta, dr, dr_low,
    dr_high, censored ("" / "at grid edge": DR is a lower bound / "not reached": DR is NaN),
    fraction (the effective fraction reached), reached (the share of resamples that reach δ),
    covers (what the interval resamples: a key of ``_bootstrap.COVERS``; "" for none), n_seeds.
    """
    import pandas as pd

    if source not in SOURCES:
        raise UnknownNameError("DR source", source, SOURCES)
    metric = SOURCES[source]
    if metric not in df.columns and len(df):
        raise IncompatibleParametersError(key="source", value=source,
                                          reason=f"these results hold no {metric} column (a sweep of an older "
                                                 f"featstore?): run the sweep again to compute it")
    o = _options(n_boot, ci, random_state, over)
    if df.empty or mode not in set(df["mode"]):
        raise InvalidParameterError(key="mode", value=mode,
                                    expected="a mode with rows in the results: "
                                             + ", ".join(sorted(set(df["mode"]) - {FULL_LAYER}) if len(df) else []))
    deltas = [float(d) for d in deltas]
    rows = []
    for keys, sub, reference in _pairings(df, mode, metric):
        if source != "cka" and reference is None:
            raise MissingKeyError(key=f"group {keys[0]} full-layer rows", expected="the sweep's reference task rows")
        runs = runs_of(sub, metric)
        ref = reference if source != "cka" else None
        boot = Resamples(o, keys[0], _n_test(runs, ref))
        kind = covers(runs, ref, o, metric)
        with np.errstate(all="ignore"):
            curve = np.nanmean(runs.values, axis=0)
        level = np.array([float(np.mean(ref.values)) if ref is not None else 1.0])
        dr, reached = _first_reached(curve[None], level, runs.fractions, deltas)
        curves, refs = curve_samples(runs, ref, boot, metric)
        refs = refs if refs is not None else np.ones(len(curves))
        boots, boot_reached = _first_reached(curves, refs, runs.fractions, deltas)
        low, high = boot.interval(boots)
        if kind == "":
            low = high = np.full(len(deltas), np.nan)
        ok = np.nan_to_num(curve, nan=-np.inf)[None, :] >= np.array(deltas)[:, None] * level[0]
        for i, d in enumerate(deltas):
            hit = bool(reached[0, i])
            first = int(np.argmax(ok[i])) if hit else -1
            rows.append(dict(zip(GROUP_COLS, keys), mode=mode, source=source, delta=d,
                             dr=float(dr[0, i]) if hit else np.nan, dr_low=float(low[i]), dr_high=float(high[i]),
                             censored=(EDGE if first == 0 else "") if hit else NOT_REACHED,
                             fraction=float(runs.fractions[first]) if hit else np.nan,
                             reached=float(boot_reached[:, i].mean()), covers=kind, n_seeds=runs.n_runs))
    return pd.DataFrame(rows)


def pairing_labels(df) -> dict[int, tuple[str, str]]:
    """Per pairing (its spec ``name`` or "", its protocol in a few words or ""): the protocol keys
    whose values differ between the sweep's pairings (the solver first, then at most four), so
    that pairings of one model, layer and dataset under several protocols
    (sweeps/paper_protocols.toml) read apart."""
    import json

    first = df.groupby("group").first()
    protocols = {int(g): json.loads(p) for g, p in first["protocol"].items()} if "protocol" in first else {}
    keys = sorted({k for p in protocols.values() for k in p if len({json.dumps(q.get(k)) for q in protocols.values()}) > 1},
                  key=lambda k: (k != "solver", k))
    out = {}
    for g in first.index:
        p = protocols.get(int(g), {})
        shown = [f"{p['solver']}" if k == "solver" else f"{k} {_short(p.get(k))}" for k in keys[:4] if k in p]
        name = first["pairing_name"].get(g) if "pairing_name" in first else None
        out[int(g)] = (name if isinstance(name, str) else "", ", ".join(shown) + (", ..." if len(keys) > 4 else ""))
    return out


def _short(value) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value[:3]) + (", ..." if len(value) > 3 else "") + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


ONE_RUN = "†"  # marks an interval that covers the test images of one run only


def dr_text(dr: float, low: float, high: float, censored: str, covers: str | None = None,
            reached: float | None = None) -> str:
    """One DR value as people read it: "0.900 [0.900, 0.925]", "≥ 0.999 [...]", "not reached";
    "0.991 (one run)" when nothing was resampled, a † when the interval covers one run's test
    images only, and the share of resamples that reach δ when some do not."""
    share = f"; {reached:.0%} of resamples reach δ" if reached is not None and reached < 0.995 else ""
    if censored == NOT_REACHED:
        return "not reached" + (f" ({reached:.0%} of resamples reach δ)" if reached else "")
    value = f"{'≥ ' if censored == EDGE else ''}{dr:.3f}"
    if covers == "" or low != low:
        return f"{value} (one run)"
    return f"{value} [{low:.3f}, {high:.3f}]{ONE_RUN if covers == 'test' else ''}{share}"


def dr_table(df, deltas: Sequence[float] = (0.8, 0.9, 0.95, 0.99), mode: str = "random", source: str = "accuracy",
             **bootstrap):
    """DR at a few δ per group, one row per group (the paper tabulates δ = 0.9); a value reached
    at the smallest evaluated fraction reads "≥ x", one reached nowhere "not reached". The
    table's ``attrs["covers"]`` says what its intervals resample. Pairings of one model, layer
    and dataset (under several protocols) are told apart by a ``pairing`` level: each one's
    spec ``name``, else the protocol keys they differ in."""
    import pandas as pd

    dr = diffused_redundancy(df, mode=mode, deltas=deltas, source=source, **bootstrap)
    dr["value"] = [dr_text(r.dr, r.dr_low, r.dr_high, r.censored, r.covers, r.reached) for r in dr.itertuples()]
    table = dr.pivot_table(index=GROUP_COLS, columns="delta", values="value", aggfunc="first")
    if table.index.droplevel("group").is_unique:  # the pairing's index adds nothing a reader needs
        table = table.droplevel("group")
    else:  # pairings of one model, layer and dataset (several protocols): named, or by what differs
        labels = pairing_labels(df)
        names = [labels.get(int(g), ("", ""))[0] or labels.get(int(g), ("", ""))[1] or str(g)
                 for g in table.index.get_level_values("group")]
        if len(set(names)) == len(names):
            table = table.set_index(pd.Index(names, name="pairing"), append=True).droplevel("group")
    table.attrs["covers"] = sorted(set(dr["covers"]))
    return table


def interval_note(kinds) -> str:
    """What a table's intervals cover, in words (for its caption)."""
    kinds = [k for k in kinds if k]
    words = [COVERS[k] for k in kinds if k != "test"]
    parts = [f"95% bootstrap interval over {' / '.join(words)}"] if words else []
    if "test" in kinds:
        parts.append(f"{ONE_RUN}: one run, the interval covers its test images only")
    return "; ".join(parts) or "one run each: no interval"


def critical_fraction(df, within: float = 0.05, mode: str = "random"):
    """Smallest evaluated effective fraction whose mean accuracy is within ``within`` (relative) of
    the full layer."""
    import pandas as pd

    curve = accuracy_curve(df)
    curve = curve[curve["mode"] == mode]
    out = {}
    for keys, g in curve.groupby(GROUP_COLS):
        ok = g[g["relative"] >= 1 - within]
        out[keys] = float(ok["fraction"].min()) if len(ok) else np.nan
    return pd.Series(out, name=f"critical fraction (within {within:.0%} of full)").rename_axis(GROUP_COLS).reset_index()


def inequality_curve(df, *, n_boot: int = _BOOT["n_boot"], ci: float = _BOOT["ci"],
                     random_state: int = _BOOT["random_state"], over: str = _BOOT["over"]):
    """Gini and coefficient of variation of each probe's per-class accuracies, averaged over the
    runs, per (group, mode, k): ``gini`` / ``cov`` with basic bootstrap intervals (``*_low``,
    ``*_high``; test images resampled with the seeds when the rows record them; basic, since
    resampling noise inflates an inequality measure, so percentiles would sit above it), and the
    binomial noise floor ``floor_gini`` / ``floor_cov``: what equal per-class accuracy would
    show on this test set's class sizes (NaN when the results hold no test labels)."""
    import pandas as pd

    o = _options(n_boot, ci, random_state, over)
    out = []
    for keys, sub, _ in _pairings(df):
        labels = _labels(df, keys[0])
        counts = np.bincount(labels) if labels is not None else None
        for mode, rows in sub.groupby("mode"):
            runs = runs_of(rows)
            boot = Resamples(o, keys[0], len(labels) if labels is not None and runs.correct is not None else None)
            g_boot, c_boot = per_class_samples(runs, labels, boot)
            several = runs.n_runs > 1 or (o.over == "seeds+test" and runs.correct is not None and labels is not None)
            g_runs, c_runs = gini_rows(runs.per_class), cov_rows(runs.per_class)  # (S, J)
            with np.errstate(all="ignore"):
                accuracy = np.nanmean(runs.values, axis=0)
                g_mean, c_mean = np.nanmean(g_runs, axis=0), np.nanmean(c_runs, axis=0)
            # test-image noise inflates an inequality measure, and a resample's noise inflates it again: the
            # basic bootstrap interval (2 x estimate - the upper and lower quantiles) undoes that shift
            g_lo, g_hi = _basic(boot.interval(g_boot), g_mean)
            c_lo, c_hi = _basic(boot.interval(c_boot), c_mean)
            for j, k in enumerate(runs.k):
                floor = binomial_floor(accuracy[j], counts) if counts is not None else (np.nan, np.nan)
                out.append(dict(zip(GROUP_COLS, keys), mode=mode, fraction=float(runs.fractions[j]), k=int(k),
                                gini=float(g_mean[j]), cov=float(c_mean[j]),
                                gini_low=float(g_lo[j]) if several else np.nan,
                                gini_high=float(g_hi[j]) if several else np.nan,
                                cov_low=float(c_lo[j]) if several else np.nan,
                                cov_high=float(c_hi[j]) if several else np.nan,
                                floor_gini=floor[0], floor_cov=floor[1], count=runs.n_runs))
    columns = GROUP_COLS + ["mode", "fraction", "k", "gini", "cov", "gini_low", "gini_high", "cov_low", "cov_high",
                            "floor_gini", "floor_cov", "count"]
    return pd.DataFrame(out, columns=columns)


def _basic(quantiles, estimate):
    """The basic bootstrap interval (2 estimate - q_high, 2 estimate - q_low), never below 0."""
    low, high = quantiles
    return np.maximum(2 * estimate - high, 0.0), np.maximum(2 * estimate - low, 0.0)


def modes_at_equal_k(df, metric: str = "test_accuracy"):
    """Mean ``metric`` per (group, k) x mode: random vs pca vs pca-least vs randproj vs prefix."""
    sub = distinct_draws(df)
    sub = sub[sub["mode"] != FULL_LAYER]
    return sub.pivot_table(index=GROUP_COLS + ["k"], columns="mode", values=metric, aggfunc="mean")


def _unconverged(rows):
    """The rows whose final training loss exceeds a uniform guess's, ln(classes): worse than
    predicting nothing on their own training rows (SGD's step too large for these features)."""
    if "train_loss" not in rows.columns or "n_classes" not in rows.columns:
        return rows.iloc[:0]
    return rows[rows["train_loss"] > np.log(rows["n_classes"].clip(lower=2))]


def sweep_warnings(df, mode: str = "random") -> dict[int, str]:
    """Per pairing, why its DR sentence would mislead, or nothing: a full-layer probe that did
    not converge (final training loss above a uniform guess's), or a subset smaller than the
    layer that beats the full layer beyond its interval (the full-layer probe looks under-trained)."""
    notes = {}
    if mode not in set(df["mode"]):
        return notes
    for group, full in _unconverged(df[df["mode"] == FULL_LAYER]).groupby("group"):
        worst = full.loc[full["train_loss"].idxmax()]
        notes[int(group)] = (f"the full-layer probe did not converge (final training loss {worst['train_loss']:.3g}, "
                             f"above a uniform guess's {np.log(max(int(worst['n_classes']), 2)):.3g}): its accuracy "
                             f"is no reference, so DR is not reported; lower the learning rate or standardise the "
                             f"features")
    curve = accuracy_curve(df)
    for group, c in curve[(curve["mode"] == mode) & (curve["fraction"] < 1)].groupby("group"):
        if int(group) in notes:
            continue
        low = c["relative_low"].where(c["relative_low"].notna(), c["relative"])
        above = c[(low > 1.0) & c["full"].notna()]
        if len(above):
            best = above.loc[above["mean"].idxmax()]
            notes[int(group)] = (f"random subsets of {int(best['k'])} neurons score {best['mean']:.3f} against the full "
                                 f"layer's {best['full']:.3f}, beyond the interval: the full-layer probe looks "
                                 f"under-trained (more epochs, another learning rate?), so DR is not reported")
    return notes


def convergence_notes(df) -> dict[int, str]:
    """Per pairing, the selection probes whose final training loss exceeds a uniform guess's (they
    did not converge: their accuracy understates what the subset holds), or nothing."""
    notes = {}
    for group, bad in _unconverged(df[df["mode"] != FULL_LAYER]).groupby("group"):
        where = ", ".join(f"{m} k={int(k)}" for m, k in bad[["mode", "k"]].drop_duplicates().head(4).itertuples(index=False))
        total = int((df["group"] == group).sum())
        notes[int(group)] = (f"{len(bad)} of {total} probes did not converge (final training loss up to "
                             f"{bad['train_loss'].max():.3g}, above a uniform guess's: {where}"
                             f"{' ...' if bad[['mode', 'k']].drop_duplicates().shape[0] > 4 else ''}); their accuracy "
                             f"understates their subsets: lower the learning rate or train longer")
    return notes
