"""Scan-level volume jobs: through-plane super-resolution, fusion of stacks, volume denoising.

Each input stack is a forward operator placed by its affine, with its slice profile along its
own normal (:mod:`napari_strainer.core.operators`); one 3D INR in world (scanner) coordinates is
fitted through those operators (for super-resolution and fusion, followed by a least-squares
data-consistency step through the same operators). The CLI calls these.

Intensities: each stack is normalised on its own, robustly: its [0.5, 99.5] percentiles over
the voxels that lie inside the output grid map to [0, 1] (stacks of one contrast that differ
by a scale and offset then agree; voxels outside the output's field of view do not sway it).
The output is in the first stack's units and dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import torch

from ..core.device import resolve_device
from ..core.fit import PlateauStop, Progress, fit
from ..core.metrics import psnr
from ..core.operators import PROFILES, GridBase, Stack, TVPrior
from ..core.problems import StackProblem
from ..core.siren import BatchedSiren, SirenConfig
from ..core.solvers import fit_grid
from ..core.world import Grid, WorldFrame, grid_omega, render_grid
from ..errors import BadArgumentError, BadInputError
from ..io.intensity import Intensity
from ..io.scan import Scan, upsampled_affine
from . import planes
from .base import Restoration, check_output_size
from .classical import interpolate_slices
from .noise import estimate_sigma, parse_sigma

# Defaults chosen by benchmarks/volume.py (see benchmarks/README.md).
OMEGA_VOXEL = {"superres": 0.5, "fuse": 1.0, "denoise": 1.0}
"""First-layer omega times the output spacing in network units (radians per output voxel)."""
NET = {"superres": (128, 5), "fuse": (256, 6), "denoise": (256, 6)}
"""Width and number of linear maps of the 3D SIREN: fusion and denoising need the paper's size
(a width-128 network underfits: fusion 29.1 dB against 31.6 after 1000 steps, before the
data-consistency step; denoising 22.6 dB after 500 steps)."""
BATCH = {"superres": 4096, "fuse": 2048, "denoise": 4096}
"""Observed voxels per step (all stacks together); the total-variation term adds half as many
random points."""
LR = 1e-4
GRID_STEPS = 100
"""Conjugate-gradient iterations of the least-squares stage: the data-consistency step after the
INR (through-plane super-resolution, fusion), or fusion's classical reconstruction."""
LS_SMOOTH = 3e-4
"""Squared-gradient penalty of the classical least-squares fusion (``--steps 0``)."""
DC_ANCHOR = 3e-3
"""Weight that keeps the data-consistency step near the INR's rendering."""
BASE = "bspline"
"""Through-plane super-resolution fits the INR on top of the cubic B-spline interpolation."""
DEFAULT_STEPS = {"superres": 300, "fuse": 500, "denoise": 1000}
PRIOR_STEPS = 0
"""INR steps of through-plane super-resolution on the learned prior."""
PRIORS = ("auto", "planes", "none")
AVERAGE = {"superres": 0.0, "fuse": 0.0, "denoise": 0.99}
"""Decay of the moving average of the weights that is rendered (0: the last weights). Each
minibatch step jitters the weights and the rendering carries that jitter as extra noise; the
average removes it (MNI 2 mm, sigma 0.1: 28.2 dB against 26.8 at the same step)."""
TV_WEIGHT = {"superres": 0.0, "fuse": 0.0}
"""Weight of the total-variation term along the slice normal (super-resolution) or the three
output axes (fusion)."""
TV_PER_SIGMA = 0.8
"""Volume denoising's 3D total-variation weight is this times the noise sigma (normalised
units; as for ROF denoising, the weight that suits grows with the noise): 0.08 at sigma 0.1."""
HOLDOUT = 0.1
"""Share of the voxels volume denoising leaves out of training: their error chooses the
weights that are kept and when to stop (:func:`~napari_strainer.core.fit.fit`). The
noise-level (discrepancy) stop it replaces stopped far too early on scans with fine detail,
whose wavelet noise estimate runs high (T1, sigma 0.1: 23.9 dB against 3D TV's 26.4)."""
PATIENCE = 200
"""Volume denoising ends when the held-out error has not improved for this many steps."""


def _check_common(steps: int, lr: float, ls_steps: int = 0) -> None:
    if steps < 0:
        raise BadArgumentError(f"--steps must be non-negative, got {steps}")
    if ls_steps < 0:
        raise BadArgumentError(f"--ls-steps must be non-negative, got {ls_steps}")
    if lr <= 0:
        raise BadArgumentError(f"--lr must be positive, got {lr}")


def is_2d_encoder(encoder) -> bool:
    """Whether ``encoder`` names a 2D encoder the volume methods cannot use: anything but
    ``none`` and ``default`` (the front ends' default, unused by them)."""
    return str(encoder).lower() not in ("none", "default")


