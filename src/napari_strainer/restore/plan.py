"""The planner: how a scan is restored, decided once for every front end.

:func:`make_plan` takes the scan(s), the task and the user's :class:`Options`, checks them
(noise level, output size, encoder and its modality, reference grid) and returns a
:class:`Plan`: the path (``slices``: one 2D INR per slice; ``volume``: one 3D INR over the
scan; ``fuse``: one 3D INR over several stacks; ``race``: denoisers raced and blended on their
estimated error, :mod:`~napari_strainer.restore.race`), the route, the noise model and level, the
step budget, the memory and time it will take, the output geometry, and the reason for each
choice. :func:`run` carries a plan out. The CLI (``--plan`` prints it without fitting), the
napari docks (shown before Run), :mod:`napari_strainer.batch` and the MONAI bundle only
gather options, call these two functions and show the result.

Example:
    >>> plan = make_plan(scan, Options(task="denoise"))      # doctest: +SKIP
    >>> print(plan.describe()); restored = run(plan).scan     # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..core.checkpoint import Encoder
from ..core.device import describe_device, resolve_device
from ..core.fit import Progress, activation_bytes, available_bytes, fit
from ..core.metrics import psnr
from ..core.operators import Identity, profile_quadrature
from ..core.problems import ImageProblem
from ..core.siren import BatchedSiren, SirenConfig
from ..errors import BadArgumentError, BadInputError
from ..io.intensity import Intensity
from ..io.scan import Scan, upsampled_affine
from ..pretrain.cards import modality_warning
from ..pretrain.encoders import get_encoder
from . import planes, race, slices, volume
from .base import Restoration, check_output_size
from .classical import has_bm4d
from .noise import (
    NOISE_KINDS,
    NoiseModel,
    estimate_sigma,
    make_stop_rule,
    noise_model,
    parse_sigma,
    rician_unbias,
)

TASKS = ("fit", "superres", "denoise", "fuse")
MODES = ("auto", "volume", "slices")


@dataclass
class Options:
    """What the user asked for; every front end fills one (defaults are the product's).

    Args:
        task: ``fit``, ``superres``, ``denoise`` or ``fuse``.
        encoder: encoder file, ``"default"`` (the shipped MRI encoder), ``"none"`` (SIREN) or
            ``"self"`` (pretrained on the scan's own slices first); slice path only.
        init: ``auto`` (routes raced on held-out pixels) or ``fixed`` (the paper's recipe).
        holdout: share of observed pixels held out by ``init="auto"``.
        head: ``solved`` or ``random`` (how an encoder route's head starts when fitting).
        steps: Adam steps (per batch of slices, or of the volume INR; None: the default).
        coarse_steps: in-plane super-resolution's first steps on the observed grid.
        lr: Adam learning rate.
        scale: in-plane super-resolution factor (None with ``slice_scale``: 1).
        slice_scale: through-plane factor (>= 2): the volume path.
        slice_profile, slice_thickness: the through-plane acquisition (box or gaussian;
            None: DICOM SliceThickness, else the spacing).
        slice_axis: the axis ``--slice-scale`` refines (None: from the geometry).
        prior: through-plane start: ``auto`` (the prior learned from the scan's in-plane
            planes where it has enough of them), ``planes`` or ``none`` (cubic).
        freeze: encoder layers kept fixed (None: the task's default).
        sigma: noise level for ``denoise``: ``"auto"``, ``"none"`` or a value in scan units.
        noise: ``denoise``'s noise model: ``auto`` (Rician for magnitude data, Gaussian for
            CT and data with negative values), ``rician`` or ``gaussian``.
        coils: magnitude data from the root sum of squares of this many receive coils: the
            non-central chi model (1: Rician).
        mode: ``denoise``: ``auto`` (the race of denoisers), ``volume`` (one 3D INR) or
            ``slices`` (one 2D INR per slice).
        slab_voxels: the race's largest slab in voxels (None: ``race.SLAB_VOXELS``): larger
            volumes race slab by slab, their memory that of one slab.
        tv: weight of the 3D total-variation term (volume paths; None: the default).
        ls_steps: conjugate-gradient steps of least squares (through-plane, fusion).
        spacing: fusion's isotropic output spacing in mm (None: finest in-plane spacing).
        device, seed, log_every, batch_size: where and how to run.
    """

    task: str = "fit"
    encoder: str = "default"
    init: str = "auto"
    holdout: float = slices.DEFAULT_HOLDOUT
    head: str = "solved"
    steps: int | None = None
    coarse_steps: int | None = None
    lr: float = 1e-4
    scale: int | None = 1
    slice_scale: int | None = None
    slice_profile: str = "box"
    slice_thickness: float | None = None
    slice_axis: int | None = None
    prior: str = "auto"
    freeze: int | None = None
    sigma: str | float = "auto"
    noise: str = "auto"
    coils: int = 1
    mode: str = "auto"
    slab_voxels: int | None = None
    tv: float | None = None
    ls_steps: int | None = None
    spacing: float | None = None
    device: str = "auto"
    seed: int = 0
    log_every: int = 10
    batch_size: int | None = None

    def __post_init__(self) -> None:
        """The checks that need no scan (one line each, :class:`BadArgumentError`)."""
        if self.task not in TASKS:
            raise BadArgumentError(f"unknown task {self.task!r}; choose one of "
                                   f"{', '.join(TASKS)}")
        _choice("--init", self.init, slices.INITS)
        _choice("--head", self.head, slices.HEADS)
        _choice("--mode", self.mode, MODES)
        _choice("--noise", self.noise, NOISE_KINDS)
        _choice("--prior", self.prior, volume.PRIORS)
        if not 0 < self.holdout <= 0.5:
            raise BadArgumentError(f"--holdout must be in (0, 0.5], got {self.holdout}")
        for name in ("steps", "coarse_steps", "ls_steps", "freeze"):
            value = getattr(self, name)
            if value is not None and (int(value) != value or value < 0):
                raise BadArgumentError(f"--{name.replace('_', '-')} must be an integer >= 0, "
                                       f"got {value}")
        if not self.lr > 0:
            raise BadArgumentError(f"--lr must be positive, got {self.lr}")
        if self.tv is not None and not self.tv >= 0:
            raise BadArgumentError(f"--tv must be >= 0, got {self.tv}")
        if self.slab_voxels is not None and (int(self.slab_voxels) != self.slab_voxels
                                             or self.slab_voxels < 1000):
            raise BadArgumentError(f"--slab-voxels must be an integer >= 1000, got "
                                   f"{self.slab_voxels}")
        if self.batch_size is not None and self.batch_size < 1:
            raise BadArgumentError(f"--batch-size must be positive, got {self.batch_size}")
        if self.log_every < 1:
            raise BadArgumentError(f"--log-every must be positive, got {self.log_every}")
        self.sigma = parse_sigma(self.sigma)
        self.encoder = str(self.encoder)
        if self.task == "superres":
            if self.slice_scale is not None:
                self.slice_scale = volume.check_slice_options(
                    self.slice_scale, self.slice_profile, self.slice_thickness)
            elif self.scale is None:
                raise BadArgumentError("superres needs --scale S (in-plane), --slice-scale F "
                                       "(through-plane), or both")
            self.scale = 1 if self.scale is None else self.scale
            if int(self.scale) != self.scale or self.scale < 1:
                raise BadArgumentError(f"--scale must be a positive integer, got {self.scale}")
            self.scale = int(self.scale)
        if self.slice_scale is not None or self.task == "fuse":
            volume.check_encoder(self.encoder)


@dataclass
class Plan:
    """How a restoration will run (see :func:`make_plan`); :meth:`describe` is what the
    front ends show."""

    task: str
    path: str
    """``slices``, ``volume``, ``fuse``, ``race``, or ``constant`` (a constant scan: nothing to
    fit)."""
    options: Options
    scans: list[Scan]
    reference: Scan | None
    encoder: Encoder | str | None
    """The loaded encoder of the slice path (``"self"``: pretrained at run time)."""
    route: str
    steps: int
    """Adam steps at most (per batch of slices on the slice path)."""
    output_shape: tuple[int, ...]
    output_affine: np.ndarray
    memory_bytes: int
    eta_seconds: float | None
    noise: dict | None = None
    ls_steps: int = 0
    """Conjugate-gradient steps of least squares after the INR (through-plane, fusion)."""
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Warnings the user should read (e.g. an encoder trained on another modality)."""
    noise_model: NoiseModel | None = None
    """The race's noise model (Rician or Gaussian, sigma)."""
    prior_steps: int = 0
    """Training steps of the learned in-plane priors (before the INR), all stacks together."""
    prior_jobs: list[tuple[tuple[int, ...], int]] = field(default_factory=list)
    """Each learned prior's thick-slice shape (slices first) and slice refinement."""
    slice_axis: int = 0
    """The axis through-plane super-resolution refines (:func:`volume.slice_axis`)."""

    def describe(self) -> str:
        """The plan in a few lines of text."""
        scan = self.scans[0]
        name = scan.source or "the scan"
        what = (f"{len(self.scans)} stacks ({name}, ...)" if len(self.scans) > 1 else
                f"{name} ({' x '.join(map(str, scan.shape))}, {scan.modality or 'unknown'})")
        path = {"constant": "constant (nothing to fit)",
                "slices": "slices (one 2D INR per slice)",
                "volume": ("volume (the whole scan at once)" if self.task == "superres" else
                           "volume (one 3D INR over the whole scan)"),
                "fuse": "fuse (one 3D INR over every stack)",
                "race": "race (denoisers judged by their estimated error, then blended)"
                }[self.path]
        spacing = np.linalg.norm(self.output_affine[:3, :3], axis=0)
        lines = [f"plan: {self.task} {what}",
                 f"  path: {path}",
                 f"  route: {self.route}",
                 "  steps: " + ", then ".join(self._stages())]
        if self.path in ("race", "constant"):
            lines.pop()
        if self.noise is not None:
            lines.append(f"  noise: {self.noise['text']}")
        lines += [(f"  output: {' x '.join(map(str, self.output_shape))} voxels of "
                   f"{' x '.join(f'{v:.3g}' for v in spacing)} mm"),
                  f"  memory: about {_gib(self.memory_bytes)}",
                  f"  ETA: {self.eta_text()}"]
        lines += [f"  why: {r}" for r in self.reasons]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def _stages(self) -> list[str]:
        """The plan's training stages, in order, for :meth:`describe`."""
        out = [f"{self.prior_steps} training steps of the in-plane prior"] \
            if self.prior_steps else []
        if self.steps or not (self.prior_steps or self.ls_steps):
            per = " per batch of slices" if self.path == "slices" else ""
            out.append(f"at most {self.steps} Adam steps{per}")
        if self.ls_steps:
            out.append(f"{self.ls_steps} of least squares")
        return out

    def eta_text(self) -> str:
        """``"at most 3 min on cpu (2 threads)"`` (slices: an upper bound from timed probes;
        volumes: an estimate), or ``"not estimated"``."""
        if self.eta_seconds is None:
            return "not estimated"
        dev = resolve_device(self.options.device)
        s = self.eta_seconds
        amount = f"{s:.0f} s" if s < 90 else (f"{s / 60:.0f} min" if s < 5400 else
                                              f"{s / 3600:.1f} h")
        hint = "; a GPU is present: --device cuda" if dev.type == "cpu" and \
            torch.cuda.is_available() else ""
        bound = "at most" if self.path == "slices" else "about"
        return f"{bound} {amount} on {describe_device(dev)}{hint}"

    def to_dict(self) -> dict:
        """JSON-friendly summary (histories and batch manifests record it)."""
        return {"task": self.task, "path": self.path, "route": self.route,
                "steps": self.steps, "ls_steps": self.ls_steps, "noise": self.noise,
                "output_shape": list(self.output_shape),
                "memory_bytes": int(self.memory_bytes), "eta_seconds": self.eta_seconds,
                "reasons": list(self.reasons), "notes": list(self.notes),
                "options": asdict(self.options)}


def make_plan(scans: Scan | Sequence[Scan], options: Options, *,
              reference: Scan | None = None, eta: bool = True) -> Plan:
    """Check ``options`` against the scan(s) and decide how to restore them.

    Args:
        scans: one scan, or the stacks to fuse (``task="fuse"``).
        options: the user's options.
        reference: clean scan on the output grid (PSNR in the history).
        eta: time a few steps for the ETA (about a second); False leaves it ``None``.

    Raises:
        BadArgumentError, BadInputError, CheckpointError: one line each.
    """
    o = options
    scans = [scans] if isinstance(scans, Scan) else list(scans)
    if o.task != "fuse" and len(scans) != 1:
        raise BadArgumentError(f"{o.task} restores one scan at a time, got {len(scans)}")
    if o.task == "fuse":
        plan = _plan_fuse(scans, o)
    elif o.task == "superres" and o.slice_scale is not None:
        plan = _plan_through_plane(scans[0], o)
    elif o.task == "denoise" and o.mode == "auto":
        plan = _plan_race(scans[0], o)
    elif o.task == "denoise" and o.mode == "volume" and scans[0].shape[0] > 1:
        plan = _plan_denoise_volume(scans[0], o)
    else:
        plan = _plan_slices(scans[0], o)
    value = _constant(scans[0]) if o.task != "fuse" else None
    if value is not None:
        plan.path, plan.steps, plan.ls_steps, plan.noise = "constant", 0, 0, None
        plan.route = f"none: the output is {value:g} everywhere on the output grid"
        plan.reasons = [f"the scan is constant ({value:g} in every voxel): nothing to fit"]
        eta = False
        plan.eta_seconds = 0.0
    if reference is not None and tuple(reference.shape) != tuple(plan.output_shape):
        raise BadArgumentError(f"--reference has shape {reference.shape}, the output will "
                               f"have {tuple(plan.output_shape)}")
    plan.reference = reference
    if eta:
        plan.eta_seconds = _eta(plan)
    return plan


def run(plan: Plan, *, callback: Callable[[Progress], None] | None = None,
        cancel=None, workdir=None, key: dict | None = None, rank: int = 0,
        world: int = 1) -> Restoration:
    """Carry ``plan`` out; the result's history also records the plan (``history["plan"]``).

    Args:
        callback: receives :class:`~napari_strainer.core.fit.Progress` reports.
        cancel: object with ``is_set()``; the result so far is returned when it is set.
        workdir, key, rank, world: the race's finished slabs are kept in ``workdir`` (and
            reused by a rerun with the same ``key``); with ``world`` processes of a
            ``torch.distributed`` group sharing it, each races its share of the slabs (see
            :func:`~napari_strainer.restore.race.denoise`).
    """
    o, scan, ref = plan.options, plan.scans[0], plan.reference
    if plan.path == "constant":
        data = np.full(plan.output_shape, _constant(scan), scan.data.dtype)
        desc = f"{plan.task} of a constant scan (unchanged, napari-strainer)"
        return Restoration(scan.derive(data, affine=plan.output_affine, description=desc,
                                       derivation=desc),
                           {"task": plan.task, "steps_done": 0, "stop_reason": plan.reasons[0],
                            "plan": _summary(plan)})
    common = {"reference": ref, "device": o.device, "seed": o.seed, "log_every": o.log_every,
              "callback": callback, "cancel": cancel}
    if plan.path == "fuse":
        res = volume.fuse(plan.scans, spacing=o.spacing, profile=o.slice_profile,
                          prior=o.prior, steps=o.steps, ls_steps=o.ls_steps, lr=o.lr, tv=o.tv, **common)
    elif plan.path == "volume" and plan.task == "superres":
        res = volume.superres_volume(scan, slice_scale=o.slice_scale, scale=o.scale,
                                     profile=o.slice_profile, thickness=o.slice_thickness,
                                     axis=o.slice_axis, prior=o.prior, steps=o.steps,
                                     ls_steps=o.ls_steps, lr=o.lr, tv=o.tv, **common)
    elif plan.path == "race":
        res = race.denoise(scan, plan.noise_model, seed=o.seed, callback=callback,
                           cancel=cancel, slab_voxels=o.slab_voxels, workdir=workdir, key=key,
                           rank=rank, world=world)
        if ref is not None:  # the race has no curve: its one PSNR
            res.history["psnr"] = [_psnr_against(res.scan, ref)]
    elif plan.path == "volume":
        res = volume.denoise_volume(scan, sigma=o.sigma, steps=o.steps, lr=o.lr, tv=o.tv,
                                    **common)
    else:
        stop = make_stop_rule(o.sigma) if plan.task == "denoise" else None
        res = slices.restore(scan, task=plan.task, encoder=plan.encoder, init=o.init,
                             holdout=o.holdout, head=o.head, steps=o.steps,
                             coarse_steps=o.coarse_steps, lr=o.lr, scale=o.scale,
                             freeze=o.freeze, stop=stop, batch_size=o.batch_size, **common)
    if plan.task == "denoise" and plan.path != "race" and plan.noise_model is not None:
        res = _unbias(res, plan.noise_model)
        if ref is not None:  # the curve ("psnr") is the fit's, before the correction
            res.history["psnr_final"] = _psnr_against(res.scan, ref)
    res.history["plan"] = _summary(plan)
    return res


def _psnr_against(out: Scan, ref: Scan) -> float:
    """PSNR of ``out`` against ``ref`` on the reference's range, in the scans' units."""
    x, truth = (torch.from_numpy(np.asarray(v, np.float64)) for v in (out.data, ref.data))
    return float(psnr(x, truth, float(np.ptp(ref.data)), dims=tuple(range(x.ndim))))


def _unbias(res: Restoration, model: NoiseModel) -> Restoration:
    """An INR denoiser's output, the mean of the noisy magnitude, mapped through the inverse
    Rician (non-central chi) mean of ``model``: the lifted background goes back to dark."""
    scan = res.scan
    out = Intensity(0.0, 1.0).inverse(rician_unbias(scan.data, model.sigma, model.coils),
                                      scan.data.dtype)
    how = f"; then {_inverse_mean(model)[2:]} (sigma {model.sigma:.4g})"
    res.history["bias_correction"] = model.to_dict()
    return Restoration(scan.derive(out, description=scan.meta.get("description"),
                                   derivation=scan.meta.get("derivation", "") + how),
                       res.history)


def default_steps(task: str, path: str, prior: bool = False) -> int:
    """The Adam steps ``task`` takes on ``path`` when ``--steps`` is not given (a constant
    scan: none; ``prior``: through-plane super-resolution on the learned prior)."""
    if path in ("constant", "race"):
        return 0
    if prior:
        return volume.PRIOR_STEPS
    return (slices.DEFAULT_STEPS if path == "slices" else volume.DEFAULT_STEPS)[task]


# ----------------------------------------------------------------------------- per path
def _plan_slices(scan: Scan, o: Options) -> Plan:
    task = o.task
    scale = o.scale if task == "superres" else 1
    steps = default_steps(task, "slices") if o.steps is None else o.steps
    reasons, notes = [], []
    if task == "denoise":
        reasons.append("--mode volume on a single 2D image: the slice path"
                       if o.mode == "volume" else "--mode slices")
    own = o.encoder.lower() == "self"
    enc = "self" if own else get_encoder(o.encoder)
    encoder = enc if isinstance(enc, Encoder) else None
    warning = modality_warning(encoder, scan)
    if warning:
        notes.append(warning)
    config = encoder.config if encoder is not None else SirenConfig()
    shared = None if encoder is None and not own else config.shared_layers
    slices.check_freeze(o.freeze, shared)
    z, h, w = scan.shape
    out_shape = (z, h * scale, w * scale)
    check_output_size(out_shape, f"--scale {scale}")
    freeze = o.freeze if o.freeze is not None else slices.default_freeze(task, shared)
    source = ("an encoder pretrained on this scan's own slices" if own else
              "SIREN (no encoder)" if encoder is None else f"encoder {o.encoder}")
    if o.init == "fixed" or steps == 0:
        route = f"{source}, freeze {freeze}, every step (--init fixed)"
    else:
        route = (f"auto: SIREN and {source} (freeze {freeze}) raced on {o.holdout:.0%} "
                 f"held-out pixels" if encoder is not None or own else
                 f"auto: SIREN, {o.holdout:.0%} held-out pixels")
        if task in slices.WARM_TASKS:
            route += "; warm starts from the neighbouring slice race the winner"
    coarse = slices.coarse_phase(scale, steps, o.coarse_steps)
    if coarse:
        reasons.append(f"super-resolution x{scale}: the first {coarse} steps fit the observed "
                       f"pixels at their centres (1/{scale * scale} of the cost)")
    noise, model = None, None
    if task == "denoise":
        noise, model = _noise(scan, o.sigma, per_slice=True), _bias_model(scan, o)
        if model is not None:
            noise["text"] += f"; the output{_inverse_mean(model)} ({model.text()})"
    dev = resolve_device(o.device)
    bs = o.batch_size or min(z, slices.auto_batch(h * w * scale * scale, config, dev))
    memory = activation_bytes(config, bs, h * w * scale * scale) + 8 * math.prod(out_shape)
    reasons.append(f"{bs} slice(s) fitted at once, {-(-z // bs)} batch(es)")
    affine = upsampled_affine(scan.affine, (1, scale, scale)) if scale > 1 else scan.affine
    return Plan(task, "slices", o, [scan], None, enc, route, steps, out_shape, affine, memory,
                None, noise, 0, reasons, notes, model)


def _plan_through_plane(scan: Scan, o: Options) -> Plan:
    volume.check_volume(scan, "through-plane super-resolution")
    ax, ax_why = volume.slice_axis(scan, o.slice_axis)
    moved = volume.axis_first(scan, ax)
    grid = volume.superres_grid(moved, o.slice_scale, o.scale)
    thick = volume.slice_thickness(moved, o.slice_thickness)
    use_prior, prior_why = volume.choose_prior(moved, o.prior)
    width, layers = volume.NET["superres"]
    steps = default_steps("superres", "volume", use_prior) if o.steps is None else o.steps
    ls = volume.GRID_STEPS if o.ls_steps is None else o.ls_steps
    reasons = [f"slice axis: {ax_why}",
               (f"--slice-scale {o.slice_scale}: the slice axis is refined through a "
                f"{o.slice_profile} slice profile of {thick:g} mm"),
               prior_why,
               (f"{'the INR fits the residual, then ' if steps else ''}{ls} conjugate-gradient "
                f"steps make the output consistent with the input")]
    route = (f"in-plane prior (CNN, {planes.STEPS} steps)" if use_prior else "cubic") + \
        (f" + 3D SIREN (width {width}, {layers} layers)" if steps else "") + \
        " + least squares"
    out = volume.grid_back(grid, ax)
    memory = _volume_memory("superres", grid.size) + (
        planes.memory_bytes(moved.shape, o.slice_scale) if use_prior else 0)
    return Plan("superres", "volume", o, [scan], None, None, route, steps, out.shape,
                out.affine, memory, None, None, ls, reasons, _encoder_note(o),
                prior_steps=planes.STEPS if use_prior else 0,
                prior_jobs=[(moved.shape, o.slice_scale)] if use_prior else [], slice_axis=ax)


def _plan_denoise_volume(scan: Scan, o: Options) -> Plan:
    width, layers = volume.NET["denoise"]
    steps = default_steps("denoise", "volume") if o.steps is None else o.steps
    volume.check_volume(scan, "volume denoising")
    volume.check_encoder(o.encoder)
    reasons = ["--mode volume: one 3D INR sees the neighbouring slices"]
    stop = ("all steps (--sigma none); the step with the lowest held-out error is kept"
            if o.sigma == "none" else
            f"ends {volume.PATIENCE} steps after the error on {volume.HOLDOUT:.0%} held-out "
            f"voxels stops improving; the best step is kept")
    reasons.append(stop)
    noise, model = _noise(scan, o.sigma, per_slice=False), _bias_model(scan, o)
    weight = o.tv if o.tv is not None else volume.TV_PER_SIGMA * noise["sigma_norm"]
    noise["text"] += f"; 3D TV weight {weight:.3g}"
    if model is not None:
        noise["text"] += f"; the output{_inverse_mean(model)} ({model.text()})"
    route = f"3D SIREN (width {width}, {layers} layers) from scratch, weights averaged"
    return Plan("denoise", "volume", o, [scan], None, None, route, steps, scan.shape,
                scan.affine, _volume_memory("denoise", math.prod(scan.shape)), None, noise, 0,
                reasons, _encoder_note(o), model)


def _plan_race(scan: Scan, o: Options) -> Plan:
    model = None if _constant(scan) is not None else _noise_model(scan, o)
    data = scan.data[0] if scan.shape[0] == 1 else scan.data
    names = [c.name for c in race.candidates(data.shape)]
    staged = (f"; the blend of the others guides {race.WIENER} (BM3D's collaborative Wiener "
              f"stage)" if race.WIENER in names else "")
    route = (f"{len(names)} denoisers ({', '.join(names)}), each run twice for its SURE "
             f"risk{staged}; the blend with the lowest estimated error"
             f"{_inverse_mean(model) if model and model.kind == 'rician' else ''}")
    reasons = [("mode auto: the race of denoisers (--mode volume or slices: an INR alone; "
                "a 3D INR given a minute on 2 cores got weight 0 in the blend on a 2 mm MNI "
                "crop, and 4 minutes to add 0.7 dB)")]
    if "BM4D" not in names and not has_bm4d():
        reasons.append("BM4D is not installed (pip install bm4d: its licence is "
                       "non-commercial), so it does not run")
    elif "BM4D" not in names:
        reasons.append(f"BM4D is installed but left out: it runs on at most "
                       f"{race.BM4D_MAX_VOXELS:,} voxels with 8 along every axis")
    if data.ndim == 3 and len(parts := race.slabs(len(data), data[0].size,
                                                  o.slab_voxels)) > 1:
        route += (f"; in {len(parts)} slabs of about {len(data) // len(parts)} slices along "
                  f"the first axis, cross-faded over {2 * race.SLAB_MARGIN}")
        reasons.append(f"{data.size:,} voxels: above {o.slab_voxels or race.SLAB_VOXELS:,}, the race runs "
                       f"slab by slab so that its memory is that of one slab")
    notes = _encoder_note(o) if o.encoder.lower() not in ("none", "default") else []
    need = race.memory_bytes(data.shape, len(names), o.slab_voxels)
    free = available_bytes(torch.device("cpu"))
    if need > free:
        raise BadInputError(f"{scan.source or 'the scan'}: the denoising race needs about "
                            f"{_gib(need)} for {data.size:,} voxels, but {_gib(free)} is free; "
                            f"race smaller slabs (--slab-voxels, now "
                            f"{o.slab_voxels or race.SLAB_VOXELS:,}), crop the scan, or "
                            f"denoise it slice by slice (--mode slices)")
    return Plan("denoise", "race", o, [scan], None, None, route, 0, scan.shape, scan.affine,
                need, None,
                model.to_dict() if model else None, 0, reasons, notes, model)


def _inverse_mean(model: NoiseModel) -> str:
    kind = "Rician" if model.coils == 1 else "non-central chi"
    return f", mapped through the inverse {kind} mean"


def _bias_model(scan: Scan, o: Options) -> NoiseModel | None:
    """The noise model an INR denoiser's output is corrected with: Rician data (the INR fits
    the mean of the noisy magnitude, which the inverse Rician mean maps back); None for
    Gaussian noise, or where no noise is found."""
    data, name = np.nan_to_num(scan.data), str(scan.source or "the scan")
    if noise_model(data, scan.modality, o.noise, 1.0, coils=o.coils, name=name).kind != "rician":
        return None
    try:
        return noise_model(data, scan.modality, o.noise, o.sigma, coils=o.coils, name=name)
    except BadArgumentError:  # no noise found: nothing to correct
        return None


def _noise_model(scan: Scan, o: Options) -> NoiseModel:
    race.check_finite(scan)
    return noise_model(scan.data, scan.modality, o.noise, o.sigma, coils=o.coils,
                       name=str(scan.source or "the scan"))


def _plan_fuse(scans: list[Scan], o: Options) -> Plan:
    grid = volume.fuse_grid(scans, o.spacing)
    stacks = volume.slice_first(scans)
    factors, prior_why = volume.fuse_prior(stacks, grid, o.prior)
    steps = default_steps("fuse", "fuse", bool(factors)) if o.steps is None else o.steps
    ls = volume.GRID_STEPS if o.ls_steps is None else o.ls_steps
    width, layers = volume.NET["fuse"]
    if factors or steps:
        route = " + ".join(
            ([f"in-plane prior of each stack (CNN, {planes.STEPS} steps each)"] if factors
             else []) +
            ([f"3D SIREN (width {width}, {layers} layers) over all {len(scans)} stacks"]
             if steps else []) + [f"{ls} conjugate-gradient steps of data consistency"])
    else:
        route = f"classical least-squares reconstruction ({ls} conjugate-gradient steps)"
    reasons = [(f"the output grid is the first stack's orientation and field of view at "
                f"{grid.spacing[0]:g} mm"), prior_why]
    jobs = [(s.shape, f) for s, f in zip(stacks, factors or [])]
    memory = _volume_memory("fuse", grid.size) + max(
        (planes.memory_bytes(*job) for job in jobs), default=0)
    return Plan("fuse", "fuse", o, scans, None, None, route, steps, grid.shape, grid.affine,
                memory, None, None, ls, reasons, _encoder_note(o),
                prior_steps=planes.STEPS * len(jobs), prior_jobs=jobs)


def _encoder_note(o: Options) -> list[str]:
    if volume.is_2d_encoder(o.encoder) and o.mode == "auto" and o.task == "denoise":
        return [f"the denoising race uses no encoder; --mode slices uses {o.encoder}"]
    if volume.is_2d_encoder(o.encoder):
        return [(f"--mode {o.mode} restores this 3D scan as one volume, which uses no "
                 f"encoder; --mode slices uses {o.encoder}")]
    return []


def _noise(scan: Scan, sigma, *, per_slice: bool) -> dict:
    """The noise model and level the denoiser will use (slices: the median of the per-slice
    estimates; volume: the 3D estimate)."""
    inten = Intensity.for_scan(scan)
    units = inten.high - inten.low
    if sigma in ("auto", "none"):
        norm = inten.forward(np.nan_to_num(scan.data, nan=inten.low))
        est = (float(np.median([estimate_sigma(s) for s in norm])) if per_slice
               else estimate_sigma(norm))
        how = "estimated per slice (median shown)" if per_slice else "estimated (3D wavelet)"
    else:
        est, how = float(sigma) / units, "given"
    text = f"gaussian, sigma {est * units:.4g} in scan units ({how})"
    if sigma == "none" and per_slice:
        text += "; no noise stop (--sigma none)"
    elif per_slice:
        text += "; each slice stops when its residual reaches 0.85 sigma"
    return {"model": "gaussian", "sigma": est * units, "sigma_norm": est, "source": how,
            "text": text}


def _volume_memory(task: str, voxels: int) -> int:
    """Activations of one step of the task's 3D INR plus the output-grid volumes held at once
    (rendering, interpolation base, least-squares vectors)."""
    points = volume.BATCH[task] * 8  # quadrature points per observed voxel: a few
    return activation_bytes(volume.net_config(task), 1, points) + 4 * 8 * voxels


def _eta(plan: Plan) -> float:
    """Seconds the plan will take at most, from a few timed steps (about a second)."""
    o = plan.options
    if plan.path == "race":
        return race.estimate_seconds(plan.scans[0].data)
    if plan.path == "slices":
        return slices.estimate_seconds(plan.scans[0], task=plan.task, encoder=plan.encoder
                                       if plan.encoder is not None else "none", init=o.init,
                                       steps=plan.steps, scale=o.scale if plan.task ==
                                       "superres" else 1, device=o.device,
                                       batch_size=o.batch_size, coarse_steps=o.coarse_steps)
    dev = resolve_device(o.device)
    points = _points_per_step(plan)
    side = max(2, round(points ** (1 / 3)))
    net = BatchedSiren(volume.net_config(plan.task), batch=1).to(dev)
    problem = ImageProblem(torch.zeros(1, side ** 3, 1, device=dev), Identity((side,) * 3))
    fit(net, problem, steps=1, keep_best=False)  # warm-up
    t0 = time.perf_counter()
    fit(net, problem, steps=2, keep_best=False)
    # two updates and the closing evaluation (a forward pass is about a third of a step)
    per_step = (time.perf_counter() - t0) / (2 + 1 / 3) * points / side ** 3
    per_point = per_step / points / 3
    voxels = math.prod(plan.output_shape)
    observed = sum(math.prod(s.shape) for s in plan.scans)
    ls = plan.ls_steps
    seconds = per_step * plan.steps + (per_point * voxels * 2 if plan.steps else 0)  # render
    if plan.prior_jobs:
        seconds += planes.estimate_seconds(plan.prior_jobs)
    if plan.task == "denoise":  # held-out validation every 25 steps
        seconds += per_point * volume.HOLDOUT * observed * plan.steps / 25
    else:  # conjugate gradients: trilinear passes over the observed footprints (~20 ns each)
        seconds += ls * observed * points / volume.BATCH[plan.task] * 2e-8
    return seconds


def _points_per_step(plan: Plan) -> int:
    """Network evaluations per step of a volume path: each observed voxel of the minibatch at
    its footprint's quadrature points, plus the total-variation prior's points."""
    o = plan.options
    spacing = np.linalg.norm(plan.output_affine[:3, :3], axis=0)
    scans = plan.scans
    if plan.task == "fuse":  # each stack's slice axis first
        scans = volume.slice_first(scans)
    elif plan.task == "superres":
        ax = plan.slice_axis
        scans = [volume.axis_first(scans[0], ax)]
        spacing = spacing[[ax] + [a for a in range(3) if a != ax]]
    samples = []
    for scan in scans:
        thick = o.slice_thickness or volume.scan_thickness(scan)
        k = len(profile_quadrature(o.slice_profile, thick, spacing[0])[0])
        for a in (1, 2):
            k *= len(profile_quadrature("box", scan.spacing[a], spacing[a])[0])
        samples.append(1 if plan.task == "denoise" else k)
    points = volume.BATCH[plan.task] * float(np.mean(samples))
    tv = o.tv if o.tv is not None else volume.TV_WEIGHT.get(plan.task, 1.0)
    if tv > 0:
        points += volume.BATCH[plan.task] // 2 * (4 if plan.task != "superres" else 2)
    return int(points)


def _summary(plan: Plan) -> dict:
    return {k: v for k, v in plan.to_dict().items() if k != "options"}


def _constant(scan: Scan) -> float | None:
    """The value of a scan whose finite voxels are all equal, else None."""
    finite = scan.data[np.isfinite(scan.data)]
    if finite.size and finite.min() == finite.max():
        return float(finite.flat[0])
    return None


def _choice(flag: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise BadArgumentError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**29 else f"{n / 2**20:.0f} MiB"
