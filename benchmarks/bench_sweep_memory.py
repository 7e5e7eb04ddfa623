"""Peak memory of a sweep vs its memory budget, for 1,000 and 10,000 draws.

    python benchmarks/bench_sweep_memory.py [--store data/featstore.zarr] [--epochs 1] [--max-memory-mb 512]

Runs the demo's random-neuron sweep (the paper's 22 fractions) with CKA on the demo's
cached features (`make demo` builds them), each in a fresh process, for 1 seed (two
tasks, 23 draws: its peak is the fixed overhead of imports, runtime workspaces and one
small fit), then ~1,000 and ~10,000 draws. A pairing's tasks train together in fits whose
estimated working memory (``probes.fit_bytes``) stays within ``--max-memory-mb`` beside the
features, so the growth over the smallest sweep's peak is bounded by the budget, not by the
number of draws (fits run one at a time; rows go to disk). Reports each peak resident
memory, the fits, and the growth in MB and as a multiple of the train feature matrix.
Goal: growth below the budget, whatever the draws.
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
store, out, seeds, epochs, budget = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
s = featstore.open(store)
g = s.group(model="tf_efficientnet_lite0", dataset="fashion-mnist", split="train", limit=5000)
matrix = g.n_samples * g.n_neurons * 4
base = rss("VmRSS")
spec = pipelines.load_spec({"store": store, "groups": [{"model": "tf_efficientnet_lite0", "dataset": "fashion-mnist",
        "train": {"limit": 5000}, "test": {"limit": 1000}}], "selection": {"modes": ["random"], "seeds": list(range(seeds))},
        "probe": {"epochs": epochs}})
t0 = time.perf_counter()
pipelines.run_sweep(spec, out, progress=False, return_results=False, max_memory_mb=budget)
df = pipelines.load_results(out)
fits = df.groupby("task")["fit_tasks"].first().value_counts().to_dict()  # tasks per fit -> count of such tasks
print(json.dumps({"draws": len(df), "seconds": time.perf_counter() - t0, "matrix": matrix, "base": base,
                  "peak": rss("VmHWM"), "fits": sum(v // k for k, v in fits.items())}))
"""


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--store", default="data/featstore.zarr")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seeds", default=None, help="comma-separated seed counts (default: 1,45,455)")
    p.add_argument("--max-memory-mb", type=int, default=512, help="the sweep's memory budget (featstore sweep's)")
    a = p.parse_args()
    rows = []
    for seeds in ([int(s) for s in a.seeds.split(",")] if a.seeds else (1, 45, 455)):  # x 22 fractions + full
        with tempfile.TemporaryDirectory() as tmp:
            out = subprocess.run([sys.executable, "-c", CHILD, a.store, f"{tmp}/out", str(seeds), str(a.epochs),
                                  str(a.max_memory_mb)],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            rows.append(r)
            fixed = rows[0]["peak"]
            growth = r["peak"] - fixed
            print(f"{r['draws']:6d} draws in {r['fits']:3d} fits, {r['seconds']:6.1f} s: after imports "
                  f"{r['base'] / 2**20:5.0f} MB, peak {r['peak'] / 2**20:5.0f} MB, growth over the smallest sweep's "
                  f"peak {growth / 2**20:6.1f} MB = {growth / r['matrix']:.2f} x the {r['matrix'] / 2**20:.1f} MB "
                  f"feature matrix")
    worst = max(r["peak"] for r in rows) - rows[0]["peak"]
    print(f"fixed overhead (the smallest sweep's peak): {rows[0]['peak'] / 2**20:.0f} MB; worst growth beyond it: "
          f"{worst / 2**20:.0f} MB (goal < the {a.max_memory_mb} MB budget, whatever the draws): "
          f"{'met' if worst < a.max_memory_mb << 20 else 'NOT met'}")


if __name__ == "__main__":
    main()
