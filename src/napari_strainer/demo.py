"""``strainer demo``: the main job on the shipped sample data, on CPU, in a few minutes.

1. pretrains a small encoder briefly on the sample brain MRI (to show the pretraining path);
2. on a slice the shipped encoder never saw, fits it, super-resolves a 2x downsampled copy
   and denoises a noisy copy three ways: with the defaults (``init="auto"``: the route chosen
   on held-out pixels, stopped when converged), with the shipped encoder (STRAINER, the
   paper's recipe) and with random initialisation (SIREN); writes the outputs as NIfTI, a PNG
   of the PSNR curves, a before/after panel, a JSON of every number, and prints a table.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .core.siren import SirenConfig
from .denoise import make_stop_rule
from .io import read_scan, sample_path, write_scan
from .io.scan import Scan
from .tasks import Intensity, pick_slices, pretrain, restore, training_slices

RUNS = (("default", "default", "auto"), ("STRAINER", "default", "fixed"),
        ("SIREN", "none", "fixed"))  # (name, encoder, init)
DEMO_STEPS = 200  # per run (the defaults stop earlier when converged): 9 runs in a few minutes
HELD_OUT = 12  # a slice of sample_data/mr_brain.nii.gz between the encoder's training slices
NOISE = 0.05  # noise sigma as a fraction of the slice's intensity range


def _slice_scan(scan: Scan, z: int, data: np.ndarray) -> Scan:
    affine = scan.affine.copy()
    affine[:3, 3] += z * affine[:3, 0]
    return scan.derive(data[None], affine=affine)


def run_demo(outdir: str | Path, *, steps: int | None = None, pretrain_steps: int | None = None,
             device: str = "cpu", seed: int = 0, quiet: bool = False) -> dict:
    """Run the demo, write everything to ``outdir`` and return the table as a dict."""
    from tqdm import tqdm

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    steps = steps or DEMO_STEPS
    brain = read_scan(sample_path("mr_brain"))
    inten = Intensity.of(brain.data)
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
    bar.total = p_steps + 9 * steps
    pretrain(imgs, enc_path, config=SirenConfig(), steps=p_steps, device=device, seed=seed,
             callback=progress, info={"files": ["mr_brain.nii.gz"]})
    offset = bar.n

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
    jobs = {"fit": (ref, {}), "superres": (low, {"scale": 2}),
            "denoise": (noisy, {"stop": make_stop_rule("auto")})}
    results, table = {}, []
    for task, (inp, kw) in jobs.items():
        for name, enc, init in RUNS:
            r = restore(inp, task=task, encoder=enc, init=init, steps=steps, reference=ref,
                        device=device, seed=seed, log_every=5, callback=progress, **kw)
            offset = bar.n
            results[(task, name)] = r
            write_scan(r.scan, out / f"{task}_{name.lower()}.nii.gz", overwrite=True)
            h = r.history
            final = float(_psnr(r.scan.data[0], clean))
            table.append({"task": task, "init": name, "route": h["route"],
                          "psnr_final_db": round(final, 2),
                          "psnr_at_50": round(_at(h, 50), 2), "best_psnr_db": round(
                              max(h["psnr"]), 2), "steps": h["steps_run"][0],
                          "stop_step": h["stop_step"][0], "seconds": h["seconds_total"]})
    bar.close()
    _plots(out, results, jobs, clean)
    (out / "demo.json").write_text(json.dumps(table, indent=1))
    if not quiet:
        print(f"\n{'task':9s} {'init':9s} {'route':16s} {'PSNR@50':>8s} {'best':>7s} "
              f"{'result':>7s} (dB) {'steps':>6s} {'seconds':>8s}")
        for row in table:
            print(f"{row['task']:9s} {row['init']:9s} {row['route']:16s} "
                  f"{row['psnr_at_50']:8.2f} {row['best_psnr_db']:7.2f} "
                  f"{row['psnr_final_db']:7.2f}      {row['steps']:6d} {row['seconds']:8.1f}")
        print(f"\noutputs, curves (psnr_curves.png) and panel (panel.png) in {out}/")
    return {"table": table}


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


def _plots(out: Path, results: dict, jobs: dict, clean: np.ndarray) -> None:
    plt = _pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, task in zip(axes, jobs):
        for (name, _, _), style in zip(RUNS, ("-", "-.", "--")):
            h = results[(task, name)].history
            ax.plot(h["iterations"], h["psnr"], style, label=name)
        ax.set(title=task, xlabel="iteration", ylabel="PSNR (dB)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "psnr_curves.png", dpi=110)
    plt.close(fig)

    lo, hi = np.percentile(clean, [0.5, 99.5])
    fig, axes = plt.subplots(3, 5, figsize=(13.5, 7.6))
    for row, task in zip(axes, jobs):
        inp = jobs[task][0].data[0]
        panels = [("input", inp), *((name, results[(task, name)].scan.data[0])
                                    for name, _, _ in reversed(RUNS)), ("reference", clean)]
        for ax, (name, img) in zip(row, panels):
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
            skip = name == "reference" or (task, name) == ("fit", "input")
            extra = "" if skip or img.shape != clean.shape else f" {_psnr(img, clean):.1f} dB"
            ax.set_title(f"{task}: {name}{extra}", fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "panel.png", dpi=110)
    plt.close(fig)
