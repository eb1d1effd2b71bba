"""``strainer fit|superres|denoise|fuse``: read the scan(s), ask the planner, print the plan
(``--plan``) or run it, write the result."""

from __future__ import annotations

import argparse
import sys

from ..core.operators import PROFILES
from ..restore.noise import NOISE_KINDS
from ..restore.plan import MODES, Options
from ..restore.volume import PRIORS
from .common import (
    PROG,
    Bar,
    add_common,
    fraction,
    mm,
    nonneg_int,
    number,
    positive_float,
    positive_int,
    weight,
)

LONG_JOB_SECONDS = 30  # restorations estimated longer than this print the estimate first
_slice_scale = number(int, lambda v: v >= 2, "an integer >= 2")


def _sigma(text: str):
    from ..errors import BadArgumentError
    from ..restore.noise import parse_sigma

    try:
        return parse_sigma(text)
    except BadArgumentError as e:  # argparse's one-line message
        raise argparse.ArgumentTypeError(str(e).removeprefix("--sigma ")) from None


def add_restore_args(p: argparse.ArgumentParser, task: str, *, batch: bool = False) -> None:
    """The options of ``strainer TASK`` (``batch``: of ``strainer batch TASK``, which reads a
    folder and has no per-scan input, output, reference, history or plan)."""
    if not batch:
        p.add_argument("input", metavar="INPUT", help="NIfTI, DICOM file/series folder, PNG/TIFF")
        p.add_argument("-o", "--output", required=True, metavar="OUTPUT",
                       help="NIfTI file, or DICOM (folder or .dcm), or PNG/TIFF for 2D")
        _run_args(p)
    p.add_argument("--encoder", default="default",
                   help="encoder .safetensors, 'default' (shipped MRI encoder), 'none' (SIREN) "
                        "or 'self' (pretrain a short while on the scan's own slices first)")
    p.add_argument("--init", choices=("auto", "fixed"), default="auto",
                   help="auto (default): race SIREN, the encoder and warm starts from the "
                        "neighbouring slice on held-out pixels, stop converged slices; "
                        "fixed: the encoder (or SIREN) with --freeze, all steps (the paper)")
    p.add_argument("--head", choices=("solved", "random"), default="solved",
                   help="fitting from an encoder: solved (default) starts the head from a ridge "
                        "regression on the encoder's features; random: the paper's head "
                        "(a Reptile file always keeps its own head)")
    p.add_argument("--holdout", type=fraction, default=0.1,
                   help="share of observed pixels held out to choose the route (auto)")
    p.add_argument("--steps", type=nonneg_int, default=None,
                   help="Adam steps per slice batch, or of the volume INR (at most)")
    p.add_argument("--lr", type=positive_float, default=1e-4)
    p.add_argument("--freeze", type=nonneg_int, default=None,
                   help="keep the first K encoder layers fixed (default: per task)")
    p.add_argument("--log-every", type=positive_int, default=10)
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="slices fitted at once (default: from free memory)")
    p.add_argument("--series", help="series UID or number, for a folder holding several series")
    p.add_argument("--volume", type=nonneg_int, default=None, help="volume of a 4D NIfTI")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    if task == "superres":
        p.add_argument("--scale", type=positive_int, default=None,
                       help="integer in-plane super-resolution factor (default 1 with "
                            "--slice-scale)")
        p.add_argument("--slice-scale", type=_slice_scale, default=None,
                       help="integer >= 2: refine the slice axis (3D INR through the slice "
                            "profile)")
        p.add_argument("--slice-thickness", type=mm, default=None,
                       help="slice thickness in mm (default: DICOM SliceThickness, else "
                            "spacing)")
        _profile_arg(p)
        p.add_argument("--slice-axis", type=int, choices=(0, 1, 2), default=None,
                       help="the axis --slice-scale refines, in the order napari shows it "
                            "(for a NIfTI file, 0 is its third axis). Default: the DICOM "
                            "slice normal, else the one coarse axis")
        p.add_argument("--prior", choices=PRIORS, default="auto",
                       help="through-plane start: auto (default: a CNN learned from the "
                            "scan's own in-plane planes, where it has enough of them), planes "
                            "or none (cubic interpolation)")
        if not batch:
            p.add_argument("--coarse-steps", type=nonneg_int, default=None,
                           help="in-plane: first steps fitting the observed pixels at their "
                                "centres, 1/S^2 the cost (default: 200, at most 5/6 of "
                                "--steps; 0: every step through the exact operator)")
            _volume_args(p)
    if task == "denoise":
        p.add_argument("--sigma", type=_sigma, default="auto",
                       help="noise level in the scan's units, 'auto' (estimate) or 'none' "
                            "(INR paths: run exactly --steps)")
        p.add_argument("--noise", choices=NOISE_KINDS, default="auto",
                       help="noise model: auto (default: rician for magnitude data such as "
                            "MR, gaussian for CT and data with negative values), rician or "
                            "gaussian")
        p.add_argument("--mode", choices=MODES, default="auto",
                       help="auto (default): a race of denoisers (non-local means, total "
                            "variation, BM4D when installed) judged by their estimated error "
                            "(SURE) and blended; volume: one 3D INR for the whole scan; "
                            "slices: one 2D INR per slice (from the encoder)")
        p.add_argument("--coils", type=int, default=1, metavar="N",
                       help="magnitude MR combined as the root sum of squares of N receive "
                            "coils: non-central chi noise (default 1: Rician); sigma per coil")
        p.add_argument("--slab-voxels", type=int, default=None, metavar="N",
                       help="--mode auto: volumes above N voxels (default 12,000,000) race "
                            "slab by slab, so memory is that of one slab")
        if not batch:
            p.add_argument("--tv", type=weight, default=None,
                           help="--mode volume: weight of the 3D total-variation term")
    add_common(p)


