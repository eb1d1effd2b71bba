"""Forward operators ``A``: the fitting loop minimises ``||A(f(x)) - y||^2``, plus priors.

Images (2D or 3D pixel grids in [-1, 1]): ``f`` is rendered on the operator's ``render_shape``
grid; :class:`Identity` and :class:`AreaDownsample` map that rendering, shaped
``[batch, pixels, channels]``, to the observation grid.

Volumes in world coordinates (:mod:`.world`): :class:`Stack` is the forward operator of one
observed stack. It renders ``f`` where the stack's voxels sit (via its affine) and integrates
it over each voxel's footprint, the slice profile (box of the slice thickness, or Gaussian with
FWHM = thickness) along the stack's own normal and a box of the pixel spacing in-plane, by
quadrature points on the output grid's spacing. Thickness below the spacing (gaps) or above it
(overlaps) is modelled as is. Through-plane super-resolution is one stack, fusion several,
denoising one stack whose footprint is a single point. :class:`GridBase` is a fixed volume the
INR adds to (it then fits the residual); :class:`TVPrior` a total-variation term at random
points.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import BadArgumentError
from .world import Grid, WorldFrame

PROFILES = ("box", "gaussian")
GAUSS_REACH = 1.25
"""A Gaussian profile is sampled over +-GAUSS_REACH FWHM (+-2.9 sigma, 99.6% of its mass)."""


class Identity:
    """Plain fitting and denoising: the observation is the image itself."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = self.render_shape = tuple(shape)

    def __call__(self, pred: torch.Tensor) -> torch.Tensor:
        return pred


class AreaDownsample:
    """Super-resolution: ``A`` averages ``factor`` x ``factor`` blocks of the fine grid.

    Args:
        shape: the observed (coarse) image shape ``(rows, cols)``.
        factor: integer refinement per axis, an int or one per axis.
    """

    def __init__(self, shape: tuple[int, ...], factor: int | tuple[int, ...]):
        factors = (factor,) * len(shape) if isinstance(factor, int) else tuple(factor)
        if any(int(f) != f or f < 1 for f in factors):
            raise BadArgumentError(f"--scale must be a positive integer, got {factor}")
        self.shape = tuple(shape)
        self.factors = tuple(int(f) for f in factors)
        self.render_shape = tuple(n * f for n, f in zip(shape, self.factors))

    def __call__(self, pred: torch.Tensor) -> torch.Tensor:
        b, _, c = pred.shape
        img = pred.transpose(1, 2).reshape(b, c, *self.render_shape)
        pool = F.avg_pool2d if len(self.shape) == 2 else F.avg_pool3d
        low = pool(img, kernel_size=self.factors, stride=self.factors)
        return low.reshape(b, c, -1).transpose(1, 2)


