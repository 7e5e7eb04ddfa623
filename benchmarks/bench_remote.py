"""Object storage: push throughput, and a sweep reading its groups from S3 vs. from disk.

    python benchmarks/bench_remote.py [--store data/featstore.zarr] [--spec sweeps/demo.toml] [--epochs 5]

Starts moto's S3 server on loopback (the test extra installs it), pushes the store to a
bucket (MB/s), then runs the same sweep (the spec's groups, its store replaced) twice with
the local launcher: reading from the local store and from the s3:// URL, side by side in
this one run. Loopback S3 measures featstore's own overhead (requests, metadata reads),
not a network: on a real bucket, add the transfer time of the features (read once per
worker and group, then cached).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from pathlib import Path


def _moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)
            return proc, endpoint
        except Exception:  # noqa: BLE001
            time.sleep(0.2)
    raise RuntimeError("moto server did not start")


def _spec_text(spec: dict, store: str) -> str:
    import json

    def val(v):
        return json.dumps(v) if not isinstance(v, dict) else "{ " + ", ".join(f"{k} = {val(x)}" for k, x in v.items()) + " }"

    lines = [f"store = {json.dumps(store)}"]
    for g in spec["groups"]:
        lines.append("[[groups]]")
        lines += [f"{k} = {val(v)}" for k, v in g.items()]
    for table in ("selection", "probe", "metrics"):
        if table in spec:
            lines.append(f"[{table}]")
            lines += [f"{k} = {val(v)}" for k, v in spec[table].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default="data/featstore.zarr")
    ap.add_argument("--spec", default="sweeps/demo.toml")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3, help="alternating runs of each; the best is compared")
    a = ap.parse_args()
    proc, endpoint = _moto()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_ENDPOINT_URL=endpoint,
                      AWS_DEFAULT_REGION="us-east-1")
    try:
        import fsspec

        import featstore
        from pipelines import run_sweep

        fsspec.filesystem("s3").mkdir("bench")
        url = "s3://bench/featstore.zarr"
        size = sum(p.stat().st_size for p in Path(a.store).rglob("*") if p.is_file())
        t = time.perf_counter()
        featstore.remote.push(a.store, url, progress=False)
        dt = time.perf_counter() - t
        print(f"push: {size / 1e6:.1f} MB in {dt:.2f} s = {size / 1e6 / dt:.1f} MB/s (loopback)")
        spec = tomllib.loads(Path(a.spec).read_text())
        spec.setdefault("probe", {})["epochs"] = a.epochs
        with tempfile.TemporaryDirectory() as tmp:
            times: dict[str, list[float]] = {"local": [], "s3": []}
            for r in range(a.repeat):  # alternating, each into a fresh output directory
                for where, store in (("local", str(Path(a.store).resolve())), ("s3", url)):
                    f = Path(tmp) / f"{where}.toml"
                    f.write_text(_spec_text(spec, store))
                    t = time.perf_counter()
                    df = run_sweep(f, Path(tmp) / f"{where}{r}", launcher="local", progress=False)
                    times[where].append(time.perf_counter() - t)
            for where, ts in times.items():
                print(f"sweep reading from {where:5s}: best {min(ts):.1f} s of {', '.join(f'{t:.1f}' for t in ts)} "
                      f"({len(df)} rows)")
            print(f"s3 / local (best of each): {min(times['s3']) / min(times['local']):.3f}x")
    finally:
        proc.terminate()


if __name__ == "__main__":
    main()
