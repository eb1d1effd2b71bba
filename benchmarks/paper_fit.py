"""The paper's in-domain claim on real MRI: does a STRAINER encoder make fitting faster?

Slices of the sample brain MRI (``sample_data/mr_brain.nii.gz``): the 10 evenly spaced slices
``io.intensity.pick_slices`` chooses train the encoders; 5 other slices are held out and fitted from
each initialisation, all weights trained (the paper's protocol, Adam 1e-4):

* STRAINER-10: encoder pretrained with 10 heads on the 10 training slices;
* STRAINER-1: the same with one training slice;
* SIREN: random SIREN initialisation;
* SIREN-fit-1: every weight of a SIREN fitted to one training slice (head included);
* STRAINER-10 solved head (``--head solved|both``): STRAINER-10 with its head solved in closed
  form on the encoder features of the observed pixels (:func:`napari_strainer.core.solve_head`)
  instead of a random head.

Prints PSNR (mean over held-out slices) at iterations 0/10/50/100/200/500/1000/2000, the largest
PSNR drop seen along each run (the paper's known weak spot), the smallest gain over SIREN at any
logged iteration (every 10), writes JSON and a PNG of curves.

    python benchmarks/paper_fit.py [--size 64] [--steps 2000] [--pretrain-steps 2000] [--reuse]
                                   [--head solved|random|both] [--ridge 1e-2] [--out paper_fit]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from _common import RESULTS, save, table
from safetensors.torch import load_file, save_file

from napari_strainer.core import BatchedSiren, Identity, SirenConfig, fit, load_encoder, solve_head
from napari_strainer.core.head import DEFAULT_RIDGE
from napari_strainer.core.problems import ImageProblem
from napari_strainer.io import read_scan, sample_path
from napari_strainer.io.intensity import Intensity, pick_slices
from napari_strainer.pretrain.train import pretrain

CHECKPOINTS = [0, 10, 50, 100, 200, 500, 1000, 2000]


def slices(size: int):
    brain = read_scan(sample_path("mr_brain"))
    norm = Intensity.of(brain.data).forward(brain.data)
    train = pick_slices(norm, 10)
    rest = [z for z in range(norm.shape[0]) if z not in train]
    held = [rest[int(i)] for i in np.linspace(0, len(rest) - 1, 5).round()]
    t = torch.from_numpy(norm)[:, None]
    t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True)[:, 0]
    return t, train, held


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--pretrain-steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse", action="store_true",
                   help="reuse encoders (and the SIREN-fit-1 donor) a previous run left in "
                        "results/paper_fit_encoders")
    p.add_argument("--out", default="paper_fit",
                   help="name of the JSON and PNG written to results/ (default paper_fit)")
    p.add_argument("--head", choices=("solved", "random", "both"), default="both",
                   help="random: the four rows above; solved: the head comparison only "
                        "(STRAINER-10 with random and solved head, SIREN); both (default): "
                        "all five")
    p.add_argument("--ridge", type=float, default=DEFAULT_RIDGE,
                   help="relative ridge of the solved head (default %(default)s)")
    a = p.parse_args()
    cfg = SirenConfig()
    imgs, train, held = slices(a.size)
    print(f"training slices {train}, held-out slices {held}, {a.size}x{a.size}", flush=True)
    tmp = RESULTS / "paper_fit_encoders"
    one = train[len(train) // 2]
    inits = {}
    encoders = (("STRAINER-10", train),) + ((("STRAINER-1", [one]),) if a.head != "solved"
                                           else ())
    for name, which in encoders:
        path = tmp / f"{name}.safetensors"
        if a.reuse and path.exists():  # same data, steps and seed: reuse a finished run
            inits[name] = load_encoder(path).weights
        else:
            inits[name] = pretrain(imgs[which], path, config=cfg, steps=a.pretrain_steps,
                                   device="cpu", seed=a.seed).weights
        print(f"encoder {name} ready", flush=True)
    if a.head != "random":
        inits["STRAINER-10 solved head"] = ("solved", inits["STRAINER-10"])
    if a.head != "solved":
        inits["SIREN-fit-1"] = "all"
    inits["SIREN"] = None
    if "SIREN-fit-1" in inits:
        donor = BatchedSiren(cfg, batch=1, seed=a.seed)
        donor_path = tmp / "SIREN-fit-1.safetensors"
        if a.reuse and donor_path.exists():
            donor.load_state_dict(load_file(str(donor_path)))
        else:
            fit(donor, ImageProblem(imgs[[one]].reshape(1, -1, 1), Identity((a.size, a.size))),
                steps=a.pretrain_steps, keep_best=True)
            tmp.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().contiguous() for k, v in donor.state_dict().items()},
                      str(donor_path))
        print("fitted SIREN-fit-1 donor", flush=True)

    target = imgs[held].reshape(len(held), -1, 1)
    curves, rows = {}, []
    for name, init in inits.items():
        net = BatchedSiren(cfg, batch=len(held), seed=a.seed + 1)
        if init == "all":
            with torch.no_grad():
                for p_net, p_donor in zip(net.parameters(), donor.parameters()):
                    p_net.copy_(p_donor.expand_as(p_net))
        elif isinstance(init, tuple):  # encoder, then the head solved on its features
            net.load_encoder(init[1])
            solve_head(net, target, Identity((a.size, a.size)), ridge=a.ridge)
        elif init is not None:
            net.load_encoder(init)
        res = fit(net, ImageProblem(target, Identity((a.size, a.size)), reference=target),
                  steps=a.steps, log_every=10, seed=a.seed)
        it, ps = res.history["iterations"], res.history["psnr"]
        curves[name] = {"iterations": it, "psnr": ps}
        run_max = np.maximum.accumulate(ps)
        row = {"method": name, **{f"it{c}": ps[it.index(c)] for c in CHECKPOINTS if c in it},
               "max_drop_db": float((run_max - np.array(ps)).max())}
        rows.append(row)
        print(name, {k: round(v, 2) for k, v in row.items() if k != "method"}, flush=True)
    siren = next(r for r in rows if r["method"] == "SIREN")
    for r in rows:
        r["gain_vs_siren_it100"] = r.get("it100", np.nan) - siren.get("it100", np.nan)
        r["min_gain_vs_siren"] = min(r[k] - siren[k] for k in r if k.startswith("it")
                                     and k in siren and k[2:].isdigit() and k != "it0")
        # every logged iteration (log_every 10, step 0 included)
        mine, base = curves[r["method"]]["psnr"], curves["SIREN"]["psnr"]
        r["min_gain_logged"] = min(m - s for m, s in zip(mine, base))
    cols = ["method"] + [f"it{c}" for c in CHECKPOINTS if c <= a.steps] + [
        "max_drop_db", "gain_vs_siren_it100", "min_gain_vs_siren", "min_gain_logged"]
    print("\nPSNR (dB), mean over 5 held-out slices\n" + table(rows, cols))
    path = save(a.out, {"args": vars(a), "train_slices": train, "held_out": held,
                        "rows": rows, "curves": curves})
    _plot(curves, RESULTS / f"{a.out}.png")
    print(f"\nwrote {path} and {RESULTS / f'{a.out}.png'}")


def _plot(curves, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, c in curves.items():
        ax.plot(c["iterations"], c["psnr"], label=name)
    ax.set(xscale="log", xlabel="iteration", ylabel="PSNR (dB)",
           title="Fitting held-out brain MRI slices")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
