"""Intervals that say what they cover: DR's bootstrap over seeds and test images against an
obvious re-implementation, one-run modes, repeated k, Gini / CoV and their noise floor, and
what the report says of unfinished or suspicious sweeps."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import pipelines
from pipelines._analysis import interval_note, sweep_warnings

N_TEST, D = 400, 100
FRACTIONS = (0.01, 0.05, 0.1, 0.5, 1.0)


def _rows(curves: dict, full: dict, mode="random", labels=None, seed_rng=0, with_correct=True):
    """Result rows: ``curves`` {seed: accuracies per FRACTIONS}, ``full`` {seed: accuracy}; each
    probe's per-sample correctness drawn to its accuracy (exactly round(acc * n) correct)."""
    rng = np.random.default_rng(seed_rng)
    labels = np.arange(N_TEST) % 4 if labels is None else labels
    base = dict(group=0, model="m", layer="l", dataset="d", cka=np.nan, cka_estimator=None, task="t", n_neurons=D,
                n_classes=4, train_loss=0.5)

    def probe(acc):
        correct = np.zeros(N_TEST, dtype=bool)
        correct[rng.permutation(N_TEST)[:int(round(acc * N_TEST))]] = True
        per_class = [float(correct[labels == c].mean()) for c in range(4)]
        return dict(test_accuracy=float(correct.mean()), per_class_accuracy=per_class,
                    **({"test_correct": correct} if with_correct else {}))

    rows = [dict(base, mode="full", fraction=1.0, k=D, seed=s, **probe(a)) for s, a in full.items()]
    for s, accs in curves.items():
        for f, a in zip(FRACTIONS, accs):
            rows.append(dict(base, mode=mode, fraction=f, k=max(1, int(f * D)), seed=s, **probe(a)))
    df = pd.DataFrame(rows)
    df.attrs["test_labels"] = {0: labels}
    return df


def _obvious_dr(df, delta, n_boot, seed):
    """DR(δ) resampled the obvious way: seeds with replacement, then test rows with replacement,
    each probe's accuracy recomputed on those rows, a resample that never reaches δ counted as 0."""
    rng = np.random.default_rng(seed)
    rand = df[df["mode"] == "random"]
    seeds = sorted(rand["seed"].unique())
    fractions = sorted(rand["k"].unique() / D)
    correct = {(s, k): c for s, k, c in zip(rand["seed"], rand["k"], rand["test_correct"])}
    full = {s: c for s, c in zip(df[df["mode"] == "full"]["seed"], df[df["mode"] == "full"]["test_correct"])}
    out = []
    for _ in range(n_boot):
        picks = rng.choice(seeds, size=len(seeds), replace=True)
        rows = rng.integers(0, N_TEST, N_TEST)
        curve = [np.mean([correct[(s, int(round(f * D)))][rows].mean() for s in picks]) for f in fractions]
        ref = np.mean([full[s][rows].mean() for s in picks])
        hits = [f for f, a in zip(fractions, curve) if a >= delta * ref]
        out.append((1 - hits[0], True) if hits else (0.0, False))
    return np.array(out)


def test_dr_bootstrap_over_seeds_and_test_images_matches_an_obvious_reimplementation():
    """The engine's resamples against a loop written out: the same distribution of DR(0.9) over the
    grid (to Monte Carlo error), the same share of resamples reaching δ, and quantiles that include
    the resamples that never reach it (DR 0 there), so the interval is not conditional on reaching."""
    df = _rows({0: (0.50, 0.70, 0.80, 0.86, 0.90), 1: (0.48, 0.66, 0.79, 0.85, 0.89),
                2: (0.52, 0.72, 0.82, 0.87, 0.90)}, {0: 0.90, 1: 0.89, 2: 0.91})
    ours = pipelines.diffused_redundancy(df, deltas=(0.9, 0.97), n_boot=3000).set_index("delta")
    for delta in (0.9, 0.97):
        theirs, reached = _obvious_dr(df, delta, 3000, seed=1).T
        row = ours.loc[delta]
        assert row["covers"] == "seeds+test"
        assert row["reached"] == pytest.approx(reached.mean(), abs=0.03)
        low, high = np.quantile(theirs, [0.025, 0.975])  # DR takes grid values: the quantiles are grid points
        assert (row["dr_low"], row["dr_high"]) == (pytest.approx(low), pytest.approx(high))
    # δ = 0.97: only the whole-layer-sized subsets reach it (0.86 / 0.90 = 0.956 below), and not in every resample
    assert ours.loc[0.97, "reached"] < 1 and ours.loc[0.97, "dr_low"] == 0.0


