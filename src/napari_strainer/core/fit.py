"""The one fitting loop: pretraining (N heads), test-time fitting, super-resolution, denoising.

It minimises ``sum_b mean ||A(f_b(x)) - y_b||^2`` over the members ``b`` of a
:class:`~napari_strainer.core.siren.BatchedSiren` with Adam. Each member's loss only reaches
its own (batched) weights, so B slices fitted together behave as B independent fits.

Safeguards: the loop keeps, per member, a snapshot of the weights with the lowest monitored
loss seen so far (``keep_best``), and hands back that snapshot, never a worse iterate; an
optional stopping rule freezes a member's snapshot once it fires (denoising, convergence).
The monitored loss is the data loss, or, with a ``holdout`` mask, the loss on held-out
observed pixels that the fit never trains on (self-validation). Progress, preview,
cancel and checkpoints are hooks, so the CLI, napari and the MONAI bundle share this code.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.func import functional_call

from ..errors import BadArgumentError
from .coords import grid
from .metrics import psnr
from .operators import Identity
from .siren import BatchedSiren, SirenConfig


@dataclass
class Progress:
    """What the loop reports every ``log_every`` updates."""

    step: int
    total: int
    loss: float
    psnr: float | None
    seconds: float
    preview: Callable[[], torch.Tensor]
    """Renders the current kept snapshot on the render grid, ``[batch, *shape, out]``."""
    slices: tuple[int, int] | None = None
    """Scan-level callers: the slices ``[first, stop)`` this fit covers."""
    phase: str = ""
    """Scan-level callers: what runs (``"probe siren"``, ``"encoder-freeze3"``, ...)."""


@dataclass
class FitResult:
    """History and outcome of :func:`fit`. The net holds the kept weights afterwards."""

    history: dict[str, list] = field(default_factory=dict)
    best_step: list[int] = field(default_factory=list)
    stop_step: list[int | None] = field(default_factory=list)
    steps_done: int = 0
    cancelled: bool = False
    optimizer: torch.optim.Optimizer | None = None


class StopRule:
    """Decides per member when to stop. ``__call__`` gets the step and the per-member
    monitored loss ``[batch]`` (held-out loss with a ``holdout`` mask, else the data loss)
    and returns a bool mask of members to stop now."""

    reason = "stopping rule"

    def __call__(self, step: int, loss: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class PlateauStop(StopRule):
    """Convergence: stop a member once its monitored loss has not improved by a factor
    ``1 - rel_tol`` for ``patience`` steps. The state persists across :func:`fit` calls
    that continue one run."""

    def __init__(self, patience: int = 50, rel_tol: float = 0.01):
        self.patience, self.rel_tol = patience, rel_tol
        self.reason = (f"converged (monitored loss improved < {rel_tol:.0%} in {patience} "
                       f"steps)")
        self._best: torch.Tensor | None = None
        self._since: torch.Tensor | None = None

    def __call__(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        if self._best is None:
            self._best = torch.full_like(loss, float("inf"))
            self._since = torch.full_like(loss, step, dtype=torch.long)
        better = loss < self._best * (1 - self.rel_tol)
        self._best = torch.where(better, loss, self._best)
        self._since = torch.where(better, step, self._since)
        return step - self._since >= self.patience


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


def fit(net: BatchedSiren, target: torch.Tensor, *, steps: int, operator=None,
        lr: float = 1e-4, batch_coords: int | None = None, keep_best: bool = True,
        stop: StopRule | None = None, reference: torch.Tensor | None = None,
        data_range: float | torch.Tensor = 1.0, log_every: int = 10,
        callback: Callable[[Progress], None] | None = None, cancel=None, seed: int = 0,
        optimizer: torch.optim.Optimizer | None = None, start_step: int = 0,
        checkpoint: Callable[[int], None] | None = None, checkpoint_every: int = 0,
        holdout: torch.Tensor | None = None,
        lr_at: Callable[[int], float] | None = None,
        view: tuple[int, ...] | None = None) -> FitResult:
    """Fit ``net`` so that ``operator(net(grid)) ~ target``.

    Args:
        net: the members to fit (its frozen layers have ``requires_grad=False``).
        target: observations ``[batch, pixels, channels]`` on the operator's observation grid.
        steps: number of Adam updates (the loss is also evaluated after the last one).
        operator: forward operator (default identity on ``target``'s grid, which must then be
            passed through ``operator``; see :mod:`.operators`).
        lr: Adam learning rate.
        batch_coords: random coordinates per step (identity operator only); None = all.
        keep_best: keep and return each member's weights with the lowest monitored loss.
        stop: optional per-member stopping rule (sees the monitored loss).
        reference: clean image ``[batch, pixels, channels]`` on the render grid, for PSNR.
        data_range: PSNR data range (scalar or per member).
        log_every: updates between history entries and callbacks.
        callback: receives a :class:`Progress`.
        cancel: object with ``is_set()``; checked every step, the kept weights are returned.
        seed: seeds the coordinate sampling (step-indexed, so resuming is exact).
        optimizer: an Adam to continue (resume); a new one otherwise.
        start_step: the number of updates already done (resume).
        checkpoint: called with the step every ``checkpoint_every`` updates.
        holdout: bool mask ``[batch or 1, observed pixels]`` of observations left out of the
            training loss; their loss (history ``val_loss``) is then the monitored loss.
        lr_at: learning rate of the update at each step (e.g. :func:`cosine_lr`); step-indexed,
            so resuming is exact. None: ``lr`` throughout.
        view: the grid of previews and of ``reference`` (default: the operator's render grid;
            another grid, e.g. the fine one while fitting the coarse pixels, is rendered).

    Returns:
        A :class:`FitResult`; ``net`` holds the kept weights.
    """
    device = target.device
    operator = operator or Identity(())
    pixels = math.prod(operator.render_shape)
    check_memory(net, min(batch_coords or pixels, pixels), device)
    coords = grid(operator.render_shape, device)
    if batch_coords and not isinstance(operator, Identity):
        raise ValueError("random-coordinate minibatches need the identity operator")
    if batch_coords and batch_coords >= coords.shape[0]:
        batch_coords = None
    params = [p for p in net.parameters() if p.requires_grad]
    if optimizer is None:
        optimizer = make_adam(params, lr)
    b = net.batch
    named = dict(net.named_parameters())
    # Snapshots of the trainable per-member weights (shared ones are frozen, or pretraining).
    snap_names = [n for n, p in named.items() if p.requires_grad and not _is_shared(net, n)]
    snap = {n: named[n].detach().clone() for n in snap_names} if keep_best else {}
    best_loss = torch.full((b,), float("inf"), device=device)
    best_step = torch.zeros(b, dtype=torch.long, device=device)
    active = torch.ones(b, dtype=torch.bool, device=device)
    stop_step = torch.full((b,), -1, dtype=torch.long, device=device)
    hist = {"iterations": [], "loss": [], "psnr": [], "seconds": []}
    keep = None
    if holdout is not None:
        keep = (~holdout.to(device)).to(target.dtype).expand(b, -1).unsqueeze(-1)
        hist["val_loss"] = []
    t0 = time.perf_counter()
    result = FitResult(history=hist)

    def kept_params() -> dict:
        return {**{n: p.detach() for n, p in named.items()}, **snap}

    view = tuple(view or operator.render_shape)

    def preview() -> torch.Tensor:
        return render(net, view, kept_params() if keep_best else None)

    step = start_step
    tf32 = _allow_tf32(device)
    for step in range(start_step, steps + 1):
        if checkpoint is not None and checkpoint_every and step > start_step \
                and step % checkpoint_every == 0:
            checkpoint(step)
        # The loss after the last update only picks the kept weights: no graph for it.
        with torch.set_grad_enabled(step < steps and torch.is_grad_enabled()):
            if batch_coords:
                g = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + step)
                idx = torch.randint(coords.shape[0], (batch_coords,), generator=g).to(device)
                pred = net(coords[idx])
                err = pred - target[:, idx]
                w = None if keep is None else keep[:, idx]
            else:
                pred = net(coords)
                err = operator(pred) - target
                w = keep
            if w is None:
                loss_per = monitor = err.pow(2).mean(dim=(1, 2))
            else:
                sq = err.pow(2).mean(dim=2, keepdim=True)
                loss_per = (sq * w).sum(dim=(1, 2)) / w.sum(dim=(1, 2)).clamp_min(1)
                with torch.no_grad():
                    monitor = (sq * (1 - w)).sum(dim=(1, 2)) / (1 - w).sum(
                        dim=(1, 2)).clamp_min(1)
        with torch.no_grad():
            if keep_best:
                improved = (monitor < best_loss) & active
                best_loss = torch.where(improved, monitor, best_loss)
                best_step = torch.where(improved, step, best_step)
                for n in snap_names:
                    mask = improved.view(-1, *([1] * (named[n].dim() - 1)))
                    torch.where(mask, named[n], snap[n], out=snap[n])
            if stop is not None:
                now = stop(step, monitor.detach()) & active
                stop_step = torch.where(now, step, stop_step)
                active = active & ~now
        log_now = step % log_every == 0 or step == steps
        if log_now:
            entry_psnr = None
            if reference is not None:
                full = pred.detach() if not batch_coords and view == tuple(
                    operator.render_shape) else render(net, view).reshape(b, -1, pred.shape[-1])
                entry_psnr = psnr(full, reference, data_range, dims=(1, 2)).mean().item()
            hist["iterations"].append(step)
            hist["loss"].append(loss_per.detach().mean().item())
            if keep is not None:
                hist["val_loss"].append(monitor.mean().item())
            hist["psnr"].append(entry_psnr)
            hist["seconds"].append(time.perf_counter() - t0)
            if callback is not None:
                callback(Progress(step, steps, hist["loss"][-1], entry_psnr,
                                  hist["seconds"][-1], preview))
        if step == steps:
            break
        if cancel is not None and cancel.is_set():
            result.cancelled = True
            break
        if stop is not None and not bool(active.any()):
            break
        optimizer.zero_grad(set_to_none=True)
        loss_per.sum().backward()
        if lr_at is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
        optimizer.step()
    if tf32 is not None:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    result.steps_done = step
    net.buffers.clear()
    if keep_best:
        with torch.no_grad():
            for n in snap_names:
                named[n].copy_(snap[n])
    if not any(hist["psnr"]):
        hist.pop("psnr")
    result.best_step = best_step.tolist()
    result.stop_step = [None if s < 0 else int(s) for s in stop_step.tolist()]
    result.optimizer = optimizer
    return result


SCHEDULES = ("cosine", "constant")
"""Learning-rate schedules of pretraining (:func:`lr_schedule`)."""


def cosine_lr(lr: float, steps: int) -> Callable[[int], float]:
    """``lr`` decaying to 0 along half a cosine over ``steps`` updates."""
    return lambda step: lr * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))


def warmup_lr(lr: float, steps: int) -> Callable[[int], float]:
    """``lr`` reached linearly over the first ``steps`` updates (``lr / steps`` at the first)."""
    return lambda step: lr * min(1.0, (step + 1) / steps)


def lr_schedule(name: str, lr: float, steps: int) -> Callable[[int], float] | None:
    """The ``lr_at`` of :func:`fit` for schedule ``name`` (one of :data:`SCHEDULES`)."""
    if name not in SCHEDULES:
        raise BadArgumentError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {name!r}")
    return cosine_lr(lr, steps) if name == "cosine" else None


def _allow_tf32(device: torch.device) -> bool | None:
    """TF32 matmuls on Ampere-or-newer GPUs during the fit; returns the previous setting
    (run on an H200 in ``benchmarks/gpu.py``); CPU runs are unaffected."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 8:
        return None
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    return old