def check_encoder(encoder) -> None:
    """Refuse a 2D encoder for a volume method (they fit a 3D SIREN from scratch)."""
    if is_2d_encoder(encoder):
        raise BadArgumentError("--encoder: the volume methods fit a 3D SIREN from scratch "
                               "(no pretrained 3D encoder exists); use --encoder none")


def check_slice_options(slice_scale, profile: str = "box",
                        thickness: float | None = None) -> int:
    """Check through-plane super-resolution's options (before any scan is read); returns
    ``slice_scale`` as an int."""
    try:
        ok = not isinstance(slice_scale, bool) and int(slice_scale) == slice_scale >= 2
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise BadArgumentError(f"--slice-scale must be an integer >= 2, got {slice_scale}")
    if profile not in PROFILES:
        raise BadArgumentError(f"--slice-profile must be one of {', '.join(PROFILES)}, got "
                               f"{profile!r}")
    try:
        ok = thickness is None or float(thickness) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise BadArgumentError(f"--slice-thickness must be positive, got {thickness}")
    return int(slice_scale)


def slice_axis(scan: Scan, axis: int | None = None) -> tuple[int, str]:
    """The axis of ``scan`` (``0, 1, 2`` in its ``(slice, row, column)`` order, as napari shows
    it) that through-plane super-resolution refines, and why: ``axis`` when given, else the
    slice normal of a DICOM series (axis 0), else the one axis whose spacing exceeds the other
    two by more than 10%, else, for equal spacings, axis 0 (the stored slice axis).

    Raises:
        BadArgumentError: ``axis`` not 0, 1 or 2.
        BadInputError: two axes equally coarse (the slice axis is ambiguous).
    """
    if axis is not None:
        if isinstance(axis, bool) or axis not in (0, 1, 2):
            raise BadArgumentError(f"--slice-axis must be 0, 1 or 2, got {axis}")
        return int(axis), f"--slice-axis {axis}"
    if scan.meta.get("format") == "dicom":
        return 0, "axis 0, the DICOM slice normal"
    sp = np.array(scan.spacing)
    text = " x ".join(f"{v:.3g}" for v in sp)
    coarse = np.flatnonzero(sp * 1.1 > sp.max())
    if len(coarse) == 1:
        return int(coarse[0]), f"axis {coarse[0]}, the one coarse axis of {text} mm voxels"
    if len(coarse) == 3:
        return 0, f"axis 0, the stored slice axis ({text} mm voxels: no coarse axis)"
    raise BadInputError(f"{scan.source or 'input'}: voxels of {text} mm have two coarse axes "
                        f"({coarse[0]} and {coarse[1]}); give --slice-axis 0, 1 or 2")


def _order(axis: int) -> list[int]:
    """The array axes with ``axis`` first, the others in their order."""
    return [axis] + [a for a in range(3) if a != axis]


def axis_first(scan: Scan, axis: int) -> Scan:
    """``scan`` with ``axis`` moved to the front (data and affine; the same voxels in space)."""
    if axis == 0:
        return scan
    affine = scan.affine.copy()
    affine[:, :3] = scan.affine[:, _order(axis)]
    return replace(scan, data=np.moveaxis(scan.data, axis, 0), affine=affine)


def grid_back(grid: Grid, axis: int) -> Grid:
    """Undo :func:`axis_first` on an output grid (its shape and affine)."""
    if axis == 0:
        return grid
    back = np.argsort(_order(axis))
    affine = grid.affine.copy()
    affine[:, :3] = grid.affine[:, :3][:, back]
    return Grid(tuple(int(n) for n in np.array(grid.shape)[back]), affine)


def check_volume(scan: Scan, what: str) -> None:
    """Refuse a 2D input for a volume method (``what`` names it)."""
    if scan.shape[0] < 2:
        raise BadInputError(f"{scan.source or 'input'}: a 2D image ({scan.shape[1]} x "
                            f"{scan.shape[2]}); {what} needs a 3D scan")


def scan_thickness(scan: Scan) -> float:
    """Slice thickness in mm: DICOM SliceThickness when the scan has one, else the spacing."""
    th = scan.meta.get("slice_thickness")
    try:
        th = float(th) if th else None
    except (TypeError, ValueError):
        th = None
    return th if th and th > 0 else scan.spacing[0]


def slice_thickness(scan: Scan, thickness: float | None = None) -> float:
    """The slice profile's width in mm for ``scan`` (slice axis first): ``thickness``, else
    :func:`scan_thickness`; refused when not positive or wider than the field of view along
    the slice axis."""
    thick = float(thickness) if thickness is not None else scan_thickness(scan)
    name = scan.source or "input"
    if not thick > 0:
        raise BadArgumentError(f"{name}: slice thickness {thick:g} mm; give --slice-thickness")
    fov = scan.shape[0] * scan.spacing[0]
    if thick > fov:
        raise BadArgumentError(f"{name}: a {thick:g} mm slice profile is wider than the "
                               f"{fov:g} mm field of view along the slice axis")
    return thick


