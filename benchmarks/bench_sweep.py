"""A sweep against the engine alone, side by side in one run: the same draws trained by
``featstore sweep`` (the local launcher: one fit per pairing, each task's rows committed on
its own) and by one ``SubsetProbes`` fit in one process.

    python benchmarks/bench_sweep.py [--store data/featstore.zarr] [--epochs 10] [--repeats 3]
        [--modes random] [--seeds 5] [--device cpu] [--paper-scale [--paper-epochs E] [--no-demo]]
        [--fits-per-pairing N]

On the demo's store (``make demo`` builds it: tf_efficientnet_lite0 pre_logits, Fashion-MNIST
5,000 train + 1,000 test; built here first if missing): the paper's 22 fractions x ``--seeds``
seeds of each mode in ``--modes`` and the full layer under each seed's order, ``--epochs``
epochs, no CKA. With ``--paper-scale``, also on a synthetic pairing of the paper's size
(50,000 train + 5,000 test images, d = 2,048, 10 classes: a fixed random ReLU layer over 8 x 8
class-patterned images, written once into ``--paper-store`` by ``featstore.build``).

Both sides are timed from opening the store to having every draw's test accuracy (the
sweep also checks its groups, commits each task's rows and reads them back), interleaved
``--repeats`` times after one warm-up run of each (the machine's load drifts; the best
counts). The two sides train the same draws with the same initial weights and minibatch
orders, so their test accuracies agree (the largest difference is printed).
``--fits-per-pairing N`` splits the sweep's pairing into N fits (N past the task count: each
task alone, as sweeps ran before issue 30). The last line reads ``sweep / single fit: R.RRx``
(the demo-store case; issue 30's goal: <= 1.15x on the CPU).
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

DEMO = {"model": "tf_efficientnet_lite0", "layer": "pre_logits", "dataset": "fashion-mnist",
        "train": {"limit": 5000}, "test": {"limit": 1000}}
PAPER_N, PAPER_TEST, PAPER_D, PAPER_CLASSES = 50_000, 5_000, 2048, 10
PAPER = {"model": "module:synthetic-relu-2048", "layer": "2", "dataset": None}


def ensure_demo_store(store: str) -> None:
    fs = featstore.FeatureStore(store, mode="a")
    for split in ("train", "test"):
        limit = DEMO[split]["limit"]
        if not fs.find(model=DEMO["model"], layer=DEMO["layer"], split=split, limit=limit):
            print(f"building the demo's {split} group ({limit} images) into {store} ...")
            featstore.build(splits=split, limit=limit, store=store, progress=False)


def ensure_paper_store(store: str) -> dict:
    """The paper-scale pairing: 8 x 8 RGB images (a class pattern plus noise, saved as a Hugging
    Face dataset beside the store), through a fixed random Linear(192, 2048) + ReLU."""
    import torch

    data = Path(store).with_suffix(".images")
    pairing = {**PAPER, "dataset": f"hf:{data}"}
    fs = featstore.FeatureStore(store, mode="a")
    if all(fs.find(model=PAPER["model"], layer=PAPER["layer"], split=s) for s in ("train", "test")):
        return pairing
    if not data.exists():
        import datasets
        from PIL import Image

        print(f"writing {PAPER_N:,} + {PAPER_TEST:,} synthetic 8 x 8 images to {data} ...")
        rng = np.random.default_rng(0)
        patterns = rng.uniform(0, 255, size=(PAPER_CLASSES, 8, 8, 3))
        features = datasets.Features({"image": datasets.Image(),
                                      "label": datasets.ClassLabel(names=[f"c{i}" for i in range(PAPER_CLASSES)])})
        splits = {}
        for split, n in (("train", PAPER_N), ("test", PAPER_TEST)):
            y = rng.integers(0, PAPER_CLASSES, n)
            pix = np.clip(0.6 * patterns[y] + rng.normal(0, 40, size=(n, 8, 8, 3)) + 50, 0, 255).astype(np.uint8)
            splits[split] = datasets.Dataset.from_dict(
                {"image": [Image.fromarray(p) for p in pix], "label": y.tolist()}, features=features)
        datasets.DatasetDict(splits).save_to_disk(str(data))
    print(f"building the paper-scale groups ({PAPER_N:,} x {PAPER_D:,} and {PAPER_TEST:,} x {PAPER_D:,}) into "
          f"{store} ...")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, PAPER_D), torch.nn.ReLU())
    prep = dict(input_size=(3, 8, 8), interpolation="bilinear", crop_pct=1.0, crop_mode="center",
                mean=(0.5,) * 3, std=(0.25,) * 3)
    featstore.build(model=net, name=PAPER["model"].split(":", 1)[1], preprocess=prep, layers=PAPER["layer"],
                    dataset=pairing["dataset"], splits="train,test", store=store, progress=False, dtype="float32")
    return pairing


def spec_dict(store: str, pairing: dict, modes, seeds: int, epochs: int) -> dict:
    return {"store": store, "groups": [pairing],
            "selection": {"modes": list(modes), "seeds": list(range(seeds))},
            "probe": {"epochs": epochs}, "metrics": {"accuracy": True, "cka": False}}


def key(r) -> tuple:
    return r.mode, None if r.seed is None or r.seed != r.seed else int(r.seed), round(float(r.fraction), 6)


def run_sweep(spec: dict, device: str, fits_per_pairing: int | None = None) -> tuple[float, dict]:
    spec = pipelines.load_spec(spec)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        df = pipelines.run_sweep(spec, Path(out) / "out", launcher="local", device=device, progress=False,
                                 fits_per_pairing=fits_per_pairing, log=lambda m: None)
        wall = time.perf_counter() - t0
    df = df[df["mode"] != "full"]  # the references: random neurons at fraction 1 (the single fit: k = d in order)
    return wall, {key(r): float(r.test_accuracy) for r in df.itertuples()}


def run_single(spec: dict, device: str) -> tuple[float, dict]:
    spec = pipelines.load_spec(spec)
    g = spec.pairings()[0]
    protocol = {**spec.protocol_for(g).model_dump(), "verbose": False}
    selection = spec.selection_for()
    options = selection.model_dump(exclude={"modes", "seeds"})
    t0 = time.perf_counter()
    s = featstore.open(spec.store)
    train = s.group(**g.train_query())
    test = s.group(**g.test_query())
    data = probes.load_training_data(train)
    got = {}
    for i, mode in enumerate(selection.modes):  # one fit per mode: every seed's draws together
        # the full layer under each seed's order beside (as the sweep's references), with the first mode
        est = probes.SubsetProbes(mode=mode, seeds=selection.seeds, include_full=i == 0, device=device, **options,
                                  **protocol).fit(data)
        res = est.evaluate(test)
        got.update({key(r): float(r.test_accuracy) for r in res[res["mode"] != "full"].itertuples()})
    return time.perf_counter() - t0, got


def compare(label: str, spec: dict, repeats: int, device: str, fits_per_pairing: int | None) -> float:
    run_sweep(spec, device, fits_per_pairing)  # warm-up: imports, caches, the allocator
    run_single(spec, device)
    sweeps, singles = [], []
    for r in range(repeats):  # interleaved: drift in the machine's load hits both alike
        w_sweep, acc_sweep = run_sweep(spec, device, fits_per_pairing)
        w_single, acc_single = run_single(spec, device)
        assert acc_sweep.keys() == acc_single.keys(), "the two sides trained other draws"
        worst = max(abs(acc_sweep[k] - acc_single[k]) for k in acc_sweep)
        sweeps.append(w_sweep)
        singles.append(w_single)
        print(f"  {label} run {r + 1}: featstore sweep {w_sweep:7.2f} s | one SubsetProbes fit per mode "
              f"{w_single:7.2f} s | {len(acc_sweep)} draws, largest test-accuracy difference {worst:.2g}")
    s, f = float(np.min(sweeps)), float(np.min(singles))
    print(f"{label}, best of {repeats}: sweep {s:.2f} s, single fit {f:.2f} s: {s / f:.2f}x")
    return s / f


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default="data/featstore.zarr")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--modes", default="random")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--fits-per-pairing", type=int, default=None)
    ap.add_argument("--paper-scale", action="store_true", help="also a 50,000 x 2,048 synthetic pairing")
    ap.add_argument("--paper-store", default="data/paper-scale.zarr")
    ap.add_argument("--paper-epochs", type=int, default=None, help="default: --epochs")
    ap.add_argument("--no-demo", action="store_true", help="only the paper-scale case (a machine without the demo's data)")
    a = ap.parse_args()
    modes = a.modes.split(",")
    device = featstore.resolve_device(a.device)
    name = device
    if device.startswith("cuda"):
        import torch

        name = f"{device} ({torch.cuda.get_device_name(device)})"
    how = f"modes {modes}, 22 fractions x {a.seeds} seeds + the full layer per seed, no CKA"
    if a.paper_scale:
        pairing = ensure_paper_store(a.paper_store)
        epochs = a.paper_epochs or a.epochs
        print(f"{os.cpu_count()} cores, device {name}; paper scale ({PAPER_N:,} x {PAPER_D:,}, {PAPER_CLASSES} "
              f"classes) in {a.paper_store}: {how}, {epochs} epochs")
        compare("paper scale", spec_dict(a.paper_store, pairing, modes, a.seeds, epochs), a.repeats, device,
                a.fits_per_pairing)
    if a.no_demo:
        return
    ensure_demo_store(a.store)
    print(f"{os.cpu_count()} cores, device {name}; demo store {a.store}: {how}, {a.epochs} epochs")
    ratio = compare("demo store", spec_dict(a.store, DEMO, modes, a.seeds, a.epochs), a.repeats, device,
                    a.fits_per_pairing)
    print(f"sweep / single fit: {ratio:.2f}x")


if __name__ == "__main__":
    main()
