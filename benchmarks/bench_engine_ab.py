"""The probe engine of this checkout against another git revision's, side by side.

    python benchmarks/bench_engine_ab.py --base 58fb836                       # paper grid, fp32, 5 seeds' orders
    python benchmarks/bench_engine_ab.py --base 58fb836 --precision bf16 --seeds 1

A shared VM's speed drifts by 10% or more within an hour, so two engines are only compared
in one run: the base revision is checked out into a temporary git worktree, and each
repetition fits both engines in fresh subprocesses, one after the other, on the same
synthetic data (``bench_probes.synthetic``), one fit of ``--epochs`` epochs each (fixed costs
such as the input layout included). The default, 12 epochs, is over the engine's
LAYOUT_MIN_EPOCHS, so the fit takes the path the paper grid's 50 epochs take. Prints every
repetition and the best of each engine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import sys, time
sys.path.insert(0, {root!r}); sys.path.insert(0, {bench!r})
from bench_probes import synthetic
from probes import PAPER_FRACTIONS, SubsetProbes
X, y = synthetic({n}, {d}, 10)
est = SubsetProbes(fractions=PAPER_FRACTIONS, seeds=tuple(range({seeds})), epochs={epochs}, device="cpu",
                   precision={precision!r}, minibatch_order={order!r})
t0 = time.perf_counter()
est.fit(X, y)
print("fit", time.perf_counter() - t0)
"""


def run(root: Path, a) -> float:
    """Seconds of one fit by the engine in ``root``."""
    code = CHILD.format(root=str(root), bench=str(REPO / "benchmarks"), n=a.n, d=a.d, epochs=a.epochs,
                        seeds=a.seeds, precision=a.precision, order=a.order)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    if out.returncode:
        sys.exit(f"bench_engine_ab: the engine in {root} failed:\n{out.stderr[-2000:]}")
    return float([line for line in out.stdout.splitlines() if line.startswith("fit ")][-1].split()[1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the git revision to compare against (a commit, tag or branch)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--order", default="per-seed", choices=("per-seed", "shared"))
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--n", type=int, default=50_000, help="rows (a tenth is the validation split)")
    p.add_argument("--d", type=int, default=2048)
    p.add_argument("--epochs", type=int, default=12, help="epochs of each fit (the engine lays its float32 inputs "
                                                            "out from LAYOUT_MIN_EPOCHS = 10)")
    p.add_argument("--repeats", type=int, default=2, help="fits of each engine, interleaved; the fastest counts")
    a = p.parse_args()
    if a.epochs < 1:
        p.error(f"--epochs: expected an integer >= 1; got {a.epochs}")
    rev = subprocess.run(["git", "rev-parse", "--verify", f"{a.base}^{{commit}}"], cwd=REPO, capture_output=True,
                         text=True)
    if rev.returncode:
        p.error(f"--base: {a.base!r} is not a commit of this repository")
    print(f"paper fractions x {a.seeds} seeds ({a.order}), n={a.n} d={a.d} C=10, {a.epochs} epochs, {a.precision}; "
          f"base {rev.stdout.strip()[:10]} vs this checkout")
    with tempfile.TemporaryDirectory(prefix="featstore-ab-") as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(base), rev.stdout.strip()], cwd=REPO,
                       check=True)
        try:
            times = {"base": [], "this": []}
            for r in range(a.repeats):
                for name, root in (("base", base), ("this", REPO)):
                    times[name].append(run(root, a))
                    print(f"  repetition {r + 1}, {name:4s}: {times[name][-1]:.2f} s", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=REPO, check=False)
    b, t = min(times["base"]), min(times["this"])
    print(f"{a.epochs} epochs, best of {a.repeats}: base {b:.2f} s, this {t:.2f} s = {t / b:.2f}x the time")


if __name__ == "__main__":
    main()
