"""Pretrain an initialisation for fitting: a STRAINER encoder (N SIRENs with shared encoder
layers, one head per image), a whole SIREN meta-learned by Reptile, or an encoder meta-learned
by Reptile (each task's head solved afresh)."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..core.checkpoint import Encoder, load_state, save_encoder, save_state
from ..core.device import resolve_device
from ..core.fit import Progress, cosine_lr, fit, lr_schedule
from ..core.head import solve_head
from ..core.operators import Identity
from ..core.problems import ImageProblem, render
from ..core.siren import BatchedSiren, SirenConfig, init_layer
from ..errors import BadArgumentError, BadInputError
from ..io.intensity import Intensity, pick_slices
from ..io.scan import Scan

log = logging.getLogger(__name__)

METHODS = ("strainer", "reptile", "reptile-encoder")
"""Pretraining methods: a shared STRAINER encoder, a Reptile-meta-learned whole network, or a
Reptile-meta-learned encoder (STRAINER's shared layers; the file holds them only)."""
PRETRAIN_STEPS = 500  # STRAINER's defaults: benchmarks/paper.py
PRETRAIN_LR = 3e-4
PRETRAIN_SCHEDULE = "cosine"
REPTILE_STEPS = 200  # Reptile's defaults (both variants): benchmarks/pretrain_method.py
REPTILE_LR = 2e-4
REPTILE_INNER = 10
REPTILE_BATCH = 1
"""Images per outer step. On CPU a batch of m members costs m single fits (or more), and at
equal time 4 images per step for 50 steps ended 3.2 dB (step 10) and 6.6 dB (step 100) below
1 image for 200 steps (``benchmarks/README.md``, section ``pretrain_method``)."""


def training_slices(scans: Sequence[Scan], *, size: int | None = None,
                    max_slices: int = 10) -> torch.Tensor:
    """Up to ``max_slices`` evenly spaced non-empty slices per scan, normalised per scan
    (:meth:`Intensity.for_scan`) and
    resampled to ``size`` x ``size`` (``None`` keeps the slice size, which must then agree).

    Returns ``[N, H, W]`` float32.
    """
    if max_slices < 1:
        raise BadArgumentError(f"--max-slices must be at least 1, got {max_slices}")
    if size is not None and size < 2:
        raise BadArgumentError(f"--size must be at least 2, got {size}")
    out = []
    for scan in scans:
        norm = Intensity.for_scan(scan).forward(np.nan_to_num(scan.data))
        picked = pick_slices(norm, max_slices)
        if not picked:
            raise BadInputError(f"{scan.source or 'a scan'}: no non-empty slice to train on")
        for z in picked:
            t = torch.from_numpy(norm[z])[None, None]
            if size is not None and tuple(t.shape[-2:]) != (size, size):
                t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True,
                                  align_corners=False)
            out.append(t[0, 0])
    shapes = {tuple(t.shape) for t in out}
    if len(shapes) > 1:
        raise BadArgumentError(f"training slices differ in size {sorted(shapes)}; pass --size N")
    return torch.stack(out)


