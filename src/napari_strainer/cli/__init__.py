"""The ``strainer`` command: pretrain, fit, superres, denoise, fuse, batch, info, convert, demo.

Every user error ends with one line on stderr and exit code 2; nothing is half written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from .. import __version__
from ..errors import BadArgumentError, StrainerError

PROG = "strainer"
LONG_JOB_SECONDS = 30  # restorations estimated longer than this print the estimate first


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints usage too; keep it short)
        self.exit(2, f"{self.prog}: error: {message}\n")


def number(kind: type, ok, expected: str):
    """An argparse ``type``: ``kind(text)`` accepted when ``ok(value)``, otherwise one line
    ``expected <expected>, got '<text>'``."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            v = None
        if v is None or not ok(v):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return v
    return parse


_positive_int = number(int, lambda v: v >= 1, "a positive integer")
_nonneg_int = number(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = number(float, lambda v: v > 0, "a positive number")
_fraction = number(float, lambda v: 0 < v <= 0.5, "a fraction in (0, 0.5]")


def _sigma(text: str):
    if text in ("auto", "none"):
        return text
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected auto, none or a noise level >= 0, got {text!r}") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"noise level must be >= 0, got {text!r}")
    return v


def _modality(text: str) -> str:
    from ..pretrain.cards import check_modality

    try:
        return check_modality(text)
    except BadArgumentError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--modality: ")) from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0, help="random seed (CPU results reproducible)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summaries")


def _restore_args(p: argparse.ArgumentParser, task: str, *, batch: bool = False) -> None:
    if not batch:
        p.add_argument("input", metavar="INPUT", help="NIfTI, DICOM file/series folder, PNG/TIFF")
        p.add_argument("-o", "--output", required=True, metavar="OUTPUT",
                       help="NIfTI file, or DICOM (folder or .dcm), or PNG/TIFF for 2D")
        p.add_argument("--reference", metavar="REF", help="clean scan on the output grid: PSNR")
        p.add_argument("--history", metavar="HISTORY.json", help="write the fitting history")
    p.add_argument("--encoder", default="default",
                   help="encoder .safetensors, 'default' (shipped MRI encoder), 'none' (SIREN) "
                        "or 'self' (pretrain a short while on the scan's own slices first)")
    p.add_argument("--init", choices=("auto", "fixed"), default="auto",
                   help="auto (default): race SIREN, the encoder and warm starts from the "
                        "neighbouring slice on held-out pixels, stop converged slices; "
                        "fixed: the encoder (or SIREN) with --freeze, all steps (the paper)")
    p.add_argument("--head", choices=("solved", "random"), default="solved",
                   help="fitting from an encoder: solved (default) starts the head from a ridge "
                        "regression on the encoder's features; random: the paper's head")
    p.add_argument("--holdout", type=_fraction, default=0.1,
                   help="share of observed pixels held out to choose the route (auto)")
    p.add_argument("--steps", type=_nonneg_int, default=None,
                   help="Adam steps per slice batch (auto: at most)")
    p.add_argument("--lr", type=_positive_float, default=1e-4)
    p.add_argument("--freeze", type=_nonneg_int, default=None,
                   help="keep the first K encoder layers fixed (default: per task)")
    p.add_argument("--log-every", type=_positive_int, default=10)
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="slices fitted at once (default: from free memory)")
    p.add_argument("--series", help="series UID or number, for a folder holding several series")
    p.add_argument("--volume", type=_nonneg_int, default=None, help="volume of a 4D NIfTI")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    if task == "superres":
        p.add_argument("--scale", type=_positive_int, default=None,
                       help="integer in-plane super-resolution factor (default 1 with "
                            "--slice-scale)")
        if not batch:
            p.add_argument("--coarse-steps", type=_nonneg_int, default=None,
                           help="in-plane: first steps fitting the observed pixels at their "
                                "centres, 1/S^2 the cost (default: 200, at most 5/6 of "
                                "--steps; 0: every step through the exact operator)")
        from .volume import add_superres_args

        add_superres_args(p, batch=batch)
    if task == "denoise":
        p.add_argument("--sigma", type=_sigma, default="auto",
                       help="noise level in the scan's units, 'auto' (estimate) or 'none' "
                            "(run exactly --steps); slices stop at it, the volume path "
                            "weights its TV term by it and stops on held-out voxels")
        p.add_argument("--mode", choices=("auto", "volume", "slices"), default="auto",
                       help="volume: one 3D INR for the whole scan (it sees the neighbouring "
                            "slices; no encoder); slices: one 2D INR per slice (from the "
                            "encoder); auto (default): volume for 3D scans of at most 1.2 "
                            "million voxels, else slices")
        if not batch:
            p.add_argument("--tv", type=_positive_float, default=None,
                           help="--mode volume: weight of the 3D total-variation term")
    _common(p)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="STRAINER implicit neural representations for "
                     "medical scans.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    from ..core.fit import SCHEDULES
    from ..pretrain.train import PRETRAIN_LR, PRETRAIN_SCHEDULE, PRETRAIN_STEPS

    p = sub.add_parser("pretrain", help="pretrain a shared encoder on scans")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="scans or folders of scans")
    p.add_argument("-o", "--output", required=True, metavar="ENCODER",
                   help="where to write the encoder (.safetensors)")
    p.add_argument("--size", type=_positive_int, default=None,
                   help="resample training slices to N x N (default: keep)")
    p.add_argument("--steps", type=_positive_int, default=PRETRAIN_STEPS,
                   help="Adam steps (default %(default)s; the paper: 5000 at a constant 1e-4)")
    p.add_argument("--width", type=_positive_int, default=256)
    p.add_argument("--layers", type=_positive_int, default=6)
    p.add_argument("--shared-layers", type=_positive_int, default=5)
    p.add_argument("--omega", type=_positive_float, default=30.0)
    p.add_argument("--lr", type=_positive_float, default=PRETRAIN_LR,
                   help="peak learning rate (default %(default)s)")
    p.add_argument("--schedule", choices=SCHEDULES, default=PRETRAIN_SCHEDULE,
                   help="learning-rate schedule: cosine decay to 0 over the steps (default), "
                        "or constant (the paper's)")
    p.add_argument("--max-slices", type=_positive_int, default=10,
                   help="evenly spaced non-empty slices taken per 3D scan")
    p.add_argument("--batch-coords", type=_positive_int, default=None,
                   help="random coordinates per step (default: all)")
    p.add_argument("--checkpoint-every", type=_positive_int, default=100)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    p.add_argument("--overwrite", action="store_true", help="replace an existing encoder")
    p.add_argument("--modality", type=_modality, default=None,
                   help="DICOM modality code of the training scans, e.g. MR or CT (default: "
                        "from the DICOM files; recorded in the encoder's card)")
    p.add_argument("--evaluate", action="store_true",
                   help="hold out 3 slices and record the gain over SIREN on them in the card")
    _common(p)

    for task, text in (("fit", "fit an INR to a scan"),
                       ("superres", "super-resolve a scan in-plane"),
                       ("denoise", "denoise a scan")):
        _restore_args(sub.add_parser(task, help=text), task)

    from .volume import add_fuse_parser

    add_fuse_parser(sub, _common)

    p = sub.add_parser("batch", help="process every scan of a folder (resumable)")
    bsub = p.add_subparsers(dest="task", required=True, parser_class=_Parser)
    for task in ("fit", "superres", "denoise"):
        q = bsub.add_parser(task, help=f"{task} every scan of IN_DIR")
        q.add_argument("in_dir", metavar="IN_DIR")
        q.add_argument("out_dir", metavar="OUT_DIR")
        q.add_argument("--format", choices=("nifti", "dicom"), default="nifti")
        _restore_args(q, task, batch=True)

    p = sub.add_parser("info", help="describe a scan, a folder of series, or an encoder "
                       "(.safetensors: its card)")
    p.add_argument("input", metavar="INPUT")
    p.add_argument("--series", help="series UID or number")
    p.add_argument("--volume", type=_nonneg_int, default=None, help="volume of a 4D NIfTI")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _common(p)

    p = sub.add_parser("convert", help="convert DICOM <-> NIfTI keeping geometry")
    p.add_argument("input", metavar="INPUT")
    p.add_argument("-o", "--output", required=True, metavar="OUTPUT")
    p.add_argument("--series", help="series UID or number")
    p.add_argument("--volume", type=_nonneg_int, default=None, help="volume of a 4D NIfTI")
    p.add_argument("--overwrite", action="store_true")
    _common(p)

    p = sub.add_parser("demo", help="the main job on the shipped sample data")
    p.add_argument("-o", "--output", default="strainer-demo", metavar="OUTDIR")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="steps of every INR run (default: 200 per 2D run, the volume task's "
                        "default for the through-plane run)")
    p.add_argument("--pretrain-steps", type=_positive_int, default=None)
    _common(p)
    return parser


