"""The one bootstrap behind every interval of a sweep: seeds and test images resampled together.

An interval of an accuracy curve, of DR(δ) or of Gini / CoV covers two sources of noise:

* the **seeds** (each seed's subsets and minibatch order; the full-layer reference too when it
  was trained under each seed): a resample picks the seeds with replacement;
* the **test images**: a paired bootstrap over the test rows. In one resample every probe of
  every seed, the reference included, is scored on the same resampled rows, so a curve and
  its reference move together (rows record which test samples each probe got right,
  ``test_correct``).

``over = "seeds"`` resamples the seeds only (results without ``test_correct``, from sweeps
before it was recorded, can only be resampled so; CKA, computed on train, too). A mode with
one run (pca, prefix, an unseeded mode) has no seed noise to resample: its interval covers the
test images only, or, without them, there is none (never a zero-width one).

Each pairing's resamples come from one generator seeded by ``random_state`` and the pairing's
index, so the DR table, the report's sentence and its figures show the same interval.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from pydantic import Field

from featstore.params import Parameters, SeedValue

__all__ = ["BootstrapOptions", "BOOTSTRAP", "Runs", "Reference", "runs_of", "reference_of", "Resamples",
           "distinct_draws", "gini_rows", "cov_rows", "COVERS"]

FULL_LAYER = "full"
# what an interval covers, as a table, a figure and a sentence say it
COVERS = {"seeds+test": "seeds and test images", "seeds": "seeds", "test": "test images (one run)", "": "none (one run)"}


class BootstrapOptions(Parameters):
    """The bootstrap every interval of a sweep's analysis uses (declared once: tables, figures, sentences)."""

    n_boot: Annotated[int, Field(ge=1, le=1_000_000)] = 1000
    """Resamples."""
    ci: Annotated[float, Field(gt=0, lt=1)] = 0.95
    """Coverage of the interval (its quantiles: (1 - ci) / 2 and 1 - (1 - ci) / 2)."""
    random_state: SeedValue = 0
    """Seeds every pairing's resamples (with the pairing's index)."""
    over: Literal["seeds+test", "seeds"] = "seeds+test"
    """seeds+test: seeds and test images resampled together (paired over the test rows); seeds: seeds only."""


BOOTSTRAP = BootstrapOptions()


def distinct_draws(df):
    """One row per (pairing, mode, seed, k): fractions that floor to the same k (d = 1280:
    0.0005 and 0.001 are both k = 1) are the same subset, so they are one point of a seed's
    curve, not extra seeds. The first row (the smallest nominal fraction) stands for them;
    ``fractions`` lists the nominal fractions it stands for."""
    if df.empty:
        return df.assign(fractions=[])
    seed_key = df["seed"].astype("float64").fillna(-1.0)
    order = df.assign(_s=seed_key).sort_values(["group", "mode", "_s", "k", "fraction"], kind="stable")
    nominal = order.groupby(["group", "mode", "_s", "k"], sort=False)["fraction"].agg(list)
    first = order.drop_duplicates(["group", "mode", "_s", "k"], keep="first")
    index = list(zip(first["group"], first["mode"], first["_s"], first["k"]))
    return first.drop(columns="_s").assign(fractions=[nominal[i] for i in index]).reset_index(drop=True)


@dataclass
class Runs:
    """One (pairing, mode)'s probes as seeds x distinct k.

    Attributes
    ----------
    seeds : list
        Seed of each run (None for an unseeded mode: one run).
    k : array of shape (J,)
        Distinct subset sizes, ascending; ``fractions`` = k / d.
    values : array of shape (S, J)
        The metric (test accuracy, CKA), NaN where a seed lacks that k.
    correct : bool array of shape (S, J, n_test), or None
        Which test samples each probe got right (None: not recorded, or the metric is not accuracy).
    per_class : array of shape (S, J, C), or None
        Per-class test accuracies (NaN: a class absent from the test split).
    nominal : list of lists
        The nominal fractions each k stands for.
    """

    seeds: list
    k: np.ndarray
    fractions: np.ndarray
    values: np.ndarray
    correct: np.ndarray | None
    per_class: np.ndarray | None
    nominal: list

    @property
    def n_runs(self) -> int:
        return len(self.seeds)


