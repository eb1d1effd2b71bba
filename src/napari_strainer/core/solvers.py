"""Least squares on a voxel grid through the stack operators, by conjugate gradients: the
classical super-resolution reconstruction and the data-consistency step after an INR."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from .fit import Progress
from .operators import GridBase, Stack
from .world import Grid, WorldFrame


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
