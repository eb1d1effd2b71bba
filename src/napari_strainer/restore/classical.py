"""Classical baselines that ``strainer demo`` reports beside the INRs.

* :func:`bicubic`: in-plane bicubic upsampling with pixel centres aligned (the product's
  super-resolution grid);
* :func:`tv_denoise`: 2D total-variation denoising, Chambolle's (2004) projection algorithm;
* :func:`interpolate_slices`: B-spline interpolation along the slice axis (and in-plane) with
  voxel centres aligned (the product's through-plane grid, and its INR's starting point);
* :func:`bm4d_denoise`: BM4D when the optional ``bm4d`` package is installed (a benchmark-only
  extra under a non-commercial licence, never a dependency of this package).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def bicubic(low: np.ndarray, scale: int) -> np.ndarray:
    """``scale``-times bicubic upsampling of a 2D image, centres aligned (each output pixel
    sits where area-averaging ``scale x scale`` of them gives the input pixel), clipped to the
    input's range."""
    t = torch.from_numpy(np.ascontiguousarray(low, np.float32))[None, None]
    up = F.interpolate(t, scale_factor=scale, mode="bicubic", align_corners=False)[0, 0]
    return up.clamp(float(low.min()), float(low.max())).numpy()


def _grad(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward differences, zero at the last row / column (Neumann boundary)."""
    gy, gx = torch.zeros_like(u), torch.zeros_like(u)
    gy[:-1] = u[1:] - u[:-1]
    gx[:, :-1] = u[:, 1:] - u[:, :-1]
    return gy, gx


def _div(py: torch.Tensor, px: torch.Tensor) -> torch.Tensor:
    """The divergence that is minus the adjoint of :func:`_grad`."""
    d = torch.zeros_like(py)
    d[0] += py[0]
    d[1:-1] += py[1:-1] - py[:-2]
    d[-1] -= py[-2]
    d[:, 0] += px[:, 0]
    d[:, 1:-1] += px[:, 1:-1] - px[:, :-2]
    d[:, -1] -= px[:, -2]
    return d


def tv_denoise(image: np.ndarray, weight: float, iters: int = 500, tol: float = 1e-4
               ) -> np.ndarray:
    """2D isotropic total-variation denoising (ROF), Chambolle's projection algorithm.

    Minimises ``||u - image||^2 / (2 weight) + TV(u)``; ``weight`` is in the image's units
    (about the noise sigma and above removes noise; 0 returns the input). Stops after ``iters``
    iterations or when the dual variable moves by less than ``tol`` (max-norm).
    """
    f = torch.as_tensor(np.asarray(image, np.float64))
    if weight <= 0 or min(f.shape) < 2:
        return np.asarray(image, np.float32).copy()
    tau = 0.125  # Chambolle's step bound 1/8 for the 2D forward-difference gradient
    py, px = torch.zeros_like(f), torch.zeros_like(f)
    for _ in range(iters):
        gy, gx = _grad(_div(py, px) - f / weight)
        norm = 1 + tau * torch.sqrt(gy ** 2 + gx ** 2)
        ny, nx = (py + tau * gy) / norm, (px + tau * gx) / norm
        moved = max(float((ny - py).abs().max()), float((nx - px).abs().max()))
        py, px = ny, nx
        if moved < tol:
            break
    return (f - weight * _div(py, px)).float().numpy()


def interpolate_slices(volume: np.ndarray, factor: int, order: int, inplane: int = 1
                       ) -> np.ndarray:
    """B-spline interpolation (``order`` 1: linear, 3: cubic) to ``factor`` times the slices
    (axis 0) and ``inplane`` times the rows and columns, voxel centres aligned as
    :func:`~napari_strainer.io.scan.upsampled_affine` places them (edges extended). Through-plane
    super-resolution starts from it (:func:`~napari_strainer.restore.volume.superres_volume`)."""
    from scipy.ndimage import zoom

    return zoom(np.asarray(volume, np.float32), (factor, inplane, inplane), order=order,
                mode="nearest", grid_mode=True)


def bm4d_denoise(image: np.ndarray, sigma: float) -> np.ndarray | None:
    """BM4D of a 2D image (as a one-slice volume) with noise ``sigma`` (the image's units), or
    ``None`` when ``bm4d`` is not installed. (bm4d 4.2.5 crashes the process on an 8 x 8
    image; 16 x 16 works.)"""
    try:
        import bm4d
    except ImportError:
        return None
    out = bm4d.bm4d(np.asarray(image, np.float32)[:, :, None], sigma)
    return np.asarray(out, np.float32)[:, :, 0]
