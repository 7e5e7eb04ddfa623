"""Where a GPU build's input pipeline spends its time: decoding and preprocessing rates, measured
side by side on ImageNet-like JPEGs (500x375, quality 90) for resnet50's eval transform.

    python benchmarks/bench_decode.py [--images 512] [--workers N] [--device cuda]

* one process: PIL decode + the model's eval transform (what each DataLoader worker does with
  --decode pil); torchvision's CPU decode_jpeg alone (libjpeg-turbo);
* the device: decode_jpeg on batches of 256 (nvJPEG on CUDA), alone and with the resize, crop
  and normalisation of --decode device;
* transport: a DataLoader whose workers return ready tensors (no decoding): float32 at 224 px
  (what --decode pil ships) and the files' bytes one tensor per file; and a thread pool in the
  main process reading the files' bytes (what --decode device does).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from torch.utils.data import DataLoader

from bench_build import write_jpeg_folder
from featstore import create_backbone, default_workers, make_transforms, resolve_device, resolve_transform
from featstore._decode import DevicePreprocess
from featstore.datasets import open_image


class _Ready:
    def __init__(self, n, make):
        self.n, self.make = n, make

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.make(i)


def _rate(fn, n, device):
    fn()  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--device", default="auto")
    a = p.parse_args()
    device = resolve_device(a.device)
    workers = default_workers(device) if a.workers is None else a.workers
    from torchvision.io import ImageReadMode, decode_jpeg

    with tempfile.TemporaryDirectory() as tmp:
        write_jpeg_folder(tmp, a.images)
        files = sorted(os.path.join(r, f) for r, _, fs in os.walk(tmp) for f in fs)
        net, _ = create_backbone("resnet50", "random")
        eval_tf, _ = make_transforms(resolve_transform(net))
        blobs = [torch.frombuffer(bytearray(open(f, "rb").read()), dtype=torch.uint8) for f in files]
        few = files[:128]
        print(f"device={device} workers={workers} images={len(files)} (500x375 JPEG, quality 90), resnet50 eval transform")
        r = _rate(lambda: [eval_tf(open_image(f)) for f in few], len(few), "cpu")
        print(f"one process, PIL decode + eval transform : {r:8.1f} images/s  (x {workers} workers = {r * workers:.0f})")
        r = _rate(lambda: [decode_jpeg(b, mode=ImageReadMode.RGB) for b in blobs[:128]], 128, "cpu")
        print(f"one process, torchvision CPU decode only : {r:8.1f} images/s  (x {workers} workers = {r * workers:.0f})")
        batch = blobs[:256]
        r = _rate(lambda: decode_jpeg(batch, mode=ImageReadMode.RGB, device=device), len(batch), device)
        print(f"device decode_jpeg, batches of {len(batch)}      : {r:8.1f} images/s")
        pre = DevicePreprocess(eval_tf, device)
        r = _rate(lambda: pre(batch), len(batch), device)
        print(f"device decode + resize/crop/normalise    : {r:8.1f} images/s  (--decode device, main process)")
        for name, make in (("float32 3x224x224", lambda i: torch.zeros(3, 224, 224)),
                           ("uint8 file bytes", lambda i: blobs[i % len(blobs)].clone())):
            n = 4096
            loader = DataLoader(_Ready(n, make), batch_size=256, num_workers=workers, pin_memory=device.startswith("cuda"),
                                collate_fn=None if "float" in name else (lambda items: items))
            t0 = time.perf_counter()
            for x in loader:
                if isinstance(x, torch.Tensor):
                    x.to(device, non_blocking=True)
            print(f"DataLoader transport only, {name:18s}: {n / (time.perf_counter() - t0):8.1f} images/s")
        from concurrent.futures import ThreadPoolExecutor

        def read(i):
            with open(files[i % len(files)], "rb") as f:
                return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)

        n = 4096
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max(2, workers)) as pool:
            list(pool.map(read, range(n), chunksize=64))
        print(f"threads reading file bytes (--decode device): {n / (time.perf_counter() - t0):8.1f} images/s")


if __name__ == "__main__":
    main()
