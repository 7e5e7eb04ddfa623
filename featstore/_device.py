"""Device names shared by extraction and probes: ``auto``, ``cpu``, ``cuda``, ``cuda:N``."""

from __future__ import annotations

import re
from typing import Annotated

from .errors import IncompatibleParametersError, UnknownNameError
from .params import Check

__all__ = ["resolve_device", "DEVICES", "Device"]

DEVICES = ("auto", "cpu", "cuda")
_CUDA_N = re.compile(r"cuda:\d+")


def is_device_name(name) -> bool:
    return isinstance(name, str) and (name in DEVICES or _CUDA_N.fullmatch(name) is not None)


Device = Annotated[str, Check(is_device_name, "one of " + ", ".join(map(repr, DEVICES)) + " or 'cuda:N'")]


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; a CUDA device without CUDA is an error."""
    import torch

    if not is_device_name(device):
        raise UnknownNameError("device", device, DEVICES + ("cuda:N",))
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise IncompatibleParametersError(key="device", value=device,
                                          reason="CUDA is not available here; use 'cpu' or 'auto'")
    return device