@dataclass
class Reference:
    """A pairing's full-layer reference: one value per seed it was trained under (or one)."""

    seeds: list
    values: np.ndarray  # (R,)
    correct: np.ndarray | None  # (R, n_test) bool


def _correct_of(rows) -> np.ndarray | None:
    if "test_correct" not in rows.columns or rows["test_correct"].isna().any():
        return None
    return np.stack([np.asarray(c, dtype=bool) for c in rows["test_correct"]])


def _seed(value) -> int | None:
    """A row's seed: an int, or None for an unseeded draw (NaN, None or pandas' NA)."""
    import pandas as pd

    return None if pd.isna(value) else int(value)


def runs_of(rows, metric: str = "test_accuracy") -> Runs:
    """The Runs of one (pairing, mode)'s rows (``distinct_draws`` already applied)."""
    seeds = sorted({_seed(s) for s in rows["seed"]}, key=lambda s: (s is not None, s or 0))
    k = np.array(sorted(set(int(v) for v in rows["k"])))
    d = int(rows["n_neurons"].iloc[0])
    S, J = len(seeds), len(k)
    values = np.full((S, J), np.nan)
    where = {}
    for i, r in enumerate(rows.itertuples(index=False)):
        where[(seeds.index(_seed(r.seed)), int(np.searchsorted(k, int(r.k))))] = i
    column = rows[metric].to_numpy(dtype=float) if metric in rows.columns else np.full(len(rows), np.nan)
    for (si, j), i in where.items():
        values[si, j] = column[i]
    complete = len(where) == S * J
    correct = _correct_of(rows) if metric == "test_accuracy" and complete else None
    if correct is not None:
        full = np.zeros((S, J, correct.shape[1]), dtype=bool)
        for (si, j), i in where.items():
            full[si, j] = correct[i]
        correct = full
    per_class = None
    if "per_class_accuracy" in rows.columns:
        C = max(len(p) for p in rows["per_class_accuracy"])
        per_class = np.full((S, J, C), np.nan)
        for (si, j), i in where.items():
            p = np.asarray(rows["per_class_accuracy"].iloc[i], dtype=float)
            per_class[si, j, :len(p)] = p
    nominal = [[] for _ in range(J)]
    if "fractions" in rows.columns:
        for (si, j), i in where.items():
            nominal[j] = sorted(set(nominal[j]) | set(rows["fractions"].iloc[i]))
    return Runs(seeds, k, k / d, values, correct, per_class, nominal)


def reference_of(full_rows, metric: str = "test_accuracy") -> Reference | None:
    """The full-layer rows of one pairing as a Reference of their ``metric`` column (None without
    any rows); their test images' correctness only for accuracy (the one metric that is a mean
    over images)."""
    if full_rows.empty:
        return None
    full_rows = full_rows.sort_values("seed", na_position="first", kind="stable")
    seeds = [_seed(s) for s in full_rows["seed"]]
    values = full_rows[metric].to_numpy(dtype=float) if metric in full_rows.columns else \
        np.full(len(full_rows), np.nan)
    return Reference(seeds, values, _correct_of(full_rows) if metric == "test_accuracy" else None)