def make_adam(params: list, lr: float) -> torch.optim.Optimizer:
    """Adam with the fused kernel (one pass over all parameters; 5x faster than ``foreach``
    on CPU, measured in ``benchmarks/speed.py``) where torch has it, else the default."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


def activation_bytes(config: SirenConfig, members: int, pixels: int) -> int:
    """Upper bound on the memory of one training step over ``pixels`` coordinates for
    ``members`` INRs: per sine layer, the two ``[members, pixels, width]`` tensors kept for
    backward, counted in float32 (bfloat16 kernels keep half), plus two transient ones (GPU;
    CPU runs pixel chunks). Parameters and Adam are small in comparison."""
    return 4 * members * pixels * config.width * (2 * (config.layers - 1) + 2)


def available_bytes(device: torch.device) -> int:
    """Free memory for tensors: CUDA free memory plus what this process's caching allocator
    holds unused (an earlier fit's blocks, reusable), or the OS's available RAM on CPU."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(torch.cuda.mem_get_info(device)[0]) + int(cached)
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return 1 << 62  # unknown: do not refuse


def check_memory(net: BatchedSiren, pixels: int, device: torch.device) -> None:
    """Refuse, before allocating, a step that cannot fit in memory (BadArgumentError)."""
    need, free = activation_bytes(net.config, net.batch, pixels), available_bytes(device)
    if need > free:
        raise BadArgumentError(
            f"fitting {net.batch} member(s) on {pixels} pixels each needs about "
            f"{need / 2**30:.1f} GiB ({need / net.batch / 2**30:.1f} GiB per slice) on "
            f"{device}, but only {free / 2**30:.1f} GiB is free; use fewer slices per batch, "
            f"random-coordinate minibatches (batch_coords), a smaller image or width, or "
            f"another device")


def _is_shared(net: BatchedSiren, name: str) -> bool:
    return int(name.split(".")[1]) < net.shared
