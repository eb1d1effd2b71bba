"""Volumes in world coordinates: one INR ``f(x)`` over scanner space, seen through stacks.

* :class:`WorldFrame` is the one normalisation of millimetre coordinates into the coordinates
  the sine layers see, ``(x - centre) / half_extent``, and the rule that scales the first
  layer's omega to the output grid (:func:`grid_omega`): the product ``omega * spacing`` (in
  network units) is what decides how fine the first layer's frequencies are against a voxel,
  so a fixed omega is too coarse on a small grid and too fine on a large one.
* :class:`Grid` is a voxel grid (shape and voxel-to-mm affine): output grids, rendering in
  chunks (:func:`render_grid`), random points for regularisers.
* :class:`Stack` is the forward operator of one observed stack: it renders ``f`` where the
  stack's voxels sit (via its affine) and integrates it over each voxel's footprint, the slice
  profile (box of the slice thickness, or Gaussian with FWHM = thickness) along the stack's own
  normal and a box of the pixel spacing in-plane, by quadrature points on the output grid's
  spacing. Thickness below the spacing (gaps) or above it (overlaps) is modelled as is.
  Through-plane super-resolution is one stack, fusion several, denoising one stack whose
  footprint is a single point.
* :func:`fit_volume` fits the INR on random minibatches of observed voxels of all stacks
  (plus an optional total-variation term at random points, :class:`TVPrior`), with the
  conventions of :func:`napari_strainer.core.fit.fit`: Adam, keep-best on the (smoothed) data
  loss, an optional :class:`~napari_strainer.core.fit.StopRule`, ``Progress`` callbacks with a
  preview, ``cancel``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import BadArgumentError
from .fit import FitResult, Progress, StopRule, check_memory, make_adam
from .siren import BatchedSiren

PROFILES = ("box", "gaussian")
GAUSS_REACH = 1.25
"""A Gaussian profile is sampled over +-GAUSS_REACH FWHM (+-2.9 sigma, 99.6% of its mass)."""


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


def fit_grid(stacks: Sequence[Stack], grid: Grid, frame: WorldFrame, init: torch.Tensor, *,
             steps: int = 100, smooth: float = 3e-4, anchor: float = 0.0,
             tol: float = 1e-4, chunk: int = 1 << 16,
             callback: Callable[[Progress], None] | None = None, cancel=None) -> GridBase:
    """Least squares on the output grid through the same operators, by conjugate gradients.

    The unknown is the voxel grid itself (trilinear between voxel centres). It minimises
    ``sum over stacks of mean(data error^2) / stacks + smooth * mean(finite differences^2) +
    anchor * mean((x - init)^2)``, a quadratic, by at most ``steps`` conjugate-gradient
    iterations from ``init``, ending early once the gradient's norm is ``tol`` times its first
    (in float32, further iterations only amplify rounding). Two uses: the classical
    super-resolution reconstruction (``smooth > 0``, ``init`` the mean of the stacks'
    interpolations) and the data-consistency step after an INR
    (``anchor > 0``, ``init`` its rendering: the observed data are matched while the rest, what
    the stacks do not determine, stays the INR's). Every iteration sees every observed voxel
    (full-batch products, accumulated ``chunk`` voxels at a time, so memory stays bounded).
    Returns the fitted grid as a :class:`GridBase`.
    """
    device = init.device
    x0 = init.detach().float().reshape(grid.shape).clone()
    base = GridBase(x0, grid, frame).to(device)

    def gradient(v: torch.Tensor, affine: bool) -> tuple[torch.Tensor, float]:
        """Gradient of the objective at ``v`` (``affine``: with the data and anchor terms'
        constants; without them it is the Hessian times ``v``) and the objective."""
        vals = v.detach().clone().reshape(1, 1, *grid.shape).requires_grad_(True)
        base.values = vals
        loss = 0.0
        for s in stacks:
            n = s.values.numel()
            for start in range(0, n, chunk):
                flat = torch.arange(start, min(start + chunk, n), device=device)
                pred = s.integrate(base(s.points(flat)))
                part = (pred - s.values[flat] if affine else pred).pow(2).sum() \
                    / (n * len(stacks))
                part.backward()
                loss += float(part.detach())
        reg = smooth * sum(torch.diff(vals, dim=d).pow(2).mean() for d in (2, 3, 4))
        if anchor > 0:
            reg = reg + anchor * (vals[0, 0] - x0 if affine else vals[0, 0]).pow(2).mean()
        if reg.requires_grad:
            reg.backward()
        return vals.grad[0, 0].detach(), loss + float(reg.detach())

    x = x0.clone()
    g, objective = gradient(x, True)
    r = -g
    p = r.clone()
    rs = float((r * r).sum())
    done = rs * tol ** 2  # converged: float32 rounding would take over below this
    t0 = time.perf_counter()
    for step in range(steps):
        if callback is not None:
            callback(Progress(step, steps, objective, None, time.perf_counter() - t0,
                              lambda v=x: v[..., None].cpu()))
        if rs <= done or (cancel is not None and cancel.is_set()):
            break
        hp, _ = gradient(p, False)
        curv = float((p * hp).sum())
        if not curv > 0:
            break
        alpha = rs / curv
        x += alpha * p
        r -= alpha * hp
        objective -= 0.5 * alpha * rs
        rs_new = float((r * r).sum())
        p = r + (rs_new / rs) * p
        rs = rs_new
    base.values = x.reshape(1, 1, *grid.shape)
    return base


def _split(stacks: Sequence[Stack], holdout: float, seed: int, device
           ) -> tuple[list[torch.Tensor] | None, list[torch.Tensor]]:
    """Each stack's voxel indices split into (trained, held out); ``(None, [])`` without
    a holdout."""
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    if holdout == 0:
        return None, []
    g = torch.Generator().manual_seed(seed + 7919)
    pools, held = [], []
    for s in stacks:
        perm = torch.randperm(s.values.numel(), generator=g).to(device)
        k = max(1, round(len(perm) * holdout))
        held.append(perm[:k])
        pools.append(perm[k:])
    return pools, held


def _held_loss(net: BatchedSiren, params: dict, stacks: Sequence[Stack],
               held: Sequence[torch.Tensor], base: GridBase | None,
               chunk: int = 1 << 13) -> float:
    """Mean squared data error on the held-out voxels under ``params``."""
    from torch.func import functional_call

    total, count = 0.0, 0
    with torch.no_grad():
        for s, idx in zip(stacks, held):
            for c in range(0, len(idx), chunk):
                part = idx[c:c + chunk]
                pts = s.points(part)
                f = functional_call(net, params, (pts,))[0, :, 0]
                if base is not None:
                    f = f + base(pts)
                total += float((s.integrate(f) - s.values[part]).pow(2).sum())
                count += len(part)
    return total / count


def render_grid(net: BatchedSiren, grid: Grid, frame: WorldFrame, chunk: int = 1 << 16,
                params: dict | None = None, base: GridBase | None = None) -> torch.Tensor:
    """``net`` (plus ``base``) at every voxel centre of ``grid``, ``[slices, rows, columns]``
    float32 on the CPU, ``chunk`` voxels at a time (memory bounded whatever the grid size)."""
    from torch.func import functional_call

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


def fit_volume(net: BatchedSiren, stacks: Sequence[Stack], frame: WorldFrame, grid: Grid, *,
               steps: int, lr: float = 1e-4, batch: int = 4096, prior: TVPrior | None = None,
               base: GridBase | None = None,
               keep_best: bool = True, average: float = 0.0, holdout: float = 0.0,
               holdout_every: int = 25, patience: int = 0, stop: StopRule | None = None,
               log_every: int = 10,
               callback: Callable[[Progress], None] | None = None, cancel=None,
               monitor: Callable[[dict], float] | None = None, monitor_every: int = 0,
               seed: int = 0) -> FitResult:
    """Fit one INR (``net.batch == 1``) so that every stack's operator matches its voxels.

    Each step draws ``batch`` observed voxels over all stacks (in proportion to their voxel
    counts), renders ``f`` at their quadrature points and at the prior's random points in one
    forward pass, and takes an Adam step on ``mean(data error^2) + prior``.

    Args:
        net: one member (``batch=1``), 3 input features.
        stacks: the observations.
        frame: the network frame the stacks were built with.
        grid: the output grid (preview; ``prior`` draws its own points).
        steps: Adam updates.
        base: fit ``f = base + net`` (the net's last layer starts near zero, so the fit
            starts from ``base``).
        keep_best: keep the weights with the lowest smoothed data loss (an exponential moving
            average over steps, since minibatch losses are noisy) and return those.
        average: decay of an exponential moving average of the weights (Polyak averaging,
            0 = off). Each minibatch step jitters the weights; their average renders without
            that jitter (volume denoising: +1.4 dB, ``benchmarks/volume.py``). When on, the
            averaged weights are what the preview, the monitor, ``keep_best`` and the result
            hold.
        holdout: share of each stack's voxels left out of training (drawn with ``seed``).
            Every ``holdout_every`` steps their data loss under the current weights (the
            average when on) is measured: the error on voxels the fit never saw plus the
            noise variance, an estimate of how good the INR is that needs no noise level.
            It then replaces the smoothed training loss for ``keep_best`` and ``stop``.
        patience: with ``holdout``, end the fit when the held-out loss has not improved for
            this many steps (0: never).
        stop: stopping rule on the monitored loss (``[1]`` tensor); it freezes the kept
            weights and ends the fit.
        monitor: called every ``monitor_every`` steps (and at the end) with the current
            weights (the average when ``average`` is on), a ``functional_call`` dict; its value
            is the history's ``psnr`` (benchmarks: PSNR against the truth).
        seed: seeds the minibatches and the prior's points.

    Returns:
        A :class:`FitResult` (``best_step``/``stop_step`` of the one member); ``net`` holds
        the kept weights.
    """
    if net.batch != 1 or net.config.in_features != 3:
        raise ValueError("fit_volume fits one 3D member")
    device = net.weights[-1].device
    counts = np.array([s.values.numel() for s in stacks], np.float64)
    per = np.maximum(1, np.round(batch * counts / counts.sum())).astype(int)
    points = int(sum(n * s.samples for n, s in zip(per, stacks)))
    points += prior.n * (1 + len(prior.dirs)) if prior is not None else 0
    check_memory(net, points, device)
    to_net = torch.as_tensor(frame.matrix(), device=device)
    if base is not None:
        with torch.no_grad():
            net.weights[-1].mul_(1e-2)
            net.biases[-1].zero_()
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = make_adam(params, lr)
    named = dict(net.named_parameters())
    if not 0.0 <= average < 1.0:
        raise ValueError(f"average must be in [0, 1), got {average}")
    avg = {n: p.detach().clone() for n, p in named.items()} if average else None
    out = avg if avg is not None else {n: p.detach() for n, p in named.items()}
    snap = {n: p.clone() for n, p in out.items()} if keep_best else {}
    hist = {"iterations": [], "loss": [], "psnr": [], "seconds": []}
    result = FitResult(history=hist, best_step=[0], stop_step=[None])
    ema, best, beta = None, math.inf, 0.9
    pools, held = _split(stacks, holdout, seed, device)
    if held:
        hist["holdout_loss"] = []
    monitored = None
    t0 = time.perf_counter()

    def kept() -> dict:
        return {**out, **snap}

    def preview() -> torch.Tensor:
        return render_grid(net, grid, frame, params=kept(), base=base)[..., None]

    step = 0
    for step in range(steps + 1):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        last = step == steps
        with torch.set_grad_enabled(not last):
            if pools is None:
                flats = [torch.randint(s.values.numel(), (int(n),), generator=g).to(device)
                         for n, s in zip(per, stacks)]
            else:
                flats = [pool[torch.randint(len(pool), (int(n),), generator=g).to(device)]
                         for n, pool in zip(per, pools)]
            pts = [s.points(f) for s, f in zip(stacks, flats)]
            if prior is not None and not last:
                pts.append(prior.points(to_net, g))
            pts = torch.cat(pts)
            f = net(pts)[0, :, 0]
            if base is not None:
                f = f + base(pts)
            err, start = [], 0
            for s, fl in zip(stacks, flats):
                k = len(fl) * s.samples
                err.append(s.integrate(f[start:start + k]) - s.values[fl])
                start += k
            data = torch.cat(err).pow(2).mean()
            loss = data + prior(f[start:]) if prior is not None and not last else data
        d = float(data.detach())
        ema = d if ema is None else beta * ema + (1 - beta) * d
        fresh = not held or step % holdout_every == 0 or last
        if fresh:
            monitored = ema if not held else _held_loss(net, out, stacks, held, base)
        if fresh and monitored < best:
            best = monitored
            result.best_step = [step]
            if keep_best:
                with torch.no_grad():
                    for n, p in out.items():
                        snap[n].copy_(p)
        stopped = fresh and stop is not None and bool(stop(step, torch.tensor([monitored]))[0])
        stopped = stopped or bool(held and patience and step - result.best_step[0] >= patience)
        if stopped:
            result.stop_step = [step]
        if step % log_every == 0 or last or stopped:
            value = None
            if monitor is not None and monitor_every and (step % monitor_every == 0 or last
                                                          or stopped):
                value = monitor(out)
            hist["iterations"].append(step)
            hist["loss"].append(ema)
            if held:
                hist["holdout_loss"].append(monitored)
            hist["psnr"].append(value)
            hist["seconds"].append(time.perf_counter() - t0)
            if callback is not None:
                callback(Progress(step, steps, ema, value, hist["seconds"][-1], preview))
        if last or stopped:
            break
        if cancel is not None and cancel.is_set():
            result.cancelled = True
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if avg is not None:
            with torch.no_grad():
                for n, p in named.items():
                    avg[n].lerp_(p, 1.0 - average)
    result.steps_done = step
    net.buffers.clear()
    if keep_best or avg is not None:
        final = kept()
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(final[n])
    if not any(v is not None for v in hist["psnr"]):
        hist.pop("psnr")
    result.optimizer = optimizer
    return result
