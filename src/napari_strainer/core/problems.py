"""What the fitting loop (:func:`~napari_strainer.core.fit.fit`) fits: observations, the
operator that predicts them from the INR, and what a step, a validation and a preview are.

* :class:`ImageProblem`: images on pixel grids in [-1, 1] (pretraining, the slice path), seen
  through an image operator (identity, area downsampling), all pixels or random coordinate
  minibatches per step, optional held-out pixels scored at every step.
* :class:`StackProblem`: a volume in world coordinates seen through one or more
  :class:`~napari_strainer.core.operators.Stack` operators (through-plane super-resolution,
  fusion, volume denoising), random voxel minibatches per step, an optional total-variation
  prior, an optional fixed base volume, optional held-out voxels validated every few steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch.func import functional_call

from .coords import grid
from .metrics import psnr
from .operators import GridBase, Identity, Stack, TVPrior
from .siren import BatchedSiren
from .world import Grid, WorldFrame, render_grid


class Step(NamedTuple):
    """One evaluation of a problem."""

    loss: torch.Tensor
    """Scalar to minimise (all members, priors included)."""
    data: torch.Tensor
    """``[batch]`` data loss per member on the trained observations."""
    held: torch.Tensor | None = None
    """``[batch]`` loss on held-out observations, when this step scores them."""


def render(net: BatchedSiren, shape: tuple[int, ...], params: dict | None = None,
           budget_bytes: int = 256 << 20) -> torch.Tensor:
    """Evaluate ``net`` on the pixel grid of ``shape`` in chunks; returns ``[batch, *shape, out]``.

    Peak activation memory stays near ``budget_bytes`` whatever the grid size.
    """
    device = net.weights[-1].device
    coords = grid(shape, device)
    per_pixel = 4 * net.batch * net.config.width * 3
    chunk = max(256, budget_bytes // per_pixel)
    out = torch.empty(net.batch, coords.shape[0], net.config.out_features, device=device)
    with torch.no_grad():
        for s in range(0, coords.shape[0], chunk):
            c = coords[s:s + chunk]
            out[:, s:s + chunk] = net(c) if params is None else functional_call(net, params, (c,))
    return out.reshape(net.batch, *shape, -1)


class ImageProblem:
    """Images ``target`` ``[batch, pixels, channels]`` = ``operator(f(grid))``.

    Args:
        target: observations on the operator's observation grid, one image per member.
        operator: forward operator (default: identity on ``target``'s grid, which must then be
            given through ``operator``; see :mod:`.operators`).
        batch_coords: random coordinates per step (identity operator only); None = all.
        holdout: bool mask ``[batch or 1, observed pixels]`` of observations left out of the
            training loss; every step scores them (history ``val_loss``).
        reference: clean image ``[batch, pixels, channels]`` on the ``view`` grid, for PSNR.
        data_range: PSNR data range (scalar or per member).
        view: the grid of previews and of ``reference`` (default: the operator's render grid).
    """

    validates = False
    smooth = 0.0

    def __init__(self, target: torch.Tensor, operator=None, *, batch_coords: int | None = None,
                 holdout: torch.Tensor | None = None, reference: torch.Tensor | None = None,
                 data_range: float | torch.Tensor = 1.0, view: tuple[int, ...] | None = None):
        self.target, self.operator = target, operator or Identity(())
        self.render_shape = tuple(self.operator.render_shape)
        self.coords = grid(self.render_shape, target.device)
        if batch_coords and not isinstance(self.operator, Identity):
            raise ValueError("random-coordinate minibatches need the identity operator")
        self.batch_coords = batch_coords if batch_coords and batch_coords < len(
            self.coords) else None
        self.keep = None
        if holdout is not None:
            self.keep = (~holdout.to(target.device)).to(target.dtype).expand(
                target.shape[0], -1).unsqueeze(-1)
        self.reference, self.data_range = reference, data_range
        self.view = tuple(view or self.render_shape)
        self._pred = None

    @property
    def points_per_step(self) -> int:
        return min(self.batch_coords or len(self.coords), len(self.coords))

    def prepare(self, net: BatchedSiren) -> None:
        """Nothing to adjust before the fit."""

    def step(self, net: BatchedSiren, step: int, g: torch.Generator, last: bool) -> Step:
        if self.batch_coords:
            idx = torch.randint(len(self.coords), (self.batch_coords,), generator=g).to(
                self.target.device)
            pred = net(self.coords[idx])
            err = pred - self.target[:, idx]
            w = None if self.keep is None else self.keep[:, idx]
        else:
            pred = net(self.coords)
            err = self.operator(pred) - self.target
            w = self.keep
        self._pred = pred
        if w is None:
            data = err.pow(2).mean(dim=(1, 2))
            return Step(data.sum(), data)
        sq = err.pow(2).mean(dim=2, keepdim=True)
        data = (sq * w).sum(dim=(1, 2)) / w.sum(dim=(1, 2)).clamp_min(1)
        with torch.no_grad():
            held = (sq * (1 - w)).sum(dim=(1, 2)) / (1 - w).sum(dim=(1, 2)).clamp_min(1)
        return Step(data.sum(), data, held)

    def score(self, net: BatchedSiren, params: dict, step: int, final: bool) -> float | None:
        """Mean PSNR of the current weights against ``reference`` (None without one)."""
        if self.reference is None:
            return None
        b = net.batch
        full = self._pred.detach() if not self.batch_coords and self.view == \
            self.render_shape else render(net, self.view).reshape(b, -1, self._pred.shape[-1])
        return psnr(full, self.reference, self.data_range, dims=(1, 2)).mean().item()

    def preview(self, net: BatchedSiren, params: dict) -> torch.Tensor:
        return render(net, self.view, params)

    def finish(self) -> None:
        self._pred = None


class StackProblem:
    """One 3D INR (``net.batch == 1``) whose rendering, through every stack's operator,
    matches that stack's voxels.

    Each step draws ``batch`` observed voxels over all stacks (in proportion to their voxel
    counts), renders ``f`` at their quadrature points and at the prior's random points in one
    forward pass; the loss is ``mean(data error^2) + prior``.

    Args:
        stacks: the observations.
        frame: the network frame the stacks were built with.
        grid: the output grid (previews; ``prior`` draws its own points).
        batch: observed voxels per step.
        prior: optional :class:`~.operators.TVPrior`.
        base: fit ``f = base + net`` (:meth:`prepare` scales the net's last layer down so the
            fit starts from ``base``).
        holdout: share of each stack's voxels left out of training (drawn with ``seed``); the
            loop validates them (:meth:`validate`): the error on voxels the fit never saw plus
            the noise variance, an estimate of quality that needs no noise level.
        monitor: called every ``monitor_every`` logged steps (and at the end) with the current
            weights, a ``functional_call`` dict; its value is the history's ``psnr``
            (benchmarks: PSNR against the truth).
        seed: draws the held-out voxels.
    """

    smooth = 0.9
    """Minibatch losses are noisy: the loop logs and monitors their moving average."""

    def __init__(self, stacks: Sequence[Stack], frame: WorldFrame, grid: Grid, *,
                 batch: int = 4096, prior: TVPrior | None = None, base: GridBase | None = None,
                 holdout: float = 0.0, monitor: Callable[[dict], float] | None = None,
                 monitor_every: int = 0, seed: int = 0):
        if not 0.0 <= holdout < 1.0:
            raise ValueError(f"holdout must be in [0, 1), got {holdout}")
        self.stacks, self.frame, self.grid = list(stacks), frame, grid
        self.prior, self.base = prior, base
        self.monitor, self.monitor_every = monitor, monitor_every
        counts = np.array([s.values.numel() for s in self.stacks], np.float64)
        self.per = np.maximum(1, np.round(batch * counts / counts.sum())).astype(int)
        self.device = self.stacks[0].values.device
        self.to_net = torch.as_tensor(frame.matrix(), device=self.device)
        self.pools, self.held = _split(self.stacks, holdout, seed, self.device)
        self.validates = bool(self.held)

    @property
    def points_per_step(self) -> int:
        n = int(sum(k * s.samples for k, s in zip(self.per, self.stacks)))
        return n + (self.prior.n * (1 + len(self.prior.dirs)) if self.prior is not None else 0)

    def prepare(self, net: BatchedSiren) -> None:
        """Checks the net; with a base, the net's last layer starts near zero."""
        if net.batch != 1 or net.config.in_features != 3:
            raise ValueError("a StackProblem fits one 3D member")
        if self.base is not None:
            with torch.no_grad():
                net.weights[-1].mul_(1e-2)
                net.biases[-1].zero_()

    def step(self, net: BatchedSiren, step: int, g: torch.Generator, last: bool) -> Step:
        if self.pools is None:
            flats = [torch.randint(s.values.numel(), (int(n),), generator=g).to(self.device)
                     for n, s in zip(self.per, self.stacks)]
        else:
            flats = [pool[torch.randint(len(pool), (int(n),), generator=g).to(self.device)]
                     for n, pool in zip(self.per, self.pools)]
        pts = [s.points(f) for s, f in zip(self.stacks, flats)]
        prior = self.prior if not last else None
        if prior is not None:
            pts.append(prior.points(self.to_net, g))
        pts = torch.cat(pts)
        f = net(pts)[0, :, 0]
        if self.base is not None:
            f = f + self.base(pts)
        err, start = [], 0
        for s, fl in zip(self.stacks, flats):
            k = len(fl) * s.samples
            err.append(s.integrate(f[start:start + k]) - s.values[fl])
            start += k
        data = torch.cat(err).pow(2).mean()
        loss = data + prior(f[start:]) if prior is not None else data
        return Step(loss, data.reshape(1))

    def validate(self, net: BatchedSiren, params: dict, chunk: int = 1 << 13) -> torch.Tensor:
        """Mean squared data error on the held-out voxels under ``params``, ``[1]`` float64."""
        total, count = 0.0, 0
        with torch.no_grad():
            for s, idx in zip(self.stacks, self.held):
                for c in range(0, len(idx), chunk):
                    part = idx[c:c + chunk]
                    pts = s.points(part)
                    f = functional_call(net, params, (pts,))[0, :, 0]
                    if self.base is not None:
                        f = f + self.base(pts)
                    total += float((s.integrate(f) - s.values[part]).pow(2).sum())
                    count += len(part)
        return torch.tensor([total / count], dtype=torch.float64)

    def score(self, net: BatchedSiren, params: dict, step: int, final: bool) -> float | None:
        """The monitor's value every ``monitor_every`` steps and at the end, else None."""
        if self.monitor is None or not self.monitor_every:
            return None
        if final or step % self.monitor_every == 0:
            return self.monitor(params)
        return None

    def preview(self, net: BatchedSiren, params: dict) -> torch.Tensor:
        return render_grid(net, self.grid, self.frame, params=params, base=self.base)[..., None]

    def finish(self) -> None:
        """Nothing cached."""


def _split(stacks: Sequence[Stack], holdout: float, seed: int, device
           ) -> tuple[list[torch.Tensor] | None, list[torch.Tensor]]:
    """Each stack's voxel indices split into (trained, held out); ``(None, [])`` without
    a holdout."""
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
