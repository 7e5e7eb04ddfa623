"""What each dataset source costs to read, side by side on the same images: an image folder,
a CSV manifest, a saved Hugging Face dataset and webdataset shards (local files).

    python benchmarks/bench_sources.py [--images 2000] [--size 160] [--per-shard 500] [--threads 4]

For each source: the time to open it (list the folder, read the manifest, open the arrow
table, index the shards' tar headers; the shards' index cache is cleared first), then the
time to decode every image to RGB through the source (``ImageSource.image``), one thread and
``--threads`` threads (as the build's loaders read); images/s and the ratio to the image
folder. Every source must return the same pixels (checked on every image).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def write_sources(root: Path, n: int, size: int, per_shard: int) -> dict[str, str]:
    """n JPEGs (10 classes, train split) as a folder, a manifest, an HF dataset and shards."""
    import datasets
    import webdataset
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        label = f"c{i % 10}"
        path = root / "tree" / "train" / label / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        img = (rng.normal(128, 40, (size, size, 3)) + 8 * (i % 10)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(path, quality=90)
        rows.append((str(path.relative_to(root)), label))
    rows.sort()  # the folder's order
    with open(root / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows((p, lab, "train") for p, lab in rows)
    names = sorted({lab for _, lab in rows})
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"image": [{"bytes": (root / p).read_bytes()} for p, _ in rows], "label": [names.index(lab) for _, lab in rows]},
        features=feats)}).save_to_disk(str(root / "hf"))
    (root / "wds").mkdir()
    with webdataset.ShardWriter(str(root / "wds" / "train-%04d.tar"), maxcount=per_shard, verbose=0) as w:
        for j, (p, lab) in enumerate(rows):
            w.write({"__key__": f"{j:06d}", "jpg": (root / p).read_bytes(), "cls": names.index(lab)})
    return {"imagefolder": f"imagefolder:{root / 'tree'}", "csv": f"csv:{root / 'm.csv'}", "hf": f"hf:{root / 'hf'}",
            "wds": f"wds:{root / 'wds'}/{{split}}-*.tar"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--per-shard", type=int, default=500)
    ap.add_argument("--threads", type=int, default=4)
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-sources-"))
    os.environ["FEATSTORE_CACHE"] = str(root / "cache")
    try:
        t0 = time.perf_counter()
        names = write_sources(root, a.images, a.size, a.per_shard)
        print(f"{a.images} JPEGs of {a.size} px written in four forms in {time.perf_counter() - t0:.1f} s "
              f"({os.cpu_count()} cores)")
        from featstore.datasets import load_split

        ref = None
        results = {}
        for name, dataset in names.items():
            shutil.rmtree(root / "cache", ignore_errors=True)
            t0 = time.perf_counter()
            src = load_split(dataset, "train")
            opened = time.perf_counter() - t0
            t0 = time.perf_counter()
            pixels = [np.asarray(src.image(i)) for i in range(len(src))]
            one = time.perf_counter() - t0
            with ThreadPoolExecutor(a.threads) as pool:
                t0 = time.perf_counter()
                list(pool.map(lambda i: np.asarray(src.image(i)).sum(), range(len(src))))
                many = time.perf_counter() - t0
            if ref is None:
                ref = pixels
            assert len(pixels) == len(ref) and all(np.array_equal(x, y) for x, y in zip(pixels, ref)), name
            results[name] = (opened, len(src) / one, len(src) / many)
        base = results["imagefolder"]
        print(f"{'source':<12} {'open s':>7} {'img/s 1 thread':>15} {'ratio':>6} "
              f"{f'img/s {a.threads} threads':>16} {'ratio':>6}")
        for name, (opened, r1, rn) in results.items():
            print(f"{name:<12} {opened:7.2f} {r1:15.0f} {r1 / base[1]:6.2f} {rn:16.0f} {rn / base[2]:6.2f}")
        print("every source gave the image folder's pixels for every image")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