def add_fuse_args(p: argparse.ArgumentParser) -> None:
    """``strainer fuse STACK STACK [...] -o OUTPUT``."""
    p.add_argument("inputs", nargs="+", metavar="STACK",
                   help="NIfTI files or DICOM series of one anatomy (the first sets the "
                        "output's orientation and field of view)")
    p.add_argument("-o", "--output", required=True, metavar="OUTPUT")
    p.add_argument("--spacing", type=mm, default=None,
                   help="isotropic output spacing in mm (default: finest in-plane spacing)")
    p.add_argument("--prior", choices=PRIORS, default="auto",
                   help="start: auto (default: each stack refined by a CNN learned from its "
                        "own in-plane planes, where every stack has enough of them), planes "
                        "or none (a 3D SIREN over all stacks)")
    p.add_argument("--steps", type=nonneg_int, default=None,
                   help="Adam steps of the 3D SIREN (default 0 on the learned prior, else "
                        "500; 0 with --prior none: classical least-squares reconstruction "
                        "alone)")
    p.add_argument("--lr", type=positive_float, default=1e-4, help="Adam learning rate")
    p.add_argument("--encoder", default="none",
                   help="'none' (a 3D SIREN; no pretrained 3D encoder exists)")
    p.add_argument("--log-every", type=positive_int, default=10)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _profile_arg(p)
    _volume_args(p)
    _run_args(p)
    add_common(p)


def _profile_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--slice-profile", choices=PROFILES, default="box",
                   help="slice profile along the normal: box of the thickness, or gaussian "
                        "with FWHM = thickness")


def _volume_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tv", type=weight, default=None,
                   help="weight of the total-variation term (default: per task)")
    p.add_argument("--ls-steps", type=nonneg_int, default=None,
                   help="conjugate-gradient steps of least squares: the data-consistency step "
                        "after the INR, or with fuse --steps 0 the reconstruction (default 100)")


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reference", metavar="REF", help="clean scan on the output grid: PSNR")
    p.add_argument("--history", metavar="HISTORY.json", help="write the fitting history")
    p.add_argument("--plan", action="store_true",
                   help="print the plan (path, route, noise, steps, memory, ETA, reasons) and "
                        "exit without fitting or writing anything")


def options_from_args(a, cls=Options, **extra) -> Options:
    """The planner's options from parsed arguments (``cls``: :class:`Options` or a subclass,
    e.g. the batch's, with ``extra`` fields)."""
    task = a.task if a.verb == "batch" else a.verb
    get = vars(a).get
    return cls(task=task, encoder=get("encoder", "default"), init=get("init", "auto"),
               holdout=get("holdout", 0.1), head=get("head", "solved"), steps=a.steps,
               coarse_steps=get("coarse_steps"), lr=a.lr, scale=get("scale", 1),
               slice_scale=get("slice_scale"), slice_profile=get("slice_profile", "box"),
               slice_thickness=get("slice_thickness"), slice_axis=get("slice_axis"),
               prior=get("prior", "auto"), freeze=get("freeze"),
               sigma=get("sigma", "auto"), noise=get("noise", "auto"), coils=get("coils", 1),
               mode=get("mode", "auto"), slab_voxels=get("slab_voxels"), tv=get("tv"),
               ls_steps=get("ls_steps"), spacing=get("spacing"), device=a.device,
               seed=a.seed, log_every=a.log_every, batch_size=get("batch_size"), **extra)


