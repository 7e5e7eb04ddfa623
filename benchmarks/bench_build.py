"""Build throughput vs a bare forward loop and vs the backbone alone, side by side in one run.

    python benchmarks/bench_build.py [--images 1000] [--batch-size N] [--workers N] [--device auto]
    python benchmarks/bench_build.py --device cuda --dataset jpeg --images 4000 \
        --models resnet50,tf_efficientnet_lite0 --workers 15           # the GPU check
    python benchmarks/bench_build.py --launcher local --jobs 2 [--devices cuda:0,cuda:1]

Per model, three rates (images/s) measured in one run, same batch size and device:

* synthetic forward: the backbone alone on random tensors already on the device (the ceiling);
* bare loop: DataLoader (decode, resize, crop, normalise in workers) + forward, features dropped;
* ``featstore build``: the same, plus pooling, fp16 conversion, Zarr compression and writes;
* with ``--jobs N`` (``--launcher``, ``--devices``): the same build shared by N workers
  (featstore._distribute), its rate and its ratio to the one-process build, end to end (the
  workers' start, each loading the model, included) and over the pass.

``--dataset fashion-mnist`` reads a stratified Fashion-MNIST subset; ``--dataset jpeg`` writes
an ImageNet-like folder first (``--images`` JPEGs of 500x375, quality 90, 10 classes) and
reads it as ``imagefolder:``. Models other than the embedded Lite0 use random weights (the
speed does not depend on them). Goals: build >= 0.9 x bare loop on CPU; on a GPU, build >=
0.9 x synthetic forward (resnet50, 224 px).
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


def write_jpeg_folder(root: str, n: int, size=(500, 375), classes: int = 10) -> str:
    """``n`` JPEGs (quality 90) in ``root/train/class_k/``: smooth random colour fields plus
    noise, so that they compress like photographs rather than like noise or flat colour."""
    from concurrent.futures import ProcessPoolExecutor

    for k in range(classes):
        os.makedirs(os.path.join(root, "train", f"class_{k}"), exist_ok=True)
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(_write_jpeg, [(root, i, size, classes) for i in range(n)], chunksize=64))
    return root


def _write_jpeg(args):
    from PIL import Image

    root, i, (w, h), classes = args
    rng = np.random.default_rng(i)
    coarse = rng.integers(0, 255, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
    arr = np.clip(np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(os.path.join(root, "train", f"class_{i % classes}", f"{i:06d}.jpg"), quality=90)


def _weights(model: str) -> str | None:
    return None if model == featstore.models.EMBEDDED_MODEL else "random"


class _EvalImages:
    """The bare loop's dataset: row i of the split, preprocessed like the build's clean pass."""

    def __init__(self, src, index, eval_tf):
        self.src, self.index, self.eval_tf = src, index, eval_tf

    def __len__(self):
        return len(self.index)

    def __getitem__(self, row):
        return self.eval_tf(self.src.image(self.index[row]))


def _autocast(device):
    return torch.autocast("cuda", dtype=torch.float16) if device == "cuda" else torch.autocast("cpu", enabled=False)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def synthetic_forward(model_name, images, batch_size, device):
    """The backbone alone: random batches already on the device, as the build runs it."""
    model, _ = create_backbone(model_name, _weights(model_name))
    size = resolve_transform(model).input_size
    model.to(device=device, memory_format=torch.channels_last)
    extractor = FeatureExtractor(model, ["pre_logits"])
    x = torch.randn((batch_size, *size), device=device).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), _autocast(device):
        for _ in range(3):  # warm-up: cuDNN picks its algorithms
            extractor(x)
        _sync(device)
        steps = max(1, images // batch_size)
        t0 = time.perf_counter()
        for _ in range(steps):
            extractor(x)
        _sync(device)
    return steps * batch_size / (time.perf_counter() - t0)


def bare_forward(model_name, dataset, split, images, batch_size, workers, device):
    model, _ = create_backbone(model_name, _weights(model_name))
    tspec = resolve_transform(model)
    eval_tf, _ = make_transforms(tspec)
    src = load_split(dataset, split)
    index = stratified_subset(src.targets, images, 0)
    items = _EvalImages(src, index, eval_tf)
    batches = [list(range(b, min(b + batch_size, len(index)))) for b in range(0, len(index), batch_size)]
    loader = DataLoader(items, batch_sampler=batches, num_workers=workers, prefetch_factor=4 if workers else None,
                        pin_memory=device == "cuda")
    model.to(device=device, memory_format=torch.channels_last)
    extractor = FeatureExtractor(model, ["pre_logits"])
    t0 = time.perf_counter()
    with torch.inference_mode(), _autocast(device):
        for x in loader:
            extractor(x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last))
        _sync(device)
    return len(index) / (time.perf_counter() - t0)


def featstore_build(model_name, dataset, split, images, batch_size, workers, device, decode="pil", **launch):
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        # small chunks so that several compressed writes happen during the pass
        (g,) = featstore.build(model=model_name, weights=_weights(model_name), dataset=dataset, splits=split,
                               limit=images, store=os.path.join(tmp, "s.zarr"), batch_size=batch_size,
                               workers=workers, device=device, progress=False, chunk_rows=128, decode=decode,
                               **launch)
        wall = time.perf_counter() - t0
        return g.timings["images_per_second"], images / wall


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the build's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dataset", choices=("fashion-mnist", "jpeg"), default="fashion-mnist")
    p.add_argument("--models", default=featstore.models.EMBEDDED_MODEL, help="comma-separated timm names")
    p.add_argument("--decodes", default="pil", help="build with each of these --decode choices (comma-separated: "
                                                      "pil, device)")
    p.add_argument("--launcher", default="local", help="also build on --jobs workers through this launcher")
    p.add_argument("--jobs", type=int, default=1, help="workers of the shared build (1: none)")
    p.add_argument("--devices", default=None, help="the shared build's devices (comma-separated), --launcher local")
    a = p.parse_args()
    shared = a.jobs > 1 or a.launcher != "local"
    launch = {"launcher": a.launcher, "jobs": a.jobs, **({"devices": a.devices} if a.devices else {})}
    device = resolve_device(a.device)
    bs = a.batch_size or (256 if device == "cuda" else 16)
    a.workers = featstore.default_workers(device) if a.workers is None else a.workers
    tmp = None
    if a.dataset == "jpeg":
        tmp = tempfile.TemporaryDirectory()
        t0 = time.perf_counter()
        write_jpeg_folder(tmp.name, a.images)
        print(f"wrote {a.images} JPEGs of 500x375 in {time.perf_counter() - t0:.1f} s")
        dataset, split = f"imagefolder:{tmp.name}", "train"
    else:
        dataset, split = "fashion-mnist", "test"
    where = torch.cuda.get_device_name() if device == "cuda" else f"{os.cpu_count()} CPU cores"
    print(f"device={device} ({where}) cores={os.cpu_count()} batch_size={bs} workers={a.workers} "
          f"images={a.images} dataset={a.dataset}")
    decodes = a.decodes.split(",")
    for model_name in a.models.split(","):
        synth, bare = [], []
        build_pass: dict = {d: [] for d in decodes}
        build_wall: dict = {d: [] for d in decodes}
        shared_pass, shared_wall = [], []
        print(f"model={model_name} ({'embedded weights' if _weights(model_name) is None else 'random weights'})")
        for r in range(a.repeats):  # interleaved, so drift in machine load hits all alike
            synth.append(synthetic_forward(model_name, a.images, bs, device))
            bare.append(bare_forward(model_name, dataset, split, a.images, bs, a.workers, device))
            line = f"  run {r + 1}: synthetic forward {synth[-1]:.1f} img/s | bare loop {bare[-1]:.1f} img/s"
            for d in decodes:
                pass_rate, wall_rate = featstore_build(model_name, dataset, split, a.images, bs, a.workers, device, d)
                build_pass[d].append(pass_rate)
                build_wall[d].append(wall_rate)
                line += f" | build --decode {d} {pass_rate:.1f} img/s (end to end {wall_rate:.1f})"
            if shared:
                pass_rate, wall_rate = featstore_build(model_name, dataset, split, a.images, bs, a.workers, device,
                                                       decodes[0], **launch)
                shared_pass.append(pass_rate)
                shared_wall.append(wall_rate)
                line += f" | {a.jobs} workers ({a.launcher}) {pass_rate:.1f} img/s (end to end {wall_rate:.1f})"
            print(line)
        s, b = np.median(synth), np.median(bare)
        print(f"  medians over {a.repeats} interleaved runs ({model_name}):")
        print(f"  synthetic forward : {s:8.1f} images/s  (the backbone alone: the ceiling)")
        print(f"  bare loop         : {b:8.1f} images/s  (PIL in {a.workers} DataLoader workers + forward)")
        for d in decodes:
            f, w = np.median(build_pass[d]), np.median(build_wall[d])
            print(f"  featstore build --decode {d}: {f:8.1f} images/s  (end to end incl. model load, file check and "
                  f"store setup: {w:.1f})")
            print(f"    ratio build/bare loop : {f / b:8.3f}   (CPU goal >= 0.9)")
            print(f"    ratio build/synthetic : {f / s:8.3f}   (GPU goal >= 0.9)")
        if shared:
            f, w = np.median(build_pass[decodes[0]]), np.median(build_wall[decodes[0]])
            sf, sw = np.median(shared_pass), np.median(shared_wall)
            print(f"  shared build, {a.jobs} workers ({a.launcher}{', ' + a.devices if a.devices else ''}): "
                  f"{sf:8.1f} images/s over the pass, {sw:.1f} end to end")
            print(f"    ratio shared/one process: {sf / f:6.3f} over the pass, {sw / w:.3f} end to end")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
