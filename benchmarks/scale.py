"""Wall time and peak memory against voxel count for each volume task, as the product runs it.

Ground truth: centred crops of the MNI ICBM152 2009a T1 template shipped in nilearn (1 mm,
189 x 233 x 197 in z, y, x), scaled in every axis to about 0.1, 1.2 and 3 million voxels,
and the whole brain (8.7 million). Tasks, each through ``make_plan`` + ``run`` with all
defaults on 2 threads:

- ``denoise``: Rician noise of 5% of the truth range; the default (the race) against dipy's
  Rician non-local means with its estimated sigma and scikit-image's 3D total variation
  followed by the inverse Rician mean at the true sigma (its weight tuned against the truth on
  the 0.1 million-voxel crop with its own noise). PSNR over all voxels and inside the head (``denoise.head_mask``), peak 1.
- ``superres``: 5 mm box slices along z (``superres --slice-scale 5 --slice-profile box``);
  the default against cubic B-spline interpolation. PSNR over all voxels (``volume.psnr``).
- ``fuse``: the crop as three orthogonal 5 mm box stacks, fused onto the 1 mm grid; the
  default against the product's least squares (``fuse --prior none --steps 0``).

Each row also has the plan's route, its memory estimate and ETA (taken before the timed run),
so the planner's honesty is measured with the rest. Rows of tasks and sizes not run are kept
from the JSON of the same name, so one row can be rerun alone. The growth exponent is the slope of
log(seconds) and log(peak MiB) against log(voxels) over the sizes that took the same start
(through-plane and fusion learn a prior from the scan's planes from 200k in-plane pixels up,
below that they fit a 3D INR of fixed cost). BM4D is kept out of the race, as the product
installs.

    python benchmarks/scale.py [--tasks denoise,superres,fuse] [--sizes 0.1,1.2,3,8.7]
                               [--threads 2] [--device auto] [--name scale]

The GPU rows: ``--device cuda --name scale_gpu`` (adds each run's peak GPU memory,
``gpu_peak_mib``).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
from _common import RESULTS, save, table
from denoise import add_noise, dipy_nlm, head_mask, timed, tv
from denoise import psnr as psnr_peak1
from through_plane import _t1
from volume import acquire, coarse_affine, psnr, thick_matrix

from napari_strainer.core.device import resolve_device
from napari_strainer.io.scan import Scan
from napari_strainer.restore import race
from napari_strainer.restore.classical import interpolate_slices
from napari_strainer.restore.noise import rician_unbias
from napari_strainer.restore.plan import Options, make_plan, run

LEVEL = 0.05
"""Rician noise, fraction of the truth range."""
TV_WEIGHTS = (0.02, 0.03, 0.05, 0.08)
"""Total-variation weights tried on the smallest crop."""
F = 5
"""Through-plane factor (5 mm box slices onto 1 mm)."""


def crop(vol: np.ndarray, voxels: float) -> np.ndarray:
    """Centred crop of ``vol`` scaled alike in every axis to about ``voxels`` voxels, each
    side a multiple of ``F``."""
    s = min(1.0, (voxels / vol.size) ** (1 / 3))
    shape = [max(F, round(n * s) // F * F) for n in vol.shape]
    lo = [(n - m) // 2 for n, m in zip(vol.shape, shape)]
    return np.ascontiguousarray(vol[tuple(slice(a, a + m) for a, m in zip(lo, shape))])


def product(scans, opts: Options) -> tuple[np.ndarray, dict, dict]:
    """Plan (with its ETA, untimed), then the timed run: the output as float32, the history,
    and the row's facts (time, peak memory, route, the plan's memory and ETA; on a GPU its
    peak memory)."""
    plan = make_plan(scans, opts)
    dev = resolve_device(opts.device)
    gpu = dev.type == "cuda"
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    res, sec, mib = timed(run, plan)
    facts = {"seconds": sec, "peak_mib": mib, "route": plan.path, "device": str(dev),
             "plan_mib": plan.memory_bytes / 2**20, "eta_s": plan.eta_seconds}
    if gpu:
        facts["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return np.asarray(res.scan.data, np.float32), res.history, facts


def unit(truth: np.ndarray) -> np.ndarray:
    return (truth - truth.min()) / np.ptp(truth)


def tune_tv(truth: np.ndarray) -> float:
    """The TV weight (then the inverse Rician mean) with the best PSNR on ``truth``."""
    t = unit(truth)
    noisy = add_noise(t, "rician", LEVEL, seed=0)
    return max(TV_WEIGHTS, key=lambda w: psnr_peak1(rician_unbias(tv(noisy, w), LEVEL), t))


def denoise_rows(truth: np.ndarray, a) -> list[dict]:
    t = unit(truth)
    noisy = add_noise(t, "rician", LEVEL, seed=truth.size)
    mask = head_mask(t)

    def row(method, out, **kw):
        return {"method": method, "psnr": psnr_peak1(out, t),
                "psnr_head": psnr_peak1(out, t, mask), **kw}

    rows = [row("noisy", noisy)]
    out, hist, facts = product(Scan(noisy, np.eye(4), meta={"modality": "MR"}),
                               Options(task="denoise", device=a.device))
    rows.append(row("default", out, **facts, winner=hist.get("race", {}).get("winner")))
    (out, _), sec, mib = timed(dipy_nlm, noisy, True, a.threads)
    rows.append(row("dipy NLM (Rician, estimated sigma)", out, seconds=sec, peak_mib=mib))
    out, sec, mib = timed(lambda: rician_unbias(tv(noisy, a.tv_weight), LEVEL))
    rows.append(row(f"TV {a.tv_weight:g} + inverse Rician mean", out, seconds=sec,
                    peak_mib=mib))
    return rows


def superres_rows(truth: np.ndarray, a) -> list[dict]:
    obs = acquire(truth, 0, thick_matrix("box", F, truth.shape[0]))
    rows = [{"method": "cubic", "psnr": psnr(interpolate_slices(obs, F, 3), truth)}]
    scan = Scan(obs, coarse_affine(np.eye(4), 0, F), meta={"modality": "MR"})
    out, hist, facts = product(scan, Options(task="superres", slice_scale=F, scale=None,
                                             slice_profile="box", encoder="none",
                                             device=a.device))
    rows.append({"method": "default", "psnr": psnr(out, truth), **facts,
                 "start": "planes prior" if hist.get("prior") == "planes" else "3D INR"})
    return rows


def fuse_rows(truth: np.ndarray, a) -> list[dict]:
    stacks = [Scan(acquire(truth, ax, thick_matrix("box", F, truth.shape[ax])),
                   coarse_affine(np.eye(4), ax, F), meta={"modality": "MR"})
              for ax in range(3)]
    rows = []
    for name, prior, steps in (("least squares", "none", 0), ("default", "auto", None)):
        out, hist, facts = product(stacks, Options(task="fuse", encoder="none", prior=prior,
                                                   steps=steps, spacing=1.0,
                                                   device=a.device))
        rows.append({"method": name, "psnr": psnr(out, truth), **facts,
                     "start": hist.get("start")})
    return rows


TASKS = {"denoise": denoise_rows, "superres": superres_rows, "fuse": fuse_rows}


def merged(kept: list[dict], new: list[dict]) -> list[dict]:
    """``new`` rows, and the ``kept`` ones of tasks and sizes ``new`` does not have, in task
    and size order."""
    done = {(r["task"], r["shape"]) for r in new}
    rows = [r for r in kept if (r["task"], r["shape"]) not in done] + new
    order = list(TASKS)
    return sorted(rows, key=lambda r: (order.index(r["task"]), r["voxels"]))


def growth(rows: list[dict], key: str) -> list[dict]:
    """Log-log slope of ``key`` against voxels for the default, per task and start."""
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        d = [r for r in rows if r["task"] == task and r["method"] == "default"]
        for start in dict.fromkeys(r.get("start") for r in d):
            pts = [(math.log(r["voxels"]), math.log(max(r[key], 1e-3)))
                   for r in d if r.get("start") == start]
            if len(pts) >= 2:
                x, y = np.array(pts).T
                out.append({"task": task, "start": start, "of": key, "sizes": len(pts),
                            "exponent": float(np.polyfit(x, y, 1)[0])})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="denoise,superres,fuse")
    p.add_argument("--sizes", default="0.1,1.2,3,8.7", help="millions of voxels")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="auto", help="the product's --device (auto, cpu, cuda)")
    p.add_argument("--name", default="scale")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    race.BM4D_MAX_VOXELS = 0  # as the product installs: no non-commercial BM4D in the race
    whole = _t1()
    a.rows, a.tv_weight = [], tune_tv(crop(whole, 1e5))
    old = RESULTS / f"{a.name}.json"  # rows of other tasks and sizes are kept
    kept = json.loads(old.read_text())["rows"] if old.exists() else []
    t0 = time.time()
    cols = ["task", "shape", "method", "psnr", "psnr_head", "seconds", "peak_mib",
            "gpu_peak_mib", "device", "route", "start", "plan_mib", "eta_s", "winner"]
    for task in a.tasks.split(","):
        for m in sorted(float(s) for s in a.sizes.split(",")):
            truth = crop(whole, m * 1e6)
            new = TASKS[task](truth, a)
            for r in new:
                r.update(task=task, voxels=truth.size, shape="x".join(map(str, truth.shape)))
            a.rows += new
            print(table(new, cols), flush=True)
            save(a.name, {"rows": merged(kept, a.rows), "seconds": time.time() - t0,
                          "partial": True})
    a.rows = merged(kept, a.rows)
    grow = growth(a.rows, "seconds") + growth(a.rows, "peak_mib")
    print(table(a.rows, cols))
    if grow:
        print(table(grow, ["task", "start", "of", "sizes", "exponent"]))
    save(a.name, {"rows": a.rows, "growth": grow, "tv_weight": a.tv_weight,
                  "level": LEVEL, "seconds": time.time() - t0})


if __name__ == "__main__":
    main()