def test_seed_only_intervals_leave_out_test_noise_and_say_so():
    df = _rows({0: (0.5, 0.7, 0.8, 0.86, 0.9), 1: (0.5, 0.7, 0.8, 0.86, 0.9)}, {0: 0.9, 1: 0.9})
    seeds_only = pipelines.diffused_redundancy(df, deltas=(0.9,), over="seeds").iloc[0]
    both = pipelines.diffused_redundancy(df, deltas=(0.9,)).iloc[0]
    assert seeds_only["covers"] == "seeds" and both["covers"] == "seeds+test"
    # identical seeds: no seed noise at all; the test images still give an interval
    assert seeds_only["dr_low"] == seeds_only["dr_high"] and both["dr_low"] < both["dr_high"]
    assert interval_note(["seeds+test"]) == "95% bootstrap interval over seeds and test images"


def test_one_run_modes_print_no_zero_width_interval():
    """pca / prefix are one run: without per-sample records there is nothing to resample, so no
    interval ("(one run)", never "[x, x]"); with them, an interval over that run's test images,
    marked as such."""
    without = _rows({None: (0.6, 0.8, 0.88, 0.9, 0.9)}, {0: 0.9, 1: 0.9}, mode="random", with_correct=False)
    text = pipelines.dr_table(without, deltas=(0.9,)).iloc[0, 0]
    assert text.endswith("(one run)") and "[" not in text
    curve = pipelines.accuracy_curve(without)
    assert curve["std"].isna().all() and curve["low"].isna().all() and (curve["count"] == 1).all()
    with_bits = _rows({None: (0.6, 0.8, 0.88, 0.9, 0.9)}, {0: 0.9}, mode="random")
    row = pipelines.diffused_redundancy(with_bits, deltas=(0.9,)).iloc[0]
    assert row["covers"] == "test" and row["dr_low"] < row["dr_high"]
    assert pipelines.dr_table(with_bits, deltas=(0.9,)).iloc[0, 0].count("†") == 1


def test_a_curve_points_interval_is_the_binomial_standard_error_of_its_test_set():
    """One run at accuracy p on n test images: the bootstrap interval of that point has the width
    of the binomial confidence interval, 2 x 1.96 x sqrt(p (1 - p) / n), to 15%."""
    df = _rows({None: (0.6, 0.7, 0.8, 0.85, 0.9)}, {0: 0.9}, mode="prefix")
    curve = pipelines.accuracy_curve(df, n_boot=4000).set_index("k")
    for k, p in zip((1, 5, 10, 50, 100), (0.6, 0.7, 0.8, 0.85, 0.9)):
        want = 2 * 1.96 * np.sqrt(p * (1 - p) / N_TEST)
        got = curve.loc[k, "high"] - curve.loc[k, "low"]
        assert got == pytest.approx(want, rel=0.15), (k, got, want)
    assert curve["full_high"].iloc[0] - curve["full_low"].iloc[0] == pytest.approx(
        2 * 1.96 * np.sqrt(0.9 * 0.1 / N_TEST), rel=0.15)  # the reference's own band


def test_fractions_that_floor_to_one_k_are_one_point_per_seed():
    """d = 1280: 0.0005 and 0.001 are both k = 1: one point per seed (not extra seeds), the
    nominal fractions kept as a list."""
    base = dict(group=0, model="m", layer="l", dataset="d", cka=np.nan, task="t", n_neurons=1280,
                per_class_accuracy=[0.5])
    rows = [dict(base, mode="full", fraction=1.0, k=1280, seed=s, test_accuracy=0.9) for s in (0, 1)]
    for s, (a, b) in {0: (0.10, 0.12), 1: (0.20, 0.22)}.items():
        rows += [dict(base, mode="random", fraction=0.0005, k=1, seed=s, test_accuracy=a),
                 dict(base, mode="random", fraction=0.001, k=1, seed=s, test_accuracy=b),
                 dict(base, mode="random", fraction=1.0, k=1280, seed=s, test_accuracy=0.9)]
    curve = pipelines.accuracy_curve(pd.DataFrame(rows))
    one = curve[curve["k"] == 1].iloc[0]
    assert one["count"] == 2 and one["fractions"] == [0.0005, 0.001]
    assert one["mean"] == pytest.approx((0.10 + 0.20) / 2)  # each seed's point is its smallest nominal fraction's row
    assert one["std"] == pytest.approx(np.std([0.10, 0.20], ddof=1))


