"""The volume parts of the ``strainer`` command: ``superres --slice-scale``, ``fuse`` and the
volume path of ``denoise`` (see :mod:`napari_strainer.volume`)."""

from __future__ import annotations

import argparse
import sys

from ..core.operators import PROFILES
from ..errors import BadArgumentError
from . import number

_slice_scale = number(int, lambda v: v >= 2, "an integer >= 2")
_mm = number(float, lambda v: v > 0, "a positive length in mm")
_tv = number(float, lambda v: v >= 0, "a weight >= 0")


def _profile_args(p: argparse.ArgumentParser, *, tv: bool = True) -> None:
    p.add_argument("--slice-profile", choices=PROFILES, default="box",
                   help="slice profile along the normal: box of the thickness, or gaussian "
                        "with FWHM = thickness")
    if tv:
        p.add_argument("--tv", type=_tv, default=None,
                       help="weight of the total-variation term (default: per task)")


def add_superres_args(p: argparse.ArgumentParser, *, batch: bool = False) -> None:
    """Through-plane options of ``strainer superres`` (``batch``: of ``strainer batch
    superres``, which has no ``--tv``)."""
    p.add_argument("--slice-scale", type=_slice_scale, default=None,
                   help="integer >= 2: refine the slice axis (3D INR through the slice profile)")
    p.add_argument("--slice-thickness", type=_mm, default=None,
                   help="slice thickness in mm (default: DICOM SliceThickness, else spacing)")
    _profile_args(p, tv=not batch)


def add_fuse_parser(sub, common, bar_help: str = "") -> argparse.ArgumentParser:
    """``strainer fuse STACK STACK [...] -o OUTPUT``."""
    p = sub.add_parser("fuse", help="fuse thick-slice stacks (any orientation) into one "
                       "isotropic volume")
    p.add_argument("inputs", nargs="+", metavar="STACK",
                   help="NIfTI files or DICOM series of one anatomy (the first sets the "
                        "output's orientation and field of view)")
    p.add_argument("-o", "--output", required=True, metavar="OUTPUT")
    p.add_argument("--spacing", type=_mm, default=None,
                   help="isotropic output spacing in mm (default: finest in-plane spacing)")
    p.add_argument("--steps", type=int, default=None,
                   help="Adam steps of the 3D SIREN (default 500; 0: classical least-squares "
                        "reconstruction alone, see benchmarks/volume.py)")
    p.add_argument("--ls-steps", type=int, default=None,
                   help="conjugate-gradient steps of least squares: the data-consistency step "
                        "after the INR, or with --steps 0 the reconstruction (default 100)")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate")
    p.add_argument("--encoder", default="none",
                   help="'none' (a 3D SIREN; no pretrained 3D encoder exists yet)")
    p.add_argument("--reference", metavar="REF", help="clean scan on the output grid: PSNR")
    p.add_argument("--history", metavar="HISTORY.json", help="write the fitting history")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _profile_args(p)
    common(p)
    return p


def _check_encoder(a) -> None:
    from ..restore.volume import check_encoder

    check_encoder(getattr(a, "encoder", "none"))


def _finish(a, res, written, what: str) -> None:
    from . import _write_json

    if a.history:
        _write_json(a.history, res.history)
    if not a.quiet:
        h = res.history
        extra = f", PSNR {h['psnr'][-1]:.2f} dB" if h.get("psnr") else ""
        print(f"wrote {written}: {res.scan.shape} voxels, {what}, {h['steps_done']} steps, "
              f"loss {h['loss'][-1]:.3g}{extra}")


def cmd_superres_volume(a) -> None:
    """``strainer superres --slice-scale F``."""
    from ..io import read_scan, write_scan
    from ..restore.volume import superres_volume
    from . import _Bar, _check_output

    _check_encoder(a)
    _check_output(a.output, a.overwrite, [a.input])
    scan = read_scan(a.input, series=a.series, volume=a.volume)
    ref = read_scan(a.reference) if a.reference else None
    bar = _Bar("superres", a.quiet)
    try:
        res = superres_volume(scan, slice_scale=a.slice_scale, scale=a.scale or 1,
                              profile=a.slice_profile, thickness=a.slice_thickness,
                              steps=a.steps, lr=a.lr, tv=a.tv, reference=ref, device=a.device,
                              seed=a.seed, log_every=a.log_every, callback=bar)
    finally:
        bar.close()
    written = write_scan(res.scan, a.output, overwrite=a.overwrite, protect=[a.input])
    _finish(a, res, written, f"through-plane x{a.slice_scale}, {a.slice_profile} profile of "
            f"{res.history['slice_thickness_mm']:g} mm")


def cmd_fuse(a) -> None:
    """``strainer fuse``."""
    from ..io import read_scan, write_scan
    from ..restore.volume import fuse
    from . import _Bar, _check_output

    _check_encoder(a)
    if a.steps is not None and a.steps < 0:
        raise BadArgumentError(f"--steps must be non-negative, got {a.steps}")
    _check_output(a.output, a.overwrite, a.inputs)
    scans = [read_scan(p) for p in a.inputs]
    ref = read_scan(a.reference) if a.reference else None
    bar = _Bar("fuse", a.quiet)
    try:
        res = fuse(scans, spacing=a.spacing, profile=a.slice_profile, steps=a.steps,
                   ls_steps=a.ls_steps, lr=a.lr,
                   tv=a.tv, reference=ref, device=a.device, seed=a.seed,
                   log_every=max(1, a.log_every), callback=bar)
    finally:
        bar.close()
    written = write_scan(res.scan, a.output, overwrite=a.overwrite, protect=a.inputs)
    _finish(a, res, written, f"{len(scans)} stacks fused at {res.history['spacing_mm']:g} mm")


def cmd_denoise_volume(a) -> bool:
    """``strainer denoise --mode volume|auto``; False (nothing done) when the scan takes the
    slice path (:func:`napari_strainer.volume.denoise_mode`)."""
    from ..io import read_scan, write_scan
    from ..restore.volume import denoise_mode, denoise_volume, is_2d_encoder
    from . import PROG, _Bar, _check_output

    _check_output(a.output, a.overwrite, [a.input])
    scan = read_scan(a.input, series=a.series, volume=a.volume)
    if denoise_mode(scan.shape, a.mode) == "slices":
        return False
    if a.mode == "volume":
        _check_encoder(a)
    elif is_2d_encoder(a.encoder) and not a.quiet:
        print(f"{PROG}: --mode {a.mode} denoises this 3D scan as one volume, which uses no "
              f"encoder; --mode slices uses {a.encoder}", file=sys.stderr)
    ref = read_scan(a.reference) if a.reference else None
    bar = _Bar("denoise", a.quiet)
    try:
        res = denoise_volume(scan, sigma=a.sigma, steps=a.steps, lr=a.lr, tv=a.tv,
                             reference=ref, device=a.device, seed=a.seed,
                             log_every=a.log_every, callback=bar)
    finally:
        bar.close()
    written = write_scan(res.scan, a.output, overwrite=a.overwrite, protect=[a.input])
    _finish(a, res, written, f"volume denoising ({res.history['stop_reason']})")
    return True
