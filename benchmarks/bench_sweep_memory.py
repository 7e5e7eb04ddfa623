"""Peak memory of a sweep vs the size of its feature matrix, for 1,000 and 10,000 draws.

    python benchmarks/bench_sweep_memory.py [--store data/featstore.zarr] [--epochs 1]

Runs the demo's random-neuron sweep (the paper's 22 fractions) with CKA on the demo's
cached features (`make demo` builds them), each in a fresh process, for 1 seed (one
task, 23 draws: its peak is the fixed overhead of imports, runtime workspaces and one
task), then ~1,000 and ~10,000 draws. Reports each peak resident memory and the growth
over the one-task peak as a multiple of the train feature matrix (float32). Goal:
growth below 3x the feature matrix, independent of the number of draws (tasks stream
through memory one at a time; rows go to disk).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time
import numpy as np
import featstore, pipelines, probes, torch, pandas, pyarrow  # the fixed overhead: imports

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
store, out, seeds, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
s = featstore.open(store)
g = s.group(model="tf_efficientnet_lite0", dataset="fashion-mnist", split="train", limit=5000)
matrix = g.n_samples * g.n_neurons * 4
base = rss("VmRSS")
spec = pipelines.load_spec({"store": store, "groups": [{"model": "tf_efficientnet_lite0", "dataset": "fashion-mnist",
        "train": {"limit": 5000}, "test": {"limit": 1000}}], "selection": {"modes": ["random"], "seeds": list(range(seeds))},
        "probe": {"epochs": epochs}})
t0 = time.perf_counter()
pipelines.run_sweep(spec, out, progress=False, return_results=False)
done = sum(json.load(open(p))["rows"] for p in __import__("glob").glob(out + "/done/*.json"))
print(json.dumps({"draws": done, "seconds": time.perf_counter() - t0, "matrix": matrix, "base": base,
                  "peak": rss("VmHWM")}))
"""


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--store", default="data/featstore.zarr")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seeds", default=None, help="comma-separated seed counts (default: 45,455)")
    a = p.parse_args()
    rows = []
    for seeds in ([int(s) for s in a.seeds.split(",")] if a.seeds else (1, 45, 455)):  # x 22 fractions + full
        with tempfile.TemporaryDirectory() as tmp:
            out = subprocess.run([sys.executable, "-c", CHILD, a.store, f"{tmp}/out", str(seeds), str(a.epochs)],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            rows.append(r)
            fixed = rows[0]["peak"]
            growth = r["peak"] - fixed
            print(f"{r['draws']:6d} draws in {r['seconds']:6.1f} s: after imports {r['base'] / 2**20:5.0f} MB, "
                  f"peak {r['peak'] / 2**20:5.0f} MB, growth over the one-task peak {growth / 2**20:6.1f} MB = "
                  f"{growth / r['matrix']:.2f} x the {r['matrix'] / 2**20:.1f} MB feature matrix")
    worst = max(r["peak"] for r in rows) - rows[0]["peak"]
    print(f"fixed overhead (one-task sweep peak): {rows[0]['peak'] / 2**20:.0f} MB; worst growth beyond it: "
          f"{worst / rows[0]['matrix']:.2f} x the feature matrix (goal < 3, independent of draws): "
          f"{'met' if worst < 3 * rows[0]['matrix'] else 'NOT met'}")


if __name__ == "__main__":
    main()