def test_gini_interval_and_the_binomial_noise_floor():
    """Every class truly at 0.8: the observed Gini is test-set noise, near the binomial floor (an
    independent simulation with the pairwise formula); the interval brackets the estimate."""
    rng = np.random.default_rng(5)
    labels = np.repeat(np.arange(4), N_TEST // 4)
    df = _rows({0: (0.8,) * 5, 1: (0.8,) * 5, 2: (0.8,) * 5}, {0: 0.8, 1: 0.8, 2: 0.8}, labels=labels)
    ineq = pipelines.inequality_curve(df)
    sims = [pipelines.gini(rng.binomial(N_TEST // 4, 0.8, size=4) / (N_TEST // 4)) for _ in range(4000)]
    assert ineq["floor_gini"].iloc[0] == pytest.approx(np.mean(sims), rel=0.15)
    assert (ineq["gini_low"] <= ineq["gini"]).all() and (ineq["gini"] <= ineq["gini_high"]).all()
    assert (ineq["gini_high"] > ineq["gini_low"]).all() and (ineq["cov_high"] > ineq["cov_low"]).all()
    assert ineq["gini"].mean() < 3 * ineq["floor_gini"].mean()  # nothing beyond test noise here


def test_a_subset_that_beats_the_full_layer_gets_a_warning_not_a_dr_sentence():
    df = _rows({0: (0.2, 0.28, 0.30, 0.305, 0.16), 1: (0.21, 0.29, 0.31, 0.30, 0.165)}, {0: 0.162, 1: 0.16})
    (note,) = sweep_warnings(df).values()
    assert "score 0.3" in note and "full layer's 0.161" in note and "under-trained" in note
    from pipelines._report import _answers

    (answer,) = _answers(df)
    assert "under-trained" in answer and "DR(0.9) =" not in answer
    fine = _rows({0: (0.5, 0.7, 0.8, 0.86, 0.9)}, {0: 0.9})
    assert sweep_warnings(fine) == {}


def test_the_report_says_when_a_sweep_is_unfinished(tmp_path, reference):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(reference.attrs["out"], out)
    done = sorted((out / "done").glob("*.json"))
    done[-1].unlink()
    page = pipelines.write_report(out, tmp_path / "report").read_text()
    assert f"Unfinished sweep:</b> {len(done) - 1} of {len(done)} tasks done" in page
    from pipelines._report import _progress_html

    assert _progress_html(reference.attrs["out"], reference) == ""  # a finished sweep: no warning


def test_probes_that_did_not_converge_are_named_and_an_unconverged_reference_gets_no_dr():
    """A final training loss above a uniform guess's (ln 4 = 1.39) is a probe SGD did not fit: the
    report names such subsets beside the DR sentence, and gives no DR when the reference is one."""
    from pipelines._analysis import convergence_notes
    from pipelines._report import _answers

    df = _rows({0: (0.5, 0.7, 0.8, 0.86, 0.9), 1: (0.5, 0.7, 0.8, 0.86, 0.9)}, {0: 0.9, 1: 0.9})
    df.loc[(df["mode"] == "random") & (df["k"] == 1), "train_loss"] = 36.3
    (note,) = convergence_notes(df).values()
    assert note.startswith("2 of 12 probes did not converge (final training loss up to 36.3") and "random k=1" in note
    (answer,) = _answers(df)
    assert "DR(0.9) =" in answer and "did not converge" in answer
    df.loc[df["mode"] == "full", "train_loss"] = 40.0
    (answer,) = _answers(df)
    assert "the full-layer probe did not converge (final training loss 40" in answer and "DR(0.9) =" not in answer


def test_results_frames_concatenate_and_keep_their_test_labels(reference):
    """The test labels ride in the frame's attrs: concatenating frames (two sweeps' results, a
    filter and a copy) works and keeps them when they agree."""
    both = pd.concat([reference, reference[reference["mode"] == "random"]], ignore_index=True)
    assert set(both.attrs["test_labels"]) == set(reference.attrs["test_labels"])
    assert np.array_equal(both.attrs["test_labels"][0], reference.attrs["test_labels"][0])
