"""Volumes in world coordinates: one INR ``f(x)`` over scanner space.

* :class:`WorldFrame` is the one normalisation of millimetre coordinates into the coordinates
  the sine layers see, ``(x - centre) / half_extent``, and :func:`grid_omega` the rule that
  scales the first layer's omega to the output grid: the product ``omega * spacing`` (in
  network units) decides how fine the first layer's frequencies are against a voxel, so a
  fixed omega is too coarse on a small grid and too fine on a large one.
* :class:`Grid` is a voxel grid (shape and voxel-to-mm affine): output grids, rendering in
  chunks (:func:`render_grid`), random points for regularisers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.func import functional_call

from .siren import BatchedSiren


def _affine_t(affine: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(affine, np.float64))


class WorldFrame:
    """Network coordinates ``(x_mm - centre) / half_extent``: the box around ``points_mm``
    maps into [-1, 1] (its longest side edge to edge)."""

    def __init__(self, points_mm: np.ndarray):
        pts = np.asarray(points_mm, np.float64).reshape(-1, 3)
        lo, hi = pts.min(0), pts.max(0)
        self.centre = (lo + hi) / 2
        self.half = float(max((hi - lo).max() / 2, 1e-6))

    def matrix(self) -> np.ndarray:
        """4x4 map from mm to network coordinates."""
        m = np.eye(4) / self.half
        m[:3, 3] = -self.centre / self.half
        m[3, 3] = 1
        return m

    def to_dict(self) -> dict:
        return {"centre_mm": self.centre.tolist(), "half_extent_mm": self.half}


def grid_omega(omega_voxel: float, spacing_mm: float, frame: WorldFrame) -> float:
    """First-layer omega for a grid of ``spacing_mm``: ``omega_voxel`` radians per voxel."""
    return omega_voxel * frame.half / spacing_mm


@dataclass
class Grid:
    """A voxel grid: ``shape`` (slice, row, column) and its voxel-to-mm ``affine``."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    def corners_mm(self) -> np.ndarray:
        """The 8 outer corners of the grid's voxels (the extent it covers), ``[8, 3]`` mm."""
        idx = np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in self.shape], indexing="ij"))
        idx = idx.reshape(3, -1).T
        return idx @ self.affine[:3, :3].T + self.affine[:3, 3]

    def points(self, flat: torch.Tensor, to_net: torch.Tensor) -> torch.Tensor:
        """Network coordinates of the voxel centres with C-order indices ``flat``."""
        _, r, c = self.shape
        idx = torch.stack([flat // (r * c), (flat // c) % r, flat % c], -1).to(torch.float64)
        return _apply(to_net @ _affine_t(self.affine).to(to_net.device), idx)

    def random_points(self, n: int, to_net: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """``n`` uniform random points inside the grid's extent, network coordinates."""
        idx = torch.rand(n, 3, generator=g, dtype=torch.float64) * torch.tensor(
            self.shape, dtype=torch.float64) - 0.5
        return _apply(to_net.cpu() @ _affine_t(self.affine), idx).to(to_net.device)


def _apply(m: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``m`` (4x4, float64) applied to index rows ``[n, 3]``; float32 result."""
    return (idx.to(m.device) @ m[:3, :3].T + m[:3, 3]).float()




def render_grid(net: BatchedSiren, grid: Grid, frame: WorldFrame, chunk: int = 1 << 16,
                params: dict | None = None, base: Callable[[torch.Tensor], torch.Tensor] | None = None
                ) -> torch.Tensor:
    """``net`` (plus ``base``, e.g. a :class:`~.operators.GridBase`) at every voxel centre of ``grid``, ``[slices, rows, columns]``
    float32 on the CPU, ``chunk`` voxels at a time (memory bounded whatever the grid size)."""
    device = net.weights[-1].device
    to_net = torch.as_tensor(frame.matrix(), device=device)
    out = torch.empty(grid.size, dtype=torch.float32)
    with torch.no_grad():
        for s in range(0, grid.size, chunk):
            flat = torch.arange(s, min(s + chunk, grid.size), device=device)
            pts = grid.points(flat, to_net)
            v = (net(pts) if params is None else functional_call(net, params, (pts,)))[0, :, 0]
            out[s:s + len(flat)] = (v if base is None else v + base(pts)).cpu()
    return out.reshape(grid.shape)