def pretrain(images: torch.Tensor, output: str | Path, *, method: str = "strainer",
             config: SirenConfig | None = None, steps: int | None = None,
             lr: float | None = None, schedule: str = PRETRAIN_SCHEDULE,
             batch_coords: int | None = None, device: str = "auto", seed: int = 0,
             resume: bool = False, checkpoint_every: int = 100,
             callback: Callable[[Progress], None] | None = None, cancel=None,
             info: dict | None = None) -> Encoder:
    """Pretrain an initialisation on ``images`` ``[N, H, W]`` and save it.

    ``method`` (one of :data:`METHODS`):

    * ``"strainer"``: a shared encoder with one head per image, ``steps`` Adam steps (default
      :data:`PRETRAIN_STEPS`) at ``lr`` (default :data:`PRETRAIN_LR`) under ``schedule``
      (:data:`~.core.fit.SCHEDULES`; the default cosine decay at 3e-4 reaches in 500 steps
      about the gain the paper's constant 1e-4 reaches in 2000: ``benchmarks/paper/README.md``).
      The file holds the encoder; a fit's head starts afresh.
    * ``"reptile"``: a whole SIREN meta-learned by Reptile (:func:`reptile`), ``steps`` outer
      steps (default :data:`REPTILE_STEPS`), inner Adam at ``lr`` (default
      :data:`REPTILE_LR`), the outer step size decaying from 1 under ``schedule``. The file
      holds every layer, head included.
    * ``"reptile-encoder"``: Reptile of the first ``config.shared_layers`` layers only (the
      encoder), same defaults; each task's head is solved afresh (:func:`reptile`,
      ``layers``). The file holds the encoder, as STRAINER's does.

    Training state is saved every ``checkpoint_every`` steps next to ``output`` (suffix
    ``.state.safetensors``); ``resume=True`` continues from it and ends with the same weights
    as an uninterrupted run. A cancelled run still writes a usable file (and keeps the
    state for resuming).
    """
    if method not in METHODS:
        raise BadArgumentError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    config = config or SirenConfig()
    reptile_ = method.startswith("reptile")
    steps = (REPTILE_STEPS if reptile_ else PRETRAIN_STEPS) if steps is None else steps
    lr = (REPTILE_LR if reptile_ else PRETRAIN_LR) if lr is None else lr
    if steps < 1:
        raise BadArgumentError(f"--steps must be at least 1, got {steps}")
    if lr <= 0:
        raise BadArgumentError(f"--lr must be positive, got {lr}")
    rate_at = lr_schedule(schedule, 1.0 if reptile_ else lr, steps)  # Reptile: outer step size
    if reptile_ and rate_at is None:  # constant: the outer step size stays 1
        rate_at = lambda step: 1.0
    output = Path(output)
    state_path = output.with_name(output.name + ".state.safetensors")
    dev = resolve_device(device)
    n, h, w = images.shape
    target = images.reshape(n, h * w, 1).to(dev)
    torch.manual_seed(seed)
    run = {"config": config.to_dict(), "images": [n, h, w], "lr": lr, "seed": seed,
           "batch_coords": batch_coords, "schedule": schedule, "steps": steps,
           "data_sha256": hashlib.sha256(images.numpy().tobytes()).hexdigest()}
    layers = config.shared_layers if method == "reptile-encoder" else config.layers
    if reptile_:
        net = BatchedSiren(config, batch=1, seed=seed).to(dev)  # theta, as one member
        opt = None
        run.update(method=method, inner=REPTILE_INNER, meta_batch=REPTILE_BATCH)
    else:
        net = BatchedSiren(config, batch=n, shared=config.shared_layers, seed=seed).to(dev)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
    start = 0
    if resume and state_path.exists():
        start = load_state(state_path, net, opt, run)
        log.info("resuming from step %d of %s", start, state_path)
        if start > steps:
            raise BadArgumentError(f"{state_path}: already at step {start} > --steps {steps}")
    elif resume:
        log.warning("%s: no saved state, starting from step 0", state_path)

    def checkpoint(step: int) -> None:
        save_state(state_path, net, opt, step, run)

    if reptile_:
        done, loss, cancelled = reptile(
            net, target, (h, w), steps=steps, lr=lr, inner=REPTILE_INNER,
            meta_batch=REPTILE_BATCH, eps_at=rate_at, batch_coords=batch_coords, seed=seed,
            layers=layers, start_step=start, callback=callback, cancel=cancel,
            checkpoint=checkpoint, checkpoint_every=checkpoint_every)
        weights = [(a[0].detach().cpu(), b[0].detach().cpu())
                   for a, b in zip(net.weights[:layers], net.biases[:layers])]
        extra = {"inner_steps": REPTILE_INNER, "meta_batch": min(REPTILE_BATCH, n)}
    else:
        result = fit(net, ImageProblem(target, Identity((h, w)), batch_coords=batch_coords),
                     steps=steps, lr=lr, keep_best=False, callback=callback, cancel=cancel,
                     seed=seed, optimizer=opt, start_step=start, checkpoint=checkpoint,
                     checkpoint_every=checkpoint_every, lr_at=rate_at)
        done, cancelled = result.steps_done, result.cancelled
        loss = result.history["loss"][-1] if result.history["loss"] else None
        weights = [(a.cpu(), b.cpu()) for a, b in net.encoder_weights()]
        extra = {}
    encoder = Encoder(config, weights, {
        "method": method, "normalization": Intensity.rule(),
        "trained_on": {"images": n, "shape": [h, w], **(info or {})},
        "steps": done, "requested_steps": steps, "final_loss": loss,
        "lr": lr, "schedule": schedule, "seed": seed, "batch_coords": batch_coords, **extra,
        "complete": not cancelled})
    save_encoder(encoder, output)
    if cancelled:
        checkpoint(done)
    else:
        state_path.unlink(missing_ok=True)
    return encoder


