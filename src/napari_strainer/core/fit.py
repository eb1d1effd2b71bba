"""The one fitting loop: pretraining (N heads), slices, volumes, every task.

:func:`fit` minimises a problem's loss (:mod:`.problems`: images through an image operator,
or a volume through stack operators, plus priors) over the members ``b`` of a
:class:`~napari_strainer.core.siren.BatchedSiren` with Adam. Each member's loss only reaches
its own (batched) weights, so B slices fitted together behave as B independent fits.

Safeguards: the loop keeps, per member, a snapshot of the weights with the lowest monitored
loss seen so far (``keep_best``), and hands back that snapshot, never a worse iterate; an
optional stopping rule freezes a member's snapshot once it fires (denoising, convergence,
patience on held-out data). The monitored loss is the data loss, or the loss on held-out
observations the fit never trains on (self-validation). Weight averaging, progress, preview,
cancel and checkpoints are options and hooks, so the CLI, napari and the MONAI bundle share
this code.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import BadArgumentError
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


def fit(net: BatchedSiren, problem, *, steps: int, lr: float = 1e-4, keep_best: bool = True,
        average: float = 0.0, smooth: float | None = None, validate_every: int = 25,
        stop: StopRule | None = None, log_every: int = 10,
        callback: Callable[[Progress], None] | None = None, cancel=None, seed: int = 0,
        optimizer: torch.optim.Optimizer | None = None, start_step: int = 0,
        checkpoint: Callable[[int], None] | None = None, checkpoint_every: int = 0,
        lr_at: Callable[[int], float] | None = None) -> FitResult:
    """Fit ``net`` to ``problem`` (:class:`~.problems.ImageProblem` or
    :class:`~.problems.StackProblem`) with Adam.

    The monitored loss that picks the kept weights and feeds ``stop`` is, per member: the
    held-out loss when the problem validates held-out observations (every
    ``validate_every`` steps and at the end, under the averaged weights when ``average`` is
    on) or scores them at every step, else the data loss (smoothed by ``smooth``).

    Args:
        net: the members to fit (its frozen layers have ``requires_grad=False``).
        problem: observations, operator, minibatches, priors (:mod:`.problems`).
        steps: number of Adam updates (the loss is also evaluated after the last one).
        lr: Adam learning rate.
        keep_best: keep and return each member's weights with the lowest monitored loss.
        average: decay of an exponential moving average of the weights (Polyak averaging,
            0 = off). Minibatch steps jitter the weights; their average renders without that
            jitter. When on, the averaged weights are what the preview, the validation,
            ``keep_best`` and the result hold.
        smooth: decay of the exponential moving average of the data loss that is logged and,
            without held-out data, monitored (0 = off; default: the problem's ``smooth``,
            0.9 for the minibatches of a :class:`~.problems.StackProblem`).
        validate_every: steps between validations of a validating problem.
        stop: optional per-member stopping rule (sees the monitored loss when it is fresh).
        log_every: updates between history entries and callbacks.
        callback: receives a :class:`Progress`.
        cancel: object with ``is_set()``; checked every step, the kept weights are returned.
        seed: seeds the minibatches (step-indexed, so resuming is exact).
        optimizer: an Adam to continue (resume); a new one otherwise.
        start_step: the number of updates already done (resume).
        checkpoint: called with the step every ``checkpoint_every`` updates.
        lr_at: learning rate of the update at each step (e.g. :func:`cosine_lr`); step-indexed,
            so resuming is exact. None: ``lr`` throughout.

    Returns:
        A :class:`FitResult`; ``net`` holds the kept weights.
    """
    device = net.weights[-1].device
    check_memory(net, problem.points_per_step, device)
    problem.prepare(net)
    smooth = problem.smooth if smooth is None else smooth
    if not 0.0 <= average < 1.0:
        raise ValueError(f"average must be in [0, 1), got {average}")
    params = [p for p in net.parameters() if p.requires_grad]
    if optimizer is None:
        optimizer = make_adam(params, lr)
    b = net.batch
    named = dict(net.named_parameters())
    avg = {n: p.detach().clone() for n, p in named.items()} if average else None
    out = avg if avg is not None else {n: p.detach() for n, p in named.items()}
    # Snapshots of the trainable per-member weights (shared ones are frozen, or pretraining).
    snap_names = [n for n, p in named.items() if p.requires_grad and not _is_shared(net, n)]
    snap = {n: out[n].clone() for n in snap_names} if keep_best else {}
    best_loss = torch.full((b,), float("inf"), dtype=torch.float64, device=device)
    best_step = torch.zeros(b, dtype=torch.long, device=device)
    active = torch.ones(b, dtype=torch.bool, device=device)
    stop_step = torch.full((b,), -1, dtype=torch.long, device=device)
    hist = {"iterations": [], "loss": [], "psnr": [], "seconds": []}
    t0 = time.perf_counter()
    result = FitResult(history=hist)
    ema = monitored = None

    def kept() -> dict:
        return {**out, **snap}

    def preview() -> torch.Tensor:
        return problem.preview(net, kept())

    step = start_step
    tf32 = _allow_tf32(device)
    for step in range(start_step, steps + 1):
        if checkpoint is not None and checkpoint_every and step > start_step \
                and step % checkpoint_every == 0:
            checkpoint(step)
        last = step == steps
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        # The loss after the last update only picks the kept weights: no graph for it.
        with torch.set_grad_enabled(not last and torch.is_grad_enabled()):
            st = problem.step(net, step, g, last)
        data = st.data.detach().double()
        ema = data if ema is None or not smooth else smooth * ema + (1 - smooth) * data
        fresh = not problem.validates or step % validate_every == 0 or last
        if problem.validates and fresh:
            monitored = problem.validate(net, out).to(device)
        elif st.held is not None:
            monitored = st.held.detach().double()
        elif not problem.validates:
            monitored = ema
        stopped_now = False
        with torch.no_grad():
            if fresh:
                improved = (monitored < best_loss) & active
                best_loss = torch.where(improved, monitored, best_loss)
                best_step = torch.where(improved, step, best_step)
                if keep_best:
                    for n in snap_names:
                        mask = improved.view(-1, *([1] * (named[n].dim() - 1)))
                        torch.where(mask, out[n], snap[n], out=snap[n])
            if stop is not None and fresh:
                now = stop(step, monitored) & active
                stop_step = torch.where(now, step, stop_step)
                active = active & ~now
                stopped_now = bool(now.any()) and not bool(active.any())
        if step % log_every == 0 or last or stopped_now:
            hist["iterations"].append(step)
            hist["loss"].append(ema.mean().item())
            if st.held is not None or problem.validates:
                hist.setdefault("val_loss", []).append(monitored.mean().item())
            hist["psnr"].append(problem.score(net, out, step, last or stopped_now))
            hist["seconds"].append(time.perf_counter() - t0)
            if callback is not None:
                callback(Progress(step, steps, hist["loss"][-1], hist["psnr"][-1],
                                  hist["seconds"][-1], preview))
        if last or (stop is not None and not bool(active.any())):
            break
        if cancel is not None and cancel.is_set():
            result.cancelled = True
            break
        optimizer.zero_grad(set_to_none=True)
        st.loss.backward()
        if lr_at is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
        optimizer.step()
        if avg is not None:
            with torch.no_grad():
                for n, p in named.items():
                    avg[n].lerp_(p, 1.0 - average)
    if tf32 is not None:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    result.steps_done = step
    net.buffers.clear()
    problem.finish()
    if keep_best or avg is not None:
        final = kept()
        with torch.no_grad():
            for n in (named if avg is not None else snap_names):
                named[n].copy_(final[n])
    if not any(v is not None for v in hist["psnr"]):
        hist.pop("psnr")
    result.best_step = best_step.tolist()
    result.stop_step = [None if s < 0 else int(s) for s in stop_step.tolist()]
    result.optimizer = optimizer
    return result


def train_network(model: torch.nn.Module, sample: Callable[[torch.Generator], tuple],
                  *, steps: int, lr: float = 1e-3, log_every: int = 10,
                  callback: Callable[[Progress], None] | None = None,
                  preview: Callable[[], torch.Tensor] | None = None,
                  cancel=None, seed: int = 0) -> FitResult:
    """Train a plain network (e.g. :class:`~.cnn.ResidualCNN`) on pairs that ``sample`` draws:
    the mean squared error of ``model(inputs)`` against ``targets``, Adam at ``lr`` decaying
    along half a cosine (:func:`cosine_lr`) over ``steps`` updates. The loss, progress and
    cancel follow :func:`fit`; the model holds its last weights afterwards."""
    opt = make_adam(list(model.parameters()), lr)
    schedule = cosine_lr(lr, steps)
    g = torch.Generator().manual_seed(seed)
    hist: dict[str, list] = {"iterations": [], "loss": [], "seconds": []}
    result = FitResult(history=hist)
    t0, ema = time.perf_counter(), None
    model.train()
    for step in range(steps):
        if cancel is not None and cancel.is_set():
            result.cancelled = True
            break
        inputs, targets = sample(g)
        loss = (model(inputs) - targets).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = schedule(step)
        opt.step()
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        result.steps_done = step + 1
        if (step + 1) % log_every == 0 or step + 1 == steps:
            hist["iterations"].append(step + 1)
            hist["loss"].append(ema)
            hist["seconds"].append(time.perf_counter() - t0)
            if callback is not None:
                callback(Progress(step + 1, steps, ema, None, hist["seconds"][-1],
                                  preview or (lambda: torch.empty(0))))
    model.eval()
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
