"""Image quality metrics."""

from __future__ import annotations

import torch


def psnr(pred: torch.Tensor, ref: torch.Tensor, data_range: float | torch.Tensor,
         dims: tuple[int, ...] = (-2, -1)) -> torch.Tensor:
    """PSNR in dB over ``dims`` (per batch member by default), on ``data_range``."""
    mse = ((pred - ref) ** 2).mean(dim=dims).clamp_min(1e-20)
    return 10 * torch.log10(torch.as_tensor(data_range, dtype=mse.dtype) ** 2 / mse)
