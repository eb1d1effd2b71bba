"""Scan-level jobs built on the core: pretrain an encoder, restore (fit / super-resolve / denoise)
a scan slice by slice. Every front end (CLI, napari widgets, MONAI bundle) calls these.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .cards import warn_modality
from .core.checkpoint import Encoder, load_encoder, load_state, save_encoder, save_state
from .core.fit import Progress, activation_bytes, available_bytes, fit, render
from .core.operators import AreaDownsample, Identity
from .core.siren import BatchedSiren, SirenConfig
from .errors import BadArgumentError, BadInputError, CheckpointError
from .io.scan import Scan, upsampled_affine

log = logging.getLogger(__name__)

DEFAULT_ENCODER = Path(__file__).parent / "encoders" / "mri_default.safetensors"
TASKS = ("fit", "superres", "denoise")
# Layers kept fixed at test time, per task (chosen by benchmarks/inverse on brain MRI; the
# paper fine-tunes everything, i.e. 0). Capped at the encoder's shared layers minus one.
DEFAULT_FREEZE = {"fit": 0, "superres": 3, "denoise": 4}
DEFAULT_STEPS = {"fit": 500, "superres": 500, "denoise": 300}
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
             steps: int = 5000, lr: float = 1e-4, batch_coords: int | None = None,
             device: str = "auto", seed: int = 0, resume: bool = False,
             checkpoint_every: int = 100, callback: Callable[[Progress], None] | None = None,
             cancel=None, info: dict | None = None) -> Encoder:
    """Pretrain a shared encoder on ``images`` ``[N, H, W]`` (one head each) and save it.

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
    output = Path(output)
    state_path = output.with_name(output.name + ".state.safetensors")
    dev = resolve_device(device)
    n, h, w = images.shape
    target = images.reshape(n, h * w, 1).to(dev)
    torch.manual_seed(seed)
    net = BatchedSiren(config, batch=n, shared=config.shared_layers, seed=seed).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    run = {"config": config.to_dict(), "images": [n, h, w], "lr": lr, "seed": seed,
           "batch_coords": batch_coords,
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
                 checkpoint_every=checkpoint_every)
    loss = result.history["loss"][-1] if result.history["loss"] else None
    encoder = Encoder(config, [(a.cpu(), b.cpu()) for a, b in net.encoder_weights()], {
        "normalization": Intensity.rule(),
        "trained_on": {"images": n, "shape": [h, w], **(info or {})},
        "steps": result.steps_done, "requested_steps": steps, "final_loss": loss,
        "lr": lr, "seed": seed, "batch_coords": batch_coords,
        "complete": not result.cancelled})
    save_encoder(encoder, output)
    if result.cancelled:
        save_state(state_path, net, opt, result.steps_done, run)
    else:
        state_path.unlink(missing_ok=True)
    return encoder


