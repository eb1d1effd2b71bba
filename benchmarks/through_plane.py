"""Through-plane super-resolution of whole brains and small crops, as the product runs it.

Ground truth: the MNI ICBM152 2009a T1 template shipped in nilearn (1 mm, 197 x 233 x 189), a
T2-like contrast built from its tissue maps (1.0 csf + 0.55 gm + 0.3 wm, as in
``benchmarks/denoise.py``), and the small crops of ``benchmarks/volume.py``, normalised to
[0, 1]. Thick slices are simulated along one axis (box average of F slices, or a Gaussian of
FWHM F sampled every F slices; with a gap, a box of T < F slices centred in every F) and handed
to the product as a scan with its geometry: the T2-like brain as a coronal stack stored in RAS
order (thick along the second array axis), so the product has to find the slice axis itself.
No multi-slice CT volume ships in the installed packages, so CT is not a case here.

Case groups: ``whole`` (the two box x5 whole brains), ``profiles`` (whole brains with Gaussian
profiles, x3 and x4, and a gap), ``crops`` (the small crops of ``volume.py``), ``fuse`` (the
whole T1 as three orthogonal box x5 stacks, each stored in RAS order, thick along its own
array axis, fused onto the 1 mm grid: the mean of the stacks' cubic interpolations, the
product's least squares (``fuse --prior none --steps 0``) and the default).

Rows: cubic B-spline interpolation; least-squares super-resolution reconstruction (L-BFGS
through the exact thick-slice operator with a squared-gradient penalty, its weight tuned on
the MNI 2 mm crop with the same acquisition, started from cubic); the product with
``--prior none`` (the 3D INR on top of cubic, then data consistency; ``crops`` only: on the
whole brains it is the row of ``results/through_plane_d70b296.json``); the product's default
(``--prior auto``: the CNN learned from the scan's own in-plane planes where there are enough
of them, then data consistency); with ``--eclare PYTHON``,
ECLARE (Remedios et al. 2023; ``pip install eclare``, GPL-3 and pinned to scipy 1.11.4, so it
runs from its own environment, given the true slice profile) on the axial T1, with
``--eclare-patches`` training patches (its default is 1,000,000: about 17 hours on 2 CPU
cores, so a CPU row is a reduced budget and labelled so). Wall seconds and peak memory (RSS
rise; for ECLARE the peak RSS of its process and data workers) per row.

    python benchmarks/through_plane.py [--cases whole,profiles,crops,fuse] [--threads 2]
                                       [--eclare /path/to/eclare-env/bin/python]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from functools import cache
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from _common import save, table
from denoise import timed
from volume import (
    _mni,
    _norm,
    acquire,
    coarse_affine,
    interpolate,
    least_squares,
    psnr,
    ssim,
    thick_matrix,
    volumes,
)

from napari_strainer.io.scan import Scan
from napari_strainer.restore.classical import interpolate_slices
from napari_strainer.restore.plan import Options, make_plan, run

LS_WEIGHTS = (1e-4, 1e-3, 1e-2)
"""Squared-gradient penalties tried for least squares on the tuning crop."""


@cache
def _t1() -> np.ndarray:
    return _norm(_mni(1))


@cache
def _t2_like() -> np.ndarray:
    from scipy import ndimage as ndi

    t1 = _mni(1, "t1")
    gm, wm = _mni(1, "gm"), _mni(1, "wm")
    gm, wm = gm / gm.max(), wm / wm.max()
    csf = np.clip(ndi.binary_fill_holes(t1 > 0) - gm - wm, 0, 1)
    return _norm(1.0 * csf + 0.55 * gm + 0.3 * wm)


def operator(profile: str, f: int, n: int, t: int | None = None) -> np.ndarray:
    """``[n // f, n]`` thick-slice matrix: ``thick_matrix``, or with a gap a box of ``t < f``
    fine slices centred in each cell of ``f`` (``f - t`` even)."""
    if t is None or t == f:
        return thick_matrix(profile, f, n)
    m = np.zeros((n // f, n))
    for k in range(n // f):
        m[k, k * f + (f - t) // 2:k * f + (f - t) // 2 + t] = 1 / t
    return m


def cases(which: set[str]) -> list[dict]:
    """Each case: truth (z, y, x), the thick axis, profile, factor, thickness in fine slices
    (None: the factor), and which optional rows it gets."""
    out = []
    t1 = {"truth": _t1, "axis": 0}
    t2 = {"truth": _t2_like, "axis": 1}
    if "whole" in which:
        out += [{"name": "MNI T1 1mm whole, axial", **t1, "profile": "box", "f": 5,
                 "eclare": True},
                {"name": "MNI T2-like 1mm whole, coronal (RAS)", **t2, "profile": "box",
                 "f": 5}]
    if "profiles" in which:
        out += [{"name": "MNI T1 1mm whole, axial", **t1, "profile": "gaussian", "f": 3},
                {"name": "MNI T1 1mm whole, axial", **t1, "profile": "box", "f": 4},
                {"name": "MNI T1 1mm whole, axial, 2 mm gap", **t1, "profile": "box", "f": 5,
                 "t": 3},
                {"name": "MNI T2-like 1mm whole, coronal (RAS)", **t2, "profile": "gaussian",
                 "f": 4}]
    if "crops" in which:
        v = volumes()
        out += [{"name": "MNI 2mm crop", "truth": lambda: v["MNI 2mm"], "axis": 0,
                 "profile": "box", "f": 4, "none": True},
                {"name": "T1 2mm crop", "truth": lambda: v["T1"][:24], "axis": 0,
                 "profile": "box", "f": 2, "none": True},
                {"name": "EPI crop", "truth": lambda: v["EPI"], "axis": 1,
                 "profile": "gaussian", "f": 3, "none": True}]
    return out


def label(c: dict) -> str:
    t = c.get("t")
    acq = f"{c['profile']} x{c['f']}" + (f" ({t} mm slices)" if t else "")
    return f"{c['name']}, {acq}"


@cache
def ls_weight(profile: str, f: int, t: int | None) -> float:
    """The least-squares penalty that does best on the MNI 2 mm crop with this acquisition."""
    tune = volumes()["MNI 2mm"]
    tune = tune[:tune.shape[0] // f * f]
    m = operator(profile, f, tune.shape[0], t)
    obs = acquire(tune, 0, m)
    return max(LS_WEIGHTS, key=lambda w: psnr(least_squares(
        [(obs, 0, m)], tune.shape, interpolate(obs, f, 3), w, iters=60), tune))


def eclare(obs: np.ndarray, ax: int, c: dict, python: str, patches: int,
           threads: int) -> tuple[np.ndarray, float, float]:
    """ECLARE's output for the thick stack ``obs`` (thick along ``ax``), wall seconds and the
    peak RSS (MiB) of its process plus its data workers."""
    f, t = c["f"], c.get("t") or c["f"]
    kind = {"box": "rect", "gaussian": "gaussian"}[c["profile"]]
    runner = ("import resource, sys; from eclare.main import main; main(sys.argv[1:]); "
              "r = resource.getrusage; print('PEAK_KB', r(resource.RUSAGE_SELF).ru_maxrss "
              "+ r(resource.RUSAGE_CHILDREN).ru_maxrss)")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "stack.nii.gz"
        nib.save(nib.Nifti1Image(obs, coarse_affine(np.eye(4), ax, f)), src)
        cmd = [python, "-c", runner, "--in-fpath", str(src), "--out-dir", tmp,
               "--n-patches", str(patches), "--relative-slice-thickness", str(t),
               "--relative-slice-profile-type", kind]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, check=False, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        sec = time.perf_counter() - t0
        if done.returncode:
            sys.exit(f"ECLARE failed:\n{done.stderr[-2000:]}")
        kb = [ln for ln in done.stdout.splitlines() if ln.startswith("PEAK_KB")][-1]
        out = np.asarray(nib.load(Path(tmp) / "stack_eclare.nii.gz").dataobj, np.float32)
    return out, sec, int(kb.split()[1]) / 1024


def product_rows(c, scan, ref, truth, cub, m, row, a) -> list[dict]:
    """Least squares and the product's rows for case ``c``."""
    ax, f, prof, t = c["axis"], c["f"], c["profile"], c.get("t")
    obs = scan.data
    rows = []
    w = ls_weight(prof, f, t)
    (ls, sec, mib) = timed(lambda: np.moveaxis(least_squares(
        [(np.moveaxis(obs, ax, 0), 0, m)], np.moveaxis(truth, ax, 0).shape,
        np.moveaxis(cub, ax, 0), w, dtype=torch.float32, history=10), 0, ax))
    rows.append(row(f"least squares (grad {w:g})", ls, seconds=sec, peak_mib=mib))
    del ls
    for prior in ("none", "auto")[0 if c.get("none") else 1:]:
        opts = Options(task="superres", slice_scale=f, scale=None, slice_profile=prof,
                       slice_thickness=float(t) if t else None, prior=prior, encoder="none")
        plan = make_plan(scan, opts, reference=ref, eta=False)
        res, sec, mib = timed(run, plan)
        h = res.history
        name = "product --prior none" if prior == "none" else f"default (prior {h['prior']})"
        rows.append(row(name, np.asarray(res.scan.data, np.float64),
                        seconds=sec, peak_mib=mib, slice_axis=h["slice_axis"],
                        prior_gain_db=h.get("prior_gain_db"), threads=a.threads))
    return rows


def run_case(c: dict, a: argparse.Namespace) -> list[dict]:
    truth, ax, f, prof, t = c["truth"](), c["axis"], c["f"], c["profile"], c.get("t")
    n = truth.shape[ax] // f * f
    truth = np.take(truth, np.arange(n), axis=ax)
    m = operator(prof, f, n, t)
    obs = acquire(truth, ax, m)
    scan = Scan(obs, coarse_affine(np.eye(4), ax, f), meta={"modality": "MR"})
    ref = Scan(truth, np.eye(4))
    case = label(c)

    def row(method, out, **kw):
        return {"case": case, "method": method, "psnr": psnr(out, truth),
                "ssim": ssim(out, truth), **kw}

    cub = np.moveaxis(interpolate_slices(np.moveaxis(obs, ax, 0), f, 3), 0, ax)
    rows = [row("cubic", cub)]
    if not a.eclare_only:
        rows += product_rows(c, scan, ref, truth, cub, m, row, a)
    if a.eclare and c.get("eclare"):
        out, sec, mib = eclare(obs, ax, c, a.eclare, a.eclare_patches, a.threads)
        # ECLARE places its output slices by its own convention: also score the best
        # whole-voxel shift along the slice axis, away from the ends
        inner = [slice(None)] * 3
        inner[ax] = slice(4, -4)
        best = max(range(-2, 3), key=lambda k: psnr(np.roll(out, k, ax)[tuple(inner)],
                                                    truth[tuple(inner)]))
        rows.append(row(f"ECLARE, {a.eclare_patches:,} patches (CPU, reduced)", out,
                        seconds=sec, peak_mib=mib, threads=a.threads, best_shift=best,
                        psnr_shifted=psnr(np.roll(out, best, ax), truth)))
    for r in rows:
        r["vs_cubic"] = r["psnr"] - rows[0]["psnr"]
        r["shape"] = "x".join(map(str, obs.shape))
    return rows


def run_fuse(a: argparse.Namespace) -> list[dict]:
    truth = _t1()
    truth = truth[tuple(slice(0, n // 5 * 5) for n in truth.shape)]
    stacks, cubic = [], []
    for ax in range(3):
        obs = acquire(truth, ax, thick_matrix("box", 5, truth.shape[ax]))
        stacks.append(Scan(obs, coarse_affine(np.eye(4), ax, 5), meta={"modality": "MR"}))
        cubic.append(np.moveaxis(interpolate_slices(np.moveaxis(obs, ax, 0), 5, 3), 0, ax))
    case = "MNI T1 1mm whole, 3 orthogonal box x5 stacks"
    rows = [{"case": case, "method": "cubic, mean of the stacks",
             "psnr": psnr(np.mean(cubic, 0), truth), "ssim": ssim(np.mean(cubic, 0), truth)}]
    del cubic
    ref = Scan(truth, np.eye(4))
    for label_, prior, steps in (("least squares", "none", 0), ("default", "auto", None)):
        opts = Options(task="fuse", encoder="none", prior=prior, steps=steps, spacing=1.0)
        res, sec, mib = timed(run, make_plan(stacks, opts, reference=ref, eta=False))
        out = np.asarray(res.scan.data, np.float64)
        rows.append({"case": case, "method": f"product, {label_} ({res.history['start']})",
                     "psnr": psnr(out, truth), "ssim": ssim(out, truth), "seconds": sec,
                     "peak_mib": mib, "threads": a.threads,
                     "prior_gain_db": [round(g, 2) for g in res.history["prior_gain_db"]]})
    for r in rows:
        r["vs_cubic"] = r["psnr"] - rows[0]["psnr"]
        r["shape"] = "3 x " + "x".join(map(str, truth.shape))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="whole,profiles,crops,fuse")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eclare", default=None, help="python of an environment with eclare")
    p.add_argument("--eclare-patches", type=int, default=6400)
    p.add_argument("--eclare-only", action="store_true", help="cubic and ECLARE rows only")
    p.add_argument("--name", default="through_plane")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    t0 = time.time()
    cols = ["case", "method", "psnr", "vs_cubic", "ssim", "seconds", "peak_mib",
            "prior_gain_db"]
    groups = set(a.cases.split(","))
    jobs = [lambda c=c: run_case(c, a) for c in cases(groups)]
    if "fuse" in groups and not a.eclare_only:
        jobs.append(lambda: run_fuse(a))
    for job in jobs:
        new = job()
        rows += new
        print(table(new, cols), flush=True)
        save(a.name, {"rows": rows, "seconds": time.time() - t0, "partial": True})
    print(table(rows, ["shape", "slice_axis"] + cols))
    save(a.name, {"rows": rows, "seconds": time.time() - t0,
                  "eclare_patches": a.eclare_patches if a.eclare else None})


if __name__ == "__main__":
    main()
