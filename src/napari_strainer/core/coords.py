"""Pixel-centre-aligned coordinate grids in [-1, 1].

The image covers [-1, 1] along each axis edge to edge; pixel ``i`` of ``n`` sits at
``-1 + (2 i + 1) / n``. A grid refined by an integer factor therefore samples the same physical
extent, and area-averaging ``f`` consecutive fine pixels gives exactly one coarse pixel.
"""

from __future__ import annotations

import torch


def axis(n: int, device=None) -> torch.Tensor:
    """Centres of ``n`` pixels spanning [-1, 1]."""
    return (torch.arange(n, device=device, dtype=torch.float32) * 2 + 1) / n - 1


def grid(shape: tuple[int, ...], device=None) -> torch.Tensor:
    """All pixel centres of an image of ``shape``, as ``[prod(shape), len(shape)]`` (C order)."""
    axes = [axis(n, device) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(shape))
