"""``strainer pretrain --method strainer|reptile`` as a prior for restoration, against no encoder.

Both initialisations train on the 10 slices of the sample brain EPI that
``io.intensity.pick_slices`` picks, 64 x 64 (``paper_fit.slices``, as
``benchmarks/pretrain_method.py``), each with the product's default budget (``pretrain(...,
steps=None)``: STRAINER 500 steps, cosine from 3e-4; Reptile 200 outer steps of 10 inner Adam
steps), timed. Each pretrained file is then the ``encoder`` of the product's own restoration,
``make_plan(scan, Options(...))`` + ``run(plan)``, every held-out slice restored as its own
single-slice MR scan, with three starts: ``encoder="none"`` (SIREN), the STRAINER file and the
Reptile file; every other option is the product's default (``init="auto"``: the route race of
SIREN against the encoder on 10% held-out pixels, freeze 3 for super-resolution and 4 for
denoising, random head outside fitting; a Reptile file keeps its own head). Truths:

* ``epi`` (in-domain): the 5 held-out slices of the same split, 64 x 64;
* ``mni`` (out of domain): axial slices 67, 87 and 107 of the MNI ICBM152 2009a T1 template
  at 1 mm shipped with nilearn (``volume._mni``), normalised over the whole volume
  (``volume._norm``), the central 192 x 192 area-averaged x2 to 96 x 96 (2 mm; 3 slices at
  96 x 96 keep the run under about 25 minutes on one thread).

``--train mni`` pretrains on 10 other axial slices of the same MNI T1 instead
(:data:`MNI_TRAIN`, same size as the test slices): then ``mni`` is in-domain and ``epi`` out
of domain.

Tasks (as ``benchmarks/defaults.py`` and ``benchmarks/denoise.py`` simulate them):

* ``superres x2``: the truth area-averaged x2 (``defaults.observe``), ``Options(task=
  "superres", scale=2)``; ``bicubic`` of the observation as a reference row;
* ``denoise``: Rician noise of sigma 0.05 (``--noises``) of the truth's range
  (``denoise.add_noise``).
  The product default (``Options(task="denoise")``, ``mode="auto"``) is the race of classical
  denoisers, which uses no encoder: it runs once per slice (row ``race (default)``, start
  ``-``; without the non-commercial BM4D, as the product installs).
  ``Options(task="denoise", mode="slices")`` forces the INR slice path (noise stop at 0.85
  sigma), where the encoder is used: rows ``INR (--mode slices)``. ``noisy`` is the input.

``--init fixed`` (the paper's recipe: no race, the encoder at the task's freeze, 3 for
super-resolution and 4 for denoising, runs every batch; ``none`` is then SIREN, the same run as
with ``auto``) shows each file as a prior when the race does not stand between it and the
output: rows ``INR (--init fixed)`` and ``INR (--mode slices --init fixed)``; run it with
``--keep DIR --name pretrain_restore_fixed`` to reuse the pretrained files of a first run.

Reported per row: PSNR (peak = the truth's range) and SSIM (scikit-image, same range) against
the truth, ``vs_none`` (PSNR minus the INR started from no encoder on the same task, slice
and method; for the reference rows the same difference), the route the auto race chose
(``history["route"]``), wall seconds of ``make_plan`` + ``run`` (1 thread); per slice and as
means over the slices of each domain, and the mean PSNR of Reptile minus STRAINER. Writes
``results/pretrain_restore.json`` (``--name``). The default run takes about 22 minutes on one
thread of a 2-core EPYC (pretraining 70 s + 256 s, restoration 17 minutes); ``--init fixed``
with ``--keep`` about 11.

    python benchmarks/pretrain_restore.py [--strainer-steps N] [--reptile-steps N]
        [--domains epi,mni] [--mni-slices 67,87,107] [--mni-size 96] [--init auto|fixed]
        [--epi-slices 5] [--train epi|mni] [--methods strainer,reptile] [--scales 2]
        [--noises 0.05]
        [--keep DIR] [--name pretrain_restore] [--threads 1]

The in-domain MNI run (``results/pretrain_restore_mni.json``): ``--train mni --methods
strainer --domains mni --scales 2,4 --noises 0.05,0.1 --keep DIR --name
pretrain_restore_mni``, once more with ``--init fixed --name pretrain_restore_mni_fixed``.
With ``--init auto`` it also reports the defaults (the route race for super-resolution, the
classical race for denoising) minus the INR from no encoder, per task and on average.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import save, table
from defaults import observe
from denoise import add_noise
from paper_fit import slices
from volume import _mni, _norm, psnr, ssim

from napari_strainer.core.checkpoint import load_encoder, save_encoder
from napari_strainer.io.scan import Scan
from napari_strainer.pretrain.train import pretrain
from napari_strainer.restore import race
from napari_strainer.restore.plan import Options, make_plan, run

METHODS = ("strainer", "reptile")
MNI_TRAIN = [55, 61, 73, 79, 93, 99, 113, 119, 125, 131]
"""Axial slices of the MNI T1 an encoder is pretrained on with ``--train mni`` (none of the
test slices, 6 to 12 mm from them)."""


def mni_slices(which: list[int], size: int) -> np.ndarray:
    """Axial slices ``which`` of the 1 mm MNI T1 (normalised over the volume), the central
    ``2 * size`` square area-averaged x2."""
    vol = _norm(_mni(1))
    _, h, w = vol.shape
    side = 2 * size
    r, c = (h - side) // 2, (w - side) // 2
    t = torch.from_numpy(np.ascontiguousarray(vol[which, r:r + side, c:c + side]))
    return F.avg_pool2d(t[:, None], 2)[:, 0].numpy()


def restore(obs: np.ndarray, **options) -> tuple[np.ndarray, dict, float]:
    """The product's restoration of one 2D MR image: output, history, wall seconds."""
    scan = Scan(np.ascontiguousarray(obs[None], np.float32), np.eye(4), meta={"modality": "MR"})
    t = time.perf_counter()
    res = run(make_plan(scan, Options(device="cpu", **options), eta=False))
    return np.asarray(res.scan.data[0], np.float32), res.history, time.perf_counter() - t


