"""``strainer demo``: the main jobs on the shipped sample data, on CPU, in a few minutes.

1. pretrains a small encoder briefly on the sample brain MRI (to show the pretraining path);
2. on a slice the shipped encoder never saw, fits it, super-resolves a 2x downsampled copy
   and denoises a noisy copy three ways, each through the planner
   (:mod:`napari_strainer.restore.plan`): with the defaults (fitting and super-resolution:
   ``init="auto"``, the route chosen on held-out pixels, stopped when converged; denoising:
   the race of denoisers, :mod:`napari_strainer.restore.race`), with the shipped encoder
   (STRAINER, the paper's recipe) and with random initialisation (SIREN); beside them
   classical baselines: bicubic interpolation for super-resolution, total variation (its
   weight picked on another slice of the scan with the same noise), non-local means with the
   true sigma and, when the optional ``bm4d`` package is installed, BM4D with the true sigma
   for denoising (:mod:`napari_strainer.restore.classical`);
3. through-plane super-resolution: the brain's slices box-averaged in pairs (a scan of half
   the slices, twice as thick) restored to the original slices by
   the planner's through-plane path with its defaults, against linear and cubic
   B-spline interpolation along the slice axis;

and writes the outputs as NIfTI, a PNG of the PSNR curves, a before/after panel, a
through-plane panel, a JSON of every number, and prints a table that marks each task's best
method. PSNR is against the clean data, its peak the clean data's range.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .core.siren import SirenConfig
from .io import read_scan, sample_path, write_scan
from .io.intensity import Intensity, pick_slices
from .io.scan import Scan
from .pretrain.train import pretrain, training_slices
from .restore.classical import bicubic, bm4d_denoise, interpolate_slices, nlm_denoise, tv_denoise
from .restore.plan import Options, make_plan, run
from .restore.volume import DEFAULT_STEPS as VOLUME_STEPS

RUNS = (("default", "default", "auto"), ("STRAINER", "default", "fixed"),
        ("SIREN", "none", "fixed"))  # (name, encoder, init)
DEMO_STEPS = 200  # per run (the defaults stop earlier when converged): 9 runs in a few minutes
HELD_OUT = 12  # a slice of sample_data/mr_brain.nii.gz between the encoder's training slices
NOISE = 0.05  # noise sigma as a fraction of the slice's intensity range
TV_TUNE_SLICE = 8  # the slice on which the TV weight is picked (not the demo slice)
TV_WEIGHTS = (0.35, 0.5, 0.7, 1.0, 1.4, 2.0)  # TV weights tried, in units of the noise sigma
THROUGH_PLANE = "thru-plane"  # the through-plane case's task name in the table
PANEL_BASELINE = {"superres": "bicubic", "denoise": "TV"}  # the classical column of panel.png


def _slice_scan(scan: Scan, z: int, data: np.ndarray) -> Scan:
    affine = scan.affine.copy()
    affine[:3, 3] += z * affine[:3, 0]
    return scan.derive(data[None], affine=affine)


def run_demo(outdir: str | Path, *, steps: int | None = None, pretrain_steps: int | None = None,
             device: str = "cpu", seed: int = 0, quiet: bool = False) -> dict:
    """Run the demo, write everything to ``outdir`` and return the table as a dict.

    ``steps`` caps every INR run, the through-plane one included (default: :data:`DEMO_STEPS`
    for the slice runs, the product's default for the through-plane run).
    """
    from tqdm import tqdm

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    vol_steps = steps or VOLUME_STEPS["superres"]
    steps = steps or DEMO_STEPS
    brain = read_scan(sample_path("mr_brain"))
    inten = Intensity.for_scan(brain)
    if HELD_OUT in pick_slices(inten.forward(brain.data), 10):
        raise RuntimeError("demo slice is one the shipped encoder was trained on")
    bar = tqdm(total=1, desc="demo", disable=quiet or not sys.stderr.isatty(), unit="step")
    offset = 0

    def progress(p) -> None:
        bar.n = offset + p.step
        bar.refresh()

    # 1. brief pretraining (64 x 64 slices, small budget), saved next to the outputs
    imgs = training_slices([brain], size=64, max_slices=10)
    enc_path = out / "encoder_brief.safetensors"
    p_steps = pretrain_steps or 100
    bar.total = p_steps + 9 * steps + vol_steps
    pretrain(imgs, enc_path, config=SirenConfig(), steps=p_steps, device=device, seed=seed,
             callback=progress, info={"files": ["mr_brain.nii.gz"]})
    offset = bar.n

    # 2. one held-out slice: fit, super-resolution x2, denoising; INRs, then classical methods
    clean = brain.data[HELD_OUT].astype(np.float32)
    ref = _slice_scan(brain, HELD_OUT, clean)
    low_t = F.avg_pool2d(torch.from_numpy(clean)[None, None], 2)[0, 0].numpy()
    low = _slice_scan(brain, HELD_OUT, low_t)
    low.affine = ref.affine.copy()
    low.affine[:3, 1:3] *= 2
    low.affine[:3, 3] += (ref.affine[:3, 1] + ref.affine[:3, 2]) / 2
    rng = np.random.default_rng(seed)
    sigma = NOISE * float(np.ptp(clean))
    noisy = _slice_scan(brain, HELD_OUT, clean + rng.normal(0, sigma, clean.shape).astype(
        np.float32))
    jobs = {"fit": (ref, {}), "superres": (low, {"scale": 2}), "denoise": (noisy, {})}
    baselines = {"superres": [("bicubic", lambda: (bicubic(low_t, 2), None))],
                 "denoise": [("TV", lambda: _tv_tuned(noisy.data[0], sigma, brain, seed)),
                             ("NLM", lambda: (nlm_denoise(noisy.data[0], sigma),
                                              {"sigma": round(sigma, 3)})),
                             ("BM4D", lambda: (bm4d_denoise(noisy.data[0], sigma),
                                               {"sigma": round(sigma, 3)}))]}
    results, images, table = {}, {}, []
    for task, (inp, kw) in jobs.items():
        for name, enc, init in RUNS:
            race = task == "denoise" and name == "default"
            mode = "auto" if race else "slices"  # the INR rows of denoising: one 2D INR
            options = Options(task=task, encoder=enc, init=init, steps=steps, device=device,
                              seed=seed, log_every=5, mode=mode, **kw)  # defaults else
            r = run(make_plan(inp, options, reference=ref, eta=False), callback=progress)
            offset = bar.n
            results[(task, name)] = r
            images[(task, name)] = r.scan.data[0]
            write_scan(r.scan, out / f"{task}_{name.lower()}.nii.gz", overwrite=True)
            h = r.history
            if race:
                table.append(_row(task, name, "race", _psnr(r.scan.data[0], clean),
                                  sum(h["race"]["seconds"].values()),
                                  params={"winner": h["race"]["winner"],
                                          "noise": h["noise"]["model"],
                                          "sigma": round(h["noise"]["sigma"], 3),
                                          "psnr_estimate": h["race"]["psnr_estimate"]}))
                continue
            table.append(_row(task, name, h["route"], _psnr(r.scan.data[0], clean),
                              h["seconds_total"], at_50=_at(h, 50), best=max(h["psnr"]),
                              steps=h["steps_run"][0], stop_step=h["stop_step"][0]))
        for name, method in baselines.get(task, []):
            t = time.perf_counter()
            img, params = method()
            images[(task, name)] = img
            if img is not None:
                write_scan(_slice_scan(brain, HELD_OUT, img), out / f"{task}_{name.lower()}"
                           ".nii.gz", overwrite=True)
            table.append(_row(task, name, "classical" if img is not None else "not installed",
                              None if img is None else _psnr(img, clean),
                              time.perf_counter() - t, params=params))

    # 3. through-plane super-resolution of the whole scan
    rows, views = _through_plane(brain, out, vol_steps, device, seed, progress)
    table += rows
    bar.close()
    _mark_best(table)
    _plots(out, results, images, jobs, clean)
    _plot_through_plane(out, views, brain)
    (out / "demo.json").write_text(json.dumps(table, indent=1))
    if not quiet:
        _print_table(table, out)
    return {"table": table}


def _tv_tuned(noisy: np.ndarray, sigma: float, brain: Scan, seed: int) -> tuple:
    """TV denoising of ``noisy`` with the weight (from :data:`TV_WEIGHTS`) that does best on
    slice :data:`TV_TUNE_SLICE` with noise of the same sigma (scan units); returns the image
    and the row's parameters."""
    tune = brain.data[TV_TUNE_SLICE].astype(np.float32)
    tune_noisy = tune + np.random.default_rng(seed + 1).normal(0, sigma, tune.shape)
    scores = {k: _psnr(tv_denoise(tune_noisy, k * sigma), tune) for k in TV_WEIGHTS}
    k = max(scores, key=scores.get)
    return tv_denoise(noisy, k * sigma), {
        "weight_sigmas": k, "weight": round(k * sigma, 3), "tuned_on_slice": TV_TUNE_SLICE,
        "tuning_psnr_db": {str(w): round(v, 2) for w, v in scores.items()}}


def _through_plane(brain: Scan, out: Path, steps: int, device: str, seed: int,
                   callback) -> tuple[list[dict], dict]:
    """Average the brain's slices in pairs, restore the 24 slices with the INR and the
    interpolations, score them; returns the table rows and the volumes for the panel."""
    truth = brain.data.astype(np.float32)
    thick = truth.reshape(truth.shape[0] // 2, 2, *truth.shape[1:]).mean(1)
    affine = brain.affine.copy()  # each thick slice centred between its two slices
    affine[:3, 3] += affine[:3, 0] / 2
    affine[:3, 0] *= 2
    scan = brain.derive(thick, affine=affine, description="slices averaged in pairs (demo)")
    write_scan(scan, out / "thru_plane_input.nii.gz", overwrite=True)
    t = time.perf_counter()
    options = Options(task="superres", slice_scale=2, scale=None, steps=steps, device=device,
                      seed=seed)
    r = run(make_plan(scan, options, reference=brain.derive(truth), eta=False),
            callback=callback)
    seconds = time.perf_counter() - t
    write_scan(r.scan, out / "thru_plane_default.nii.gz", overwrite=True)
    h = r.history
    rows = [_row(THROUGH_PLANE, "default", "3D SIREN+cubic", _psnr(r.scan.data, truth), seconds,
                 best=max(p for p in h["psnr"] if p is not None), steps=h["steps_done"])]
    views = {"thick input": np.repeat(thick, 2, axis=0)}
    for name, order in (("linear", 1), ("cubic", 3)):
        t = time.perf_counter()
        views[name] = interpolate_slices(thick, 2, order)
        rows.append(_row(THROUGH_PLANE, name, "classical", _psnr(views[name], truth),
                         time.perf_counter() - t))
    views["default"] = r.scan.data
    return rows, views


def _row(task: str, method: str, route: str, final: float | None, seconds: float, *,
         at_50: float | None = None, best: float | None = None, steps: int | None = None,
         stop_step: int | None = None, params: dict | None = None) -> dict:
    def r2(v):
        return None if v is None else round(float(v), 2)

    row = {"task": task, "method": method, "route": route, "psnr_final_db": r2(final),
           "psnr_at_50": r2(at_50), "best_psnr_db": r2(best), "steps": steps,
           "stop_step": stop_step, "seconds": round(seconds, 2)}
    return {**row, "params": params} if params else row


def _mark_best(table: list[dict]) -> None:
    """``best``: the rows of each task with the highest final PSNR as rounded in the table
    (classical ones included; all of them on a tie)."""
    for task in dict.fromkeys(r["task"] for r in table):
        rows = [r for r in table if r["task"] == task]
        top = max(r["psnr_final_db"] for r in rows if r["psnr_final_db"] is not None)
        for r in rows:
            r["best"] = r["psnr_final_db"] == top


def _print_table(table: list[dict], out: Path) -> None:
    def num(v, width: int, fmt: str = ".2f") -> str:
        return f"{'-' if v is None else format(v, fmt):>{width}s}"

    print(f"\n{'task':10s} {'method':8s} {'route':16s} {'PSNR@50':>8s} {'best':>7s} "
          f"{'result':>7s} (dB) {'steps':>6s} {'seconds':>8s}")
    for row in table:
        print(f"{row['task']:10s} {row['method']:8s} {row['route']:16s} "
              f"{num(row['psnr_at_50'], 8)} {num(row['best_psnr_db'], 7)} "
              f"{num(row['psnr_final_db'], 7)}      {num(row['steps'], 6, 'd')} "
              f"{row['seconds']:8.1f}{'  <- best' if row['best'] else ''}")
    tv = next((r["params"] for r in table if r["method"] == "TV"), None)
    print("\n<- best: the highest PSNR of the task, classical methods included.\n"
          f"{THROUGH_PLANE}: the scan's 24 slices restored from 12 twice as thick (pairs "
          "averaged).")
    if tv:
        print(f"TV weight {tv['weight_sigmas']:g} sigma, picked by PSNR on slice "
              f"{tv['tuned_on_slice']} with the same noise; NLM and BM4D use the true sigma.")
    race = next((r["params"] for r in table if r["route"] == "race"), None)
    if race:
        print(f"denoise default: {race['winner']} ({race['noise']} noise, sigma "
              f"{race['sigma']:g} estimated).")
    print(f"outputs, curves (psnr_curves.png), panels (panel.png, thru_plane.png) in {out}/")


def _psnr(x: np.ndarray, ref: np.ndarray) -> float:
    mse = float(np.mean((x.astype(np.float64) - ref) ** 2))
    return 10 * np.log10(float(np.ptp(ref)) ** 2 / max(mse, 1e-20))


def _at(history: dict, step: int) -> float:
    it = history["iterations"]
    return history["psnr"][min(range(len(it)), key=lambda i: abs(it[i] - step))]


def _pyplot():
    """matplotlib's pyplot on the Agg backend, without the font-cache notices ("Matplotlib is
    building the font cache", "generated new fontManager") of a first run on a fresh machine;
    errors still show."""
    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    import matplotlib.pyplot as plt

    return plt


def _plots(out: Path, results: dict, images: dict, jobs: dict, clean: np.ndarray) -> None:
    plt = _pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, task in zip(axes, jobs):
        for (name, _, _), style in zip(RUNS, ("-", "-.", "--")):
            h = results[(task, name)].history
            if "iterations" not in h:  # the denoising race: no iterations
                continue
            ax.plot(h["iterations"], h["psnr"], style, label=name)
        ax.set(title=task, xlabel="iteration", ylabel="PSNR (dB)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "psnr_curves.png", dpi=110)
    plt.close(fig)

    lo, hi = np.percentile(clean, [0.5, 99.5])
    fig, axes = plt.subplots(3, 6, figsize=(16, 7.6))
    for row, task in zip(axes, jobs):
        names = [name for name, _, _ in reversed(RUNS)] + [PANEL_BASELINE.get(task)]
        panels = [("input", jobs[task][0].data[0]),
                  *((name, images.get((task, name))) for name in names), ("reference", clean)]
        for ax, (name, img) in zip(row, panels):
            ax.axis("off")
            if img is None:
                continue
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
            skip = name == "reference" or (task, name) == ("fit", "input")
            extra = "" if skip or img.shape != clean.shape else f" {_psnr(img, clean):.1f} dB"
            ax.set_title(f"{task}: {name}{extra}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "panel.png", dpi=110)
    plt.close(fig)


def _plot_through_plane(out: Path, views: dict, brain: Scan) -> None:
    """``thru_plane.png``: a sagittal cut (the middle column) of the truth, the thick input
    and the restorations, and below them the absolute errors."""
    plt = _pyplot()
    truth = brain.data.astype(np.float32)
    col = truth.shape[2] // 2
    aspect = brain.spacing[0] / brain.spacing[1]
    lo, hi = np.percentile(truth, [0.5, 99.5])
    emax = float(np.percentile(np.abs(views["cubic"] - truth), 99.5))
    panels = [("truth", truth), *views.items()]
    fig, axes = plt.subplots(2, len(panels), figsize=(3.2 * len(panels), 2.8))
    for (top, bottom), (name, vol) in zip(axes.T, panels):
        top.imshow(vol[:, :, col], cmap="gray", vmin=lo, vmax=hi, origin="lower",
                   aspect=aspect)
        extra = "" if name in ("truth", "thick input") else f" {_psnr(vol, truth):.2f} dB"
        top.set_title(f"{THROUGH_PLANE}: {name}{extra}", fontsize=9)
        if name != "truth":
            bottom.imshow(np.abs(vol - truth)[:, :, col], cmap="magma", vmin=0, vmax=emax,
                          origin="lower", aspect=aspect)
            bottom.set_title(f"|{name} - truth|", fontsize=9)
        top.axis("off")
        bottom.axis("off")
    fig.tight_layout()
    fig.savefig(out / "thru_plane.png", dpi=110)
    plt.close(fig)