def net_config(task: str, omega_first: float = 30.0) -> SirenConfig:
    """The 3D SIREN of volume task ``task`` (:data:`NET`); ``omega_first`` is set per output
    grid by :func:`~napari_strainer.core.world.grid_omega`."""
    width, layers = NET[task]
    return SirenConfig(in_features=3, width=width, layers=layers, shared_layers=layers - 1,
                       omega_first=omega_first)


def _net(task: str, grid: Grid, frame: WorldFrame, seed: int,
         device: torch.device) -> BatchedSiren:
    cfg = net_config(task, grid_omega(OMEGA_VOXEL[task], min(grid.spacing), frame))
    torch.manual_seed(seed)
    return BatchedSiren(cfg, batch=1, seed=seed).to(device)


def _psnr(out: np.ndarray, ref: np.ndarray) -> float:
    """PSNR of a normalised volume against the reference, on the reference's range."""
    rng = float(np.ptp(ref)) or 1.0
    return float(psnr(torch.from_numpy(out).double(), torch.from_numpy(ref).double(), rng,
                      dims=(0, 1, 2)))


def _run(stacks: list[Stack], grid: Grid, frame: WorldFrame, net: BatchedSiren, *,
         batch: int, steps: int, lr: float, prior: TVPrior | None,
         base: GridBase | None = None, average: float = 0.0, holdout: float = 0.0,
         patience: int = 0, reference: np.ndarray | None, log_every: int, callback, cancel,
         seed: int) -> tuple[np.ndarray, dict]:
    """Fit, then render on ``grid``; returns the normalised volume and the history."""
    if cancel is not None and cancel.is_set():
        steps = 0
    monitor = None
    if reference is not None:

        def monitor(params: dict) -> float:
            return _psnr(render_grid(net, grid, frame, params=params, base=base).numpy(),
                         reference)

    problem = StackProblem(stacks, frame, grid, batch=batch, prior=prior, base=base,
                           holdout=holdout, monitor=monitor, monitor_every=max(100, log_every),
                           seed=seed)
    res = fit(net, problem, steps=steps, lr=lr, average=average,
              stop=PlateauStop(patience, 0.0) if holdout and patience else None,
              log_every=log_every, callback=callback, cancel=cancel, seed=seed)
    hist = dict(res.history)
    hist.update(best_step=res.best_step[0], stop_step=res.stop_step[0], steps=steps,
                steps_done=res.steps_done, cancelled=res.cancelled, frame=frame.to_dict(),
                omega_first=net.config.omega_first, width=net.config.width,
                layers=net.config.layers, batch=batch, lr=lr, average=average,
                tv_weight=prior.weight if prior is not None else 0.0)
    return render_grid(net, grid, frame, base=base).numpy(), hist


def _offset(callback, start: int, total: int):
    """``callback`` for a stage that begins at step ``start`` of a job of ``total`` steps."""
    if callback is None:
        return None
    return lambda p: callback(replace(p, step=start + p.step, total=total))


def _least_squares(stacks: list[Stack], grid: Grid, frame: WorldFrame, init: torch.Tensor, *,
                   steps: int, smooth: float, anchor: float, start: int, total: int,
                   ref: np.ndarray | None, hist: dict, callback, cancel) -> np.ndarray:
    """:func:`~napari_strainer.core.solvers.fit_grid` as the job's last stage (steps
    ``start..total``); records the final PSNR against ``ref`` and whether a Stop came."""
    out = fit_grid(stacks, grid, frame, init, steps=steps, smooth=smooth, anchor=anchor,
                   callback=_offset(callback, start, total), cancel=cancel)
    out = out.values[0, 0].cpu().numpy()
    if ref is not None:
        hist["psnr_final"] = _psnr(out, ref)
    hist["cancelled"] = bool(hist.get("cancelled") or (cancel is not None and cancel.is_set()))
    hist.setdefault("steps_done", 0)
    hist.update(ls_steps=steps, ls_smooth=smooth, ls_anchor=anchor)
    return out


def _reference(reference: Scan | None, shape: tuple[int, ...], inten: Intensity):
    if reference is None:
        return None
    if reference.shape != tuple(shape):
        raise BadArgumentError(f"--reference has shape {reference.shape}, the output will "
                               f"have {tuple(shape)}")
    return inten.forward(reference.data)


