"""End-to-end on the embedded default: real weights, real Fashion-MNIST, the notebook."""

from __future__ import annotations

import os

import numpy as np
import pytest

import featstore

from .conftest import REPO


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    store = tmp_path_factory.mktemp("demo") / "featstore.zarr"
    featstore.build(splits="train", limit=300, store=store, progress=False, workers=1)
    featstore.build(splits="test", limit=150, store=store, progress=False, workers=1)
    return store


@pytest.mark.slow
def test_embedded_default_features_are_informative(demo_store):
    from sklearn.linear_model import LogisticRegression

    s = featstore.open(demo_store)
    train = s.group(model="tf_efficientnet_lite0", dataset="fashion-mnist", split="train")
    test = s.group(model="tf_efficientnet_lite0", dataset="fashion-mnist", split="test")
    assert train.spec.weights == "embedded" and train.spec.layer == "pre_logits"
    assert train.n_neurons == 1280 and train.n_samples == 300 and test.n_samples == 150
    assert np.bincount(train.labels).tolist() == [30] * 10
    X, Xt = train.numpy(dtype=np.float32), test.numpy(dtype=np.float32)
    acc = LogisticRegression(max_iter=500).fit(X, train.labels).score(Xt, test.labels)
    # ImageNet features separate Fashion-MNIST classes well; random weights do not
    assert acc > 0.7, acc
    assert train.verify() == [] and test.verify() == []


@pytest.mark.slow
def test_explore_notebook_runs_on_the_demo_store(demo_store):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "notebooks" / "explore.ipynb", as_version=4)
    os.environ["FEATSTORE_STORE"] = str(demo_store)
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(REPO)}}).execute()
    finally:
        del os.environ["FEATSTORE_STORE"]
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the figure was drawn
    text = "".join(o.get("text", "") for o in outputs)
    assert "all 1280 neurons" in text