def reptile(theta: BatchedSiren, target: torch.Tensor, shape: tuple[int, int], *, steps: int,
            lr: float = REPTILE_LR, inner: int = REPTILE_INNER, meta_batch: int = REPTILE_BATCH,
            eps_at: Callable[[int], float] | None = None, batch_coords: int | None = None,
            seed: int = 0, layers: int | None = None, start_step: int = 0,
            callback: Callable[[Progress], None] | None = None, cancel=None,
            checkpoint: Callable[[int], None] | None = None,
            checkpoint_every: int = 0) -> tuple[int, float | None, bool]:
    """Reptile (Nichol et al. 2018) of the first ``layers`` layers of a SIREN ``theta`` (one
    member), in place; ``None``: the whole network.

    Each outer step picks ``meta_batch`` of the ``N`` images ``target`` ``[N, H * W, 1]``
    (step-indexed, so resuming is exact), starts one member per image from ``theta``, runs
    ``inner`` Adam steps at ``lr`` on all of them as one batched fit (:func:`~.core.fit.fit`)
    and moves ``theta``'s first ``layers`` layers by ``eps_at(step)`` (default: from 1 to 0
    along a cosine) towards the mean of the adapted members. With fewer layers than the
    network's (an encoder), the members' other layers start each task afresh, as fitting from
    an encoder does: a step-seeded SIREN initialisation and the head solved on the image
    (:func:`~.core.head.solve_head`); they are discarded after the step.

    Returns ``(steps done, last mean inner loss, cancelled)``.
    """
    n = target.shape[0]
    m = min(meta_batch, n)
    eps_at = eps_at or cosine_lr(1.0, steps)
    config = theta.config
    layers = config.layers if layers is None else layers
    members = BatchedSiren(config, batch=m, seed=seed).to(target.device)
    loss, t0 = None, time.perf_counter()

    def preview() -> torch.Tensor:  # an encoder alone renders nothing: the adapted members
        return render(theta if layers == config.layers else members, shape)

    for step in range(start_step, steps):
        if checkpoint is not None and checkpoint_every and step > start_step \
                and step % checkpoint_every == 0:
            checkpoint(step)
        if cancel is not None and cancel.is_set():
            return step, loss, True
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        pick = torch.randperm(n, generator=g)[:m].to(target.device)
        with torch.no_grad():
            for i in range(config.layers):
                w, b = ((theta.weights[i], theta.biases[i]) if i < layers
                        else init_layer(config, i, m, g))  # a fresh head for the task
                members.weights[i].copy_(w.expand_as(members.weights[i]))
                members.biases[i].copy_(b.expand_as(members.biases[i]))
        if layers < config.layers:
            solve_head(members, target[pick], Identity(shape))
        res = fit(members, ImageProblem(target[pick], Identity(shape),
                                        batch_coords=batch_coords),
                  steps=inner, lr=lr, keep_best=False, log_every=inner, seed=seed + step)
        loss = res.history["loss"][-1]
        with torch.no_grad():
            for i in range(layers):
                for p, q in ((theta.weights[i], members.weights[i]),
                             (theta.biases[i], members.biases[i])):
                    p.add_(q.mean(0, keepdim=True) - p, alpha=eps_at(step))
        if callback is not None:
            callback(Progress(step + 1, steps, loss, None, time.perf_counter() - t0, preview))
    return steps, loss, False
