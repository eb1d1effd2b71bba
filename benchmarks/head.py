"""Solved head (:func:`napari_strainer.core.solve_head`): its ridge, and a check out of domain.

1. ``sweep``: the STRAINER-10 encoder of ``paper_fit.py`` (``results/paper_fit_encoders``,
   else the shipped MRI encoder) on the 5 held-out brain slices of ``paper_fit.py`` (64 x 64),
   every relative ridge in ``--ridges`` (and the random head), every weight trained (Adam 1e-4):
   PSNR of the current iterate at steps 0/10/50/100 (``--sweep-steps``).
2. ``ct``: the same MRI encoder on the sample CTs (``ct_small``, the 2 frames of
   ``ct_enhanced``, ``ct_j2k``) at 64 x 64, normalised as ``restore`` does
   (``Intensity.for_scan``: the HU window): SIREN, random head, solved head (each ``--ridge``),
   PSNR at steps 0/10/50/100/200 (``--steps``).
3. ``superres`` (not in ``both``): x2 super-resolution of 2 held-out brain slices (32 x 32
   observed, the 64 x 64 slice the reference) through ``AreaDownsample``, the same encoder at
   freeze 3 (restore's default for super-resolution) and 0, random vs solved head, 100 steps.

    python benchmarks/head.py [--part sweep|ct|both|superres] [--ridges 1e-6,1e-3,...] [--ridge 1e-2,...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import RESULTS, save, table
from paper_fit import slices

import napari_strainer
from napari_strainer.core import (
    AreaDownsample,
    BatchedSiren,
    Identity,
    SirenConfig,
    fit,
    load_encoder,
)
from napari_strainer.core.head import DEFAULT_RIDGE, solve_head
from napari_strainer.core.problems import ImageProblem
from napari_strainer.io import read_scan, sample_path
from napari_strainer.io.intensity import Intensity

SHIPPED = Path(napari_strainer.__file__).parent / "encoders" / "mri_default.safetensors"
CT_SAMPLES = ("ct_small", "ct_enhanced", "ct_j2k")


def ct_slices(size: int) -> torch.Tensor:
    out = []
    for name in CT_SAMPLES:
        scan = read_scan(sample_path(name))
        norm = Intensity.for_scan(scan).forward(np.nan_to_num(scan.data).astype(np.float32))
        t = torch.from_numpy(np.ascontiguousarray(norm, dtype=np.float32))[:, None]
        out.append(F.interpolate(t, size=(size, size), mode="bilinear", antialias=True)[:, 0])
    return torch.cat(out)


def run(cfg, encoder, target, size, steps, head, ridge=DEFAULT_RIDGE, seed=1, op=None,
        reference=None, freeze=0):
    """PSNR curve (every 10 steps, current iterate) of one initialisation on ``target``."""
    net = BatchedSiren(cfg, batch=target.shape[0], shared=freeze, seed=seed)
    op = op or Identity((size, size))
    if encoder is not None:
        net.load_encoder(encoder)
    net.freeze(freeze)
    if head == "solved":
        solve_head(net, target, op, ridge=ridge)
    res = fit(net, ImageProblem(target, op, reference=target if reference is None else reference),
              steps=steps, log_every=10, seed=0)
    return res.history["iterations"], res.history["psnr"]


def row(name, it, ps, checkpoints, base=None):
    r = {"method": name, **{f"it{c}": ps[it.index(c)] for c in checkpoints if c in it}}
    r["max_drop_db"] = float((np.maximum.accumulate(ps) - np.array(ps)).max())
    r["curve"] = {"iterations": it, "psnr": ps}
    if base is not None:
        r["min_gain_logged"] = min(m - s for m, s in zip(ps, base))
    print(name, {k: round(v, 2) for k, v in r.items() if k not in ("method", "curve")},
          flush=True)
    return r


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--part", choices=("sweep", "ct", "both", "superres"), default="both")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--ridges", default="random,1e-6,1e-3,1e-1,1",
                   help="relative ridges of the sweep, comma-separated; 'random': the random "
                        "head (the same run as paper_fit.py's STRAINER-10 row)")
    p.add_argument("--ridge", default=str(DEFAULT_RIDGE),
                   help="relative ridge(s) of the solved head in the CT part, comma-separated")
    p.add_argument("--sweep-steps", type=int, default=100)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--encoder", default=None,
                   help="encoder file, or 'default' for the shipped MRI encoder (default: "
                        "results/paper_fit_encoders/STRAINER-10 if there, else shipped)")
    p.add_argument("--out", default=None, help="JSON name in results/ (default head[_part])")
    a = p.parse_args()
    path = a.encoder or RESULTS / "paper_fit_encoders" / "STRAINER-10.safetensors"
    if a.encoder is None and not Path(path).exists():
        path = "default"
    enc = load_encoder(SHIPPED if path == "default" else path)
    cfg = SirenConfig(**enc.config.to_dict())
    print(f"encoder {path}", flush=True)
    out = {"args": {**vars(a), "encoder": str(path)}}

    if a.part in ("sweep", "both"):
        imgs, _, held = slices(a.size)
        target = imgs[held].reshape(len(held), -1, 1)
        cps = [0, 10, 50, 100, 200]
        rows = []
        for r in a.ridges.split(","):
            if r == "random":
                rows.append(row("random head", *run(cfg, enc.weights, target, a.size,
                                                    a.sweep_steps, "random"), cps))
                continue
            rows.append(row(f"solved, ridge {float(r):g}",
                            *run(cfg, enc.weights, target, a.size, a.sweep_steps, "solved",
                                 float(r)), cps))
        cols = ["method"] + [f"it{c}" for c in cps if c <= a.sweep_steps] + ["max_drop_db"]
        print(f"\nridge sweep, PSNR (dB), mean over held-out brain slices {held}\n"
              + table(rows, cols), flush=True)
        out["sweep"] = {"held_out": held, "rows": rows}

    if a.part in ("ct", "both"):
        target = ct_slices(a.size).reshape(-1, a.size * a.size, 1)
        cps = [0, 10, 50, 100, 200, 500]
        it, base = run(cfg, None, target, a.size, a.steps, "random")
        rows = [row("SIREN", it, base, cps)]
        rows.append(row("MRI encoder, random head",
                        *run(cfg, enc.weights, target, a.size, a.steps, "random"), cps, base))
        for r in a.ridge.split(","):
            rows.append(row(f"MRI encoder, solved head (ridge {float(r):g})",
                            *run(cfg, enc.weights, target, a.size, a.steps, "solved",
                                 float(r)), cps, base))
        cols = ["method"] + [f"it{c}" for c in cps if c <= a.steps] + [
            "max_drop_db", "min_gain_logged"]
        print(f"\nCT ({', '.join(CT_SAMPLES)}; {target.shape[0]} slices), PSNR (dB)\n"
              + table(rows, cols), flush=True)
        out["ct"] = {"samples": CT_SAMPLES, "rows": rows}
    if a.part == "superres":
        imgs, _, held = slices(a.size)
        held = [held[1], held[3]]
        ref = imgs[held].reshape(len(held), -1, 1)
        op = AreaDownsample((a.size // 2, a.size // 2), 2)
        cps = [0, 10, 50, 100]
        rows = []
        for freeze in (3, 0):
            for head in ("random", "solved"):
                rows.append(row(f"freeze {freeze}, {head} head",
                                *run(cfg, enc.weights, op(ref), a.size, 100, head,
                                     float(a.ridge.split(",")[0]), op=op, reference=ref,
                                     freeze=freeze), cps))
        print(f"\nx2 super-resolution, PSNR (dB) against the {a.size} x {a.size} slices {held}\n"
              + table(rows, ["method"] + [f"it{c}" for c in cps]), flush=True)
        out["superres"] = {"held_out": held, "rows": rows}
    name = a.out or ("head" if a.part == "both" else f"head_{a.part}")
    print(f"\nwrote {save(name, out)}")


if __name__ == "__main__":
    main()