def score(out: np.ndarray, truth: np.ndarray) -> dict:
    return {"psnr": round(psnr(out, truth), 3), "ssim": round(ssim(out, truth), 4)}


def run_slice(domain: str, idx: int, truth: np.ndarray, starts: dict, init: str,
              seed: int, scales: list[int], noises: list[float]) -> list[dict]:
    rows = []

    def row(task, method, start, out, seconds=None, hist=None):
        r = {"domain": domain, "slice": idx, "task": task, "method": method, "start": start,
             **score(out, truth), "s": None if seconds is None else round(seconds, 2)}
        if hist is not None:
            r.update(route=hist.get("route"), steps_run=(hist.get("steps_run") or [None])[0],
                     probes=[{k: p[k] for k in ("route", "val_loss", "chosen")}
                             for p in hist.get("probes") or []])
        rows.append(r)
        print(f"  {domain} {idx} {task} {method} {start}: {r['psnr']:.2f} dB, "
              f"SSIM {r['ssim']:.4f}, {r['s']} s, route {r.get('route')}", flush=True)

    for scale in scales:  # super-resolution
        task = f"superres x{scale}"
        lo = observe(truth[None], "superres", scale, seed)[0]
        bic = F.interpolate(torch.from_numpy(lo)[None, None], scale_factor=scale,
                            mode="bicubic", align_corners=False)[0, 0].numpy()
        row(task, "bicubic", "-", bic)
        for start, enc in starts.items():
            out, hist, s = restore(lo, task="superres", scale=scale, encoder=enc, init=init)
            row(task, "INR (default)" if init == "auto" else "INR (--init fixed)", start, out,
                s, hist)
    for level in noises:  # denoising, Rician
        task = f"denoise {level:g}"
        noisy = add_noise(truth, "rician", level * float(np.ptp(truth)), seed)
        row(task, "noisy", "-", noisy)
        out, hist, s = restore(noisy, task="denoise")
        row(task, "race (default)", "-", out, s)
        rows[-1]["route"] = str(hist.get("stop_reason")).split(";")[0]  # the blend it chose
        for start, enc in starts.items():
            out, hist, s = restore(noisy, task="denoise", mode="slices", encoder=enc, init=init)
            row(task, "INR (--mode slices" + (")" if init == "auto" else " --init fixed)"),
                start, out, s, hist)
    for task in tasks(scales, noises):
        base = next(r for r in rows if r["task"] == task and r["start"] == "none")
        for r in rows:
            if r["task"] == task:
                r["vs_none"] = round(r["psnr"] - base["psnr"], 3)
    return rows


