"""Denoising: the product's default (the race of classical denoisers judged by SURE) against
classical denoisers, with known ground truth.

Truth (normalised to the robust range [0, 1], then clipped to [0, 1]):

* volumes: a 48 x 64 x 64 crop of the MNI ICBM152 2009a T1 template at 1 mm (nilearn) at the
  right edge of the brain (brain and background); the 48 x 56 x 48 crop at 2 mm from
  ``benchmarks/volume.py`` (inside the brain; the INR volume defaults were tuned on it:
  in-domain); a T2-like contrast of the 1 mm crop built from the template's tissue maps
  (``1.0 csf + 0.55 gm + 0.3 wm``, csf = the filled brain mask minus gm and wm: nilearn ships
  no CSF map); nibabel's anatomical T1 and volume 1 of its example4d EPI (both carry noise of
  their own);
* 2D: an axial slice of the whole 1 mm MNI brain (233 x 197), a 1024 x 1024 shoulder MR
  slice from pydicom-data (``MR2_UNCR.dcm``) area-averaged to 256 x 256, pydicom's
  ``CT_small.dcm`` (128 x 128) and a head CT slice from pydicom-data (``693_UNCR.dcm``,
  padding set to -1024 HU, area-averaged to 256 x 256). No multi-slice CT volume ships in the
  installed packages (pydicom-data's enhanced CT has two frames 10 mm apart).

Noise: Rician (the magnitude of complex Gaussian noise) and Gaussian, sigma 0.05 and 0.1 of
the truth range, for MR; Gaussian only for CT.

Methods: ``default`` (``make_plan(scan, Options(task="denoise"))`` and ``run``: the race,
noise model and sigma estimated, BM4D off as the package installs), ``default, true sigma``
(the same with ``Options(sigma=<the true sigma>)``: what the noise estimate costs),
``race+BM4D`` (BM4D allowed into the race; by default at sigma 0.05 only, for time),
``dipy NLM`` (dipy's
``nlmeans`` with ``estimate_sigma(N=0)``, ``rician`` matching the noise; 2D: scikit-image's
``denoise_nl_means(h=0.8 s, sigma=s, fast_mode=True)`` with its ``estimate_sigma``, which has
no Rician correction, so on Rician slices also ``NLM 2D+unbias``: its output through the
inverse Rician mean at the true sigma), ``TV tuned`` (scikit-image 3D / 2D TV, weight tuned
against the truth on another case with the same noise; on Rician data also ``TV+unbias``, the
weight tuned with the inverse Rician mean at the true sigma applied), ``BM4D (true sigma)``
(the ``bm4d`` package; licence restricts commercial use: benchmark-only; on Rician data also
``BM4D+unbias``), ``noisy``; with ``--inr`` the INR volume path (``Options(mode="volume")``,
Rician 0.05 on ``--inr-cases``; ``--inr-only`` skips the classical methods).

Metrics: PSNR (peak 1, the truth range) and SSIM over all voxels and inside the head/body
(truth > 10% of its max, closed and hole-filled; 2D cases in 2D), wall seconds, peak memory
(the rise of the process's peak RSS over the RSS before the method, Linux ``VmHWM`` reset
through ``/proc/self/clear_refs``). For the race: its estimated PSNR (SURE, in the noisy-mean
domain on the scan's robust range; Rician: where the signal is above ``race.SIGNAL`` sigmas)
against the true PSNR of its blend in the same domain and the true PSNR of the output, and how well the estimated risk ranks the candidates (Spearman
correlation with each candidate's true MSE against the noisy mean, captured from the same
run).

    python benchmarks/denoise.py [--quick] [--threads 2] [--cases A,B] [--levels 0.05,0.1]
        [--noises rician,gaussian] [--race-bm4d-levels 0.05] [--inr [--inr-only]] [--name N]
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import threading
import time
import warnings
import zlib

import numpy as np
import torch
from _common import save, table
from volume import _mni, _norm, volumes

from napari_strainer.io.scan import Scan
from napari_strainer.restore import race
from napari_strainer.restore.noise import rician_mean, rician_unbias
from napari_strainer.restore.plan import Options, make_plan, run

TV_WEIGHTS = (0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.12, 0.15, 0.2)
BM4D_LIMIT = 500_000
"""race+BM4D only up to this many voxels (the race's own default limit)."""


# ----------------------------------------------------------------------------- data
def _dcm(name: str) -> np.ndarray:
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.pixels import apply_rescale

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(get_testdata_file(name))
    return np.asarray(apply_rescale(ds.pixel_array, ds), np.float32)


def _area(img: np.ndarray, f: int) -> np.ndarray:
    h, w = img.shape[0] // f * f, img.shape[1] // f * f
    return img[:h, :w].reshape(h // f, f, w // f, f).mean((1, 3))


def _unit(v: np.ndarray) -> np.ndarray:
    return np.clip(_norm(v), 0.0, 1.0).astype(np.float32)


def cases() -> dict[str, dict]:
    """Named truth cases: ``truth`` (normalised, [0, 1]), ``mr`` (Rician noise too),
    ``tune`` (the case TV's weight is tuned on) and a note."""
    from scipy import ndimage as ndi

    t1 = _mni(1, "t1")
    gm, wm = _mni(1, "gm"), _mni(1, "wm")
    gm, wm = gm / gm.max(), wm / wm.max()
    csf = np.clip(ndi.binary_fill_holes(t1 > 0) - gm - wm, 0, 1)
    t2 = 1.0 * csf + 0.55 * gm + 0.3 * wm
    crop = (slice(73, 121), slice(115, 179), slice(118, 182))  # right edge of the brain
    vols = volumes()
    ct_head = _dcm("693_UNCR.dcm")
    ct_head = _area(np.maximum(ct_head, -1024), 2)

    def case(truth, mr, tune, note):
        return {"truth": truth, "mr": mr, "tune": tune, "note": note}

    return {
        "MNI T1 1mm": case(_unit(t1[crop]), True, "MNI T1 2mm",
                           "48x64x64, brain edge and background"),
        "MNI T1 2mm": case(np.clip(vols["MNI 2mm"], 0, 1), True, "MNI T1 1mm",
                           "48x56x48, inside the brain; in-domain for the INR defaults"),
        "MNI T2-like 1mm": case(_unit(t2[crop]), True, "MNI T1 1mm",
                                "48x64x64, 1.0 csf + 0.55 gm + 0.3 wm"),
        "nibabel T1": case(np.clip(vols["T1"], 0, 1), True, "MNI T1 2mm",
                           "40x24x32, 2 mm, own noise"),
        "nibabel EPI": case(np.clip(vols["EPI"], 0, 1), True, "MNI T1 2mm",
                            "64x24x64, own noise"),
        "MNI slice 2D": case(_unit(t1[87]), True, "MR shoulder 2D",
                             "233x197, whole axial slice, 1 mm"),
        "MR shoulder 2D": case(_unit(_area(_dcm("MR2_UNCR.dcm"), 4)), True, "MNI slice 2D",
                               "256x256, MR2_UNCR area x4"),
        "CT small 2D": case(_unit(_dcm("CT_small.dcm")), False, "CT head 2D",
                            "128x128, CT_small.dcm"),
        "CT head 2D": case(_unit(ct_head), False, "CT small 2D", "256x256, 693_UNCR area x2"),
    }


def add_noise(truth: np.ndarray, kind: str, level: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "rician":
        re = truth + level * rng.standard_normal(truth.shape)
        im = level * rng.standard_normal(truth.shape)
        return np.hypot(re, im).astype(np.float32)
    return (truth + level * rng.standard_normal(truth.shape)).astype(np.float32)


def _seed(*key) -> int:
    return zlib.crc32("|".join(map(str, key)).encode())


def head_mask(truth: np.ndarray) -> np.ndarray:
    """Truth above 10% of its max, closed (2 iterations) and hole-filled, in the truth's own
    dimension (edges padded so that closing does not erode the crop's border)."""
    from scipy import ndimage as ndi

    m = truth > 0.1 * truth.max()
    p = 3
    m = np.pad(m, p, mode="edge")
    m = ndi.binary_closing(m, ndi.generate_binary_structure(m.ndim, 1), iterations=2)
    m = ndi.binary_fill_holes(m)
    return m[tuple(slice(p, -p) for _ in range(m.ndim))]


# ----------------------------------------------------------------------------- metrics
def psnr(x: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> float:
    d = (np.asarray(x, np.float64) - ref) ** 2
    mse = float(d[mask].mean() if mask is not None else d.mean())
    return 10 * math.log10(1.0 / max(mse, 1e-20))  # peak 1: the truth range


def ssim(x: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    from skimage.metrics import structural_similarity

    _, s = structural_similarity(np.asarray(x, np.float64), np.asarray(ref, np.float64),
                                 data_range=1.0, full=True)
    return float(s.mean()), float(s[mask].mean())


def _trim() -> None:
    """Give freed heap pages back to the system (glibc), so that a method reusing them shows
    in the RSS."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak RSS rise over a block, in MiB: Linux VmHWM reset through /proc/self/clear_refs;
    else a psutil sampling thread (every 2 ms; misses peaks inside C code that holds the
    GIL); else ``resource.getrusage`` (the process's peak so far: an upper bound)."""

    def __enter__(self):
        gc.collect()
        _trim()
        self.how = "VmHWM"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.start = _rss_kib("VmRSS")
            if self.start is None:
                raise OSError
        except OSError:
            self._psutil()
        return self

    def _psutil(self):
        try:
            import psutil
        except ImportError:
            import resource

            self.how, self.start = "ru_maxrss", 0
            self._ru = resource
            return
        self.how = "psutil"
        proc = psutil.Process()
        self.start = self.top = proc.memory_info().rss // 1024
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self.top = max(self.top, proc.memory_info().rss // 1024)
                time.sleep(0.002)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    def __exit__(self, *exc):
        if self.how == "VmHWM":
            top = _rss_kib("VmHWM")
        elif self.how == "psutil":
            self._stop.set()
            self._thread.join()
            top = self.top
        else:
            top = self._ru.getrusage(self._ru.RUSAGE_SELF).ru_maxrss
        self.mib = max(0, top - self.start) / 1024
        return False


def timed(fn, *args, **kw):
    with PeakMemory() as mem:
        t = time.perf_counter()
        out = fn(*args, **kw)
        sec = time.perf_counter() - t
    return out, sec, mem.mib


# ----------------------------------------------------------------------------- methods
class Capture:
    """Records each race candidate's result on the scan (its first run; the second is on the
    probe-shifted scan) by wrapping ``race.candidates``."""

    def __init__(self):
        self.outs: dict[str, np.ndarray] = {}

    def __enter__(self):
        self._orig = race.candidates

        def wrapped(*args, **kw):
            return [race.Candidate(c.name, self._wrap(c), c.pilot)
                    for c in self._orig(*args, **kw)]

        race.candidates = wrapped
        return self

    def _wrap(self, c):
        def runner(x, s, *pilot):
            out = c.run(x, s, *pilot)
            if c.name not in self.outs:
                self.outs[c.name] = np.asarray(out, np.float64)
            return out
        return runner

    def __exit__(self, *exc):
        race.candidates = self._orig
        return False


def product(noisy: np.ndarray, mr: bool, *, bm4d: bool, mode: str = "auto", sigma="auto"):
    """The product's denoise (make_plan + run); returns the output (truth's shape), the
    history and the race's captured candidates."""
    data = noisy[None] if noisy.ndim == 2 else noisy
    scan = Scan(np.ascontiguousarray(data, np.float32), np.eye(4),
                meta={"modality": "MR" if mr else "CT"})
    old = race.BM4D_MAX_VOXELS
    race.BM4D_MAX_VOXELS = BM4D_LIMIT if bm4d else 0
    try:
        with Capture() as cap:
            plan = make_plan(scan, Options(task="denoise", noise="auto", mode=mode,
                                           sigma=sigma, device="cpu"), eta=False)
            res = run(plan)
    finally:
        race.BM4D_MAX_VOXELS = old
    out = np.asarray(res.scan.data, np.float32)
    return (out[0] if noisy.ndim == 2 else out), res.history, cap


def dipy_nlm(noisy: np.ndarray, rician: bool, threads: int) -> tuple[np.ndarray, float]:
    if noisy.ndim == 2:
        from skimage.restoration import denoise_nl_means, estimate_sigma

        s = float(estimate_sigma(noisy))
        return denoise_nl_means(noisy, h=0.8 * s, sigma=s, fast_mode=True).astype(
            np.float32), s
    from dipy.denoise.nlmeans import nlmeans
    from dipy.denoise.noise_estimate import estimate_sigma

    s = float(np.mean(estimate_sigma(noisy, N=0)))
    return np.asarray(nlmeans(noisy, sigma=s, rician=rician, num_threads=threads),
                      np.float32), s


def tv(noisy: np.ndarray, weight: float) -> np.ndarray:
    from skimage.restoration import denoise_tv_chambolle

    return denoise_tv_chambolle(noisy, weight=weight).astype(np.float32)


def bm4d_true(noisy: np.ndarray, sigma: float) -> np.ndarray | None:
    from napari_strainer.restore.classical import bm4d_denoise

    return bm4d_denoise(noisy, sigma)


_TUNED: dict = {}
CLASSICAL = ("dipy NLM", "NLM 2D+unbias", "TV tuned", "TV+unbias")
"""The classical methods the default is compared with (BM4D separately)."""


def tuned_weight(all_cases: dict, name: str, kind: str, level: float,
                 unbias: bool = False) -> float:
    """TV weight with the best PSNR on the case's tuning case (same noise, its own draw);
    ``unbias``: scored after the inverse Rician mean (true sigma)."""
    key = (all_cases[name]["tune"], kind, level, unbias)
    if key not in _TUNED:
        truth = all_cases[key[0]]["truth"]
        noisy = add_noise(truth, kind, level, _seed("tune", *key[:3]))
        post = (lambda x: rician_unbias(x, level)) if unbias else (lambda x: x)
        _TUNED[key] = max(TV_WEIGHTS, key=lambda w: psnr(post(tv(noisy, w)), truth))
    return _TUNED[key]


# ----------------------------------------------------------------------------- race check
def race_check(hist: dict, cap: Capture, noisy: np.ndarray, truth: np.ndarray, kind: str,
               level: float) -> dict:
    """The race's risk estimates against the truth, in the race's own (normalised noisy-mean)
    domain and over the voxels its risk covers (Rician: where its pilot's bias-corrected
    magnitude is above ``race.SIGNAL`` sigmas; else all): each candidate's true MSE against the
    noisy mean, the Spearman correlation with the estimated risks, which candidate the risk
    ranks first against the truly best (the regret in dB), and the blend's estimated vs true
    PSNR there."""
    from scipy.stats import spearmanr

    r = hist["race"]
    scale = float(r["psnr_range"])
    data = np.asarray(noisy, np.float64)
    rician_model = hist["noise"]["model"] == "rician"
    offset = 0.0 if rician_model else float(np.percentile(data, 0.5))
    mean = rician_mean(truth, level) if kind == "rician" else np.asarray(truth, np.float64)
    mu = (mean - offset) / scale  # the noisy mean in the race's units (true noise model)
    names = [k for k in r["risks"] if k in cap.outs]
    region = np.ones(truth.shape, bool)
    if rician_model and hasattr(race, "SIGNAL"):
        s_n = hist["noise"]["sigma"] / scale
        pilot = cap.outs[r.get("candidates", names)[0]]
        region = rician_unbias(pilot, s_n) > race.SIGNAL * s_n
    true_mse = {k: float(np.mean((cap.outs[k][region] - mu[region]) ** 2)) * scale ** 2
                for k in names}
    est = [r["risks"][k] for k in names]
    tru = [true_mse[k] for k in names]
    rho = float(spearmanr(est, tru).statistic) if len(names) > 2 else float("nan")
    blend = sum(r["weights"][k] * cap.outs[k][region] for k in names if r["weights"][k] > 0)
    blend_mse = float(np.mean((blend - mu[region]) ** 2))
    picked = names[int(np.argmin(est))]
    best = names[int(np.argmin(tru))]
    est_psnr = r.get("psnr_estimate")
    return {"scale": scale, "offset": offset, "region_fraction": float(region.mean()),
            "true_mse": true_mse, "est_risk": dict(zip(names, est)), "spearman": rho,
            "picked_by_risk": picked, "truly_best": best,
            "pick_regret_db": 10 * math.log10(true_mse[picked] / true_mse[best]),
            "psnr_estimate": None if est_psnr is None else float(est_psnr),
            "psnr_true_noisy_mean_domain": 10 * math.log10(1.0 / max(blend_mse, 1e-20)),
            "risk_ratio": float(r["risk"] / scale ** 2) / max(blend_mse, 1e-20),
            "warning": r.get("warning")}


# ----------------------------------------------------------------------------- main loop
def classical(all_cases, name, kind, level, a, noisy, res, extra):
    """The classical baselines: dipy NLM, tuned TV (and with the inverse Rician mean), BM4D
    with the true sigma."""
    rician = kind == "rician"
    out, sec, mib = timed(dipy_nlm, noisy, rician, a.threads)
    res["dipy NLM"] = (out[0], sec, mib)
    extra["dipy NLM"] = {"sigma_est": out[1]}
    if rician and noisy.ndim == 2:  # scikit-image's NLM has no Rician correction
        res["NLM 2D+unbias"] = (rician_unbias(res["dipy NLM"][0], level).astype(np.float32),
                                *res["dipy NLM"][1:])
    w = tuned_weight(all_cases, name, kind, level)
    img, sec, mib = timed(tv, noisy, w)
    res["TV tuned"] = (img, sec, mib)
    extra["TV tuned"] = {"weight": w, "tuned_on": all_cases[name]["tune"]}
    if rician:  # TV then the inverse Rician mean (true sigma), the weight tuned that way
        w = tuned_weight(all_cases, name, kind, level, unbias=True)
        img, sec, mib = timed(lambda: rician_unbias(tv(noisy, w), level).astype(np.float32))
        res["TV+unbias"] = (img, sec, mib)
        extra["TV+unbias"] = {"weight": w, "tuned_on": all_cases[name]["tune"]}
    if _bm4d_installed():
        img, sec, mib = timed(bm4d_true, noisy, level)
        res["BM4D (true sigma)"] = (img, sec, mib)
        if rician:
            res["BM4D+unbias"] = (rician_unbias(img, level).astype(np.float32), sec, mib)


def evaluate(all_cases, name, kind, level, a, rows, races):
    c = all_cases[name]
    truth = c["truth"]
    mask = head_mask(truth)
    noisy = add_noise(truth, kind, level, _seed(a.seed, name, kind, level))
    res: dict[str, tuple] = {}
    extra: dict[str, dict] = {}

    runs = [("default", {"bm4d": False}), ("default, true sigma", {"bm4d": False,
                                                                    "sigma": level})]
    if a.inr_only:
        runs = runs[:1]
    elif _bm4d_installed() and truth.size <= BM4D_LIMIT and level in a.race_bm4d_levels:
        runs.append(("race+BM4D", {"bm4d": True}))
    for method, kw in runs:
        (img, hist, cap), sec, mib = timed(product, noisy, c["mr"], **kw)
        res[method] = (img, sec, mib)
        chk = race_check(hist, cap, noisy, truth, kind, level)
        extra[method] = {"winner": hist["race"]["winner"], "model": hist["noise"]["model"],
                         "sigma_est": hist["noise"]["sigma"],
                         "psnr_estimate": chk["psnr_estimate"],
                         "psnr_true_nm": chk["psnr_true_noisy_mean_domain"],
                         "spearman": chk["spearman"], "regret_db": chk["pick_regret_db"]}
        races.append({"case": name, "noise": kind, "level": level, "method": method,
                      "history": {k: hist[k] for k in ("noise", "race")}, "check": chk})
        del cap

    if not a.inr_only:
        classical(all_cases, name, kind, level, a, noisy, res, extra)

    if a.inr and kind == "rician" and level == 0.05 and name in a.inr_cases \
            and truth.ndim == 3:
        out, sec, mib = timed(product, noisy, c["mr"], bm4d=False, mode="volume")
        res["INR volume"] = (out[0], sec, mib)
        extra["INR volume"] = {"steps": out[1].get("steps_done"),
                               "stop": out[1].get("stop_reason")}

    res["noisy"] = (noisy, 0.0, 0.0)
    for method, (img, sec, mib) in res.items():
        s_all, s_mask = ssim(img, truth, mask)
        row = {"case": name, "noise": kind, "level": level, "method": method,
               "psnr": psnr(img, truth), "psnr_mask": psnr(img, truth, mask),
               "ssim": s_all, "ssim_mask": s_mask, "seconds": sec, "peak_mib": mib,
               "voxels": int(truth.size), **extra.get(method, {})}
        rows.append(row)
        print(f"{name:16s} {kind:8s} {level:4.2f} {method:19s} {row['psnr']:6.2f} dB "
              f"(mask {row['psnr_mask']:6.2f})  SSIM {s_all:.3f}  {sec:6.1f} s  "
              f"{mib:6.0f} MiB", flush=True)
    d = extra["default"]
    print(f"  race: {d['model']} sigma {d['sigma_est']:.4f} (true {level:g}); {d['winner']}; "
          f"estimated {_f(d['psnr_estimate'])} dB, true in the same domain "
          f"{d['psnr_true_nm']:.2f}; Spearman {d['spearman']:.2f}", flush=True)


def _f(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def _bm4d_installed() -> bool:
    try:
        import bm4d  # noqa: F401
    except ImportError:
        return False
    return True


def summary(rows: list[dict]) -> list[str]:
    """Per case and noise: the default against the best classical method (dipy NLM, TV tuned)
    and against BM4D; race+BM4D against BM4D."""
    lines = []
    keys = list(dict.fromkeys((r["case"], r["noise"], r["level"]) for r in rows))
    for key in keys:
        by = {r["method"]: r for r in rows if (r["case"], r["noise"], r["level"]) == key}
        d = by["default"]["psnr"]
        if not any(m in by for m in CLASSICAL):
            continue
        cls = max((m for m in CLASSICAL if m in by), key=lambda m: by[m]["psnr"])
        diff = d - by[cls]["psnr"]
        text = (f"{key[0]}, {key[1]} {key[2]:g}: default {d:.2f} dB, "
                f"{'wins' if diff > 0 else 'LOSES'} {diff:+.2f} dB vs {cls} "
                f"({by[cls]['psnr']:.2f})")
        bm = [m for m in ("BM4D (true sigma)", "BM4D+unbias") if m in by]
        if bm:
            b = max(bm, key=lambda m: by[m]["psnr"])
            text += f"; vs {b} {d - by[b]['psnr']:+.2f} dB"
            if "race+BM4D" in by:
                text += (f"; race+BM4D {by['race+BM4D']['psnr']:.2f} "
                         f"({by['race+BM4D']['psnr'] - by[b]['psnr']:+.2f} vs {b})")
        t = by.get("default, true sigma")
        if t is not None:
            text += f"; default with the true sigma {t['psnr']:.2f}"
        lines.append(text)
    return lines


def markdown(rows: list[dict], races: list[dict], key: str = "psnr") -> str:
    """One line per case and noise: every method's ``key`` (PSNR in dB) and the differences."""
    cols = ["noisy", "dipy NLM", "NLM 2D+unbias", "TV tuned", "TV+unbias",
            "BM4D (true sigma)", "BM4D+unbias", "default", "default, true sigma", "race+BM4D",
            "INR volume"]
    present = [c for c in cols if any(r["method"] == c for r in rows)]
    head = (["case", "noise"] + present + ["default - best classical", "default - best BM4D"])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = list(dict.fromkeys((r["case"], r["noise"], r["level"]) for r in rows))
    f = ".3f" if "ssim" in key else ".2f"
    for k in keys:
        by = {r["method"]: r for r in rows if (r["case"], r["noise"], r["level"]) == k}
        best = max((by[m][key] for m in CLASSICAL if m in by), default=float("nan"))
        bms = [by[m][key] for m in ("BM4D (true sigma)", "BM4D+unbias") if m in by]
        top = max(v[key] for m, v in by.items() if m != "noisy")
        cells = []
        for c in present:
            if c not in by:
                cells.append("")
                continue
            v = format(by[c][key], f)
            if c == "default":
                v += f" ({by[c]['seconds']:.0f} s)" if by[c]["seconds"] >= 1 else \
                    f" ({by[c]['seconds']:.1f} s)"
            cells.append(f"**{v}**" if by[c][key] == top else v)
        d = by["default"][key]
        cells += [format(d - best, "+" + f) if not math.isnan(best) else "",
                  format(d - max(bms), "+" + f) if bms else ""]
        out.append(f"| {k[0]} | {k[1]} {k[2]:g} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def race_markdown(races: list[dict]) -> str:
    head = ["case", "noise", "method", "model", "sigma est.", "winner", "est. PSNR",
            "true PSNR (same domain)", "output PSNR", "Spearman", "pick regret (dB)"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in races:
        h, c = r["history"], r["check"]
        out.append(f"| {r['case']} | {r['noise']} {r['level']:g} | {r['method']} | "
                   f"{h['noise']['model']} | {h['noise']['sigma']:.4f} | "
                   f"{h['race']['winner']} | {_f(c['psnr_estimate'])} | "
                   f"{c['psnr_true_noisy_mean_domain']:.2f} | {r['psnr']:.2f} | "
                   f"{c['spearman']:.2f} | {c['pick_regret_db']:.2f} |")
    return "\n".join(out)


def _versions() -> dict:
    """SHA-1 (git blob hash) of the product files this benchmark measures."""
    import hashlib

    import napari_strainer.restore as pkg

    out = {}
    for f in ("race.py", "noise.py", "classical.py", "plan.py"):
        with open(os.path.join(os.path.dirname(pkg.__file__), f), "rb") as fh:
            data = fh.read()
        out[f] = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="sigma 0.05 only; nibabel T1, MNI slice 2D, CT small 2D")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    p.add_argument("--levels", default="0.05,0.1")
    p.add_argument("--noises", default="rician,gaussian")
    p.add_argument("--race-bm4d-levels", default="0.05",
                   help="noise levels at which race+BM4D runs (BM4D runs twice in the race: "
                        "about 0.4 s per thousand voxels on 2 cores)")
    p.add_argument("--inr", action="store_true",
                   help="also the INR volume path (mode volume) at Rician 0.05 on --inr-cases "
                        "(about 4 min each on 2 cores)")
    p.add_argument("--inr-only", action="store_true",
                   help="with --inr: only the default, the INR and the noisy input")
    p.add_argument("--inr-cases", default="MNI T1 2mm,MNI T2-like 1mm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="denoise")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    versions = _versions()  # as imported (the files may change while this runs)
    all_cases = cases()
    names = list(all_cases) if a.cases is None else a.cases.split(",")
    levels = [float(v) for v in a.levels.split(",")]
    if a.quick:
        names = ["nibabel T1", "MNI slice 2D", "CT small 2D"] if a.cases is None else names
        levels, a.inr, a.inr_only = [0.05], False, False
    a.inr_cases = a.inr_cases.split(",")
    a.race_bm4d_levels = [float(v) for v in a.race_bm4d_levels.split(",") if v]
    rows, races = [], []
    for name in names:
        kinds = [k for k in a.noises.split(",") if all_cases[name]["mr"] or k == "gaussian"]
        for kind in kinds:
            for level in levels:
                evaluate(all_cases, name, kind, level, a, rows, races)
    lines = summary(rows)
    print()
    print(table(rows, ["case", "noise", "level", "method", "psnr", "psnr_mask", "ssim",
                       "ssim_mask", "seconds", "peak_mib"]))
    print()
    rrows = [{"case": r["case"], "noise": r["noise"], "level": r["level"],
              "method": r["method"], "model": r["history"]["noise"]["model"],
              "sigma_est": r["history"]["noise"]["sigma"],
              "winner": r["history"]["race"]["winner"],
              "est_psnr": r["check"]["psnr_estimate"],
              "true_psnr_nm": r["check"]["psnr_true_noisy_mean_domain"],
              "spearman": r["check"]["spearman"],
              "regret_db": r["check"]["pick_regret_db"]} for r in races]
    print(table(rrows, ["case", "noise", "level", "method", "model", "sigma_est",
                        "est_psnr", "true_psnr_nm", "spearman", "regret_db", "winner"]))
    print()
    print("\n".join(lines))
    for r in races:
        r["psnr"] = next(x["psnr"] for x in rows if (x["case"], x["noise"], x["level"],
                                                       x["method"]) == (r["case"], r["noise"],
                                                                        r["level"], r["method"]))
    print("\nPSNR (dB), all voxels\n")
    print(markdown(rows, races))
    print("\nPSNR (dB), inside the head / body mask\n")
    print(markdown(rows, races, "psnr_mask"))
    print("\nSSIM, all voxels\n")
    print(markdown(rows, races, "ssim"))
    print("\nThe race's risk estimate\n")
    print(race_markdown(races))
    total = time.perf_counter() - t_start
    print(f"\ntotal {total:.0f} s")
    info = {k: {"shape": list(v["truth"].shape), "mr": v["mr"], "tune": v["tune"],
                "note": v["note"], "mask_fraction": float(head_mask(v["truth"]).mean())}
            for k, v in all_cases.items() if k in names}
    path = save(a.name, {"args": vars(a), "cases": info, "product_files": versions, "rows": rows, "races": races,
                         "tv_weights": {f"{k[0]} {k[1]} {k[2]:g}{' unbias' * k[3]}": w
                                        for k, w in _TUNED.items()},
                         "summary": lines, "total_seconds": total})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
