"""A prior for through-plane super-resolution learned from the scan's own in-plane planes.

A thick-slice scan is sharp in-plane. Its in-plane planes, degraded along one in-plane axis by
the acquisition's own slice profile and slice spacing and then interpolated back with the same
cubic B-spline that upsamples the slice axis, show exactly what the through-plane axis lost.
A small residual CNN (:class:`~napari_strainer.core.cnn.ResidualCNN`) learns to undo that on
those pairs and is then applied to the through-plane planes of the cubic interpolation, both
orientations averaged (the idea of SMORE, Zhao et al. 2021, and ECLARE, Remedios et al. 2023).
Some planes are held out: the network's gain over cubic interpolation on them, in-plane, is
the prior's no-reference check (:attr:`PlanesPrior.gain_db`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from itertools import pairwise

import numpy as np
import torch

from ..core.cnn import ResidualCNN
from ..core.fit import Progress, train_network
from ..core.operators import profile_quadrature
from .classical import interpolate_slices

CHANNELS, LAYERS = 32, 6
"""The CNN's width and depth."""
PATCH, BATCH = 48, 16
"""Training patches (pixels per side) and patches per step."""
STEPS = 600
"""Adam steps of the CNN (lr :data:`LR`, cosine decay)."""
LR = 1e-3
PHASE = "in-plane prior"
"""The :class:`~napari_strainer.core.fit.Progress` phase while the prior trains."""
HOLDOUT = 0.1
"""Share of the in-plane planes held out to measure the prior's gain over cubic."""
MIN_PIXELS = 200_000
"""Fewer in-plane pixels than this (over all planes, both orientations counted once) are too
few to learn from: through-plane super-resolution then goes without the prior."""


@dataclass
class PlanesPrior:
    """The prior on the output grid and how it was learned."""

    volume: np.ndarray
    """``[slices * factor, rows, columns]``, normalised intensities."""
    gain_db: float
    """PSNR gain of the network over cubic interpolation on the held-out in-plane pairs."""
    network: ResidualCNN
    history: dict = field(default_factory=dict)


def too_small(shape: tuple[int, ...]) -> str | None:
    """Why a thick-slice scan of ``shape`` (slices first) has too few in-plane pixels to learn
    from, or None."""
    pixels = int(np.prod(shape))
    if pixels < MIN_PIXELS or min(shape[1:]) < PATCH:
        return (f"{pixels:,} in-plane pixels ({shape[0]} planes of {shape[1]} x {shape[2]}); "
                f"the learned prior needs at least {MIN_PIXELS:,} in planes of at least "
                f"{PATCH} x {PATCH}")
    return None


def degrade_rows(planes: torch.Tensor, factor: int, taps: np.ndarray, weights: np.ndarray,
                 phase: int) -> torch.Tensor:
    """Thick samples of ``planes`` ``[n, rows, cols]`` along the rows: sample ``k`` is the
    profile (``taps`` in rows from its centre, ``weights``) centred on row
    ``phase + k factor + (factor - 1) / 2``, linear between rows, edge rows repeated."""
    n_rows = planes.shape[1]
    count = (n_rows - phase) // factor
    centres = phase + np.arange(count) * factor + (factor - 1) / 2
    pos = np.clip(centres[:, None] + taps[None, :], 0, n_rows - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n_rows - 1)
    frac = pos - lo
    m = np.zeros((count, n_rows))
    for k in range(count):
        np.add.at(m[k], lo[k], weights * (1 - frac[k]))
        np.add.at(m[k], hi[k], weights * frac[k])
    return torch.einsum("kr,nrc->nkc", torch.as_tensor(m, dtype=planes.dtype), planes)


def _resample_rows(planes: np.ndarray, zoom: float) -> np.ndarray:
    """Cubic resampling along the rows by ``zoom`` (1: unchanged)."""
    if abs(zoom - 1) < 0.01:
        return planes
    from scipy.ndimage import zoom as nd_zoom

    return nd_zoom(planes, (1, zoom, 1), order=3, mode="nearest", grid_mode=True)