def profile_quadrature(profile: str, width: float, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (mm, along the axis) and weights that integrate a slice profile.

    ``box``: the midpoint rule over ``width`` with about one point per ``step`` (one point when
    ``width < 1.5 step``). ``gaussian`` (FWHM = ``width``): points ``step`` apart over
    +-:data:`GAUSS_REACH` FWHM, their count of the parity of ``width / step`` so that they
    fall on an output grid whose voxels are ``step`` wide and centred as the profile is.
    """
    if profile not in PROFILES:
        raise BadArgumentError(f"slice profile must be one of {', '.join(PROFILES)}, got "
                               f"{profile!r}")
    if not width > 0 or not step > 0:
        raise BadArgumentError(f"slice thickness must be positive, got {width:g} mm")
    ratio = width / step
    if profile == "box":
        k = max(1, round(ratio)) if ratio >= 1.5 else 1
        return (np.arange(k) + 0.5) / k * width - width / 2, np.full(k, 1.0 / k)
    k = round(2 * GAUSS_REACH * ratio) + 1
    if k % 2 != round(ratio) % 2:
        k += 1
    offsets = (np.arange(k) - (k - 1) / 2) * step
    sigma = width / (2 * math.sqrt(2 * math.log(2)))
    w = np.exp(-0.5 * (offsets / sigma) ** 2)
    return offsets, w / w.sum()


class Stack:
    """Forward operator of one observed stack.

    Args:
        values: normalised voxels ``[slices, rows, columns]``.
        affine: voxel-to-mm affine of ``values``.
        frame: the network frame.
        step: quadrature spacing in mm (the output grid's spacing), one for all axes or one
            per axis of the stack (slice, row, column).
        thickness: slice thickness in mm along the stack's normal (default: the slice spacing).
        profile: ``box`` or ``gaussian`` slice profile.
        inplane: model the in-plane pixel footprint (box of the pixel spacing).
    """

    def __init__(self, values: torch.Tensor, affine: np.ndarray, frame: WorldFrame,
                 step: float | Sequence[float], *, thickness: float | None = None,
                 profile: str = "box", inplane: bool = True):
        self.values = values.reshape(-1)
        self.grid = Grid(tuple(values.shape), np.asarray(affine, np.float64))
        spacing = self.grid.spacing
        self.thickness = float(thickness or spacing[0])
        dirs = self.grid.affine[:3, :3] / np.array(spacing)
        steps = np.broadcast_to(np.asarray(step, np.float64), (3,))
        per_axis = [profile_quadrature(profile, self.thickness, steps[0])]
        for a in (1, 2):
            per_axis.append(profile_quadrature("box", spacing[a], steps[a]) if inplane
                            else (np.zeros(1), np.ones(1)))
        offs = np.zeros((1, 3))
        wts = np.ones(1)
        for a, (o, w) in enumerate(per_axis):
            offs = (offs[:, None] + o[None, :, None] * dirs[:, a]).reshape(-1, 3)
            wts = (wts[:, None] * w[None]).reshape(-1)
        to_net = frame.matrix()
        self.to_net = torch.as_tensor(to_net)
        self.offsets = torch.as_tensor(offs @ to_net[:3, :3].T, dtype=torch.float32)
        self.weights = torch.as_tensor(wts, dtype=torch.float32)
        self.normal = dirs[:, 0]

    @property
    def samples(self) -> int:
        """Quadrature points per observed voxel."""
        return len(self.weights)

    def to(self, device: torch.device) -> Stack:
        for name in ("values", "offsets", "weights", "to_net"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def points(self, flat: torch.Tensor) -> torch.Tensor:
        """Quadrature points of voxels ``flat``, ``[len(flat) * samples, 3]`` (network)."""
        centres = self.grid.points(flat, self.to_net)
        return (centres[:, None, :] + self.offsets[None]).reshape(-1, 3)

    def integrate(self, f: torch.Tensor) -> torch.Tensor:
        """``f`` at :meth:`points` (``[n * samples]``) to predicted voxel values ``[n]``."""
        return f.view(-1, self.samples) @ self.weights


class GridBase:
    """A volume on ``grid`` (e.g. a B-spline interpolation of the input) sampled trilinearly
    at network coordinates: the INR then fits the residual ``f = base + net``."""

    def __init__(self, values: torch.Tensor, grid: Grid, frame: WorldFrame):
        self.values = values.reshape(1, 1, *grid.shape).float()
        # network -> voxel index -> grid_sample's [-1, 1] (align_corners=True), axes reversed
        to_idx = np.linalg.inv(frame.matrix() @ grid.affine)
        n = np.array(grid.shape, np.float64)
        scale = np.diag([*(2 / np.maximum(n - 1, 1)), 1.0])
        scale[:3, 3] = -1
        m = (scale @ to_idx)[[2, 1, 0, 3]]
        self.m = torch.as_tensor(m[:3], dtype=torch.float32)

    def to(self, device: torch.device) -> GridBase:
        self.values, self.m = self.values.to(device), self.m.to(device)
        return self

    def __call__(self, pts: torch.Tensor) -> torch.Tensor:
        """``[n]`` values at network points ``[n, 3]`` (edge values outside the grid)."""
        g = pts @ self.m[:, :3].T + self.m[:, 3]
        out = torch.nn.functional.grid_sample(self.values, g.view(1, 1, 1, -1, 3),
                                              mode="bilinear", padding_mode="border",
                                              align_corners=True)
        return out.view(-1)


class TVPrior:
    """Total variation of ``f`` at random points of ``grid``: the mean Charbonnier norm
    ``sqrt(d^2 + eps^2)`` of finite differences ``f(x + u) - f(x)`` for each shift ``u``
    (mm vectors, typically one output voxel along an axis or a slice normal), weighted by
    ``weight``."""

    def __init__(self, grid: Grid, shifts_mm: Sequence[np.ndarray], weight: float,
                 points: int = 2048, eps: float = 1e-3):
        self.grid, self.weight, self.n, self.eps = grid, weight, points, eps
        self.dirs = np.asarray(shifts_mm, np.float64).reshape(-1, 3)

    def points(self, to_net: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """``[n * (1 + directions), 3]``: each random point, then its shifted copies."""
        base = self.grid.random_points(self.n, to_net, g)
        shift = torch.as_tensor(self.dirs @ to_net[:3, :3].cpu().numpy().T,
                                dtype=torch.float32, device=base.device)
        return torch.cat([base[:, None], base[:, None] + shift[None]], 1).reshape(-1, 3)

    def __call__(self, f: torch.Tensor) -> torch.Tensor:
        v = f.view(self.n, 1 + len(self.dirs))
        d = v[:, 1:] - v[:, :1]
        return self.weight * torch.sqrt(d * d + self.eps ** 2).mean()
