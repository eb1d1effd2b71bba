"""Are the defaults trustworthy? ``restore``'s defaults against SIREN and every fixed route,
in-domain and out of domain.

Cases (ground truth known; a slab of neighbouring slices each, restored as one scan):

* ``epi``: the shipped encoder's own scan (sample brain EPI, 96 x 128), slices around the
  middle: in-domain.
* ``t1``: the T1 anatomical sample resampled in-plane to 96 x 96 (unlike the encoder's data).
* ``ct``: the sample CT slices (three scans) resampled to 128 x 128 (``--ct-size``; another
  modality).
* ``epi64``: the EPI resampled to 48 x 64 (another size).

Tasks: fit, super-resolution x2 / x4 (area-downsampled observation), denoising (Gaussian noise,
sigma 0.1 of the range, ``--sigma auto`` stop). Methods: ``auto`` (the default: held-out route
race, warm starts, convergence stop, super-resolution's coarse phase), ``auto-none`` (the
same with ``--encoder none``), ``auto-exact`` (the race, then 500 steps
through the exact operator, no coarse phase), ``siren`` (``--init fixed --encoder none``; for
super-resolution the paper's loop: 500 steps through the exact operator, no coarse phase),
``encoder`` (``--init fixed``, the shipped encoder at the task's default freeze) and
``encoder-f0`` (fine-tune everything, the paper). Reported: PSNR against the truth, wall
seconds, steps per slice, the route ``auto`` chose, the SIREN step at which SIREN first
reaches each method's PSNR (``siren_equiv_step``: the time SIREN needs for that quality),
and the time of a paper-style loop (``nn.Linear`` SIREN, one slice at a time) for 100
iterations per slice, timed in the same run.

    python benchmarks/defaults.py [--cases t1:superres2,epi:fit,...] [--slices 4] [--steps N]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from _common import save, table
from speed import RefSiren

from napari_strainer.core import SirenConfig
from napari_strainer.core.coords import grid
from napari_strainer.io import read_scan, sample_path
from napari_strainer.io.intensity import Intensity, busy_slices
from napari_strainer.io.scan import Scan
from napari_strainer.restore.classical import tv_denoise
from napari_strainer.restore.noise import make_stop_rule
from napari_strainer.restore.slices import restore

TASKS = {"fit": ("fit", 1), "superres2": ("superres", 2), "superres4": ("superres", 4),
         "denoise": ("denoise", 1)}
METHODS = {"auto": {"init": "auto"},
           "auto-none": {"init": "auto", "encoder": "none"},
           # no coarse phase: 500 exact steps after the race (--coarse-steps 0 --steps 500)
           "auto-exact": {"init": "auto", "steps": 500, "coarse_steps": 0},
           "siren": {"init": "fixed", "encoder": "none", "paper_sr": True},
           "encoder": {"init": "fixed"},
           "encoder-f0": {"init": "fixed", "freeze": 0},
           "tv": {}}  # denoising only: total variation, its weight tuned on the truth
TV_WEIGHTS = (0.35, 0.5, 0.7, 1.0, 1.4, 2.0)  # x the true noise sigma
NOISE = 0.1
PAPER_SR_STEPS = 500  # the "siren" row of super-resolution: 500 steps through the exact operator


def _resample(vol: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    t = torch.from_numpy(vol.astype(np.float32))[:, None]
    return F.interpolate(t, size=size, mode="bicubic", align_corners=False)[:, 0].numpy()


def slab(name: str, n: int, t1_size: int = 96, ct_size: int = 128) -> np.ndarray:
    """``n`` neighbouring non-empty slices of case ``name``, normalised to [0, 1]-ish."""
    if name == "ct":
        vols = [_resample(Intensity.of(d).forward(d), (ct_size, ct_size)) for d in (
            read_scan(sample_path(s)).data for s in ("ct_small", "ct_enhanced", "ct_j2k"))]
        return np.concatenate(vols)[:n]
    src = "mr_anatomical" if name == "t1" else "mr_brain"
    data = read_scan(sample_path(src)).data
    norm = Intensity.of(data).forward(data)
    busy = busy_slices(norm)
    mid = busy[len(busy) // 2]
    vol = norm[max(0, mid - n // 2): max(0, mid - n // 2) + n]
    size = {"t1": (t1_size, t1_size), "epi64": (48, 64)}.get(name)
    return np.clip(_resample(vol, size), 0, None) if size else vol


def observe(truth: np.ndarray, task: str, scale: int, seed: int) -> np.ndarray:
    if task == "superres":
        return F.avg_pool2d(torch.from_numpy(truth)[:, None], scale)[:, 0].numpy()
    if task == "denoise":
        rng = np.random.default_rng(seed)
        return (truth + rng.normal(0, NOISE * np.ptp(truth), truth.shape)).astype(np.float32)
    return truth


def psnr(x: np.ndarray, ref: np.ndarray) -> float:
    mse = float(np.mean((x.astype(np.float64) - ref) ** 2))
    return 10 * np.log10(float(np.ptp(ref)) ** 2 / max(mse, 1e-20))


def paper_loop_seconds(shape: tuple[int, int], scale: int, slices: int, iters: int = 100,
                       timed: int = 10) -> float:
    """Seconds of a paper-style loop (``nn.Linear`` SIREN, Adam, one slice at a time,
    through the task's operator) for ``iters`` iterations per slice, from ``timed``."""
    cfg = SirenConfig()
    fine = (shape[0] * scale, shape[1] * scale)
    coords = grid(fine)
    target = torch.rand(1, shape[0] * shape[1], 1)
    model = RefSiren(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad()
        out = model(coords)
        if scale > 1:
            out = F.avg_pool2d(out.reshape(1, 1, *fine), scale).reshape(1, -1, 1)
        ((out - target) ** 2).mean().backward()
        opt.step()

    step()
    t0 = time.perf_counter()
    for _ in range(timed):
        step()
    return (time.perf_counter() - t0) / timed * iters * slices


def siren_equiv(siren_hist: dict, target: float) -> int | None:
    """The first logged SIREN step whose (slice-averaged) PSNR reaches ``target``."""
    for it, p in zip(siren_hist["iterations"], siren_hist.get("psnr") or []):
        if p is not None and p >= target:
            return it
    return None


def run_case(case: str, task_key: str, n: int, steps: int | None, methods: list[str],
             seed: int, t1_size: int = 96, ct_size: int = 128) -> list[dict]:
    task, scale = TASKS[task_key]
    truth = slab(case, n, t1_size, ct_size)
    obs = observe(truth, task, scale, seed)
    ref = Scan(truth)
    rows, hists = [], {}
    paper = paper_loop_seconds(obs.shape[1:], scale, len(truth))
    for m in methods:
        if m == "tv":
            if task == "denoise":
                rows.append(_tv_row(case, task_key, obs, truth, paper))
            continue
        kw = {"steps": steps, **METHODS[m]}
        if kw.pop("paper_sr", False) and task == "superres":  # the paper's loop
            kw.update(steps=steps or PAPER_SR_STEPS, coarse_steps=0)
        if task == "denoise":
            kw["stop"] = make_stop_rule("auto")
        t0 = time.perf_counter()
        r = restore(Scan(obs), task=task, scale=scale, reference=ref,
                    device="cpu", seed=seed, log_every=10, **kw)
        sec = time.perf_counter() - t0
        h = hists[m] = r.history
        ran = [s for s in h["steps_run"] if s is not None]
        rows.append({"case": case, "task": task_key, "method": m,
                     "psnr": round(psnr(r.scan.data, truth), 2), "seconds": round(sec, 1),
                     "steps_per_slice": round(float(np.mean(ran)), 1), "route": h["route"],
                     "probe_s": h["probe_seconds"], "paper100_s": round(paper, 1),
                     "probes": h["probes"], "steps_run": h["steps_run"],
                     "curve": {k: h.get(k) for k in ("iterations", "psnr", "val_loss")}})
    base = next((r for r in rows if r["method"] == "siren"), None)
    none = next((r for r in rows if r["method"] == "auto-none"), None)
    for r in rows:
        if base is not None:
            r["vs_siren_db"] = round(r["psnr"] - base["psnr"], 2)
            r["siren_equiv_step"] = siren_equiv(hists["siren"], r["psnr"]) if r[
                "method"] != "tv" else None
        if none is not None:
            r["vs_none_db"] = round(r["psnr"] - none["psnr"], 2)
        r["time_vs_paper100"] = round(r["seconds"] / r["paper100_s"], 2)
    return rows


def _tv_row(case: str, task_key: str, obs: np.ndarray, truth: np.ndarray, paper: float
            ) -> dict:
    """Total-variation denoising slice by slice with the weight (from :data:`TV_WEIGHTS` x the
    true sigma) that scores best against the truth: an upper bound on tuned TV."""
    sigma = NOISE * float(np.ptp(truth))
    t0 = time.perf_counter()
    outs = {k: np.stack([tv_denoise(o, k * sigma) for o in obs]) for k in TV_WEIGHTS}
    best = max(outs, key=lambda k: psnr(outs[k], truth))
    return {"case": case, "task": task_key, "method": "tv", "psnr": round(psnr(
        outs[best], truth), 2), "seconds": round(time.perf_counter() - t0, 1),
        "steps_per_slice": None, "route": f"classical, weight {best} sigma (oracle)",
        "probe_s": 0.0, "paper100_s": round(paper, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="t1:superres2,epi:superres2,t1:fit,epi:fit,"
                    "t1:denoise,epi:denoise,ct:superres2,t1:superres4,epi64:superres2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--slices", type=int, default=4)
    ap.add_argument("--steps", type=int, default=None, help="default: the task's")
    ap.add_argument("--t1-size", type=int, default=96, help="T1 slices resampled to N x N")
    ap.add_argument("--ct-size", type=int, default=128, help="CT slices resampled to N x N")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="defaults")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    for spec in a.cases.split(","):
        case, task_key = spec.split(":")
        rows += run_case(case, task_key, a.slices, a.steps, a.methods.split(","), a.seed,
                         a.t1_size, a.ct_size)
        print(table(rows[-len(a.methods.split(",")):],
                    ["case", "task", "method", "psnr", "vs_siren_db", "vs_none_db", "seconds",
                     "time_vs_paper100", "steps_per_slice", "route", "siren_equiv_step"]),
              flush=True)
        save(a.out, {"slices": a.slices, "steps": a.steps, "noise": NOISE,
                     "t1_size": a.t1_size, "ct_size": a.ct_size, "rows": rows})
    print("\n" + table(rows, ["case", "task", "method", "psnr", "vs_siren_db", "vs_none_db",
                              "seconds", "time_vs_paper100", "steps_per_slice", "route",
                              "siren_equiv_step"]))


if __name__ == "__main__":
    main()
