"""A sweep against the engine alone, side by side in one run: the same draws trained by
``featstore sweep`` (the local launcher: its tasks, each its own fit) and by one
``SubsetProbes`` fit in one process.

    python benchmarks/bench_sweep.py [--store data/featstore.zarr] [--epochs 10] [--repeats 2]
        [--modes random] [--seeds 5] [--device cpu]

On the demo's store (``make demo`` builds it: tf_efficientnet_lite0 pre_logits, Fashion-MNIST
5,000 train + 1,000 test; built here first if missing): the paper's 22 fractions x ``--seeds``
seeds of each mode in ``--modes``, ``--epochs`` epochs, no CKA. Both sides are timed from
opening the store to having every draw's test accuracy, interleaved ``--repeats`` times (the
machine's load drifts). Each side's draws are checked to give the same test accuracies.
The last line reads ``sweep / single fit: R.RRx`` (issue 30's goal: <= 1.15x on the CPU).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

import featstore
import pipelines
import probes

TRAIN, TEST = 5000, 1000


def ensure_demo_store(store: str) -> None:
    fs = featstore.FeatureStore(store, mode="a")
    for split, limit in (("train", TRAIN), ("test", TEST)):
        if not fs.find(model="tf_efficientnet_lite0", layer="pre_logits", split=split, limit=limit):
            print(f"building the demo's {split} group ({limit} images) into {store} ...")
            featstore.build(splits=split, limit=limit, store=store, progress=False)


def spec_dict(store: str, modes, seeds: int, epochs: int) -> dict:
    return {"store": store,
            "groups": [{"model": "tf_efficientnet_lite0", "layer": "pre_logits", "dataset": "fashion-mnist",
                        "train": {"limit": TRAIN}, "test": {"limit": TEST}}],
            "selection": {"modes": list(modes), "seeds": list(range(seeds))},
            "probe": {"epochs": epochs}, "metrics": {"accuracy": True, "cka": False}}


def run_sweep(store, modes, seeds, epochs, device) -> tuple[float, dict]:
    spec = pipelines.load_spec(spec_dict(store, modes, seeds, epochs))
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        df = pipelines.run_sweep(spec, Path(out) / "out", launcher="local", device=device, progress=False,
                                 log=lambda m: None)
        wall = time.perf_counter() - t0
    df = df[df["mode"] != "full"]
    return wall, {(r.mode, int(r.seed), round(float(r.fraction), 6)): float(r.test_accuracy) for r in df.itertuples()}


def run_single(store, modes, seeds, epochs, device) -> tuple[float, dict]:
    spec = pipelines.load_spec(spec_dict(store, modes, seeds, epochs))
    g = spec.pairings()[0]
    protocol = {**spec.protocol_for(g).model_dump(), "verbose": False}
    selection = spec.selection_for().model_dump(exclude={"modes", "seeds"})
    t0 = time.perf_counter()
    s = featstore.open(store)
    train = s.group(**g.train_query())
    test = s.group(**g.test_query())
    got = {}
    for mode in modes:  # one fit per mode: every seed's draws together
        # the full layer under each seed's order beside (the sweep's references), with the first mode
        est = probes.SubsetProbes(mode=mode, seeds=tuple(range(seeds)), include_full=mode == modes[0],
                                  device=device, **selection, **protocol).fit(train)
        res = est.evaluate(test)
        res = res[res["mode"] != "full"]
        got.update({(r.mode, int(r.seed), round(float(r.fraction), 6)): float(r.test_accuracy)
                    for r in res.itertuples()})
    return time.perf_counter() - t0, got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default="data/featstore.zarr")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--modes", default="random")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    modes = a.modes.split(",")
    ensure_demo_store(a.store)
    print(f"{os.cpu_count()} cores, device {a.device}; demo store {a.store}: modes {modes}, 22 fractions x "
          f"{a.seeds} seeds, {a.epochs} epochs, no CKA")
    sweeps, singles = [], []
    for r in range(a.repeats):  # interleaved: drift in the machine's load hits both alike
        w_sweep, acc_sweep = run_sweep(a.store, modes, a.seeds, a.epochs, a.device)
        w_single, acc_single = run_single(a.store, modes, a.seeds, a.epochs, a.device)
        assert acc_sweep.keys() == acc_single.keys(), "the two sides trained other draws"
        worst = max(abs(acc_sweep[k] - acc_single[k]) for k in acc_sweep)
        sweeps.append(w_sweep)
        singles.append(w_single)
        print(f"  run {r + 1}: featstore sweep {w_sweep:6.2f} s | one SubsetProbes fit per mode {w_single:6.2f} s | "
              f"{len(acc_sweep)} draws, largest test-accuracy difference {worst:.2g}")
    s, f = float(np.min(sweeps)), float(np.min(singles))
    print(f"best of {a.repeats}: sweep {s:.2f} s, single fit {f:.2f} s")
    print(f"sweep / single fit: {s / f:.2f}x")


if __name__ == "__main__":
    main()
