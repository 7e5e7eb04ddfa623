"""``--decode device``: the clean pass's JPEG files decoded and preprocessed on the build's device.

On a GPU, decoding in DataLoader workers (PIL) is what bounds a build: one H200 runs resnet50
at ~14,700 images/s on tensors already there, while 15 workers decode and resize ~1,000
ImageNet-like JPEGs/s. With ``decode="device"`` the workers only read each file's bytes;
``torchvision.io.decode_jpeg`` decodes a whole batch on the device (nvJPEG on CUDA,
libjpeg-turbo on the CPU: the fallback, and what the CPU tests run), and the model's own eval
transforms (timm's Resize and CenterCrop, then scaling and Normalize) run on the decoded
tensors there, images of one size together.

What the device path does not take goes through the usual PIL pipeline, per file: non-JPEG
files, JPEGs that are neither RGB nor greyscale (CMYK), JPEGs with an EXIF rotation, anything
the device decoder refuses, sources without files, and the augmented views (their random
transforms are PIL's). The pixels differ from PIL's by rounding (a level or two of 255 after
resizing), so the choice is part of a group's key.
"""

from __future__ import annotations

import io
from typing import Literal, get_args

from .errors import IncompatibleParametersError

JPEG_MAGIC = b"\xff\xd8\xff"
Decode = Literal["pil", "device"]
DECODE_MODES = get_args(Decode)


def raw_jpeg(path) -> bytes | None:
    """The file's bytes when the device path can take it (a JPEG in RGB or greyscale with no
    EXIF rotation), else None. Reads only the header beyond the bytes themselves."""
    from PIL import Image

    from ._images import read_image_bytes

    data = read_image_bytes(path)
    if not data.startswith(JPEG_MAGIC):
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "JPEG" or img.mode not in ("RGB", "L") or img.getexif().get(0x0112, 1) != 1:
                return None
    except Exception:  # the PIL path reports what is wrong with it, naming the file
        return None
    return data


class DevicePreprocess:
    """The model's eval transform (a torchvision Compose of Resize, CenterCrop, ToTensor and
    Normalize, as timm builds it) applied to JPEG bytes, decoded on ``device``.

    Raises IncompatibleParametersError, before any work, when the transform holds a step that
    only runs on PIL images.
    """

    def __init__(self, eval_tf, device: str):
        import warnings

        import torchvision.transforms as T

        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                                category=DeprecationWarning)  # torchvision >= 0.29 points to TorchCodec
        self.device = device
        self.geometry, self.normalize = [], None
        stage = "geometry"
        for t in getattr(eval_tf, "transforms", [eval_tf]):
            name = type(t).__name__
            if isinstance(t, (T.Resize, T.CenterCrop)) and stage == "geometry":
                self.geometry.append(t)
            elif name in ("ToTensor", "MaybeToTensor", "PILToTensor") and stage == "geometry":
                stage = "scaled"
            elif isinstance(t, T.Normalize) and stage == "scaled" and self.normalize is None:
                self.normalize = t
            else:
                raise IncompatibleParametersError(
                    key="decode", value="device",
                    reason=f"the model's eval preprocessing has {name} where the device path takes Resize / "
                           f"CenterCrop, then ToTensor and Normalize; build with --decode pil")

    def __call__(self, blobs: list) -> list:
        """Preprocessed (3, H, W) float tensors on the device, one per JPEG in ``blobs`` (uint8
        tensors of file bytes); None where the decoder refused a file (the PIL path takes it)."""
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            images = decode_jpeg(blobs, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:  # one file the decoder refuses fails the batch: decode one by one
            images = []
            for b in blobs:
                try:
                    images.append(decode_jpeg(b, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    images.append(None)
        out: list = [None] * len(images)
        by_size: dict[tuple, list[int]] = {}
        for i, img in enumerate(images):
            if img is not None:
                by_size.setdefault(tuple(img.shape), []).append(i)
        for _, members in by_size.items():  # images of one size are resized as one batch
            x = torch.stack([images[i] for i in members])
            for t in self.geometry:
                x = t(x)
            x = x.float().div_(255.0)
            if self.normalize is not None:
                x = self.normalize(x)
            for j, i in enumerate(members):
                out[i] = x[j]
        return out
