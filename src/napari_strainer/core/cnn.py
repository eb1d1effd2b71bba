"""A small residual CNN for 2D planes: the through-plane prior's network
(:mod:`napari_strainer.restore.planes`)."""

from __future__ import annotations

import torch
from torch import nn


class ResidualCNN(nn.Module):
    """``x + net(x)`` with ``net`` a stack of ``layers`` 3x3 convolutions of ``channels``
    features and ReLUs (one input and one output channel); input and output ``[n, 1, h, w]``.
    The last convolution starts at a tenth of PyTorch's default scale, so the untrained
    network is near the identity (at zero no gradient would reach the layers before it)."""

    def __init__(self, channels: int = 48, layers: int = 8):
        super().__init__()
        convs: list[nn.Module] = [nn.Conv2d(1, channels, 3, padding=1), nn.ReLU()]
        for _ in range(layers - 2):
            convs += [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU()]
        last = nn.Conv2d(channels, 1, 3, padding=1)
        with torch.no_grad():
            last.weight.mul_(0.1)
            last.bias.zero_()
        self.net = nn.Sequential(*convs, last)
        self.channels, self.layers = channels, layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)

    @torch.no_grad()
    def apply_planes(self, planes: torch.Tensor, chunk_pixels: int = 1 << 19) -> torch.Tensor:
        """The network on a stack of planes ``[n, h, w]``, a few planes at a time (at most
        about ``chunk_pixels`` pixels per pass, so memory stays bounded)."""
        n, h, w = planes.shape
        per = max(1, chunk_pixels // (h * w))
        out = torch.empty_like(planes)
        for s in range(0, n, per):
            out[s:s + per] = self(planes[s:s + per, None])[:, 0]
        return out
