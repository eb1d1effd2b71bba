"""The STRAINER paper's baselines, ablations and analyses on our data (report:
``benchmarks/paper/README.md``, figures and JSON in ``benchmarks/paper/``).

Data (64 x 64, normalised as ``restore`` does):

* in-domain: the 10 training slices ``io.intensity.pick_slices`` picks from the sample brain EPI
  (``paper_fit.slices``) train every initialisation; 5 other slices of that scan are the test
  images;
* out of domain: 5 slices of the T1 anatomical sample (another contrast and resolution) and
  the 4 sample CT slices (another modality), fitted from the same initialisations.

Initialisations, trained on the same 10 training slices (STRAINER-1 and SIREN-fit-1 on the
middle one); Reptile and SIREN-fit-1 get the wall time STRAINER-10's pretraining took:

* SIREN (random init); SIREN-fit-1: every weight of a SIREN fitted to one training slice;
* Reptile: a meta-learned initialisation of the whole network (Nichol et al. 2018, as in
  Tancik et al. 2021 "Learned Initializations for Optimizing Coordinate-Based Neural
  Representations"): inner loop ``--inner`` Adam steps on one training slice, outer update
  ``theta += eps * (phi - theta)`` with eps annealed linearly from 1 to 0;
* STRAINER-1 / STRAINER-10: the shared encoder of ``pretrain.train.pretrain`` (the product's recipe:
  ``--pretrain`` steps, cosine decay from 3e-4);
* each of those with the head solved in closed form on its features (``solve_head``), the
  product's default for fitting.

Test-time fitting: every weight trained, Adam 1e-4 (the paper's protocol). Reported: PSNR
(mean over the test images) at steps 0/10/50/100/200/500/1000 (up to ``--steps``), steps to
reach 30 and 40 dB (mean over images; ``>N`` when some image never got there), the largest drop
along a run, the smallest gain over SIREN at any logged step.

In-domain every method runs; out of domain SIREN, STRAINER-10 and the solved-head variants of
the pretrained inits.

Ablations (3 in-domain test images, ``--ablation-steps`` test steps, both heads): shared layers
1/3/5, width 128/256, training images 1/3/10, pretraining length (and the paper's 2000 steps
at a constant 1e-4). Analyses: principal components of the encoder
features, histograms of weights and of test-time gradients per layer, the partition of the
image plane by the features (k-means of the per-pixel feature vectors).

A part ``pretrain2000`` checks the solved head + warm-up with an encoder pretrained by the
paper's recipe (``--paper-steps`` at a constant 1e-4). A last part (``size128``) pretrains
the encoder on the same 10 slices at 128 x 128 and fits 3 held-out slices for 100 steps
(SIREN, random head, solved head).

    python benchmarks/paper.py [--part main|ablations|analyses|pretrain2000|size128|all]
        [--pretrain 500] [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import machine, table
from head import ct_slices
from paper_fit import slices

from napari_strainer.core import BatchedSiren, Identity, SirenConfig, fit, solve_head
from napari_strainer.core.coords import grid
from napari_strainer.core.fit import make_adam, warmup_lr
from napari_strainer.core.head import WARMUP_STEPS, _features
from napari_strainer.core.problems import ImageProblem
from napari_strainer.io import read_scan, sample_path
from napari_strainer.io.intensity import Intensity, busy_slices
from napari_strainer.pretrain.train import PRETRAIN_LR, PRETRAIN_SCHEDULE, PRETRAIN_STEPS, pretrain

OUT = Path(__file__).parent / "paper"
SIZE = 64
LOGGED = [0, 10, 50, 100, 200, 500, 1000]


# ----------------------------------------------------------------------------- data
def t1_slices(size: int, n: int = 5) -> torch.Tensor:
    scan = read_scan(sample_path("mr_anatomical"))
    norm = Intensity.for_scan(scan).forward(np.nan_to_num(scan.data).astype(np.float32))
    busy = busy_slices(norm)
    picked = [busy[int(i)] for i in np.linspace(len(busy) * 0.2, len(busy) * 0.8, n).round()]
    t = torch.from_numpy(np.ascontiguousarray(norm[picked]))[:, None]
    return F.interpolate(t, size=(size, size), mode="bilinear", antialias=True)[:, 0]


def test_sets(size: int) -> tuple[torch.Tensor, list[int], dict[str, torch.Tensor]]:
    imgs, train, held = slices(size)
    return imgs[train], train, {"brain EPI (in-domain)": imgs[held],
                                "T1 anatomical": t1_slices(size), "CT": ct_slices(size)}


# ----------------------------------------------------------------------------- inits
class Init:
    """A starting point for test-time fitting: encoder layers or a whole network."""

    def __init__(self, name: str, cfg: SirenConfig, *, encoder=None, full=None,
                 head: str = "random", seconds: float = 0.0, info: dict | None = None):
        self.name, self.cfg, self.encoder, self.full = name, cfg, encoder, full
        self.head, self.seconds, self.info = head, seconds, info or {}

    def solved(self, warmup: bool = False) -> Init:
        """The same start with the head solved on the target's features; ``warmup``: then
        the learning-rate warm-up that fitting uses (``core.head.WARMUP_STEPS``)."""
        return Init(self.name + ", solved head" + (" + warm-up" if warmup else ""), self.cfg,
                    encoder=self.encoder, full=self.full,
                    head="solved-warmup" if warmup else "solved", seconds=self.seconds,
                    info=self.info)

    def build(self, n: int, seed: int = 1) -> BatchedSiren:
        net = BatchedSiren(self.cfg, batch=n, seed=seed)
        with torch.no_grad():
            if self.full is not None:
                for p, q in zip(net.parameters(), self.full):
                    p.copy_(q.expand_as(p))
            elif self.encoder is not None:
                net.load_encoder(self.encoder)
        return net


_ENCODERS: dict = {}


def strainer(images: torch.Tensor, cfg: SirenConfig, steps: int, tmp: Path, name: str,
             lr: float = PRETRAIN_LR, schedule: str = PRETRAIN_SCHEDULE, seed: int = 0) -> Init:
    """The encoder of ``pretrain.train.pretrain`` (cached per run by ``name``)."""
    if name not in _ENCODERS:
        t = time.perf_counter()
        enc = pretrain(images, tmp / f"{name}.safetensors", config=cfg, steps=steps, lr=lr,
                       schedule=schedule, device="cpu", seed=seed)
        _ENCODERS[name] = Init(name, cfg, encoder=enc.weights, seconds=time.perf_counter() - t,
                               info={"steps": steps, "lr": lr, "schedule": schedule,
                                     "final_loss": enc.info.get("final_loss")})
    return _ENCODERS[name]


def siren_fit_1(image: torch.Tensor, cfg: SirenConfig, seconds: float, seed: int = 0) -> Init:
    """A whole SIREN fitted to one image for ``seconds``."""
    net = BatchedSiren(cfg, batch=1, seed=seed)
    target, op = image.reshape(1, -1, 1), Identity(tuple(image.shape))
    t, steps = time.perf_counter(), 0
    opt = make_adam(list(net.parameters()), 1e-4)
    coords = grid(tuple(image.shape))
    while time.perf_counter() - t < seconds:
        loss = (op(net(coords)) - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
    net.buffers.clear()
    return Init("SIREN-fit-1", cfg, full=[p.detach().clone() for p in net.parameters()],
                seconds=time.perf_counter() - t, info={"steps": steps})


def reptile(images: torch.Tensor, cfg: SirenConfig, seconds: float, inner: int = 10,
            lr: float = 1e-4, seed: int = 0) -> Init:
    """Reptile meta-learning of a whole SIREN on ``images`` for ``seconds`` of wall time.

    The outer loop is sized by a timed first iteration so that eps anneals 1 -> 0 within the
    budget."""
    g = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    theta = BatchedSiren(cfg, batch=1, seed=seed)
    coords = grid(tuple(images.shape[1:]))
    targets = images.reshape(n, 1, -1, 1)
    t0 = time.perf_counter()

    def adapt(k: int) -> list[torch.Tensor]:
        phi = BatchedSiren(cfg, batch=1, seed=seed)
        phi.load_state_dict(theta.state_dict())
        opt = make_adam(list(phi.parameters()), lr)
        for _ in range(inner):
            loss = (phi(coords) - targets[k]).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        phi.buffers.clear()
        return [p.detach() for p in phi.parameters()]

    outer = 0
    total = None
    while True:
        k = int(torch.randint(n, (1,), generator=g))
        phi = adapt(k)
        if total is None:  # size the schedule from the first outer step
            total = max(1, int(seconds / (time.perf_counter() - t0)))
        eps = 1.0 - outer / total
        with torch.no_grad():
            for p, q in zip(theta.parameters(), phi):
                p.add_(q - p, alpha=eps)
        outer += 1
        if outer >= total or time.perf_counter() - t0 >= seconds:
            break
    return Init("Reptile", cfg, full=[p.detach().clone() for p in theta.parameters()],
                seconds=time.perf_counter() - t0, info={"outer_steps": outer, "inner": inner})


# ----------------------------------------------------------------------------- evaluation
def run(init: Init | None, cfg: SirenConfig, target: torch.Tensor, steps: int,
        seed: int = 1) -> dict:
    """Fit ``target`` ``[n, H, W]`` from ``init`` (None: SIREN); PSNR per image every 10 steps."""
    n, h, w = target.shape
    y = target.reshape(n, -1, 1)
    op = Identity((h, w))
    net = init.build(n, seed) if init is not None else BatchedSiren(cfg, batch=n, seed=seed)
    lr_at = None
    if init is not None and init.head.startswith("solved"):
        solve_head(net, y, op)
        if init.head == "solved-warmup":
            lr_at = warmup_lr(1e-4, WARMUP_STEPS)
    per_image = []

    def log(p) -> None:
        if p.step % 10 == 0 or p.step == steps:
            pred = p.preview().reshape(n, -1)
            mse = (pred - y.reshape(n, -1)).pow(2).mean(1)
            per_image.append((p.step, (10 * torch.log10(1 / mse.clamp_min(1e-20))).tolist()))

    fit(net, ImageProblem(y, op), steps=steps, keep_best=False, log_every=10, callback=log, seed=0,
        lr_at=lr_at)
    its = [s for s, _ in per_image]
    psnr = np.array([v for _, v in per_image])  # [logged, n]
    return {"iterations": its, "psnr": psnr.mean(1).tolist(), "per_image": psnr.tolist()}


def steps_to(curve: dict, level: float) -> str | float:
    """Mean first logged step where each image reaches ``level`` dB (``>N`` if one never)."""
    per = np.array(curve["per_image"])
    its = np.array(curve["iterations"])
    firsts = []
    for j in range(per.shape[1]):
        hit = np.nonzero(per[:, j] >= level)[0]
        if not len(hit):
            return f">{its[-1]}"
        firsts.append(its[hit[0]])
    return float(np.mean(firsts))


def rows_of(curves: dict[str, dict], steps: int) -> list[dict]:
    base = np.array(curves["SIREN"]["psnr"])
    rows = []
    for name, c in curves.items():
        ps = np.array(c["psnr"])
        r = {"method": name, **{f"it{s}": ps[c["iterations"].index(s)]
                                for s in LOGGED if s in c["iterations"]}}
        r["to30"], r["to40"] = steps_to(c, 30), steps_to(c, 40)
        r["max_drop"] = float((np.maximum.accumulate(ps) - ps).max())
        r["min_gain"] = float((ps - base)[1:].min())  # every logged step after step 0
        rows.append(r)
    return rows


def cols(steps: int) -> list[str]:
    return ["method"] + [f"it{s}" for s in LOGGED if s <= steps] + [
        "to30", "to40", "max_drop", "min_gain"]


# ----------------------------------------------------------------------------- parts
def main_part(a, cfg, train, sets, tmp) -> dict:
    mid = train[len(train) // 2: len(train) // 2 + 1]
    s10 = strainer(train, cfg, a.pretrain, tmp, "STRAINER-10")
    budget = s10.seconds  # the others get STRAINER-10's wall time
    inits = [s10, strainer(mid, cfg, a.pretrain, tmp, "STRAINER-1"),
             reptile(train, cfg, budget, a.inner), siren_fit_1(mid[0], cfg, budget)]
    for i in inits:
        print(f"{i.name}: {i.seconds:.0f} s of training {i.info}", flush=True)
    solved = {i.name: i.solved() for i in inits}
    warm = {i.name: i.solved(warmup=True) for i in inits[:2]}  # STRAINER as fitting runs it
    in_domain = [None, inits[3], solved["SIREN-fit-1"], inits[2], solved["Reptile"], inits[1],
                 solved["STRAINER-1"], warm["STRAINER-1"], s10, solved["STRAINER-10"],
                 warm["STRAINER-10"]]
    ood = [None, solved["SIREN-fit-1"], solved["Reptile"], s10, solved["STRAINER-10"],
           warm["STRAINER-10"]]
    out = {"training": {i.name: {"seconds": i.seconds, **i.info} for i in inits}, "sets": {}}
    for set_name, target in sets.items():
        inside = "in-domain" in set_name
        steps = a.steps if inside else a.ood_steps
        curves = {}
        for m in in_domain if inside else ood:
            name = "SIREN" if m is None else m.name
            curves[name] = run(m, cfg, target, steps)
            print(f"{set_name} | {name}: " + " ".join(
                f"{p:.1f}" for it, p in zip(curves[name]["iterations"], curves[name]["psnr"])
                if it in LOGGED or it == steps), flush=True)
        rows = rows_of(curves, steps)
        print(f"\n{set_name}, {target.shape[0]} images, PSNR (dB)\n{table(rows, cols(steps))}\n",
              flush=True)
        out["sets"][set_name] = {"steps": steps, "rows": rows, "curves": curves}
        _plot_curves(curves, set_name, OUT / f"curves_{_slug(set_name)}.png")
    return out


def ablations_part(a, cfg, train, sets, tmp) -> dict:
    target = sets["brain EPI (in-domain)"][:3]
    steps = a.ablation_steps
    siren = run(None, cfg, target, steps)
    out = {"test_images": target.shape[0], "SIREN_it10": siren["psnr"][1],
           "SIREN": siren["psnr"][-1], "rows": []}

    def evaluate(group: str, value, init: Init) -> None:
        r = {"ablation": group, "value": value, "train_s": round(init.seconds, 1)}
        for head in ("random", "solved"):
            c = run(init if head == "random" else init.solved(), init.cfg, target, steps)
            r[f"{head}_it10"], r[f"{head}_it100"] = c["psnr"][1], c["psnr"][-1]
        r["gain_it100_solved"] = r["solved_it100"] - out["SIREN"]
        out["rows"].append(r)
        print(r, flush=True)

    n = a.pretrain
    for k in a.shared:
        c = SirenConfig(shared_layers=k)
        evaluate("shared layers", k, strainer(train, c, n, tmp, f"shared{k}"
                                              if k != 5 else "STRAINER-10"))
    default = next((r for r in out["rows"] if r["value"] == 5), None)
    evaluate("width", 128, strainer(train, SirenConfig(width=128), n, tmp, "w128"))
    if default:  # the default network, for the width and training-image panels
        out["rows"].append({**default, "ablation": "width", "value": 256})
    for m in (1, 3):
        pick = train[np.linspace(0, len(train) - 1, m).round().astype(int)]
        evaluate("training images", m, strainer(pick, cfg, n, tmp, f"img{m}"))
    if default:
        out["rows"].append({**default, "ablation": "training images", "value": len(train)})
    for s in a.pretrain_steps:
        evaluate("pretraining steps", s, strainer(train, cfg, s, tmp, f"steps{s}"
                                                  if s != n else "STRAINER-10"))
    if a.paper_steps:
        evaluate("pretraining steps", f"{a.paper_steps}, paper (1e-4 constant)",
                 strainer(train, cfg, a.paper_steps, tmp, "paper", lr=1e-4,
                          schedule="constant"))
    print(f"\nablations (in-domain, {target.shape[0]} test images, {steps} test steps; SIREN "
          f"{out['SIREN']:.2f} dB at {steps})\n" + table(out["rows"], list(out["rows"][0])),
          flush=True)
    _plot_ablations(out, OUT / "ablations.png")
    return out


def analyses_part(a, cfg, train, sets, tmp) -> dict:
    """Features, weights, gradients and partitions of SIREN, Reptile and STRAINER-10."""
    inits = {"SIREN": Init("SIREN", cfg),
             "STRAINER-10": strainer(train, cfg, a.pretrain, tmp, "STRAINER-10")}
    inits["Reptile"] = reptile(train, cfg, inits["STRAINER-10"].seconds, a.inner)
    coords = grid((SIZE, SIZE))
    test = sets["brain EPI (in-domain)"][:1]
    out = {}
    feats, grads, weights = {}, {}, {}
    for name, init in inits.items():
        net = init.build(1)
        with torch.no_grad():
            f = _features(net, coords)
            f = (f[0] if f.dim() == 3 else f).double()
        feats[name] = f
        weights[name] = [net.weights[i].detach().flatten().numpy() for i in range(cfg.layers)]
        y = test.reshape(1, -1, 1)
        net.kernel = "eager"
        loss = (net(coords) - y).pow(2).mean()
        loss.backward()
        grads[name] = [net.weights[i].grad.flatten().numpy() for i in range(cfg.layers)]
        centred = f - f.mean(0)
        s = torch.linalg.svdvals(centred)
        var = (s ** 2 / (s ** 2).sum()).numpy()
        cum = np.cumsum(var)
        out[name] = {"components_for_90pct": int(np.searchsorted(cum, 0.9) + 1),
                     "components_for_99pct": int(np.searchsorted(cum, 0.99) + 1),
                     "explained_top10": var[:10].tolist(),
                     "grad_norm_per_layer": [float(np.linalg.norm(g)) for g in grads[name]],
                     "weight_std_per_layer": [float(w.std()) for w in weights[name]]}
        print(name, {k: v for k, v in out[name].items() if k != "explained_top10"}, flush=True)
    _plot_pca(feats, OUT / "features_pca.png")
    _plot_hist(weights, "weights", OUT / "weights_hist.png")
    _plot_hist(grads, "gradients at test step 0 (in-domain slice)", OUT / "grads_hist.png")
    out["partition_regions"] = _plot_partition(feats, OUT / "partition.png")
    return out


def size128_part(a, cfg, train, sets, tmp) -> dict:
    """A 128 x 128 encoder (the product's recipe) on 3 held-out slices, 100 test steps."""
    imgs, train_idx, held = slices(128)
    t = time.perf_counter()
    enc = strainer(imgs[train_idx], cfg, a.pretrain, tmp, "STRAINER-10-128")
    out = {"pretrain_seconds": time.perf_counter() - t, "steps": a.pretrain}
    target = imgs[held][:3]
    for name, m in (("SIREN", None), ("STRAINER-10", enc), ("STRAINER-10, solved head",
                                                          enc.solved())):
        c = run(m, cfg, target, 100)
        out[name] = {k: c["psnr"][c["iterations"].index(k)] for k in (0, 10, 50, 100)}
        print(name, out[name], flush=True)
    return out


def pretrain2000_part(a, cfg, train, sets, tmp) -> dict:
    """STRAINER-10 by the paper's pretraining recipe (``--paper-steps`` at a constant 1e-4)
    with the product's solved head + warm-up against SIREN and the paper's random head."""
    init = strainer(train, cfg, a.paper_steps, tmp, "paper", lr=1e-4, schedule="constant")
    out = {"pretrain_s": init.seconds, "sets": {}}
    for name, target in sets.items():
        steps = a.steps if "in-domain" in name else a.ood_steps
        starts = {"SIREN": None, "random head": init,
                  "solved head + warm-up": init.solved(warmup=True)}
        curves = {label: run(i, cfg, target, steps) for label, i in starts.items()}
        base = np.array(curves["SIREN"]["psnr"])
        out["sets"][name] = {
            label: {"psnr": {s: p for s, p in zip(c["iterations"], c["psnr"])
                             if s in LOGGED},
                    "min_gain": float((np.array(c["psnr"]) - base)[1:].min())}
            for label, c in curves.items()}
        print(name, {k: round(v["min_gain"], 2) for k, v in out["sets"][name].items()},
              flush=True)
    return out


# ----------------------------------------------------------------------------- figures
def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")[:24]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_curves(curves: dict, title: str, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, c in curves.items():
        ax.plot(np.maximum(c["iterations"], 1), c["psnr"], label=name,
                ls="--" if "solved" in name else "-")
    ax.set(xscale="log", xlabel="test-time step (step 0 plotted at 1)", ylabel="PSNR (dB)",
           title=f"Fitting {title}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_ablations(out: dict, path: Path) -> None:
    plt = _plt()
    groups = list(dict.fromkeys(r["ablation"] for r in out["rows"]))
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 3.2), sharey=True)
    for ax, g in zip(np.atleast_1d(axes), groups):
        rs = [r for r in out["rows"] if r["ablation"] == g]
        x = [str(r["value"]) for r in rs]
        ax.plot(x, [r["solved_it100"] for r in rs], "o-", label="solved head")
        ax.plot(x, [r["random_it100"] for r in rs], "s--", label="random head")
        ax.axhline(out["SIREN"], color="k", lw=0.8, label="SIREN")
        ax.set(title=g, xlabel=g)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("PSNR at test step 100 (dB)")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_pca(feats: dict, path: Path, k: int = 6) -> None:
    plt = _plt()
    fig, axes = plt.subplots(len(feats), k + 1, figsize=(1.6 * (k + 1), 1.7 * len(feats)))
    for row, (name, f) in zip(axes, feats.items()):
        centred = f - f.mean(0)
        u, s, _ = torch.linalg.svd(centred, full_matrices=False)
        var = (s ** 2 / (s ** 2).sum()).numpy()
        for j in range(k):
            row[j].imshow(u[:, j].reshape(SIZE, SIZE).numpy(), cmap="RdBu")
            row[j].set_title(f"PC{j + 1} {100 * var[j]:.0f}%", fontsize=7)
            row[j].axis("off")
        row[k].plot(np.arange(1, 51), np.cumsum(var)[:50])
        row[k].set_ylim(0, 1.01)
        row[k].set_title("cumulative", fontsize=7)
        row[k].tick_params(labelsize=6)
        row[0].text(-0.35, 0.5, name, transform=row[0].transAxes, rotation=90, va="center",
                    fontsize=8)
    fig.suptitle("Principal components of the last encoder layer's features (64 x 64 grid)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_hist(values: dict, what: str, path: Path) -> None:
    plt = _plt()
    layers = len(next(iter(values.values())))
    fig, axes = plt.subplots(1, layers, figsize=(2.3 * layers, 2.4))
    for i, ax in enumerate(axes):
        for name, v in values.items():
            x = v[i]
            lim = np.percentile(np.abs(np.concatenate([w[i] for w in values.values()])), 99.5)
            ax.hist(x, bins=60, range=(-lim, lim), histtype="step", density=True, label=name)
        ax.set_title(f"layer {i + 1}" + (" (head)" if i == layers - 1 else ""), fontsize=8)
        ax.tick_params(labelsize=6)
        ax.set_yticks([])
    axes[0].legend(fontsize=6)
    fig.suptitle(f"Histograms of {what} per layer", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _kmeans(x: torch.Tensor, k: int, iters: int = 30, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = x[torch.randperm(x.shape[0], generator=g)[:k]].clone()
    for _ in range(iters):
        labels = torch.cdist(x, centres).argmin(1)
        for j in range(k):
            if (labels == j).any():
                centres[j] = x[labels == j].mean(0)
    return labels


def _plot_partition(feats: dict, path: Path, k: int = 8) -> dict:
    """k-means of the per-pixel feature vectors (unit-normalised): how the features split
    the plane, and how many connected pieces the k clusters form."""
    from scipy import ndimage

    plt = _plt()
    fig, axes = plt.subplots(1, len(feats), figsize=(2.6 * len(feats), 2.8))
    pieces = {}
    for ax, (name, f) in zip(axes, feats.items()):
        x = (f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)).float()
        labels = _kmeans(x, k).reshape(SIZE, SIZE).numpy()
        pieces[name] = int(sum(ndimage.label(labels == j)[1] for j in range(k)))
        ax.imshow(labels, cmap="tab10", interpolation="nearest")
        ax.set_title(f"{name}\n{pieces[name]} connected regions", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"Partition of the plane by the encoder features (k-means, k={k})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return pieces


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--part", choices=("main", "ablations", "analyses", "pretrain2000", "size128",
                                      "all"),
                   default="all")
    p.add_argument("--pretrain", type=int, default=PRETRAIN_STEPS,
                   help="pretraining steps of the encoders (default: the product's, "
                        "%(default)s); Reptile and SIREN-fit-1 get STRAINER-10's wall time")
    p.add_argument("--steps", type=int, default=200, help="test steps in-domain")
    p.add_argument("--ood-steps", type=int, default=200, help="test steps out of domain")
    p.add_argument("--inner", type=int, default=10, help="Reptile inner steps")
    p.add_argument("--pretrain-steps", type=lambda s: [int(x) for x in s.split(",")],
                   default=[100, 300, 500, 1000], help="pretraining lengths of the ablation (the "
                   "product's recipe; the paper's 2000 steps at 1e-4 are added)")
    p.add_argument("--ablation-steps", type=int, default=100)
    p.add_argument("--shared", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1, 2, 3, 4, 5],
                   help="shared-layer counts of the ablation (below 5 the per-image sine "
                        "layers make pretraining 6-20x slower)")
    p.add_argument("--paper-steps", type=int, default=2000,
                   help="the paper's recipe (constant 1e-4) in the length ablation; 0: skip")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    OUT.mkdir(exist_ok=True)
    tmp = OUT / "encoders"
    tmp.mkdir(exist_ok=True)
    cfg = SirenConfig()
    train, train_idx, sets = test_sets(SIZE)
    print(f"training slices {train_idx}; test sets "
          + ", ".join(f"{k}: {v.shape[0]}" for k, v in sets.items()), flush=True)
    parts = ("main", "ablations", "analyses", "pretrain2000", "size128") if a.part == "all" \
        else (a.part,)
    for part in parts:
        fn = {"main": main_part, "ablations": ablations_part, "analyses": analyses_part,
              "pretrain2000": pretrain2000_part, "size128": size128_part}[part]
        result = {"machine": machine(), "args": vars(a), **fn(a, cfg, train, sets, tmp)}
        (OUT / f"{part}.json").write_text(json.dumps(result, indent=1, default=float))
        print(f"wrote {OUT / f'{part}.json'}", flush=True)


if __name__ == "__main__":
    main()
