"""Through-plane super-resolution of whole brains and small crops, as the product runs it.

Ground truth: the MNI ICBM152 2009a T1 template shipped in nilearn (1 mm, 197 x 233 x 189), a
T2-like contrast built from its tissue maps (1.0 csf + 0.55 gm + 0.3 wm, as in
``benchmarks/denoise.py``), and the small crops of ``benchmarks/volume.py``, normalised to
[0, 1]. Thick slices are simulated along one axis (box average of F slices, or a Gaussian of
FWHM F sampled every F slices) and handed to the product as a scan with its geometry: the
T2-like brain as a coronal stack stored in RAS order (5 mm along the second array axis), so
the product has to find the slice axis itself.

Rows: cubic B-spline interpolation; the product with ``--prior none`` (the 3D INR on top of
cubic, then data consistency); the product's default (``--prior auto``: the CNN learned from
the scan's own in-plane planes where there are enough of them, then data consistency). Wall
seconds and peak memory (RSS rise) per product row.

    python benchmarks/through_plane.py [--cases whole,crops] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _common import save, table
from denoise import timed
from volume import _mni, _norm, acquire, coarse_affine, psnr, ssim, thick_matrix, volumes

from napari_strainer.io.scan import Scan
from napari_strainer.restore.classical import interpolate_slices
from napari_strainer.restore.plan import Options, make_plan, run


def _t2_like() -> np.ndarray:
    from scipy import ndimage as ndi

    t1 = _mni(1, "t1")
    gm, wm = _mni(1, "gm"), _mni(1, "wm")
    gm, wm = gm / gm.max(), wm / wm.max()
    csf = np.clip(ndi.binary_fill_holes(t1 > 0) - gm - wm, 0, 1)
    return 1.0 * csf + 0.55 * gm + 0.3 * wm


def cases(which: set[str]) -> list[dict]:
    """Each case: truth (z, y, x), the thick axis, profile, factor."""
    out = []
    if "whole" in which:
        t1 = _norm(_mni(1))
        out.append({"name": "MNI T1 1mm whole, axial", "truth": t1[:t1.shape[0] // 5 * 5],
                    "axis": 0, "profile": "box", "f": 5})
        t2 = _norm(_t2_like())
        out.append({"name": "MNI T2-like 1mm whole, coronal (RAS)",
                    "truth": t2[:, :t2.shape[1] // 5 * 5], "axis": 1, "profile": "box",
                    "f": 5})
    if "crops" in which:
        v = volumes()
        out += [{"name": "MNI 2mm crop", "truth": v["MNI 2mm"], "axis": 0, "profile": "box",
                 "f": 4},
                {"name": "T1 2mm crop", "truth": v["T1"][:24], "axis": 0, "profile": "box",
                 "f": 2},
                {"name": "EPI crop", "truth": v["EPI"], "axis": 1, "profile": "gaussian",
                 "f": 3}]
    return out


def run_case(c: dict, threads: int) -> list[dict]:
    truth, ax, f, prof = c["truth"], c["axis"], c["f"], c["profile"]
    n = truth.shape[ax] // f * f
    truth = np.take(truth, np.arange(n), axis=ax)
    obs = acquire(truth, ax, thick_matrix(prof, f, n))
    affine = coarse_affine(np.eye(4), ax, f)
    scan = Scan(obs, affine, meta={"modality": "MR"})
    ref = Scan(truth, np.eye(4))
    cub = np.moveaxis(interpolate_slices(np.moveaxis(obs, ax, 0), f, 3), 0, ax)
    rows = [{"case": c["name"], "method": "cubic", "psnr": psnr(cub, truth),
             "ssim": ssim(cub, truth)}]
    for prior in ("none", "auto"):
        opts = Options(task="superres", slice_scale=f, scale=None, slice_profile=prof,
                       prior=prior, encoder="none")
        plan = make_plan(scan, opts, reference=ref, eta=False)
        res, sec, mib = timed(run, plan)
        out = np.asarray(res.scan.data, np.float64)
        h = res.history
        rows.append({"case": c["name"], "method": f"product, prior {h['prior']}",
                     "psnr": psnr(out, truth), "ssim": ssim(out, truth), "seconds": sec,
                     "peak_mib": mib, "slice_axis": h["slice_axis"],
                     "prior_gain_db": h.get("prior_gain_db"), "threads": threads})
    for r in rows:
        r["vs_cubic"] = r["psnr"] - rows[0]["psnr"]
        r["shape"] = "x".join(map(str, obs.shape))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="whole,crops")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="through_plane")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    t0 = time.time()
    for c in cases(set(a.cases.split(","))):
        rows += run_case(c, a.threads)
        print(table(rows[-3:], ["case", "method", "psnr", "vs_cubic", "ssim", "seconds",
                                "peak_mib", "prior_gain_db"]), flush=True)
    print(table(rows, ["case", "shape", "method", "psnr", "vs_cubic", "ssim", "seconds",
                       "peak_mib", "slice_axis", "prior_gain_db"]))
    save(a.name, {"rows": rows, "seconds": time.time() - t0})


if __name__ == "__main__":
    main()