def tasks(scales: list[int], noises: list[float]) -> list[str]:
    return [f"superres x{v}" for v in scales] + [f"denoise {v:g}" for v in noises]


def means(rows: list[dict]) -> list[dict]:
    groups = defaultdict(list)
    for r in rows:
        groups[(r["domain"], r["task"], r["method"], r["start"])].append(r)
    out = []
    for (domain, task, method, start), rs in groups.items():
        routes = sorted({str(r.get("route")) for r in rs if r.get("route") is not None})
        m = {"domain": domain, "task": task, "method": method, "start": start,
             "slices": len(rs)}
        for k in ("psnr", "ssim", "vs_none", "s"):
            vals = [r[k] for r in rs if r.get(k) is not None]
            m[k] = round(float(np.mean(vals)), 4 if k == "ssim" else 3) if vals else None
        if method.startswith("INR"):
            m["min_vs_none"] = round(min(r["vs_none"] for r in rs), 3)
            m["max_vs_none"] = round(max(r["vs_none"] for r in rs), 3)
            m["routes"] = ", ".join(f"{x} x{sum(str(r.get('route')) == x for r in rs)}"
                                    for x in routes)
        out.append(m)
    return out


def defaults_vs_siren(summary: list[dict], start: str) -> dict:
    """Per domain and task, the product's default output with the encoder ``start``
    (super-resolution: the route race; denoising: the classical race) minus the INR from no
    encoder, mean over slices; and the mean over the tasks."""
    out = {}
    for d in dict.fromkeys(r["domain"] for r in summary):
        got = {r["task"]: r["vs_none"] for r in summary if r["domain"] == d and (
            r["method"] == "race (default)" or
            (r["method"] == "INR (default)" and r["start"] == start))}
        out[d] = {**got, "mean": round(float(np.mean(list(got.values()))), 3)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strainer-steps", type=int, default=None, help="default: the product's")
    p.add_argument("--reptile-steps", type=int, default=None, help="default: the product's")
    p.add_argument("--domains", default="epi,mni")
    p.add_argument("--epi-slices", type=int, default=5, help="held-out EPI slices used (<= 5)")
    p.add_argument("--mni-slices", default="67,87,107")
    p.add_argument("--mni-size", type=int, default=96)
    p.add_argument("--init", choices=("auto", "fixed"), default="auto",
                   help="Options.init of the INR rows (default: the product's, auto)")
    p.add_argument("--keep", default=None,
                   help="folder for the pretrained files; reused when they are there")
    p.add_argument("--train", choices=("epi", "mni"), default="epi",
                   help="the slices the encoders are pretrained on (see above)")
    p.add_argument("--methods", default=",".join(METHODS), help="pretraining methods")
    p.add_argument("--scales", default="2", help="super-resolution factors")
    p.add_argument("--noises", default="0.05", help="Rician sigmas, shares of the range")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="pretrain_restore")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    race.BM4D_MAX_VOXELS = 0  # as the product installs: no non-commercial BM4D in the race
    scales = [int(v) for v in a.scales.split(",")]
    noises = [float(v) for v in a.noises.split(",")]
    imgs, train, held = slices(64)
    if a.train == "mni":  # in-domain: other slices of the test slices' own volume
        train = MNI_TRAIN
        pretrain_on = torch.from_numpy(mni_slices(train, a.mni_size))
    else:
        pretrain_on = imgs[train]
    print(f"training slices ({a.train}) {train}, held-out EPI slices {held}", flush=True)
    seconds, info = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(a.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        starts = {"none": "none"}
        budget = {"strainer": a.strainer_steps, "reptile": a.reptile_steps}
        for method in a.methods.split(","):
            steps = budget[method]
            path = folder / f"{method}.safetensors"
            if a.keep and path.exists():
                enc = load_encoder(path)
                seconds[method] = enc.info.get("pretrain_seconds")
            else:
                t = time.perf_counter()
                enc = pretrain(pretrain_on, path, method=method, steps=steps, device="cpu")
                seconds[method] = round(time.perf_counter() - t, 1)
                if a.keep:  # record the time in the kept file's card for --keep reuse
                    enc.info["pretrain_seconds"] = seconds[method]
                    save_encoder(enc, path)
            info[method] = {"steps": enc.info.get("steps"), "final_loss": enc.info.get(
                "final_loss"), "whole_network": enc.whole}
            print(f"{method}: {enc.info['steps']} steps in {seconds[method]} s", flush=True)
            starts[method] = str(path)
        cases = []
        domains = a.domains.split(",")
        if "epi" in domains:
            cases += [("epi", z, imgs[z].numpy()) for z in held[:a.epi_slices]]
        if "mni" in domains:
            which = [int(v) for v in a.mni_slices.split(",")]
            cases += list(zip(["mni"] * len(which), which, mni_slices(which, a.mni_size)))
        rows = []
        t0 = time.perf_counter()
        for domain, z, truth in cases:
            print(f"{domain} slice {z} ({truth.shape[0]} x {truth.shape[1]})", flush=True)
            rows += run_slice(domain, z, truth, starts, a.init, seed=1000 * len(rows) + z,
                              scales=scales, noises=noises)
        restore_s = time.perf_counter() - t0
    summary = means(rows)
    cols = ["domain", "task", "method", "start", "psnr", "ssim", "vs_none", "min_vs_none",
            "max_vs_none", "s", "routes"]
    inside = {d: "in-domain" if d == a.train else "out of domain" for d in ("epi", "mni")}
    print(f"\nMeans over slices (epi: {min(a.epi_slices, 5)} held-out 64 x 64, {inside['epi']}; "
          f"mni: {len(a.mni_slices.split(','))} MNI T1 slices {a.mni_size} x {a.mni_size}, "
          f"{inside['mni']}); PSNR (dB), vs_none = PSNR minus the INR from encoder none\n"
          f"{table(summary, cols)}")
    versus = {m: defaults_vs_siren(summary, m) for m in starts if m != "none"} \
        if a.init == "auto" else {}
    for m, v in versus.items():
        print(f"\nDefaults with the {m} file minus the INR from no encoder (dB): {v}")
    per = ["domain", "slice", "task", "method", "start", "psnr", "ssim", "vs_none", "s", "route"]
    print(f"\nPer slice\n{table(rows, per)}")
    if set(METHODS) <= set(starts):
        print("\nReptile minus STRAINER (PSNR, mean over slices):")
        for d in dict.fromkeys(r["domain"] for r in summary):
            for task in tasks(scales, noises):
                got = {r["start"]: r["psnr"] for r in summary if r["domain"] == d
                       and r["task"] == task and r["method"].startswith("INR")}
                print(f"  {d} {task}: {got['reptile'] - got['strainer']:+.2f} dB")
    print(f"pretraining seconds: {seconds}; restoration seconds: {restore_s:.0f}")
    path = save(a.name, {"args": vars(a), "train": train, "held_out": held[:a.epi_slices],
                         "in_domain": a.train,
                         "pretrain_seconds": seconds, "pretrain": info,
                         "restore_seconds": round(restore_s, 1), "means": summary,
                         "defaults_vs_siren": versus,
                         "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