# ----------------------------------------------------------------------------- restoration
def get_encoder(encoder: str | Path | Encoder | None) -> Encoder | None:
    """``"default"`` is the shipped MRI encoder, ``"none"``/None the SIREN baseline."""
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
            steps: int | None = None, lr: float = 1e-4, scale: int = 1,
            freeze: int | None = None, stop=None, reference: Scan | None = None,
            device: str = "auto", seed: int = 0, log_every: int = 10,
            batch_size: int | None = None, callback: Callable[[Progress], None] | None = None,
            cancel=None) -> Restoration:
    """Fit one INR per slice of ``scan`` (in batches), for ``task``:

    * ``fit``: represent the scan (output: same grid);
    * ``superres``: the scan is the ``scale``-times area-downsampled view of the output;
    * ``denoise``: like ``fit``, stopped per slice by ``stop`` (a :class:`StopRule` factory
      ``stop(norm_slices, units_per_norm) -> StopRule``, see :mod:`napari_strainer.denoise`).

    The encoder initialises the first layers (``None``: SIREN random initialisation), the
    first ``freeze`` stay fixed. Output voxels are in the input's units and dtype.
    """
    if task not in TASKS:
        raise BadArgumentError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    steps = DEFAULT_STEPS[task] if steps is None else steps
    if steps < 0:
        raise BadArgumentError(f"--steps must be non-negative, got {steps}")
    if lr <= 0:
        raise BadArgumentError(f"--lr must be positive, got {lr}")
    if int(scale) != scale or scale < 1:
        raise BadArgumentError(f"--scale must be a positive integer, got {scale}")
    scale = int(scale) if task == "superres" else 1
    enc = get_encoder(encoder)
    warn_modality(enc, scan)
    config = enc.config if enc is not None else SirenConfig()
    if freeze is None:
        freeze = default_freeze(task, None if enc is None else config.shared_layers)
    limit = config.shared_layers if enc is not None else 0
    if not 0 <= freeze <= limit:
        raise BadArgumentError(f"--freeze must be between 0 and {limit} (the encoder's layers"
                               f"{'; --encoder none has none' if enc is None else ''}), got "
                               f"{freeze}")
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
    bs = batch_size or min(z, auto_batch(h * w * scale * scale, config, dev))
    result = np.empty(out_shape, np.float32)
    parts, best, stopped, sigmas, reason = [], [], [], [], None
    for start in range(0, z, bs):
        sl = slice(start, min(z, start + bs))
        b = sl.stop - sl.start
        torch.manual_seed(seed)
        net = BatchedSiren(config, batch=b, shared=freeze, seed=seed + start).to(dev)
        if enc is not None:
            net.load_encoder([(wt.to(dev), bi.to(dev)) for wt, bi in enc.weights])
        net.freeze(freeze)
        target = torch.from_numpy(norm[sl]).reshape(b, h * w, 1).to(dev)
        ref_t = None if ref_norm is None else torch.from_numpy(ref_norm[sl]).reshape(
            b, -1, 1).to(dev)

        def progress(p: Progress, k=start // bs, n=-(-z // bs)) -> None:
            if callback is not None:  # steps counted over all batches of slices
                callback(Progress(k * steps + p.step, n * steps, p.loss, p.psnr, p.seconds,
                                  p.preview))

        rule = stop(norm[sl], inten.high - inten.low) if stop is not None else None
        if rule is not None:
            sigmas += [float(v) * (inten.high - inten.low) for v in rule.sigma]
            reason = rule.reason
        res = fit(net, target, steps=steps, operator=operator, lr=lr, stop=rule, reference=ref_t,
                  data_range=ref_range if ref_t is not None else 1.0, log_every=log_every,
                  callback=progress, cancel=cancel, seed=seed)
        result[sl] = render(net, operator.render_shape)[..., 0].cpu().numpy()
        parts.append((b, res.history))
        best += res.best_step
        stopped += res.stop_step
        if res.cancelled:
            if start + b < z:  # unfinished slices: the input resampled, clearly not restored
                rest = torch.from_numpy(norm[start + b:])[:, None]
                result[start + b:] = F.interpolate(rest, scale_factor=scale,
                                                   mode="nearest")[:, 0].numpy()
            break
    history = _merge_histories(parts)
    history.update(task=task, scale=scale, freeze=freeze, steps=steps,
                   encoder="none" if enc is None else "pretrained", best_step=best,
                   stop_step=stopped, stop_reason=reason if any(
                       s is not None for s in stopped) else "ran all steps",
                   sigma=sigmas or None, cancelled=bool(cancel is not None and cancel.is_set()))
    affine = upsampled_affine(scan.affine, (1, scale, scale)) if scale > 1 else scan.affine
    what = {"fit": "INR fit", "superres": f"INR super-resolution x{scale}",
            "denoise": "INR denoising"}[task]
    desc = f"{what} ({'STRAINER' if enc is not None else 'SIREN'}, napari-strainer)"
    out = scan.derive(inten.inverse(result, scan.data.dtype), affine=affine, description=desc)
    return Restoration(out, history)


def _merge_histories(parts: list[tuple[int, dict]]) -> dict:
    """Average per-batch histories over slices (weights = batch sizes); seconds add up."""
    if len(parts) == 1:
        return dict(parts[0][1])
    n = min(len(h["iterations"]) for _, h in parts)
    total = sum(b for b, _ in parts)
    merged = {"iterations": parts[0][1]["iterations"][:n]}
    for key in ("loss", "psnr"):
        if all(key in h for _, h in parts):
            merged[key] = [sum(b * h[key][i] for b, h in parts) / total for i in range(n)]
    merged["seconds"] = [sum(h["seconds"][i] for _, h in parts) for i in range(n)]
    return merged