class _Bar:
    """A tqdm progress callback (silent when not a TTY or --quiet)."""

    def __init__(self, desc: str, quiet: bool):
        from tqdm import tqdm

        self.tqdm = tqdm(desc=desc, unit="step", disable=quiet or not sys.stderr.isatty(),
                         dynamic_ncols=True)

    def __call__(self, p) -> None:
        self.tqdm.total = p.total
        self.tqdm.n = p.step
        post = {"loss": f"{p.loss:.2e}"}
        if p.psnr is not None:
            post["psnr"] = f"{p.psnr:.2f}"
        self.tqdm.set_postfix(post, refresh=True)

    def close(self) -> None:
        self.tqdm.close()


def _check_output(path: str | Path, overwrite: bool, inputs=()) -> None:
    """Refuse early (before any work) an output that exists or is one of the inputs."""
    out = Path(path).resolve()
    for i in inputs:
        if Path(i).resolve() == out:
            raise BadArgumentError(f"{path}: output would overwrite the input")
    if out.exists() and not overwrite:
        raise BadArgumentError(f"{path}: already exists (pass --overwrite to replace it)")


def _write_json(path: str | Path, data: dict) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def cmd_pretrain(a) -> None:
    from ..batch import list_scans
    from ..core.checkpoint import save_encoder
    from ..core.siren import SirenConfig
    from ..io import read_scan
    from ..pretrain.cards import evaluation_split, measure_gain, scans_modality
    from ..pretrain.train import pretrain, training_slices

    out = Path(a.output)
    if not a.resume:
        _check_output(out, a.overwrite, a.inputs)
    sources = []  # (path, series UID or None): one per scan, a folder's series each apart
    for i in a.inputs:
        p = Path(i)
        if not p.is_dir():
            sources.append((p, None))
            continue
        found = [(Path(d["image"]), d["series"]) for d in list_scans(p)]
        if not found:
            raise BadArgumentError(f"{p}: no scans found in this folder")
        sources += found
    config = SirenConfig(width=a.width, layers=a.layers, shared_layers=a.shared_layers,
                         omega_first=a.omega, omega_hidden=a.omega)
    scans = [read_scan(p, series=uid) for p, uid in sources]
    if a.evaluate:
        images, held_out = evaluation_split(scans, size=a.size, max_slices=a.max_slices)
    else:
        images = training_slices(scans, size=a.size, max_slices=a.max_slices)
    modality = a.modality or scans_modality(scans)
    bar = _Bar("pretrain", a.quiet)
    try:
        enc = pretrain(images, out, config=config, steps=a.steps, lr=a.lr,
                       schedule=a.schedule, batch_coords=a.batch_coords, device=a.device,
                       seed=a.seed,
                       resume=a.resume, checkpoint_every=a.checkpoint_every, callback=bar,
                       info={"files": [p.name for p, _ in sources], "modality": modality})
    finally:
        bar.close()
    if a.evaluate:
        enc.info["evaluation"] = measure_gain(enc, held_out, device=a.device, seed=a.seed)
        save_encoder(enc, out)
    if not a.quiet:
        print(f"wrote {out}: {modality} encoder of {config.shared_layers} layers trained on "
              f"{images.shape[0]} slices of {tuple(images.shape[1:])}, {enc.info['steps']} "
              f"steps, final loss {enc.info['final_loss']:.3g}")
        if a.evaluate:
            ev = enc.info["evaluation"]
            for head, key in (("random head", "gain_db"), ("solved head", "gain_db_solved")):
                print(f"gain over SIREN on {ev['held_out']} held-out slices, {head}: "
                      + ", ".join(f"{g:+.2f} dB at step {s}"
                                  for s, g in zip(ev["steps"], ev[key])))


