"""Scan-level jobs built on the core: pretrain an encoder, restore (fit / super-resolve / denoise)
a scan slice by slice. Every front end (CLI, napari widgets, MONAI bundle) calls these.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .cards import warn_modality
from .core.checkpoint import Encoder, load_encoder, load_state, save_encoder, save_state
from .core.fit import (
    PlateauStop,
    Progress,
    activation_bytes,
    available_bytes,
    fit,
    lr_schedule,
    render,
    warmup_lr,
)
from .core.head import WARMUP_STEPS, solve_head
from .core.operators import AreaDownsample, Identity
from .core.siren import BatchedSiren, SirenConfig
from .errors import BadArgumentError, BadInputError, CheckpointError
from .io.scan import Scan, upsampled_affine
from .routes import PROBE_STEPS, Route, candidates, holdout_mask, member_params, race

log = logging.getLogger(__name__)

DEFAULT_ENCODER = Path(__file__).parent / "encoders" / "mri_default.safetensors"
TASKS = ("fit", "superres", "denoise")
# Layers kept fixed at test time, per task (chosen by benchmarks/inverse on brain MRI; the
# paper fine-tunes everything, i.e. 0). Capped at the encoder's shared layers minus one.
DEFAULT_FREEZE = {"fit": 0, "superres": 3, "denoise": 4}
DEFAULT_STEPS = {"fit": 500, "superres": 240, "denoise": 300}
# super-resolution first fits the observed pixels at their own centres (the coarse grid: 1/S^2
# of a step's cost), then goes on through the exact area operator with the same Adam state:
# on 4 neighbouring 96 x 96 T1 slices x2, 200 coarse + 40 exact steps end 1.0 dB below SIREN's
# 500 exact steps (39.12 against 40.08 dB) in a quarter of their time, within a paper loop's
# 100 iterations per slice (benchmarks/README.md#defaults)
COARSE_STEPS = 200
INITS = ("auto", "fixed")
# how an encoder route's head starts: "solved" (ridge regression on the encoder features)
# for fitting, where it lifts step 0 from 8 to 31 dB; through super-resolution it ends
# 0.4 dB lower and as a denoiser it fits the noise, so there the head stays random
HEADS = ("solved", "random")
DEFAULT_HOLDOUT = 0.1  # share of observed pixels held out to choose the route and stop
# convergence stop of fitting: (steps, relative gain) without which a slice has converged
PATIENCE = {"fit": (50, 0.01)}  # benchmarks/defaults.py
# tasks whose auto route races a warm start from the neighbouring slice on the second batch
# (for super-resolution it wins the short race, then ends 4 dB below SIREN on 96 x 96 T1
# slices: benchmarks/README.md#defaults)
WARM_TASKS = ("fit", "denoise")
PRETRAIN_STEPS = 500  # pretraining defaults: benchmarks/paper.py (issue 12)
PRETRAIN_LR = 3e-4
PRETRAIN_SCHEDULE = "cosine"
SELF_STEPS = 300  # --encoder self: pretraining steps on the scan's own slices
SELF_MIN_SLICES = 3
MAX_OUTPUT_VOXELS = 2**31 // 4  # a float32 output above 2 GiB is refused
LOW_PCT, HIGH_PCT = 0.5, 99.5
HU_WINDOW = (-1024.0, 3071.0)  # CT: the 12-bit CT range in Hounsfield units maps to [0, 1]
CPU_BATCH_PIXELS = 16384


def default_freeze(task: str, shared_layers: int | None) -> int:
    """The freeze depth a task uses by default with an encoder of ``shared_layers`` layers
    (``None``: no encoder, nothing to freeze); at least one encoder layer stays trainable."""
    if shared_layers is None:
        return 0
    return max(0, min(DEFAULT_FREEZE[task], shared_layers - 1))


def coarse_phase(scale: int, steps: int, coarse_steps: int | None = None) -> int:
    """Steps of super-resolution's coarse phase: ``coarse_steps``, by default
    :data:`COARSE_STEPS` but at most 5/6 of ``steps``; none without super-resolution."""
    if scale == 1:
        return 0
    if coarse_steps is None:
        return min(COARSE_STEPS, steps * 5 // 6)
    return min(coarse_steps, steps)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` is CUDA when present, else CPU; ``cuda``/``cuda:N``/``cpu`` are checked."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise BadArgumentError(f"--device: unknown device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadArgumentError(f"--device {device}: CUDA is not available on this machine")
    return dev


@dataclass
class Intensity:
    """Intensity normalisation to [0, 1]: robust per-scan percentiles (``[p0.5, p99.5]`` maps
    to [0, 1]) for every scan but CT; CT (DICOM modality CT, read in Hounsfield units) uses the
    fixed window ``HU_WINDOW`` instead, with which CT encoders transfer better to unseen CT
    slices (benchmarks/ct_normalization.py)."""

    low: float
    high: float
    method: str = "robust_percentile"

    @classmethod
    def for_scan(cls, scan: Scan) -> Intensity:
        """The normalisation of ``scan``: ``HU_WINDOW`` for CT, :meth:`of` its data otherwise."""
        if scan.modality.upper() == "CT":
            return cls(*HU_WINDOW, method="hu_window")
        return cls.of(scan.data)

    @staticmethod
    def rule() -> dict:
        """The normalisation rule as an encoder records it (what :meth:`for_scan` does)."""
        return {**Intensity(0.0, 1.0).to_dict(), "CT": Intensity(*HU_WINDOW, "hu_window")
                .to_dict()}

    @classmethod
    def of(cls, data: np.ndarray) -> Intensity:
        """Robust per-scan percentiles of ``data``."""
        finite = data[np.isfinite(data)]
        if finite.size == 0:
            raise BadInputError("scan has no finite voxel values")
        lo, hi = np.percentile(finite, [LOW_PCT, HIGH_PCT])
        if hi <= lo:
            lo, hi = float(finite.min()), float(finite.max())
        return cls(float(lo), float(hi) if hi > lo else float(lo) + 1.0)

    def forward(self, data: np.ndarray) -> np.ndarray:
        return ((np.asarray(data, np.float32) - self.low) / (self.high - self.low)).astype(
            np.float32)

    def inverse(self, norm: np.ndarray, dtype: np.dtype) -> np.ndarray:
        out = norm.astype(np.float64) * (self.high - self.low) + self.low
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            out = np.clip(np.rint(out), info.min, info.max)
        return out.astype(dtype)

    def to_dict(self) -> dict:
        if self.method == "hu_window":
            return {"method": "fixed_window", "window": list(HU_WINDOW), "units": "HU",
                    "target_range": [0.0, 1.0]}
        return {"method": "robust_percentile", "low_percentile": LOW_PCT,
                "high_percentile": HIGH_PCT, "target_range": [0.0, 1.0]}


# ----------------------------------------------------------------------------- pretraining
def busy_slices(norm: np.ndarray) -> list[int]:
    """Non-empty slices of a normalised scan: > 5% of pixels above 10% of the range."""
    return [z for z in range(norm.shape[0]) if (norm[z] > 0.1).mean() > 0.05]


def pick_slices(norm: np.ndarray, max_slices: int) -> list[int]:
    """Up to ``max_slices`` evenly spaced non-empty slices (indices into axis 0)."""
    busy = busy_slices(norm)
    if not busy:
        return []
    pick = np.unique(np.linspace(0, len(busy) - 1, min(max_slices, len(busy))).round())
    return [busy[int(i)] for i in pick]


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

    result = fit(net, target, steps=steps, operator=Identity((h, w)), lr=lr,
                 batch_coords=batch_coords, keep_best=False, callback=callback, cancel=cancel,
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


# ----------------------------------------------------------------------------- restoration
def get_encoder(encoder: str | Path | Encoder | None) -> Encoder | None:
    """``"default"`` is the shipped MRI encoder, ``"none"``/None the SIREN baseline
    (``"self"`` is resolved by :func:`restore`, see :func:`self_encoder`)."""
    if encoder is None or isinstance(encoder, Encoder):
        return encoder
    if str(encoder).lower() == "none":
        return None
    if str(encoder).lower() == "default":
        if not DEFAULT_ENCODER.is_file():
            raise CheckpointError(f"{DEFAULT_ENCODER}: the shipped encoder is missing from "
                                  "this installation")
        return load_encoder(DEFAULT_ENCODER)
    return load_encoder(encoder)


def self_encoder(scan: Scan, *, steps: int = SELF_STEPS, device: str = "auto", seed: int = 0,
                 callback: Callable[[Progress], None] | None = None, cancel=None) -> Encoder:
    """``--encoder self``: a STRAINER encoder pretrained for ``steps`` on up to 10 evenly
    spaced non-empty slices of ``scan`` itself (in-domain by construction; the paper's
    architecture). Needs :data:`SELF_MIN_SLICES` non-empty slices."""
    norm = Intensity.for_scan(scan).forward(np.nan_to_num(scan.data))  # as restore will
    picked = pick_slices(norm, 10)
    if len(picked) < SELF_MIN_SLICES:
        raise BadArgumentError(
            f"{scan.source or 'the scan'}: --encoder self pretrains on the scan's own slices "
            f"and needs at least {SELF_MIN_SLICES} non-empty ones; it has {len(picked)}")
    with tempfile.TemporaryDirectory() as tmp:
        return pretrain(torch.from_numpy(norm[picked]), Path(tmp) / "self.safetensors",
                        steps=steps, device=device, seed=seed, callback=callback,
                        cancel=cancel, info={"files": ["the restored scan itself"],
                                             "modality": scan.modality})


@dataclass
class Restoration:
    """The output of :func:`restore`: the restored scan and the fitting history."""

    scan: Scan
    history: dict = field(default_factory=dict)


def auto_batch(pixels: int, config: SirenConfig, device: torch.device) -> int:
    """How many slices to fit at once: as many as half the free memory holds (GPU), and on
    CPU at most about 16k pixels per batch, because larger batches fall out of cache and run
    slower per slice (measured in benchmarks/speed.py)."""
    fit_in_memory = available_bytes(device) // 2 // activation_bytes(config, 1, pixels)
    if device.type == "cuda":
        return max(1, int(fit_in_memory))
    return max(1, min(CPU_BATCH_PIXELS // pixels, int(fit_in_memory)))


def restore(scan: Scan, *, task: str = "fit", encoder: str | Path | Encoder | None = "default",
            init: str = "auto", holdout: float = DEFAULT_HOLDOUT, head: str = "solved",
            steps: int | None = None, coarse_steps: int | None = None,
            lr: float = 1e-4, scale: int = 1, freeze: int | None = None, stop=None,
            reference: Scan | None = None, device: str = "auto", seed: int = 0,
            log_every: int = 10, batch_size: int | None = None,
            callback: Callable[[Progress], None] | None = None, cancel=None,
            on_estimate: Callable[[float], None] | None = None) -> Restoration:
    """Fit one INR per slice of ``scan`` (in batches), for ``task``:

    * ``fit``: represent the scan (output: same grid);
    * ``superres``: the scan is the ``scale``-times area-downsampled view of the output;
    * ``denoise``: like ``fit``, stopped per slice by ``stop`` (a :class:`StopRule` factory
      ``stop(norm_slices, units_per_norm) -> StopRule``, see :mod:`napari_strainer.denoise`).

    ``init="auto"`` (default) chooses how the INRs start from the scan itself (see
    :mod:`napari_strainer.routes`): ``holdout`` of the observed pixels are held out, SIREN and
    the encoder (freeze 0 and the task's default freeze, or ``freeze`` when given) race on the
    middle batch of slices, then (fitting, denoising) a warm start from the neighbouring
    slice's fit races the winner; the rest of the scan follows the winner slice by slice
    outwards from the middle.
    Fitting then stops a slice when its data loss has converged and denoising keeps its noise
    stop (``steps`` is a maximum); super-resolution runs every step on every pixel.
    Super-resolution spends its first ``coarse_steps`` steps (default :data:`COARSE_STEPS`, at
    most 5/6 of ``steps``; 0: none, the paper's loop) fitting the observed pixels at their own
    centres, at ``1 / scale**2`` of the cost, then goes on through the exact area operator.
    ``init="fixed"`` is the paper's recipe: the encoder (``None``: SIREN) initialises every
    batch, the first ``freeze`` layers stay fixed, all ``steps`` run.
    ``head="solved"`` (default) starts an encoder route's head, for fitting, from the ridge
    regression of the slice on the encoder's features (:func:`~.core.head.solve_head`);
    ``"random"`` is the paper's random head.

    Output voxels are in the input's units and dtype. The history records the route, the
    probes (held-out loss, seconds) and why each batch stopped. ``on_estimate`` receives the
    :func:`estimate_seconds` bound once the arguments have been checked, before any fitting.
    """
    if task not in TASKS:
        raise BadArgumentError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if init not in INITS:
        raise BadArgumentError(f"--init must be one of {', '.join(INITS)}, got {init!r}")
    if not 0 < holdout <= 0.5:
        raise BadArgumentError(f"--holdout must be in (0, 0.5], got {holdout}")
    if head not in HEADS:
        raise BadArgumentError(f"--head must be one of {', '.join(HEADS)}, got {head!r}")
    steps = DEFAULT_STEPS[task] if steps is None else steps
    if steps < 0:
        raise BadArgumentError(f"--steps must be non-negative, got {steps}")
    if lr <= 0:
        raise BadArgumentError(f"--lr must be positive, got {lr}")
    if int(scale) != scale or scale < 1:
        raise BadArgumentError(f"--scale must be a positive integer, got {scale}")
    scale = int(scale) if task == "superres" else 1
    if coarse_steps is not None and coarse_steps < 0:
        raise BadArgumentError(f"--coarse-steps must be non-negative, got {coarse_steps}")
    coarse = coarse_phase(scale, steps, coarse_steps)
    if isinstance(encoder, str) and encoder.lower() == "self":
        encoder = self_encoder(scan, device=device, seed=seed, cancel=cancel, callback=None
                               if callback is None else lambda p: callback(
                                   replace(p, phase="pretrain on this scan")))
    enc = get_encoder(encoder)
    warn_modality(enc, scan)
    config = enc.config if enc is not None else SirenConfig()
    limit = config.shared_layers if enc is not None else 0
    if freeze is not None and not 0 <= freeze <= limit:
        raise BadArgumentError(f"--freeze must be between 0 and {limit} (the encoder's layers"
                               f"{'; --encoder none has none' if enc is None else ''}), got "
                               f"{freeze}")
    task_freeze = default_freeze(task, None if enc is None else config.shared_layers)
    z, h, w = scan.shape
    out_shape = (z, h * scale, w * scale)
    if int(np.prod(out_shape)) > MAX_OUTPUT_VOXELS:
        need = np.prod(out_shape) * 4 / 2**30
        raise BadArgumentError(f"--scale {scale} would make a {out_shape} output needing "
                               f"{need:.1f} GiB; the limit is "
                               f"{MAX_OUTPUT_VOXELS * 4 / 2**30:.0f} GiB")
    ref_norm = None
    if reference is not None and reference.shape != out_shape:
        raise BadArgumentError(f"--reference has shape {reference.shape}, the output will "
                               f"have {out_shape}")
    dev = resolve_device(device)
    inten = Intensity.for_scan(scan)
    norm = inten.forward(np.nan_to_num(scan.data, nan=inten.low))
    if reference is not None:
        ref_norm = inten.forward(reference.data)
        ref_range = float(np.ptp(reference.data)) / (inten.high - inten.low) or 1.0
    operator = AreaDownsample((h, w), scale) if scale > 1 else Identity((h, w))
    centres = Identity((h, w))  # the coarse phase: observed pixels at their own centres
    bs = batch_size or min(z, auto_batch(h * w * scale * scale, config, dev))
    n_batches = -(-z // bs)
    auto = init == "auto" and steps > 0  # nothing to race without steps
    if not auto:
        routes = [Route("encoder" if enc is not None else "siren", enc,
                        task_freeze if freeze is None else freeze)]
    else:
        # denoising races only the starts its noise stop was calibrated for (SIREN and the
        # task's freeze): fine-tuning everything wins 25-step probes, then stops 1.3 dB lower
        freezes = [freeze] if freeze is not None else [task_freeze] if task == "denoise" \
            else [0, task_freeze]
        routes = candidates(enc, freezes)
    if on_estimate is not None:
        on_estimate(estimate_seconds(scan, task=task, encoder=enc, init=init, steps=steps,
                                     scale=scale, device=device, batch_size=bs,
                                     coarse_steps=coarse))
    mask = holdout_mask(h * w, holdout, seed, dev) if auto else None
    converge = auto and task == "fit"
    warm_race = auto and task in WARM_TASKS
    solved_head = head == "solved" and task == "fit"
    result = np.empty(out_shape, np.float32)
    parts, best, stopped, ran, sigmas, probes, reasons = [], {}, {}, {}, [], [], set()
    done_steps, parents, phases, chosen = 0, {}, {}, None
    solved = weakref.WeakSet()  # nets whose head was solved
    t_start = time.perf_counter()

    order = _batch_order(norm, bs)
    uses = Counter(parent for _, parent in order)  # batches still to start from each slice
    for k, (start, parent) in enumerate(order):
        sl = slice(start, min(z, start + bs))
        b = sl.stop - sl.start
        target = torch.from_numpy(norm[sl]).reshape(b, h * w, 1).to(dev)
        ref_t = None if ref_norm is None else torch.from_numpy(ref_norm[sl]).reshape(
            b, -1, 1).to(dev)
        rule = stop(norm[sl], inten.high - inten.low) if stop is not None else None
        if rule is not None:
            sigmas += [float(v) * (inten.high - inten.low) for v in rule.sigma]
            reasons.add(rule.reason)
        bound = done_steps + (n_batches - k) * steps  # steps left at most, probes aside

        def train(net, first, last, opt, *, val=True, rule=rule, target=target, ref_t=ref_t,
                  bound=bound, where=(sl.start, sl.stop), op=operator):
            nonlocal done_steps
            # a solved head's first Adam steps ramp up (core.head.WARMUP_STEPS); step-indexed,
            # so a probe's winner continues the same ramp
            lr_at = warmup_lr(lr, WARMUP_STEPS) if net in solved else None
            base = done_steps - first
            phase = phases.get(id(net), "")

            def progress(p: Progress) -> None:
                if callback is not None:  # steps over probes and batches; total: at most
                    callback(Progress(base + p.step, max(bound, base + p.step), p.loss,
                                      p.psnr, p.seconds, p.preview, where, phase))

            res = fit(net, target, steps=last, operator=op, lr=lr, stop=rule,
                      reference=ref_t, data_range=ref_range if ref_t is not None else 1.0,
                      log_every=log_every, callback=progress, cancel=cancel, seed=seed,
                      optimizer=opt, start_step=first, holdout=mask if val else None,
                      lr_at=lr_at, view=operator.render_shape)
            done_steps += res.steps_done - first
            return res

        def make(route, start=start, b=b, parent=parent, probe=False, target=target):
            net = route.build(config, b, seed + start, dev, parents.get(parent))
            if solved_head and route.encoder is not None and not route.warm:
                solve_head(net, target, operator, holdout=mask if probe else None)
                solved.add(net)
            phases[id(net)] = f"probe {route.name}" if probe else route.name
            return net

        torch.manual_seed(seed)
        if chosen is None or (k == 1 and warm_race):  # the candidates, then warm vs winner
            field_ = routes if chosen is None else [chosen, Route("warm", chosen.encoder,
                                                                  chosen.freeze, warm=True)]
            if len(field_) > 1:
                winner, records = race(field_, lambda r: make(r, probe=True),
                                       lambda n, last: train(n, 0, last, None, rule=None,
                                                             op=centres if coarse else operator),
                                       min(PROBE_STEPS, coarse or steps))  # within --steps
                phases[id(winner.net)] = winner.route.name
                probes += [{**r, "slices": [sl.start, sl.stop]} for r in records]
                entry_route, net, segs = winner.route, winner.net, [winner.result]
                if coarse:  # the race only picks the route: its winner starts again on every
                    # pixel (cheap on the coarse grid); going on from its held-out probe ended
                    # 0.8 dB below --encoder none on 48 x 64 EPI slices x2
                    net, segs = make(entry_route), []
            else:
                entry_route, net, segs = field_[0], make(field_[0]), []
            if chosen is None or entry_route.warm:
                chosen = entry_route
        else:
            entry_route, net, segs = chosen, make(chosen), []
        at = segs[-1].steps_done if segs else 0
        opt = segs[-1].optimizer if segs else None
        if coarse:
            # every pixel from step 0; the exact phase keeps the coarse phase's Adam (a fresh
            # one dips 8 dB); no stop: ending on a held-out plateau cost 1.1 dB on 96 x 96 T1
            # slices (benchmarks/README.md#defaults)
            segs.append(train(net, 0, coarse, None, val=False, op=centres))
            segs.append(train(net, coarse, steps, segs[-1].optimizer, val=False))
        elif auto and task == "superres":  # every step through the exact operator
            segs.append(train(net, at, steps, None, val=False))
        elif converge:  # fitting: every pixel counts, the data loss is the quality
            rule = PlateauStop(*PATIENCE[task])
            segs.append(train(net, at, steps, opt, val=False, rule=rule))
        elif at < steps or not segs:  # denoising (noise stop) and init="fixed"
            segs.append(train(net, at, steps, opt, val=False))
        res = segs[-1]
        result[sl] = render(net, operator.render_shape)[..., 0].cpu().numpy()
        # keep only the weights a later batch starts from (its nearest finished slice)
        uses[parent] -= 1
        if uses[parent] <= 0:
            parents.pop(parent, None)
        for edge, member in ((sl.start, 0), (sl.stop - 1, b - 1)):
            if warm_race and uses[edge] > 0:
                parents[edge] = member_params(net, member)
        parts.append((b, _concat(segs)))
        for i in range(b):
            best[sl.start + i] = res.best_step[i]
            stopped[sl.start + i] = res.stop_step[i]
            ran[sl.start + i] = res.steps_done
        if rule is not None and any(s is not None for s in res.stop_step):
            reasons.add(rule.reason)
        if res.cancelled:
            _fill_unfinished(result, norm, scale, [i for i in range(z) if i not in ran])
            break
    history = _merge_histories(parts)
    history.update(task=task, scale=scale, freeze=chosen.freeze, steps=steps,
                   coarse_steps=coarse,
                   encoder="none" if chosen.encoder is None else "pretrained",
                   init=init, route=chosen.name, probes=probes,
                   head="solved" if solved_head and chosen.encoder is not None else "random",
                   probe_seconds=round(sum(p["seconds"] for p in probes), 3),
                   holdout=holdout if auto else None,
                   best_step=[best.get(i) for i in range(z)],
                   stop_step=[stopped.get(i) for i in range(z)],
                   steps_run=[ran.get(i) for i in range(z)],
                   stop_reason="; ".join(sorted(reasons)) or "ran all steps",
                   sigma=sigmas or None, seconds_total=round(time.perf_counter() - t_start, 3),
                   cancelled=bool(cancel is not None and cancel.is_set()))
    affine = upsampled_affine(scan.affine, (1, scale, scale)) if scale > 1 else scan.affine
    what = {"fit": "INR fit", "superres": f"INR super-resolution x{scale}",
            "denoise": "INR denoising"}[task]
    desc = f"{what} ({'STRAINER' if chosen.encoder is not None else 'SIREN'}, napari-strainer)"
    how = (f"{desc}: route {chosen.name}, head {history['head']}, freeze {chosen.freeze}, "
           f"at most {steps} Adam steps per slice at lr {lr:g} ({history['stop_reason']}"
           f"{f'; the first {coarse} on the observed grid' if coarse else ''}), seed {seed}")
    out = scan.derive(inten.inverse(result, scan.data.dtype), affine=affine, description=desc,
                      derivation=how)
    return Restoration(out, history)


def estimate_seconds(scan: Scan, *, task: str = "fit", encoder="default", init: str = "auto",
                     steps: int | None = None, scale: int = 1, device: str = "auto",
                     batch_size: int | None = None, probe_steps: int = 3,
                     coarse_steps: int | None = None) -> float:
    """Upper bound on the seconds :func:`restore` needs with these options, from short timed
    probes (``probe_steps`` training steps of one batch of slices on each grid; about a
    second): every batch running all ``steps`` plus the route probes. Fitting (plateau) and
    denoising (noise level) may stop earlier; super-resolution runs every step."""
    steps = DEFAULT_STEPS.get(task, 500) if steps is None else steps
    scale = int(scale) if task == "superres" else 1
    coarse = coarse_phase(scale, steps, coarse_steps)
    own = isinstance(encoder, str) and encoder.lower() == "self"
    enc = None if own else get_encoder(encoder)
    config = enc.config if enc is not None else SirenConfig()
    dev = resolve_device(device)
    z, h, w = scan.shape
    bs = batch_size or min(z, auto_batch(h * w * scale * scale, config, dev))
    net = BatchedSiren(config, batch=bs).to(dev)
    target = torch.zeros(bs, h * w, 1, device=dev)

    def seconds_per_step(operator) -> float:
        fit(net, target, steps=1, operator=operator, keep_best=False)  # warm-up
        t0 = time.perf_counter()
        fit(net, target, steps=probe_steps, operator=operator, keep_best=False)
        return (time.perf_counter() - t0) / probe_steps

    per_step = seconds_per_step(AreaDownsample((h, w), scale) if scale > 1 else Identity((h, w)))
    per_coarse = seconds_per_step(Identity((h, w))) if coarse else per_step
    n_routes = 1 if init == "fixed" else 1 + (2 if enc is not None or own else 0)
    warm = z > bs and task in WARM_TASKS  # the warm start's race on the second batch
    probe = 0 if init == "fixed" else (n_routes - 1 + warm) * PROBE_STEPS
    pretraining = SELF_STEPS * min(10, z) / bs if own else 0  # heads cost like slices
    batches = -(-z // bs)
    return (per_step * (batches * (steps - coarse) + pretraining)
            + per_coarse * (batches * coarse + probe))


def describe_estimate(seconds: float, device: str = "auto") -> str:
    """``"at most 6 min on cpu (2 threads)"``, plus a GPU hint when one is idle."""
    dev = resolve_device(device)
    where = f"cpu ({torch.get_num_threads()} threads)" if dev.type == "cpu" else str(dev)
    amount = f"{seconds:.0f} s" if seconds < 90 else (
        f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h")
    hint = "; a GPU is present: --device cuda" if dev.type == "cpu" and \
        torch.cuda.is_available() else ""
    return f"at most {amount} on {where}{hint}"


def _batch_order(norm: np.ndarray, bs: int) -> list[tuple[int, int | None]]:
    """Batches of ``bs`` slices as ``(first slice, parent slice)``, the batch holding the
    middle non-empty slice first, then outwards; the parent is the nearest slice of the batch
    processed before it on that side (for warm starts)."""
    z = norm.shape[0]
    busy = busy_slices(norm) or list(range(z))
    mid = (busy[len(busy) // 2] // bs) * bs
    order = [(mid, None)]
    order += [(s, s - 1) for s in range(mid + bs, z, bs)]
    order += [(s, s + bs) for s in range(mid - bs, -1, -bs)]
    return order


def _fill_unfinished(result: np.ndarray, norm: np.ndarray, scale: int, slices: list[int]):
    """Cancelled: unfinished slices get the input resampled, clearly not restored."""
    if slices:
        rest = torch.from_numpy(norm[slices])[:, None]
        result[slices] = F.interpolate(rest, scale_factor=scale, mode="nearest")[:, 0].numpy()


def _concat(results: list) -> dict:
    """One history from consecutive fit segments of the same net (each segment logs its first
    step, which the previous one logged as its last: kept once)."""
    hist: dict = {}
    for r in results:
        h = r.history
        skip = 1 if hist.get("iterations") and h["iterations"][:1] == hist["iterations"][-1:] \
            else 0
        offset = hist["seconds"][-1] if hist.get("seconds") else 0.0
        for key, values in h.items():
            values = values[skip:]
            if key == "seconds":
                values = [v + offset for v in values]
            hist.setdefault(key, []).extend(values)
    return hist


def _merge_histories(parts: list[tuple[int, dict]]) -> dict:
    """Average per-batch histories over slices (weights = batch sizes); a batch that stopped
    early counts with its last entry; seconds add up."""
    if len(parts) == 1:
        return dict(parts[0][1])
    n = max(len(h["iterations"]) for _, h in parts)
    total = sum(b for b, _ in parts)

    def at(values: list, i: int):
        return values[min(i, len(values) - 1)]

    longest = next(h for _, h in parts if len(h["iterations"]) == n)
    merged = {"iterations": list(longest["iterations"])}
    for key in ("loss", "val_loss", "psnr"):
        if all(h.get(key) for _, h in parts):
            merged[key] = [sum(b * at(h[key], i) for b, h in parts) / total for i in range(n)]
    merged["seconds"] = [sum(at(h["seconds"], i) for _, h in parts) for i in range(n)]
    return merged
