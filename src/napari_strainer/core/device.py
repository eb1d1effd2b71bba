"""Which device a job runs on."""

from __future__ import annotations

import torch

from ..errors import BadArgumentError


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` is CUDA when present, else CPU; ``cuda``/``cuda:N``/``cpu`` are checked."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise BadArgumentError(f"--device: unknown device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadArgumentError(f"--device {device}: CUDA is not available on this machine")
    return dev



def describe_device(device: torch.device) -> str:
    """``"cpu (2 threads)"`` or the CUDA device's name."""
    return f"cpu ({torch.get_num_threads()} threads)" if device.type == "cpu" else str(device)