def _stop_rule(a):
    if getattr(a, "sigma", None) is None:
        return None
    from ..restore.noise import make_stop_rule

    return make_stop_rule(a.sigma)


def cmd_restore(a) -> None:
    from ..io import read_scan, write_scan
    from ..restore.slices import describe_estimate, restore
    from .volume import cmd_denoise_volume, cmd_superres_volume

    if a.verb == "superres" and a.slice_scale:
        return cmd_superres_volume(a)
    if a.verb == "superres" and a.scale is None:
        raise BadArgumentError("superres needs --scale S (in-plane), --slice-scale F "
                               "(through-plane), or both")
    if a.verb == "denoise" and a.mode != "slices" and cmd_denoise_volume(a):
        return None
    _check_output(a.output, a.overwrite, [a.input])
    scan = read_scan(a.input, series=a.series, volume=a.volume)
    ref = read_scan(a.reference) if a.reference else None
    bar = _Bar(a.verb, a.quiet)

    def announce(seconds: float) -> None:  # after restore has checked the arguments
        if seconds > LONG_JOB_SECONDS:
            early = "; converged slices stop earlier" if a.verb != "superres" else ""
            bar.tqdm.write(f"{PROG}: estimated time {describe_estimate(seconds, a.device)}"
                           f"{early}", file=sys.stderr)

    try:
        res = restore(scan, task=a.verb, encoder=a.encoder, init=a.init, holdout=a.holdout,
                      head=a.head, steps=a.steps,
                      coarse_steps=getattr(a, "coarse_steps", None), lr=a.lr,
                      scale=getattr(a, "scale", 1), freeze=a.freeze, stop=_stop_rule(a),
                      reference=ref, device=a.device, seed=a.seed, log_every=a.log_every,
                      batch_size=a.batch_size, callback=bar,
                      on_estimate=None if a.quiet else announce)
    finally:
        bar.close()
    written = write_scan(res.scan, a.output, overwrite=a.overwrite, protect=[a.input])
    if a.history:
        _write_json(a.history, res.history)
    if not a.quiet:
        h = res.history
        extra = f", PSNR {h['psnr'][-1]:.2f} dB" if h.get("psnr") else ""
        route = (f"route {h['route']} (chosen on held-out pixels, probes "
                 f"{h['probe_seconds']:.0f} s)" if h["probes"] else f"route {h['route']}")
        print(f"wrote {written}: {res.scan.shape} voxels, {a.verb}, {route}, freeze "
              f"{h['freeze']}, {_steps_text(h)}, loss {h['loss'][-1]:.3g}{extra}, "
              f"{h['seconds_total']:.0f} s")


