"""One place that turns a --device value into a device this machine has, or a one-line error."""

from __future__ import annotations

import torch

from multitoken.errors import UserError

DEVICE_CHOICES = "cpu, cuda, cuda:N, mps or auto"


def resolve_device(device: str | None) -> str:
    """`device` checked against this machine; "auto" (or None) means the GPU when there is one."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}: use {DEVICE_CHOICES}") from None
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown device {device!r}: use {DEVICE_CHOICES}")
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (parsed.index or 0) >= count:
            raise UserError(f"device {device!r} is not available here ({count} CUDA devices)")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {device!r} is not available here")
    return device