class Resamples:
    """The resamples of one pairing: which seeds each picks, and which test rows (weights).

    Drawn in blocks from one generator keyed by (random_state, pairing), the same for every
    mode and metric of the pairing, so every interval of it comes from one bootstrap.
    """

    BLOCK = 100  # resamples drawn at once (n_test weights each)

    def __init__(self, options: BootstrapOptions, pairing: int, n_test: int | None):
        self.options = options
        self.pairing = int(pairing)
        self.n_test = n_test

    def blocks(self, n_seeds: int, n_ref_seeds: int = 0, test: bool = True):
        """Yield (seed picks (b, S), reference picks (b, R), test weights (b, n) float32 or None)."""
        o = self.options
        for start in range(0, o.n_boot, self.BLOCK):
            b = min(self.BLOCK, o.n_boot - start)
            rng = np.random.default_rng([o.random_state, 17, self.pairing, start])
            picks = rng.integers(0, n_seeds, (b, n_seeds)) if n_seeds > 1 else np.zeros((b, max(n_seeds, 1)), int)
            ref_picks = rng.integers(0, n_ref_seeds, (b, n_ref_seeds)) if n_ref_seeds > 1 else \
                np.zeros((b, max(n_ref_seeds, 1)), int)
            weights = None
            if test and self.n_test:
                rows = rng.integers(0, self.n_test, (b, self.n_test))
                weights = np.stack([np.bincount(r, minlength=self.n_test) for r in rows]).astype(np.float32)
            yield picks, ref_picks, weights

    def interval(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The (low, high) quantiles of ``samples`` (n_boot, ...) over the resamples (NaN ignored)."""
        a = (1 - self.options.ci) / 2
        with _quiet():  # all-NaN columns: NaN bounds
            lo, hi = np.nanquantile(samples, [a, 1 - a], axis=0)
        return lo, hi


def covers(runs: Runs, reference: Reference | None, options: BootstrapOptions, metric: str) -> str:
    """What resampling ``runs`` (with its reference) covers: a key of COVERS."""
    test = options.over == "seeds+test" and metric == "test_accuracy" and runs.correct is not None and \
        (reference is None or reference.correct is not None)
    several = runs.n_runs > 1  # a one-run curve has no seed noise to show (its reference's alone is not its)
    if test:
        return "seeds+test" if several else "test"
    return "seeds" if several else ""


def curve_samples(runs: Runs, reference: Reference | None, resamples: Resamples, metric: str = "test_accuracy"):
    """Resampled (curves (n_boot, J), references (n_boot,) or None) of one (pairing, mode).

    A curve is the mean over the picked seeds of each k's metric (NaN-aware); the reference the
    mean of the picked references: the same seeds when the reference was trained under each of
    the curve's seeds, else its own seeds resampled. With test images, each value is the probe's
    accuracy on the resample's test rows.
    """
    kind = covers(runs, reference, resamples.options, metric)
    test = kind in ("seeds+test", "test")
    S, J = runs.values.shape
    paired = reference is not None and runs.seeds[0] is not None and \
        set(runs.seeds) <= set(reference.seeds) and len(reference.seeds) > 1
    R = len(reference.values) if reference is not None else 0
    curves, refs = [], []
    missing = np.isnan(runs.values)
    for picks, ref_picks, weights in resamples.blocks(S, R, test=test):
        b = len(picks)
        if test:
            n = weights.shape[1]
            acc = (weights @ runs.correct.reshape(S * J, -1).T.astype(np.float32) / n).reshape(b, S, J)
            acc = np.where(missing[None], np.nan, acc)
            ref_acc = (weights @ reference.correct.T.astype(np.float32) / n) if reference is not None else None
        else:
            acc = np.broadcast_to(runs.values, (b, S, J))
            ref_acc = np.broadcast_to(reference.values, (b, R)) if reference is not None else None
        picked = np.take_along_axis(acc, picks[:, :, None].repeat(J, axis=2), axis=1)
        with _quiet():
            curves.append(np.nanmean(picked, axis=1))
        if ref_acc is not None:
            if paired:
                cols = np.array([reference.seeds.index(s) for s in runs.seeds])[picks]
            else:
                cols = ref_picks
            refs.append(np.take_along_axis(ref_acc, cols, axis=1).mean(axis=1))
    return np.concatenate(curves), (np.concatenate(refs) if refs else None)


@contextlib.contextmanager
def _quiet():
    """NaN-aware reductions over all-NaN slices give NaN: expected here, not worth a warning."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def gini_rows(x: np.ndarray) -> np.ndarray:
    """Gini coefficient of each row of ``x`` (..., C), NaN entries left out: Σ_i Σ_j |x_i - x_j| /
    (2 m² mean) = (2 Σ_i i x_(i) - (m + 1) Σ x) / (m Σ x) over the m defined values sorted
    ascending; 0 for a zero mean, NaN for a row with no defined value."""
    s = np.sort(x, axis=-1)  # NaN last
    m = (~np.isnan(s)).sum(axis=-1)
    rank = np.arange(1, x.shape[-1] + 1)
    total = np.nansum(s, axis=-1)
    weighted = np.nansum(s * rank, axis=-1)
    with np.errstate(all="ignore"):
        g = (2 * weighted - (m + 1) * total) / (m * total)
    return np.where(m == 0, np.nan, np.where(total == 0, 0.0, g))


def cov_rows(x: np.ndarray) -> np.ndarray:
    """std / mean (population std) of each row, NaN left out; 0 for a zero mean."""
    with _quiet():
        mean = np.nanmean(x, axis=-1)
        sd = np.nanstd(x, axis=-1)
        return np.where(mean == 0, 0.0, sd / mean)


def per_class_samples(runs: Runs, labels: np.ndarray | None, resamples: Resamples):
    """Resampled (Gini (n_boot, J), CoV (n_boot, J)) of one (pairing, mode): each probe's
    per-class accuracy on the resample's test rows (a class the resample misses left out),
    then the mean over the picked seeds. Without per-sample records, the seeds alone."""
    S, J = runs.values.shape
    test = resamples.options.over == "seeds+test" and runs.correct is not None and labels is not None
    ginis, covs = [], []
    if test:
        order = np.argsort(labels, kind="stable")
        classes, starts = np.unique(labels[order], return_index=True)
        C = int(runs.per_class.shape[2]) if runs.per_class is not None else int(labels.max()) + 1
        correct = runs.correct.reshape(S * J, -1)[:, order].astype(np.float32)
    for picks, _, weights in resamples.blocks(S, 0, test=test):
        b = len(picks)
        if test:
            w = weights[:, order]
            totals = np.add.reduceat(w, starts, axis=1)  # (b, classes present)
            per_class = np.full((b, S * J, C), np.nan, dtype=np.float64)
            for p in range(S * J):
                hits = np.add.reduceat(w * correct[p], starts, axis=1)
                with np.errstate(all="ignore"):
                    per_class[:, p, classes] = np.where(totals > 0, hits / totals, np.nan)
            per_class = per_class.reshape(b, S, J, C)
        else:
            per_class = np.broadcast_to(runs.per_class, (b,) + runs.per_class.shape)
        g, c = gini_rows(per_class), cov_rows(per_class)  # (b, S, J)
        idx = picks[:, :, None].repeat(J, axis=2)
        with _quiet():
            ginis.append(np.nanmean(np.take_along_axis(g, idx, axis=1), axis=1))
            covs.append(np.nanmean(np.take_along_axis(c, idx, axis=1), axis=1))
    return np.concatenate(ginis), np.concatenate(covs)


def binomial_floor(accuracy: float, class_counts: np.ndarray, draws: int = 200, seed: int = 0) -> tuple[float, float]:
    """(Gini, CoV) expected from test-set noise alone: every class with the same true accuracy,
    each class's observed accuracy Binomial(n_c, accuracy) / n_c (n_c its test samples)."""
    counts = np.asarray(class_counts)
    counts = counts[counts > 0]
    if not len(counts) or not np.isfinite(accuracy):
        return np.nan, np.nan
    rng = np.random.default_rng([seed, 23, len(counts)])
    x = rng.binomial(counts, float(np.clip(accuracy, 0, 1)), size=(draws, len(counts))) / counts
    return float(gini_rows(x).mean()), float(cov_rows(x).mean())
