"""Pretrain a STRAINER encoder: N SIRENs with shared encoder layers, one head per image."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..core.checkpoint import Encoder, load_state, save_encoder, save_state
from ..core.device import resolve_device
from ..core.fit import Progress, fit, lr_schedule
from ..core.operators import Identity
from ..core.problems import ImageProblem
from ..core.siren import BatchedSiren, SirenConfig
from ..errors import BadArgumentError, BadInputError
from ..io.intensity import Intensity, pick_slices
from ..io.scan import Scan

log = logging.getLogger(__name__)

PRETRAIN_STEPS = 500  # pretraining defaults: benchmarks/paper.py
PRETRAIN_LR = 3e-4
PRETRAIN_SCHEDULE = "cosine"


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


def pretrain(images: torch.Tensor, output: str | Path, *, config: SirenConfig | None = None,
             steps: int = PRETRAIN_STEPS, lr: float = PRETRAIN_LR,
             schedule: str = PRETRAIN_SCHEDULE, batch_coords: int | None = None,
             device: str = "auto", seed: int = 0, resume: bool = False,
             checkpoint_every: int = 100, callback: Callable[[Progress], None] | None = None,
             cancel=None, info: dict | None = None) -> Encoder:
    """Pretrain a shared encoder on ``images`` ``[N, H, W]`` (one head each) and save it.

    Adam at ``lr`` under ``schedule`` (:data:`~.core.fit.SCHEDULES`; the default cosine decay
    at 3e-4 reaches in 500 steps about the gain the paper's constant 1e-4 reaches in 2000:
    ``benchmarks/paper/README.md``).

    Training state is saved every ``checkpoint_every`` steps next to ``output`` (suffix
    ``.state.safetensors``); ``resume=True`` continues from it and ends with the same encoder
    as an uninterrupted run. A cancelled run still writes a usable encoder (and keeps the
    state for resuming).
    """
    config = config or SirenConfig()
    if steps < 1:
        raise BadArgumentError(f"--steps must be at least 1, got {steps}")
    if lr <= 0:
        raise BadArgumentError(f"--lr must be positive, got {lr}")
    lr_at = lr_schedule(schedule, lr, steps)
    output = Path(output)
    state_path = output.with_name(output.name + ".state.safetensors")
    dev = resolve_device(device)
    n, h, w = images.shape
    target = images.reshape(n, h * w, 1).to(dev)
    torch.manual_seed(seed)
    net = BatchedSiren(config, batch=n, shared=config.shared_layers, seed=seed).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    run = {"config": config.to_dict(), "images": [n, h, w], "lr": lr, "seed": seed,
           "batch_coords": batch_coords, "schedule": schedule, "steps": steps,
           "data_sha256": hashlib.sha256(images.numpy().tobytes()).hexdigest()}
    start = 0
    if resume and state_path.exists():
        start = load_state(state_path, net, opt, run)
        log.info("resuming from step %d of %s", start, state_path)
        if start > steps:
            raise BadArgumentError(f"{state_path}: already at step {start} > --steps {steps}")
    elif resume:
        log.warning("%s: no saved state, starting from step 0", state_path)

    result = fit(net, ImageProblem(target, Identity((h, w)), batch_coords=batch_coords),
                 steps=steps, lr=lr, keep_best=False, callback=callback, cancel=cancel,
                 seed=seed, optimizer=opt, start_step=start,
                 checkpoint=lambda step: save_state(state_path, net, opt, step, run),
                 checkpoint_every=checkpoint_every, lr_at=lr_at)
    loss = result.history["loss"][-1] if result.history["loss"] else None
    encoder = Encoder(config, [(a.cpu(), b.cpu()) for a, b in net.encoder_weights()], {
        "normalization": Intensity.rule(),
        "trained_on": {"images": n, "shape": [h, w], **(info or {})},
        "steps": result.steps_done, "requested_steps": steps, "final_loss": loss,
        "lr": lr, "schedule": schedule, "seed": seed, "batch_coords": batch_coords,
        "complete": not result.cancelled})
    save_encoder(encoder, output)
    if result.cancelled:
        save_state(state_path, net, opt, result.steps_done, run)
    else:
        state_path.unlink(missing_ok=True)
    return encoder

