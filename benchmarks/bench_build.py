"""Build throughput vs a bare forward loop, measured side by side in one run.

    python benchmarks/bench_build.py [--images 1000] [--batch-size N] [--workers N] [--device auto]

Both loops use the same model (the embedded tf_efficientnet_lite0), the same images
(a stratified Fashion-MNIST subset), the same preprocessing, DataLoader settings, batch
size and device. The bare loop only runs the backbone and drops the features; `featstore
build` also pools, converts, compresses and writes Zarr chunks. Goal: build >= 0.9 x bare.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

import featstore
from featstore import (
    FeatureExtractor,
    create_backbone,
    load_split,
    make_transforms,
    resolve_device,
    resolve_transform,
    stratified_subset,
)


class _EvalImages:
    """The bare loop's dataset: row i of the split, preprocessed like the build's clean pass."""

    def __init__(self, src, index, eval_tf):
        self.src, self.index, self.eval_tf = src, index, eval_tf

    def __len__(self):
        return len(self.index)

    def __getitem__(self, row):
        return self.eval_tf(self.src.image(self.index[row]))


def bare_forward(images, batch_size, workers, device):
    model, _ = create_backbone("tf_efficientnet_lite0")
    tspec = resolve_transform(model)
    eval_tf, _ = make_transforms(tspec)
    src = load_split("fashion-mnist", "test")
    index = stratified_subset(src.targets, images, 0)
    items = _EvalImages(src, index, eval_tf)
    batches = [list(range(b, min(b + batch_size, len(index)))) for b in range(0, len(index), batch_size)]
    loader = DataLoader(items, batch_sampler=batches, num_workers=workers, prefetch_factor=4 if workers else None,
                        pin_memory=device == "cuda")
    model.to(device=device, memory_format=torch.channels_last)
    extractor = FeatureExtractor(model, ["pre_logits"])
    autocast = torch.autocast("cuda", dtype=torch.float16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    t0 = time.perf_counter()
    with torch.inference_mode(), autocast:
        for x in loader:
            extractor(x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last))
        if device == "cuda":
            torch.cuda.synchronize()
    return len(index) / (time.perf_counter() - t0)


def featstore_build(images, batch_size, workers, device):
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        # small chunks so that several compressed writes happen during the pass
        (g,) = featstore.build(splits="test", limit=images, store=os.path.join(tmp, "s.zarr"), batch_size=batch_size,
                               workers=workers, device=device, progress=False, chunk_rows=128)
        wall = time.perf_counter() - t0
        return g.timings["images_per_second"], images / wall


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--workers", type=int, default=max(0, min(4, (os.cpu_count() or 1) - 1)))
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    device = resolve_device(a.device)
    bs = a.batch_size or (256 if device == "cuda" else 16)
    print(f"device={device} ({torch.cuda.get_device_name() if device == 'cuda' else f'{os.cpu_count()} CPU cores'}) "
          f"batch_size={bs} workers={a.workers} images={a.images} model=tf_efficientnet_lite0 dataset=fashion-mnist")
    bare, build_pass, build_wall = [], [], []
    for r in range(a.repeats):  # interleaved, so drift in machine load hits both alike
        bare.append(bare_forward(a.images, bs, a.workers, device))
        pass_rate, wall_rate = featstore_build(a.images, bs, a.workers, device)
        build_pass.append(pass_rate)
        build_wall.append(wall_rate)
        print(f"  run {r + 1}: bare forward {bare[-1]:.1f} img/s | featstore build pass {pass_rate:.1f} img/s "
              f"(end to end incl. model load and store setup {wall_rate:.1f} img/s)")
    b, f, w = np.median(bare), np.median(build_pass), np.median(build_wall)
    print(f"medians over {a.repeats} interleaved runs:")
    print(f"bare forward loop : {b:8.1f} images/s")
    print(f"featstore build   : {f:8.1f} images/s  (end to end: {w:.1f})")
    print(f"ratio build/bare  : {f / b:8.3f}   (goal >= 0.9)")


if __name__ == "__main__":
    main()