def training_pairs(norm: np.ndarray, factor: int, profile: str, thickness: float,
                   spacing: tuple[float, float, float]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(cubic interpolation of degraded planes, planes) for both in-plane axes and every phase
    of the slice sampling: each in-plane axis in turn is resampled to the output slice spacing
    (``spacing[0] / factor``), degraded by the slice profile (``thickness`` mm) sampled every
    ``factor`` rows and interpolated back; the degraded axis comes first, as the slice axis
    does in the through-plane planes the network is applied to."""
    step = spacing[0] / factor
    taps, weights = profile_quadrature(profile, thickness, step)
    taps = taps / step
    pairs = []
    for axis in (1, 2):
        planes = np.moveaxis(norm, axis, 1)  # [slices, degraded axis, other axis]
        planes = torch.from_numpy(np.ascontiguousarray(
            _resample_rows(planes, spacing[axis] / step), dtype=np.float32))
        for phase in range(factor):
            thick = degrade_rows(planes, factor, taps, weights, phase).numpy()
            back = interpolate_slices(thick.transpose(1, 0, 2), factor, 3).transpose(1, 0, 2)
            rows = back.shape[1]
            pairs.append((torch.from_numpy(np.ascontiguousarray(back)),
                          planes[:, phase:phase + rows].contiguous()))
    return pairs


def _sampler(pairs, planes: np.ndarray, patch: int, batch: int):
    """Draws ``batch`` random ``patch``-square crops from the given planes of the pairs."""

    def sample(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for _ in range(batch):
            i = int(torch.randint(len(pairs), (1,), generator=g))
            x, y = pairs[i]
            p = planes[int(torch.randint(len(planes), (1,), generator=g))]
            r = int(torch.randint(x.shape[1] - patch + 1, (1,), generator=g))
            c = int(torch.randint(x.shape[2] - patch + 1, (1,), generator=g))
            xs.append(x[p, r:r + patch, c:c + patch])
            ys.append(y[p, r:r + patch, c:c + patch])
        return torch.stack(xs)[:, None], torch.stack(ys)[:, None]

    return sample


def _gain_db(net: ResidualCNN, pairs, planes: np.ndarray) -> float:
    """PSNR of the network over that of its input (cubic) on ``planes`` of the pairs."""
    err_in = err_out = 0.0
    with torch.no_grad():
        for x, y in pairs:
            xi, yi = x[planes], y[planes]
            err_in += float(((xi - yi) ** 2).sum())
            err_out += float(((net.apply_planes(xi) - yi) ** 2).sum())
    return 10 * math.log10(err_in / max(err_out, 1e-20))


def learn_prior(norm: np.ndarray, factor: int, profile: str, thickness: float,
                spacing: tuple[float, float, float], *, steps: int | None = None,
                seed: int = 0,
                callback: Callable[[Progress], None] | None = None,
                cancel=None) -> PlanesPrior:
    """Learn the in-plane prior of a normalised thick-slice volume ``norm`` (slices first) and
    apply it to the through-plane planes of its cubic interpolation by ``factor``.

    Args:
        norm: ``[slices, rows, columns]``, normalised intensities.
        factor: the slice refinement.
        profile, thickness: the slice profile (``box`` or ``gaussian``) and its width in mm.
        spacing: voxel spacing in mm (slice, row, column).
        steps, seed: CNN training steps (default :data:`STEPS`) and seed.
        callback, cancel: as in :func:`~napari_strainer.core.fit.train_network`.
    """
    t0 = time.perf_counter()
    steps = STEPS if steps is None else steps
    torch.manual_seed(seed)
    pairs = training_pairs(norm, factor, profile, thickness, spacing)
    rng = np.random.default_rng(seed)
    order = rng.permutation(norm.shape[0])
    held = order[:max(1, round(HOLDOUT * len(order)))] if len(order) > 4 else order[:0]
    train = np.setdiff1d(order, held)
    net = ResidualCNN(CHANNELS, LAYERS)
    patch = min(PATCH, *(min(x.shape[1:]) for x, _ in pairs))
    report = None if callback is None else (
        lambda p: callback(replace(p, phase=PHASE)))
    res = train_network(net, _sampler(pairs, train, patch, BATCH), steps=steps, lr=LR,
                        callback=report, cancel=cancel, seed=seed)
    gain = _gain_db(net, pairs, held) if len(held) else float("nan")
    cubic = torch.from_numpy(interpolate_slices(norm, factor, 3))
    # Through-plane planes, slice axis first: (slice, column) for each row, (slice, row) for
    # each column.
    along_rows = net.apply_planes(cubic.permute(1, 0, 2).contiguous()).permute(1, 0, 2)
    along_cols = net.apply_planes(cubic.permute(2, 0, 1).contiguous()).permute(1, 2, 0)
    volume = (0.5 * (along_rows + along_cols)).numpy()
    hist = dict(res.history)
    hist.update(prior_steps=res.steps_done, prior_gain_db=gain, prior_channels=CHANNELS,
                prior_layers=LAYERS, prior_held_planes=len(held),
                prior_seconds=time.perf_counter() - t0)
    return PlanesPrior(volume, gain, net, hist)


def memory_bytes(shape: tuple[int, ...], factor: int) -> int:
    """Peak memory of :func:`learn_prior` on a thick-slice volume of ``shape``: the training
    pairs (both axes, every phase), the cubic interpolation and the two orientations' outputs,
    and the CNN's activations on one chunk of planes."""
    fine = int(np.prod(shape)) * factor
    return 4 * (4 * fine + 4 * fine) + 4 * CHANNELS * LAYERS * (1 << 19) * 2


def estimate_seconds(jobs: Sequence[tuple[tuple[int, ...], int]]) -> float:
    """Seconds :func:`learn_prior` will take on thick-slice volumes of the given shapes
    (slices first) and refinements, one after the other: three timed training steps and one
    timed pass over a plane (about a second)."""
    net = ResidualCNN(CHANNELS, LAYERS)
    x = torch.rand(BATCH, 1, PATCH, PATCH)
    seconds = train_network(net, lambda g: (x, x), steps=3, log_every=1).history["seconds"]
    per_step = min(b - a for a, b in pairwise(seconds))
    plane = torch.rand(1, 128, 128)
    t0 = time.perf_counter()
    net.apply_planes(plane)
    per_pixel = (time.perf_counter() - t0) / plane.numel()
    return sum(STEPS * per_step + 2 * per_pixel * int(np.prod(shape)) * factor
               for shape, factor in jobs)
