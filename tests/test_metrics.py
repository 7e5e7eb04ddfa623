"""Test metrics (probes.METRICS) against scikit-learn, and in SubsetProbes.evaluate's rows."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

import probes

SKLEARN = {
    "accuracy": lambda y, pred, logits, C: skm.accuracy_score(y, pred),
    "top5_accuracy": lambda y, pred, logits, C: skm.top_k_accuracy_score(y, logits, k=5, labels=np.arange(C)),
    "balanced_accuracy": lambda y, pred, logits, C: skm.balanced_accuracy_score(y, pred),
    "macro_f1": lambda y, pred, logits, C: skm.f1_score(y, pred, average="macro"),
}


def test_every_metric_has_a_reference():
    assert set(probes.METRICS) == set(SKLEARN)


@pytest.mark.parametrize("name", list(SKLEARN))
def test_metrics_equal_scikit_learn(name):
    """On logits of 4 draws over 12 classes, two of them absent from the truth (one predicted
    anyway: its F1 is 0 and counts, as scikit-learn's macro average does)."""
    rng = np.random.default_rng(0)
    n, D, C = 300, 4, 12
    y = rng.choice([c for c in range(C) if c not in (3, 7)], size=n)
    logits = rng.normal(size=(n, D, C)).astype(np.float32)
    logits[np.arange(n), :, y] += rng.uniform(0, 3, size=(n, 1))  # better than chance, unevenly
    logits[:20, 1, 3] += 10  # draw 1 predicts class 3, absent from the truth
    pred = logits.argmax(-1)
    got = probes.METRICS[name].compute(logits, pred, y, C)
    want = [SKLEARN[name](y, pred[:, d], logits[:, d], C) for d in range(D)]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_evaluate_records_every_metric():
    rng = np.random.default_rng(1)
    C, d = 8, 24
    means = rng.normal(size=(C, d))
    y = rng.integers(0, C, 700)
    X = (means[y] + rng.normal(size=(700, d)) * 1.5).astype(np.float32)
    est = probes.SubsetProbes(mode="random", fractions=(0.25, 1.0), seeds=(0,), epochs=3, device="cpu",
                              verbose=False).fit(X[:500], y[:500])
    res = est.evaluate(X[500:], y[500:])
    logits = est.decision_function(X[500:])
    for name, m in probes.METRICS.items():
        want = [SKLEARN[name](y[500:], logits[:, di].argmax(-1), logits[:, di], C) for di in range(len(res))]
        np.testing.assert_allclose(res[m.column], want, rtol=1e-12, err_msg=name)
    assert (res["test_top5_accuracy"] >= res["test_accuracy"]).all()