def cmd_restore(a) -> None:
    """``strainer fit|superres|denoise|fuse``."""
    from ..io import read_scan, write_scan
    from ..io.atomic import check_output, write_json
    from ..restore.plan import make_plan, run

    options = options_from_args(a)
    inputs = a.inputs if a.verb == "fuse" else [a.input]
    if not a.plan:
        check_output(a.output, overwrite=a.overwrite, protect=inputs)
    if a.verb == "fuse":
        scans = [read_scan(p) for p in inputs]
    else:
        scans = [read_scan(a.input, series=a.series, volume=a.volume)]
    ref = read_scan(a.reference) if a.reference else None
    plan = make_plan(scans, options, reference=ref)
    if a.plan:
        print(plan.describe())
        return
    for note in plan.notes:
        print(f"{PROG}: warning: {note}", file=sys.stderr)
    bar = Bar(a.verb, a.quiet)
    if not a.quiet and plan.eta_seconds is not None and plan.eta_seconds > LONG_JOB_SECONDS:
        bar.tqdm.write(f"{PROG}: estimated time {plan.eta_text()}", file=sys.stderr)
    try:
        res = run(plan, callback=bar)
    finally:
        bar.close()
    written = write_scan(res.scan, a.output, overwrite=a.overwrite, protect=inputs)
    if a.history:
        write_json(a.history, res.history)
    if not a.quiet:
        print(f"wrote {written}: {res.scan.shape} voxels, {_summary(plan, res.history)}")


def _summary(plan, h: dict) -> str:
    """One line on how the restoration ran, from its history."""
    final = h.get("psnr_final") or (h["psnr"][-1] if h.get("psnr") else None)
    psnr = f", PSNR {final:.2f} dB" if final else ""
    loss = f"loss {h['loss'][-1]:.3g}" if h.get("loss") else "no INR steps"
    if plan.path == "constant":
        return h["stop_reason"]
    if plan.path == "race":
        r = h["race"]
        est = (f"estimated PSNR {r['psnr_estimate']:.1f} dB" if r["psnr_estimate"] is not None
               else f"PSNR not estimated ({r['warning']})")
        return (f"denoised by {r['winner']} (lowest estimated error), noise "
                f"{h['noise']['model']} sigma {h['noise']['sigma']:.4g}, {est}{psnr}, "
                f"{sum(r['seconds'].values()):.0f} s")
    if plan.task == "superres" and plan.path == "volume":
        start = (f"start: in-plane prior ({h['prior_gain_db']:+.2f} dB over cubic on held-out "
                 f"planes)" if h.get("prior") == "planes" else "start: cubic")
        return (f"through-plane x{plan.options.slice_scale} along {h['slice_axis_reason']}, "
                f"{plan.options.slice_profile} profile of {h['slice_thickness_mm']:g} mm, "
                f"{start}, {h.get('steps_done', 0)} INR steps, {h['ls_steps']} of least "
                f"squares{psnr}")
    if plan.path == "fuse":
        gains = ", ".join(f"{g:+.2f}" for g in h.get("prior_gain_db") or [])
        start = f" (held-out in-plane gains over cubic {gains} dB)" if gains else ""
        return (f"{len(plan.scans)} stacks fused at {h.get('spacing_mm', 0):g} mm by "
                f"{h['start']}{start}, {h.get('steps_done', 0)} INR steps, {h['ls_steps']} of "
                f"least squares{psnr}")
    if plan.path != "slices":
        return (f"volume denoising ({h.get('stop_reason')}), {h.get('steps_done', 0)} steps, "
                f"{loss}{psnr}")
    route = (f"route {h['route']} (chosen on held-out pixels, probes "
             f"{h['probe_seconds']:.0f} s)" if h["probes"] else f"route {h['route']}")
    ran = [r for r in h["steps_run"] if r is not None]
    lo, hi = (min(ran), max(ran)) if ran else (0, 0)
    steps = f"{lo} steps" if lo == hi else f"{lo}-{hi} steps"
    return (f"{plan.task}, {route}, freeze {h['freeze']}, {steps} per slice "
            f"({h['stop_reason']}), {loss}{psnr}, {h['seconds_total']:.0f} s")