def superres_volume(scan: Scan, *, slice_scale: int = 2, scale: int = 1,
                    profile: str = "box", thickness: float | None = None,
                    axis: int | None = None, prior: str = "auto",
                    steps: int | None = None, ls_steps: int | None = None, lr: float = LR,
                    tv: float | None = None, base: str = BASE, reference: Scan | None = None,
                    device: str = "auto",
                    seed: int = 0, log_every: int = 10,
                    callback: Callable[[Progress], None] | None = None,
                    cancel=None) -> Restoration:
    """Through-plane (and optionally in-plane) super-resolution of a 3D scan.

    The output has ``slice_scale`` times the slices along the slice axis (:func:`slice_axis`)
    and ``scale`` times the in-plane voxels over the same field of view (voxel centres
    aligned: averaging the fine voxels of one input voxel gives its centre,
    :func:`~napari_strainer.io.scan.upsampled_affine`). Three stages:

    1. The starting estimate: the prior learned from the scan's own in-plane planes
       (:mod:`.planes`; ``prior="planes"``, or ``"auto"`` when the scan has enough in-plane
       pixels), else the cubic B-spline interpolation (``base="bspline"``) or nothing.
    2. An INR fitted through the acquisition model on top of it (``steps`` Adam steps): each
       input voxel is the mean of the volume over its slice profile (``box`` of ``thickness``,
       or ``gaussian`` with FWHM = ``thickness``) along the slice normal and over its pixel
       in-plane.
    3. Data consistency: ``ls_steps`` conjugate-gradient steps of least squares through the
       same operator, anchored to the estimate (the input is matched; what it leaves
       undetermined stays the estimate's).

    Args:
        scan: a 3D scan.
        slice_scale: integer >= 2, the refinement along the slice axis.
        scale: integer >= 1, the in-plane refinement.
        profile: slice profile, ``box`` or ``gaussian``.
        thickness: slice thickness in mm (default: DICOM SliceThickness, else the spacing).
        axis: the slice axis (0, 1 or 2; default: from the geometry, :func:`slice_axis`).
        prior: ``auto``, ``planes`` or ``none``.
        steps: Adam steps of the INR (default :data:`DEFAULT_STEPS`, or
            :data:`PRIOR_STEPS` on the prior).
        ls_steps: conjugate-gradient steps of the data-consistency step (default
            :data:`GRID_STEPS`; 0: none).
        tv: weight of the total-variation term along the slice normal (default
            :data:`TV_WEIGHT`; 0 = none).
        base: without the prior, ``bspline`` or ``none`` (a plain 3D SIREN).
        reference: clean scan on the output grid, for a PSNR history.
        device, seed, log_every, callback, cancel: as in :func:`napari_strainer.restore.slices.restore`.
    """
    slice_scale = check_slice_options(slice_scale, profile, thickness)
    if int(scale) != scale or scale < 1:
        raise BadArgumentError(f"--scale must be a positive integer, got {scale}")
    scale = int(scale)
    if base not in ("bspline", "none"):
        raise BadArgumentError(f"base must be bspline or none, got {base!r}")
    check_volume(scan, "through-plane super-resolution")
    ax, ax_why = slice_axis(scan, axis)
    src, scan = scan, axis_first(scan, ax)
    use_prior, prior_why = choose_prior(scan, prior)
    steps = (PRIOR_STEPS if use_prior else DEFAULT_STEPS["superres"]) if steps is None \
        else steps
    ls_steps = GRID_STEPS if ls_steps is None else ls_steps
    _check_common(steps, lr, ls_steps)
    grid = superres_grid(scan, slice_scale, scale)
    shape = grid.shape
    thick = slice_thickness(scan, thickness)
    dev = resolve_device(device)
    frame = WorldFrame(grid.corners_mm())
    inten = Intensity.for_scan(scan)
    norm = inten.forward(np.nan_to_num(scan.data, nan=inten.low))
    ref = _reference(axis_first(reference, ax) if reference is not None else None, shape,
                     inten)
    step = np.asarray(grid.spacing)
    stack = Stack(torch.from_numpy(norm), scan.affine, frame, step, thickness=thick,
                  profile=profile).to(dev)
    weight = TV_WEIGHT["superres"] if tv is None else tv
    batch = BATCH["superres"]
    prior_steps = planes.STEPS if use_prior else 0
    total = prior_steps + steps + ls_steps
    hist_prior: dict = {}
    start = None
    if use_prior:
        learned = planes.learn_prior(norm, slice_scale, profile, thick, scan.spacing,
                                     seed=seed, callback=_offset(callback, 0, total),
                                     cancel=cancel)
        start, hist_prior = learned.volume, learned.history
        if scale > 1:
            start = interpolate_slices(start, 1, 3, inplane=scale)
    elif base == "bspline":
        start = interpolate_slices(norm, slice_scale, 3, inplane=scale)
    gb = GridBase(torch.from_numpy(start), grid, frame).to(dev) if start is not None else None
    prior_tv = TVPrior(grid, [stack.normal * step[0]], weight, batch // 2) if weight > 0 \
        else None
    net = _net("superres", grid, frame, seed, dev)
    out, hist = _run([stack], grid, frame, net, batch=batch, steps=steps, lr=lr,
                     prior=prior_tv, base=gb, reference=ref, log_every=log_every,
                     callback=_offset(callback, prior_steps, total), cancel=cancel, seed=seed)
    out = _least_squares([stack], grid, frame, torch.from_numpy(out).to(dev), steps=ls_steps,
                         smooth=0.0, anchor=DC_ANCHOR, start=prior_steps + steps, total=total,
                         ref=ref, hist=hist, callback=callback, cancel=cancel)
    first = "learned in-plane prior" if use_prior else base
    hist.update(hist_prior)
    hist.update(task="superres_volume", slice_scale=slice_scale, scale=scale, profile=profile,
                slice_thickness_mm=thick, slice_axis=ax, slice_axis_reason=ax_why,
                prior="planes" if use_prior else "none", prior_reason=prior_why, base=first,
                normalization=inten.to_dict())
    desc = (f"INR through-plane super-resolution x{slice_scale}"
            f"{f' in-plane x{scale}' if scale > 1 else ''} (3D SIREN, napari-strainer)")
    how = (f"{desc}: {profile} slice profile of {thick:g} mm along axis {ax}, start {first}, "
           f"{steps} Adam steps of {batch} voxels at lr {lr:g}, TV {weight:g}, then "
           f"{ls_steps} conjugate-gradient steps of data consistency, seed {seed}")
    data = np.ascontiguousarray(np.moveaxis(inten.inverse(out, scan.data.dtype), 0, ax))
    return Restoration(src.derive(data, affine=grid_back(grid, ax).affine, description=desc,
                                  derivation=how), hist)


def choose_prior(scan: Scan, prior: str = "auto") -> tuple[bool, str]:
    """Whether through-plane super-resolution of ``scan`` (slice axis first) starts from the
    learned in-plane prior (:mod:`.planes`), and why."""
    if prior not in PRIORS:
        raise BadArgumentError(f"--prior must be one of {', '.join(PRIORS)}, got {prior!r}")
    if prior == "none":
        return False, "--prior none: cubic B-spline interpolation is the start"
    small = planes.too_small(scan.shape)
    if small is None:
        return True, ("a CNN learned from the scan's own in-plane planes, degraded by the "
                      "slice profile, gives the start")
    if prior == "planes":
        raise BadInputError(f"{scan.source or 'input'}: {small}")
    return False, f"cubic B-spline interpolation is the start: {small}"


def fuse_grid(scans: Sequence[Scan], spacing: float | None = None) -> Grid:
    """The output grid of :func:`fuse` (:func:`output_grid` of the first stack at ``spacing``,
    default the finest in-plane spacing), after checking that the stacks can be fused: at
    least two 3D stacks, one frame of reference, each overlapping the first, an output within
    the size limit."""
    if len(scans) < 2:
        raise BadArgumentError(f"fuse needs at least two stacks, got {len(scans)}")
    for s in scans:
        check_volume(s, "fusion")
    uids = {u for u in map(_frame_of_reference, scans) if u}
    if len(uids) > 1:
        raise BadArgumentError("the stacks come from different frames of reference "
                               f"(FrameOfReferenceUID {', '.join(sorted(uids))}); they cannot "
                               "be placed in one space")
    if spacing is None:
        spacing = min(min(s.spacing[1:]) for s in scans)
    if not spacing > 0:
        raise BadArgumentError(f"--spacing must be positive, got {spacing}")
    grid = output_grid(scans[0], float(spacing))
    check_output_size(grid.shape, f"--spacing {spacing:g}")
    probe = grid.corners_mm().mean(0) + (np.random.default_rng(0).random((4096, 3)) - 0.5) \
        @ (grid.affine[:3, :3] * np.array(grid.shape)).T
    for i, s in enumerate(scans[1:], 2):
        if not _inside(s.shape, s.affine, probe).any():
            raise BadArgumentError(f"stack {i} ({s.source or 'input'}) does not overlap the "
                                   "first stack's field of view")
    return grid


def superres_grid(scan: Scan, slice_scale: int, scale: int = 1) -> Grid:
    """The output grid of :func:`superres_volume` for ``scan`` with its slice axis first
    (:func:`axis_first`): ``slice_scale`` times the slices and ``scale`` times the rows and
    columns over the same field of view (checked: a 3D scan, an output within the size
    limit)."""
    check_volume(scan, "through-plane super-resolution")
    z, h, w = scan.shape
    shape = (z * slice_scale, h * scale, w * scale)
    check_output_size(shape, f"--slice-scale {slice_scale} --scale {scale}")
    return Grid(shape, upsampled_affine(scan.affine, (slice_scale, scale, scale)))


def output_grid(first: Scan, spacing: float) -> Grid:
    """The fusion grid: ``first``'s orientation and field of view, voxels ``spacing`` mm wide,
    centred on the field of view (with an integer refinement: the super-resolution rule)."""
    aff = first.affine
    counts = [max(1, round(n * s / spacing)) for n, s in zip(first.shape, first.spacing)]
    dirs = aff[:3, :3] / np.array(first.spacing)
    centre = aff[:3, :3] @ ((np.array(first.shape) - 1) / 2) + aff[:3, 3]
    out = np.eye(4)
    out[:3, :3] = dirs * spacing
    out[:3, 3] = centre - out[:3, :3] @ ((np.array(counts) - 1) / 2)
    return Grid(tuple(counts), out)


def _inside(shape: tuple[int, ...], affine: np.ndarray, mm: np.ndarray) -> np.ndarray:
    """Which points (mm, ``[n, 3]``) fall inside the voxels of a grid (shape, affine)."""
    idx = (mm - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    return np.all((idx >= -0.5) & (idx <= np.array(shape) - 0.5), axis=1)


def _resample(values: torch.Tensor, src: Grid, grid: Grid, frame: WorldFrame,
              chunk: int = 1 << 18) -> torch.Tensor:
    """``values`` on grid ``src`` interpolated trilinearly at ``grid``'s voxel centres (edge
    values outside its field of view), ``[slices, rows, columns]`` on ``values``' device."""
    dev = values.device
    sampler = GridBase(values.reshape(src.shape), src, frame).to(dev)
    to_net = torch.as_tensor(frame.matrix(), device=dev)
    out = torch.empty(grid.size, device=dev)
    for s in range(0, grid.size, chunk):
        flat = torch.arange(s, min(s + chunk, grid.size), device=dev)
        out[s:s + len(flat)] = sampler(grid.points(flat, to_net))
    return out.reshape(grid.shape)


def _frame_of_reference(scan: Scan) -> str | None:
    tpl = scan.meta.get("dicom_template")
    uid = tpl.get("FrameOfReferenceUID") if tpl is not None else None
    return str(uid) if uid else None


def _stack_intensity(scan: Scan, grid: Grid, most: int = 1 << 20) -> Intensity:
    """:meth:`Intensity.for_scan` of ``scan``, its percentiles taken over the voxels inside
    ``grid`` (all of them if few), from an evenly strided subset of at most about ``most``
    voxels."""
    k = max(1, math.ceil((np.prod(scan.shape) / most) ** (1 / 3)))
    idx = np.stack(np.meshgrid(*[np.arange(0, n, k) for n in scan.shape], indexing="ij"), -1)
    mm = idx.reshape(-1, 3) @ scan.affine[:3, :3].T + scan.affine[:3, 3]
    inside = _inside(grid.shape, grid.affine, mm)
    data = scan.data[::k, ::k, ::k].reshape(-1)
    return Intensity.for_scan(scan, data[inside] if inside.sum() >= 64 else data)


def stack_axes(scans: Sequence[Scan]) -> list[int]:
    """Each stack's slice axis (:func:`slice_axis`; with two equally coarse axes, the stored
    axis 0, the other coarse axis then being covered by the in-plane pixel footprint)."""
    axes = []
    for s in scans:
        try:
            axes.append(slice_axis(s)[0])
        except BadInputError:
            axes.append(0)
    return axes


def slice_first(scans: Sequence[Scan]) -> list[Scan]:
    """Each stack with its slice axis (:func:`stack_axes`) first, as the slice operator and
    the learned prior take it."""
    return [axis_first(s, a) for s, a in zip(scans, stack_axes(scans))]


def fuse_prior(stacks: Sequence[Scan], grid: Grid, prior: str = "auto"
               ) -> tuple[list[int] | None, str]:
    """Each stack's slice refinement onto ``grid`` when fusion starts from the learned
    in-plane priors of the stacks (:mod:`.planes`), else None; and why. ``stacks`` have their
    slice axis first (:func:`slice_first`); each needs enough in-plane pixels and slices an
    integer multiple (at least 2) of the output spacing."""
    factors = []
    for i, s in enumerate(stacks, 1):
        use, why = choose_prior(s, prior)
        if not use:
            return None, why if prior == "none" else f"stack {i}: {why}"
        ratio = s.spacing[0] / grid.spacing[0]
        if round(ratio) < 2 or abs(ratio - round(ratio)) > 0.01 * ratio:
            why = (f"stack {i}: its {s.spacing[0]:g} mm slices are not an integer multiple (at "
                   f"least 2) of the {grid.spacing[0]:g} mm output spacing")
            if prior == "planes":
                raise BadArgumentError(f"{s.source or 'input'}: {why}")
            return None, f"the INR over all stacks is the start: {why}"
        factors.append(round(ratio))
    return factors, ("a CNN learned from each stack's own in-plane planes, degraded by its "
                     "slice profile, refines that stack; their mean is the start")


def fuse(scans: Sequence[Scan], *, spacing: float | None = None, profile: str = "box",
         prior: str = "auto", steps: int | None = None, ls_steps: int | None = None,
         lr: float = LR, tv: float | None = None,
         reference: Scan | None = None, device: str = "auto", seed: int = 0,
         log_every: int = 10, callback: Callable[[Progress], None] | None = None,
         cancel=None) -> Restoration:
    """Fuse several thick-slice stacks of one anatomy (any orientations) into one volume.

    Every stack is a forward operator (slice profile along its normal, pixel footprint
    in-plane, placed by its affine; the slice axis found as in :func:`stack_axes`). The start:
    with the learned prior (``prior="auto"`` where every stack has enough in-plane pixels,
    :func:`fuse_prior`), each stack refined through-plane by the CNN learned from its own
    in-plane planes (:func:`~napari_strainer.restore.planes.learn_prior`), resampled onto the
    output grid and averaged; otherwise one 3D SIREN in world coordinates fitted to all
    stacks at once (``steps`` Adam steps, default :data:`DEFAULT_STEPS`; given ``steps`` on
    top of the prior, it fits the residual). Then data consistency: ``ls_steps``
    conjugate-gradient steps of least squares through the same operators, anchored to the
    start (:func:`~napari_strainer.core.solvers.fit_grid`), so that what the stacks measure is
    matched and what they leave undetermined comes from the start. ``prior="none"`` with
    ``steps=0`` is the classical least-squares super-resolution reconstruction instead (a
    small squared-gradient penalty, from the mean of the stacks' trilinear resamplings).
    The output grid is the first stack's orientation and field of view, isotropic at
    ``spacing`` mm (default: the finest in-plane spacing of the stacks); see :func:`output_grid`.
    Each stack's slice thickness is its DICOM SliceThickness when present, else its spacing.
    The result's ``meta["sources"]`` lists every DICOM stack, so that a DICOM output
    references the source images of each (not only the first stack's).

    Raises:
        BadArgumentError: fewer than two stacks, stacks from different frames of reference,
            a stack that does not overlap the first one, an output above the size limit,
            ``prior="planes"`` with a stack it cannot refine.
        BadInputError: a 2D input; ``prior="planes"`` with too few in-plane pixels.
    """
    scans = list(scans)
    grid = fuse_grid(scans, spacing)
    stacks_in = slice_first(scans)
    factors, prior_why = fuse_prior(stacks_in, grid, prior)
    steps = (PRIOR_STEPS if factors else DEFAULT_STEPS["fuse"]) if steps is None else steps
    ls_steps = GRID_STEPS if ls_steps is None else ls_steps
    _check_common(steps, lr, ls_steps)
    spacing = grid.spacing[0]
    dev = resolve_device(device)
    frame = WorldFrame(grid.corners_mm())
    intens = [_stack_intensity(s, grid) for s in stacks_in]
    thick = [scan_thickness(s) for s in stacks_in]
    stacks = [Stack(torch.from_numpy(it.forward(np.nan_to_num(s.data, nan=it.low))), s.affine,
                    frame, spacing, thickness=t, profile=profile).to(dev)
              for s, it, t in zip(stacks_in, intens, thick)]
    ref = _reference(reference, grid.shape, intens[0])
    prior_steps = planes.STEPS * len(stacks) if factors else 0
    total = prior_steps + steps + ls_steps
    hist: dict = {"steps": 0}
    parts, gains = [], []
    for i, (s, st, f, t) in enumerate(zip(stacks_in, stacks, factors or [], thick)):
        if cancel is not None and cancel.is_set():  # Stop: the rest start from resampling
            parts.append(_resample(st.values, st.grid, grid, frame))
            continue
        learned = planes.learn_prior(st.values.reshape(st.grid.shape).cpu().numpy(), f,
                                     profile, t, s.spacing, seed=seed + i,
                                     callback=_offset(callback, i * planes.STEPS, total),
                                     cancel=cancel)
        gains.append(learned.gain_db)
        vol = torch.from_numpy(learned.volume).to(dev)
        parts.append(_resample(vol, superres_grid(s, f), grid, frame))
        del learned, vol
    start = torch.stack(parts).mean(0) if parts else None
    del parts
    weight = TV_WEIGHT["fuse"] if tv is None else tv
    if steps > 0:
        tv_prior = None
        if weight > 0:
            tv_prior = TVPrior(grid, list(grid.affine[:3, :3].T), weight, BATCH["fuse"] // 2)
        net = _net("fuse", grid, frame, seed, dev)
        base = GridBase(start, grid, frame).to(dev) if start is not None else None
        init, hist = _run(stacks, grid, frame, net, batch=BATCH["fuse"], steps=steps, lr=lr,
                          prior=tv_prior, base=base, reference=ref, log_every=log_every,
                          callback=_offset(callback, prior_steps, total), cancel=cancel,
                          seed=seed)
        init = torch.from_numpy(init).to(dev)
        smooth, anchor = 0.0, DC_ANCHOR
    elif start is not None:
        init, smooth, anchor = start, 0.0, DC_ANCHOR
    else:
        init = torch.stack([_resample(s.values, s.grid, grid, frame) for s in stacks]).mean(0)
        smooth, anchor = LS_SMOOTH, 0.0
    out = _least_squares(stacks, grid, frame, init, steps=ls_steps, smooth=smooth,
                         anchor=anchor, start=prior_steps + steps, total=total, ref=ref,
                         hist=hist, callback=callback, cancel=cancel)
    how = " + ".join((["learned in-plane priors"] if factors else []) +
                     (["3D SIREN"] if steps else []) + ["data consistency"]) \
        if factors or steps else "least squares"
    hist.update(task="fuse", stacks=len(scans), spacing_mm=float(spacing),
                profile=profile, slice_thickness_mm=thick,
                slice_axes=stack_axes(scans),
                prior="planes" if factors else "none", prior_reason=prior_why,
                prior_gain_db=gains, start=how,
                normalization={**intens[0].to_dict(), "per_stack": [
                    [it.low, it.high] for it in intens], "over": "voxels inside the output"})
    desc = f"fusion of {len(scans)} stacks ({how}, napari-strainer)"
    first = scans[0]
    derivation = (f"{desc}: {profile} slice profiles, "
                  f"{f'in-plane priors of {planes.STEPS} steps per stack, ' if factors else ''}"
                  f"{steps} INR steps at lr {lr:g}, TV {weight:g}, then {ls_steps} "
                  f"conjugate-gradient steps of least squares (smoothness {smooth:g}, anchor "
                  f"{anchor:g}), {spacing:g} mm grid, seed {seed}")
    out_scan = first.derive(intens[0].inverse(out, first.data.dtype), affine=grid.affine,
                            description=desc, derivation=derivation)
    # the output derives from every stack: a DICOM writer references the images of each
    keys = ("source_images", "source_affine", "series_uid", "study_uid")
    out_scan.meta["sources"] = [{k: src.get(k) for k in keys} for s in scans
                                for src in s.sources if src.get("source_images")]
    return Restoration(out_scan, hist)


def denoise_volume(scan: Scan, *, sigma="auto", steps: int | None = None, lr: float = LR,
                   tv: float | None = None, reference: Scan | None = None,
                   device: str = "auto", seed: int = 0, log_every: int = 10,
                   callback: Callable[[Progress], None] | None = None,
                   cancel=None) -> Restoration:
    """Denoise a 3D scan with one 3D INR that sees the neighbouring slices.

    The loss is the data error plus a 3D total-variation term (weight :data:`TV_PER_SIGMA`
    times sigma, or ``tv``) on all but :data:`HOLDOUT` of the voxels; what is rendered is the
    moving average of the weights (:data:`AVERAGE`) at the step where the held-out voxels'
    error was lowest, and the fit ends :data:`PATIENCE` steps after that error stopped
    improving (or after ``steps``). The held-out voxels are rendered like the others.

    Args:
        sigma: the noise level that sets the TV weight: ``"auto"`` (estimated from the
            volume's finest 3D wavelet band), a value in the scan's units, or ``"none"`` (the
            estimate, and no early end: all ``steps`` run, the best step is still kept).
    """
    steps = DEFAULT_STEPS["denoise"] if steps is None else steps
    _check_common(steps, lr)
    check_volume(scan, "volume denoising")
    check_output_size(scan.shape, "denoising")
    dev = resolve_device(device)
    grid = Grid(scan.shape, scan.affine)
    frame = WorldFrame(grid.corners_mm())
    inten = Intensity.for_scan(scan)
    norm = inten.forward(np.nan_to_num(scan.data, nan=inten.low))
    ref = _reference(reference, scan.shape, inten)
    sigma = parse_sigma(sigma)
    sig = estimate_sigma(norm) if sigma in ("none", "auto") else sigma / (inten.high - inten.low)
    patience = 0 if sigma == "none" else PATIENCE
    stack = Stack(torch.from_numpy(norm), scan.affine, frame, grid.spacing).to(dev)
    weight = TV_PER_SIGMA * sig if tv is None else tv
    prior = None
    if weight > 0:
        prior = TVPrior(grid, list(grid.affine[:3, :3].T), weight, BATCH["denoise"] // 2)
    net = _net("denoise", grid, frame, seed, dev)
    out, hist = _run([stack], grid, frame, net, batch=BATCH["denoise"], steps=steps, lr=lr,
                     prior=prior, average=AVERAGE["denoise"], holdout=HOLDOUT,
                     patience=patience, reference=ref, log_every=log_every,
                     callback=callback, cancel=cancel, seed=seed)
    reason = (f"the error on {HOLDOUT:.0%} held-out voxels had not improved for {patience} "
              f"steps; weights of step {hist['best_step']} kept" if hist["stop_step"] is not None
              else f"ran all steps; weights of step {hist['best_step']} (lowest held-out "
              f"error) kept")
    hist.update(task="denoise_volume", normalization=inten.to_dict(),
                sigma=sig * (inten.high - inten.low), holdout=HOLDOUT, stop_reason=reason)
    desc = "INR volume denoising (3D SIREN + TV, napari-strainer)"
    how = (f"{desc}: at most {steps} Adam steps at lr {lr:g} ({hist['stop_reason']}), "
           f"TV {weight:g}, seed {seed}")
    return Restoration(scan.derive(inten.inverse(out, scan.data.dtype), description=desc,
                                   derivation=how), hist)