def _steps_text(h: dict) -> str:
    ran = [r for r in h["steps_run"] if r is not None]
    lo, hi = (min(ran), max(ran)) if ran else (0, 0)
    text = f"{lo} steps" if lo == hi else f"{lo}-{hi} steps"
    return f"{text} per slice ({h['stop_reason']})"


def cmd_batch(a) -> None:
    from ..batch import run_batch

    failed = run_batch(a)
    if failed:
        raise SystemExit(1)


def cmd_info(a) -> None:
    from ..io import describe

    if Path(a.input).suffix == ".safetensors":  # an encoder: its card
        from ..core.checkpoint import load_encoder
        from ..pretrain.cards import card, format_card

        c = card(load_encoder(a.input))
        print(json.dumps(c, indent=1) if a.json else f"encoder: {a.input}\n{format_card(c)}")
        return
    info = describe(a.input, series=a.series, volume=a.volume)
    if a.json:
        print(json.dumps(info, indent=1, default=str))
        return
    for k, v in info.items():
        if k == "series" and isinstance(v, list):
            print("series:")
            for s in v:
                print("  " + "  ".join(f"{kk}={vv}" for kk, vv in s.items()))
        elif k == "affine":
            print("affine (voxel -> RAS mm):")
            for row in v:
                print("  " + " ".join(f"{x:10.4f}" for x in row))
        else:
            print(f"{k}: {v}")


def cmd_convert(a) -> None:
    from ..io import convert

    _check_output(a.output, a.overwrite, [a.input])
    written = convert(a.input, a.output, series=a.series, volume=a.volume,
                      overwrite=a.overwrite)
    if not a.quiet:
        print(f"wrote {written}")


def cmd_demo(a) -> None:
    from ..demo import run_demo

    run_demo(a.output, steps=a.steps, pretrain_steps=a.pretrain_steps, device=a.device,
             seed=a.seed, quiet=a.quiet)


def cmd_fuse(a) -> None:
    from .volume import cmd_fuse as run

    run(a)


COMMANDS = {"pretrain": cmd_pretrain, "fit": cmd_restore, "superres": cmd_restore,
            "denoise": cmd_restore, "fuse": cmd_fuse, "batch": cmd_batch, "info": cmd_info,
            "convert": cmd_convert, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``strainer`` console script."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error (already printed)
        return int(e.code or 0)
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        format=f"{PROG}: %(message)s")
    # Reader warnings (assumed geometry, replaced NaNs, ...) as one line each, no source line.
    warnings.showwarning = lambda message, *_a, **_k: print(f"{PROG}: warning: {message}",
                                                            file=sys.stderr)
    try:
        COMMANDS[args.verb](args)
    except StrainerError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
