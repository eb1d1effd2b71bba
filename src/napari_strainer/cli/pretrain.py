"""``strainer pretrain``: pretrain an encoder (STRAINER, or Reptile of the encoder) or a whole
initialisation (Reptile) on scans, and evaluate it."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import BadArgumentError
from .common import Bar, add_common, positive_float, positive_int


def _modality(text: str) -> str:
    from ..pretrain.cards import check_modality

    try:
        return check_modality(text)
    except BadArgumentError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--modality: ")) from None


def add_pretrain_args(p: argparse.ArgumentParser) -> None:
    """The options of ``strainer pretrain``."""
    from ..core.fit import SCHEDULES
    from ..pretrain.train import (
        METHODS,
        PRETRAIN_LR,
        PRETRAIN_SCHEDULE,
        PRETRAIN_STEPS,
        REPTILE_LR,
        REPTILE_STEPS,
    )

    p.add_argument("inputs", nargs="+", metavar="INPUT", help="scans or folders of scans")
    p.add_argument("-o", "--output", required=True, metavar="ENCODER",
                   help="where to write the encoder (.safetensors)")
    p.add_argument("--size", type=positive_int, default=None,
                   help="resample training slices to N x N (default: keep)")
    p.add_argument("--method", choices=METHODS, default="strainer",
                   help="strainer (default): a shared encoder, one head per training slice; "
                        "reptile: a whole network (head included) meta-learned by Reptile, "
                        "the faster start for fitting; reptile-encoder: the shared encoder "
                        "meta-learned by Reptile (each task's head solved afresh)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help=f"strainer: Adam steps (default {PRETRAIN_STEPS}; the paper: 5000 at a "
                        f"constant 1e-4); reptile, reptile-encoder: outer steps (default "
                        f"{REPTILE_STEPS})")
    p.add_argument("--width", type=positive_int, default=256)
    p.add_argument("--layers", type=positive_int, default=6)
    p.add_argument("--shared-layers", type=positive_int, default=5)
    p.add_argument("--omega", type=positive_float, default=30.0)
    p.add_argument("--lr", type=positive_float, default=None,
                   help=f"strainer: peak learning rate (default {PRETRAIN_LR:g}); reptile, "
                        f"reptile-encoder: the inner loop's (default {REPTILE_LR:g})")
    p.add_argument("--schedule", choices=SCHEDULES, default=PRETRAIN_SCHEDULE,
                   help="cosine decay to 0 over the steps (default), or constant (the paper's); "
                        "of the learning rate (strainer) or of the outer step size from 1 "
                        "(reptile, reptile-encoder)")
    p.add_argument("--max-slices", type=positive_int, default=10,
                   help="evenly spaced non-empty slices taken per 3D scan")
    p.add_argument("--batch-coords", type=positive_int, default=None,
                   help="random coordinates per step (default: all)")
    p.add_argument("--checkpoint-every", type=positive_int, default=100)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    p.add_argument("--overwrite", action="store_true", help="replace an existing encoder")
    p.add_argument("--modality", type=_modality, default=None,
                   help="DICOM modality code of the training scans, e.g. MR or CT (default: "
                        "from the DICOM files; recorded in the encoder's card)")
    p.add_argument("--evaluate", action="store_true",
                   help="hold out 3 slices and record the gain over SIREN on them in the card")
    add_common(p)


def cmd_pretrain(a) -> None:
    from ..batch import list_scans
    from ..core.checkpoint import save_encoder
    from ..core.siren import SirenConfig
    from ..io import read_scan
    from ..io.atomic import check_output
    from ..pretrain.cards import evaluation_split, measure_gain, scans_modality
    from ..pretrain.train import pretrain, training_slices

    out = Path(a.output)
    if not a.resume:
        check_output(out, overwrite=a.overwrite, protect=a.inputs)
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
    bar = Bar("pretrain", a.quiet)
    try:
        enc = pretrain(images, out, method=a.method, config=config, steps=a.steps, lr=a.lr,
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
        what = (f"Reptile initialisation of all {config.layers} layers" if enc.whole
                else f"{'Reptile' if a.method == 'reptile-encoder' else 'STRAINER'} encoder "
                     f"of {config.shared_layers} layers")
        print(f"wrote {out}: {modality} {what} trained on {images.shape[0]} slices of "
              f"{tuple(images.shape[1:])}, {enc.info['steps']} steps, final loss "
              f"{enc.info['final_loss']:.3g}")
        if a.evaluate:
            ev = enc.info["evaluation"]
            own = "its own head" if enc.whole else "random head"
            for head, key in ((own, "gain_db"), ("solved head", "gain_db_solved")):
                print(f"gain over SIREN on {ev['held_out']} held-out slices, {head}: "
                      + ", ".join(f"{g:+.2f} dB at step {s}"
                                  for s, g in zip(ev["steps"], ev[key])))
