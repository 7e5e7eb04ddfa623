"""Device names shared by extraction and probes: ``auto``, ``cpu``, ``cuda``, ``cuda:N``."""

from __future__ import annotations

from .errors import InvalidParameterError, UnknownNameError

__all__ = ["resolve_device", "DEVICES"]

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; a CUDA device without CUDA is an error."""
    import torch

    if device not in DEVICES and not str(device).startswith("cuda:"):
        raise UnknownNameError("device", device, DEVICES + ("cuda:N",))
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise InvalidParameterError(f"device={device!r} but CUDA is not available here; use 'cpu' or 'auto'")
    return device
