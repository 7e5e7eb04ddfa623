"""What the checked reads cost: a group read through featstore (every chunk present, decoded,
finite, its content hash compared) against zarr reading the same array unchecked, side by side
in one run, repeated and interleaved.

    python benchmarks/bench_reads.py [--repeats 5]

The group: 20,000 Fashion-MNIST train images (Debian's files, `make setup`) through a random
test_resnet at 32 px, layer1 flattened (2,048 neurons, float16, 78 MB in 10 chunks of 8 MB),
built once into a temporary store.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

import featstore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        (g,) = featstore.build("test_resnet", weights="random", dataset="fashion-mnist", splits="train", limit=20000,
                               layers="layer1", pooling="flatten", image_size=32, progress=False,
                               store=f"{tmp}/s.zarr")
        mb = g.n_samples * g.n_neurons * 2 / 2**20
        print(f"group: {g.n_samples} x {g.n_neurons} {g.spec.dtype} ({mb:.0f} MB), chunks of {g.spec.chunk_rows} rows")
        raw = g.raw("features")

        def unchecked():
            return raw[:]

        def checked():
            return g.numpy()

        def checked_without_hash():
            digests, g._digests = g._checksums(), None
            try:
                return g.numpy()
            finally:
                g._digests = digests

        ways = {"zarr, unchecked": unchecked, "featstore, checks 1-3 (no hash)": checked_without_hash,
                "featstore, every check (hash too)": checked}
        times = {k: [] for k in ways}
        for _ in range(args.repeats):
            for name, read in ways.items():  # interleaved: the machine's drift hits every way alike
                t0 = time.perf_counter()
                out = read()
                times[name].append(time.perf_counter() - t0)
        assert np.array_equal(unchecked(), checked())
        base = np.median(times["zarr, unchecked"])
        for name, ts in times.items():
            t = float(np.median(ts))
            print(f"{name:36s} {t * 1000:7.1f} ms  ({mb / t:6.0f} MB/s)  {t / base:5.2f}x zarr")
        del out


if __name__ == "__main__":
    main()
