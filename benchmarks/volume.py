"""Volumes: through-plane super-resolution, fusion of orthogonal thick stacks, volume denoising.

Ground truth: brain MRI volumes the project has not trained on, normalised to their robust
range [0, 1]: crops of the MNI ICBM152 2009a T1 template shipped inside nilearn (at 1 mm and
area-downsampled to 2 mm), volume 1 of nibabel's example4d EPI (the shipped sample is volume
0) and nibabel's anatomical T1. Observations are simulated from them:

* through-plane: thick slices along one axis, a box average of F slices (F = 2, 4, 5) or a
  Gaussian profile with FWHM = F slices sampled every F slices (F = 3; the simulation's
  Gaussian reaches +-4 sigma, the operator's +-2.9 sigma);
* fusion: three stacks, each a box average of 4 slices along its own axis;
* denoising: Gaussian noise of sigma 0.05 and 0.1.

Classical baselines: linear and cubic B-spline interpolation (scipy.ndimage), least-squares
super-resolution reconstruction (L-BFGS on the box/Gaussian operators with a small gradient
penalty, or with total variation; weight tuned on a different volume), 3D total variation
(skimage, weight tuned on a different volume), BM4D with the true sigma (``pip install bm4d``,
licence restricts commercial use: benchmark-only). INR methods: a 3D SIREN in world
coordinates (napari_strainer.core.world) with the first-layer omega scaled to the grid,
with and without a total-variation term (along the slice normals, or in 3D for denoising);
for denoising also a shared-encoder slice denoiser (:func:`shared_slices`).

    python benchmarks/volume.py [--quick] [--tasks sr,fuse,dn] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import time

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from _common import RESULTS, save, table

from napari_strainer.core.coords import grid as grid2d
from napari_strainer.core.fit import fit
from napari_strainer.core.operators import GridBase, Stack, TVPrior
from napari_strainer.core.problems import StackProblem
from napari_strainer.core.siren import BatchedSiren, SirenConfig
from napari_strainer.core.world import Grid, WorldFrame, grid_omega, render_grid
from napari_strainer.io.intensity import Intensity

NIB_DATA = os.path.join(os.path.dirname(nib.__file__), "tests", "data")


# ----------------------------------------------------------------------------- data
def _norm(v: np.ndarray) -> np.ndarray:
    return np.clip(Intensity.of(v).forward(v), -0.2, 1.2).astype(np.float32)


def _mni(mm: int, kind: str = "t1") -> np.ndarray:
    """The MNI ICBM152 2009a template shipped with nilearn: ``t1`` or the ``gm`` tissue map."""
    import nilearn

    path = os.path.join(os.path.dirname(nilearn.__file__), "datasets", "data",
                        f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz")
    v = np.asarray(nib.load(path).dataobj, np.float32).transpose(2, 1, 0)[:, ::-1]  # z, y, x
    if mm > 1:
        t = torch.from_numpy(v[: v.shape[0] // mm * mm, : v.shape[1] // mm * mm,
                               : v.shape[2] // mm * mm].copy())
        v = F.avg_pool3d(t[None, None], mm)[0, 0].numpy()
    return v


def volumes() -> dict[str, np.ndarray]:
    """Named truth volumes ``(slice, row, column)``, isotropic voxels, normalised."""
    m2, m1 = _mni(2), _mni(1)
    c = [s // 2 for s in m2.shape]
    epi = np.asarray(nib.load(os.path.join(NIB_DATA, "example4d.nii.gz")).dataobj)[..., 1]
    epi = epi.transpose(2, 1, 0).astype(np.float32)  # (24, 96, 128), 2.2 x 2 x 2 mm
    anat = np.asarray(nib.load(os.path.join(NIB_DATA, "anatomical.nii")).dataobj, np.float32)
    anat = anat.transpose(2, 1, 0)  # (25, 41, 33), 2 mm
    gm = _mni(2, "gm")
    return {
        "MNI 2mm": _norm(m2[c[0] - 24:c[0] + 24, c[1] - 28:c[1] + 28, c[2] - 24:c[2] + 24]),
        # grey-matter probability map: another contrast, and (unlike T1 and EPI) no noise of
        # its own
        "GM 2mm": _norm(gm[c[0] - 24:c[0] + 24, c[1] - 28:c[1] + 28, c[2] - 24:c[2] + 24]),
        "MNI 2mm sup": _norm(m2[c[0]:c[0] + 40, c[1] - 28:c[1] + 28, c[2] - 24:c[2] + 24]),
        "MNI 1mm": _norm(m1[80:128, 100:156, 70:118]),
        "EPI": _norm(epi[:, 16:80, 32:96].transpose(1, 0, 2)),  # 64 x 24 x 64, thick along y
        "T1": _norm(anat[:24, :40, :32].transpose(1, 0, 2)),
    }


TUNE = {"MNI 2mm": "MNI 1mm", "MNI 1mm": "MNI 2mm", "EPI": "MNI 2mm", "T1": "MNI 2mm",
        "GM 2mm": "MNI 2mm",
        "MNI 2mm sup": "MNI 2mm"}
"""Where a baseline's weight is tuned: another volume than the one it is scored on."""


def gauss_weights(f: int, n_fine: int, k: int, reach: float = 4.0) -> np.ndarray:
    """Weights over fine slices of thick slice ``k`` (centre ``k f + (f-1)/2``), FWHM f."""
    sigma = f / (2 * np.sqrt(2 * np.log(2)))
    j = np.arange(n_fine)
    d = j - (k * f + (f - 1) / 2)
    w = np.where(np.abs(d) <= reach * sigma, np.exp(-0.5 * (d / sigma) ** 2), 0)
    return w / w.sum()


def thick_matrix(profile: str, f: int, n_fine: int) -> np.ndarray:
    """``[n_fine // f, n_fine]`` averaging matrix of a thick-slice acquisition."""
    n = n_fine // f
    if profile == "box":
        m = np.zeros((n, n_fine))
        for k in range(n):
            m[k, k * f:(k + 1) * f] = 1 / f
        return m
    return np.stack([gauss_weights(f, n_fine, k) for k in range(n)])


def acquire(vol: np.ndarray, axis: int, m: np.ndarray) -> np.ndarray:
    """Apply the thick-slice matrix ``m`` along ``axis``."""
    return np.moveaxis(np.tensordot(m, np.moveaxis(vol, axis, 0), axes=1), 0, axis).astype(
        np.float32)


def coarse_affine(fine: np.ndarray, axis: int, f: int) -> np.ndarray:
    """Affine of thick slices of ``f`` fine voxels along ``axis`` (centres aligned)."""
    a = fine.copy()
    a[:3, 3] += fine[:3, axis] * (f - 1) / 2
    a[:3, axis] *= f
    return a


def psnr(x: np.ndarray, ref: np.ndarray) -> float:
    mse = float(np.mean((np.asarray(x, np.float64) - ref) ** 2))
    return 10 * np.log10(float(np.ptp(ref)) ** 2 / max(mse, 1e-20))


def ssim(x: np.ndarray, ref: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(x.astype(np.float64), ref.astype(np.float64),
                                       data_range=float(np.ptp(ref))))


# ----------------------------------------------------------------------------- classical
def interpolate(obs: np.ndarray, f: int, order: int) -> np.ndarray:
    """B-spline interpolation along axis 0 back to ``f`` times the slices, centres aligned."""
    from scipy.ndimage import map_coordinates

    n = obs.shape[0] * f
    z = (np.arange(n) - (f - 1) / 2) / f
    g = np.meshgrid(z, np.arange(obs.shape[1]), np.arange(obs.shape[2]), indexing="ij")
    return map_coordinates(obs, g, order=order, mode="nearest").astype(np.float32)


def least_squares(obs: list[tuple[np.ndarray, int, np.ndarray]], shape, init: np.ndarray,
                  weight: float, reg: str = "grad", iters: int = 150,
                  dtype: torch.dtype = torch.float64, history: int = 20) -> np.ndarray:
    """``argmin sum_i ||A_i x - y_i||^2 / n_i + weight * R(x)`` by L-BFGS, where ``A_i`` applies
    the thick-slice matrix of stack ``i`` along its axis and ``R`` is the mean squared
    gradient (``grad``) or the mean Charbonnier total variation (``tv``). Whole brains fit
    in memory with ``dtype=torch.float32`` and a shorter ``history``."""
    x = torch.tensor(init, dtype=dtype, requires_grad=True)
    ops = [(torch.from_numpy(m).to(dtype), axis, torch.from_numpy(y).to(dtype))
           for y, axis, m in obs]
    opt = torch.optim.LBFGS([x], max_iter=iters, history_size=history,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-10,
                            tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = 0
        for m, axis, y in ops:
            pred = torch.movedim(torch.tensordot(m, torch.movedim(x, axis, 0), dims=1), 0, axis)
            loss = loss + (pred - y).pow(2).mean()
        d = [torch.diff(x, dim=a) for a in range(3)]
        if reg == "grad":
            loss = loss + weight * sum(v.pow(2).mean() for v in d)
        else:
            loss = loss + weight * sum(torch.sqrt(v * v + 1e-6).mean() for v in d)
        loss.backward()
        return loss

    opt.step(closure)
    return x.detach().float().numpy()


def tv3d(noisy: np.ndarray, weight: float) -> np.ndarray:
    from skimage.restoration import denoise_tv_chambolle

    return denoise_tv_chambolle(noisy, weight=weight).astype(np.float32)


def bm4d_denoise(noisy: np.ndarray, sigma: float) -> np.ndarray | None:
    try:
        import bm4d
    except ImportError:
        return None
    return np.asarray(bm4d.bm4d(noisy, sigma), np.float32)


# ----------------------------------------------------------------------------- INR
def inr(stacks: list[tuple[np.ndarray, np.ndarray, float, str]], grid: Grid, truth, *,
        steps: int, omega_voxel: float, width: int, layers: int, batch: int,
        tv: float = 0.0, tv_dirs=None, lr: float = 1e-4, seed: int = 0,
        monitor_every: int = 100, inplane: bool = True,
        base: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Fit a 3D SIREN in world coordinates to ``stacks`` (values, affine, thickness, profile);
    returns the rendering on ``grid`` and the history (PSNR against ``truth``)."""
    frame = WorldFrame(grid.corners_mm())
    h = min(grid.spacing)
    ops = [Stack(torch.from_numpy(v), a, frame, h, thickness=t, profile=p, inplane=inplane)
           for v, a, t, p in stacks]
    cfg = SirenConfig(in_features=3, width=width, layers=layers, shared_layers=layers - 1,
                      omega_first=grid_omega(omega_voxel, h, frame))
    net = BatchedSiren(cfg, batch=1, seed=seed)
    prior = None
    if tv > 0:
        prior = TVPrior(grid, np.asarray(tv_dirs) * h, tv, points=batch // 2)

    gb = None if base is None else GridBase(torch.from_numpy(base), grid, frame)

    def monitor(params):
        return psnr(render_grid(net, grid, frame, params=params, base=gb).numpy(), truth)

    res = fit(net,
              StackProblem(ops, frame, grid, batch=batch, prior=prior, base=gb, monitor=monitor, monitor_every=monitor_every),
              steps=steps, lr=lr, log_every=monitor_every, seed=seed)
    return render_grid(net, grid, frame, base=gb).numpy(), res.history


def shared_slices(noisy: np.ndarray, truth: np.ndarray, *, tv: float, steps: int,
                  sigma: float, lr: float = 1e-4, factor: float = 0.85, seed: int = 0,
                  monitor_every: int = 25) -> tuple[np.ndarray, np.ndarray, dict]:
    """A shared-encoder slice denoiser: one 2D SIREN per slice, all sine layers shared across
    the slices (a linear head each, so the encoder runs once per step), fitted to the noisy
    slices plus ``tv`` x the mean 3D total variation (Charbonnier) of the rendered volume.

    Returns the rendering at the best PSNR against ``truth`` (an oracle stop), the rendering
    when the data RMSE first reaches ``factor * sigma`` (the product's discrepancy stop; the
    last one if it never does), and the history."""
    z, h, w = noisy.shape
    cfg = SirenConfig()
    net = BatchedSiren(cfg, batch=z, shared=cfg.layers - 1, seed=seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    coords = grid2d((h, w))
    y = torch.from_numpy(noisy).reshape(z, -1, 1)
    hist = {"iterations": [], "psnr": [], "mse": []}
    best, stopped = (-np.inf, None), None
    for step in range(steps + 1):
        pred = net(coords)
        vol = pred.reshape(z, h, w)
        mse = (pred - y).pow(2).mean()
        if stopped is None and mse.item() <= (factor * sigma) ** 2:
            stopped = vol.detach().numpy().copy()
        if step % monitor_every == 0 or step == steps:
            p = psnr(vol.detach().numpy(), truth)
            hist["iterations"].append(step)
            hist["psnr"].append(p)
            hist["mse"].append(mse.item())
            if p > best[0]:
                best = (p, vol.detach().numpy().copy())
        if step == steps:
            break
        d = [vol.diff(dim=k) for k in range(3)]
        tv_term = ((d[0][:, :-1, :-1] ** 2 + d[1][:-1, :, :-1] ** 2 + d[2][:-1, :-1, :] ** 2
                    + 1e-6).sqrt() - 1e-3).mean()
        opt.zero_grad()
        (mse + tv * tv_term).backward()
        opt.step()
    hist["stop_step"] = None if stopped is None else next(
        i for i, m in zip(hist["iterations"], hist["mse"]) if m <= (factor * sigma) ** 2)
    last = vol.detach().numpy()  # never reached the discrepancy: all steps ran
    return best[1], stopped if stopped is not None else last, hist


# ----------------------------------------------------------------------------- tasks
def run_sr(vols, cases, a, rows, panels, curves):
    for vname, prof, f in cases:
        truth = vols[vname]
        n = truth.shape[0] // f * f
        truth = truth[:n]
        m = thick_matrix(prof, f, n)
        obs = acquire(truth, 0, m)
        fine = np.diag([1.0, 1.0, 1.0, 1.0])
        grid = Grid(truth.shape, fine)
        case = f"{vname} {prof} x{f}"
        res = {}
        for name, order in (("linear", 1), ("cubic", 3)):
            t = time.perf_counter()
            res[name] = (interpolate(obs, f, order), time.perf_counter() - t)
        if a.sr_ls:  # LS with the gradient penalty tuned on another volume
            tune = vols[TUNE[vname]][:vols[TUNE[vname]].shape[0] // f * f]
            mt = thick_matrix(prof, f, tune.shape[0])
            ot = acquire(tune, 0, mt)
            best_w = max(a.ls_weights, key=lambda w: psnr(least_squares(
                [(ot, 0, mt)], tune.shape, interpolate(ot, f, 3), w, iters=60), tune))
            t = time.perf_counter()
            res[f"least squares (grad {best_w:g})"] = (least_squares(
                [(obs, 0, m)], truth.shape, res["cubic"][0], best_w), time.perf_counter() - t)
        stack = [(obs, coarse_affine(fine, 0, f), float(f), prof)]
        for label, kw in a.sr_methods:
            kw = dict(kw)
            if kw.pop("cubic_base", False):
                kw["base"] = res["cubic"][0]
            t = time.perf_counter()
            out, hist = inr(stack, grid, truth, tv_dirs=[[1.0, 0, 0]], **{**a.inr, **kw})
            res[label] = (out, time.perf_counter() - t)
            curves[f"{case} {label}"] = hist
        if a.sr_product:  # napari_strainer.restore.volume.superres_volume with its defaults
            from napari_strainer.io.scan import Scan
            from napari_strainer.restore.volume import superres_volume

            t = time.perf_counter()
            r = superres_volume(Scan(obs, coarse_affine(fine, 0, f)), slice_scale=f,
                                profile=prof, device="cpu", seed=a.seed,
                                reference=Scan(truth, fine))
            label = "product: SIREN 3D on cubic + data consistency"
            res[label] = (r.scan.data, time.perf_counter() - t)
            curves[f"{case} {label}"] = r.history
        _score(case, "superres", truth, res, rows, panels, "cubic")


def run_fuse(vols, names, a, rows, panels, curves):
    f = 4
    for vname in names:
        truth = vols[vname]
        truth = truth[:truth.shape[0] // f * f, :truth.shape[1] // f * f,
                      :truth.shape[2] // f * f]
        grid = Grid(truth.shape, np.eye(4))
        obs, stacks, cubics = [], [], []
        for axis in range(3):
            m = thick_matrix("box", f, truth.shape[axis])
            y = acquire(truth, axis, m)
            obs.append((y, axis, m))
            # the stack with its thick axis first (the Scan convention), affine permuted
            perm = [axis] + [i for i in range(3) if i != axis]
            aff = coarse_affine(np.eye(4), axis, f)
            aff[:, :3] = aff[:, perm]
            stacks.append((np.ascontiguousarray(y.transpose(perm)), aff, float(f), "box"))
            cubics.append(np.moveaxis(interpolate(np.moveaxis(y, axis, 0), f, 3), 0, axis))
        case = f"{vname} 3 stacks box x{f}"
        res = {"cubic (best stack)": (max(cubics, key=lambda c: psnr(c, truth)), 0.0),
               "cubic (average)": (np.mean(cubics, 0), 0.0)}
        tune = vols[TUNE[vname]]
        tune = tune[:tune.shape[0] // f * f, :tune.shape[1] // f * f, :tune.shape[2] // f * f]
        tobs = [(acquire(tune, ax, thick_matrix("box", f, tune.shape[ax])), ax,
                 thick_matrix("box", f, tune.shape[ax])) for ax in range(3)]
        tinit = np.mean([np.moveaxis(interpolate(np.moveaxis(y, ax, 0), f, 3), 0, ax)
                         for y, ax, _ in tobs], 0)
        for reg, weights in (("grad", a.ls_weights), ("tv", a.ls_tv_weights))[:a.fuse_ls]:
            best_w = max(weights, key=lambda w: psnr(least_squares(
                tobs, tune.shape, tinit, w, reg, iters=60), tune))
            t = time.perf_counter()
            res[f"least squares ({reg} {best_w:g})"] = (least_squares(
                obs, truth.shape, res["cubic (average)"][0], best_w, reg),
                time.perf_counter() - t)
        for n in a.fuse_product:  # napari_strainer.restore.volume.fuse on the stacks as scans
            from napari_strainer.io.scan import Scan
            from napari_strainer.restore.volume import fuse

            t = time.perf_counter()
            r = fuse([Scan(v, aff) for v, aff, _, _ in stacks], spacing=1.0, steps=n,
                     device="cpu", seed=a.seed, reference=Scan(truth, np.eye(4)))
            label = (f"product fuse: 3D SIREN {n} steps + data consistency" if n else
                     "product fuse --steps 0: least squares (CG)")
            res[label] = (r.scan.data, time.perf_counter() - t)
            curves[f"{case} {label}"] = r.history
        for label, kw in a.fuse_methods:
            t = time.perf_counter()
            out, hist = inr(stacks, grid, truth, tv_dirs=np.eye(3), **{**a.inr, **kw})
            res[label] = (out, time.perf_counter() - t)
            curves[f"{case} {label}"] = hist
        _score(case, "fuse", truth, res, rows, panels, "least squares")


def run_dn(vols, names, sigmas, a, rows, panels, curves):
    rng = np.random.default_rng(a.seed)
    for vname in names:
        truth = vols[vname]
        grid = Grid(truth.shape, np.eye(4))
        for sigma in sigmas:
            noisy = (truth + rng.normal(0, sigma, truth.shape)).astype(np.float32)
            tune = vols[TUNE[vname]]
            tnoisy = (tune + rng.normal(0, sigma, tune.shape)).astype(np.float32)
            best_w = max(a.tv_weights, key=lambda w: psnr(tv3d(tnoisy, w), tune))
            case = f"{vname} sigma {sigma:g}"
            t = time.perf_counter()
            res = {f"3D TV ({best_w:g})": (tv3d(noisy, best_w), time.perf_counter() - t)}
            t = time.perf_counter()
            b = bm4d_denoise(noisy, sigma)
            if b is not None:
                res["BM4D (true sigma)"] = (b, time.perf_counter() - t)
            stack = [(noisy, np.eye(4), 1.0, "box")]
            for label, kw in a.dn_methods:
                t = time.perf_counter()
                out, hist = inr(stack, grid, truth, tv_dirs=np.eye(3), **{**a.inr, **kw})
                res[label] = (out, time.perf_counter() - t)
                curves[f"{case} {label}"] = hist
            if a.dn_product:  # napari_strainer.restore.volume.denoise_volume, sigma estimated
                from napari_strainer.io.scan import Scan
                from napari_strainer.restore.volume import denoise_volume

                t = time.perf_counter()
                r = denoise_volume(Scan(noisy, np.eye(4)), device="cpu", seed=a.seed,
                                   reference=Scan(truth, np.eye(4)))
                label = "product --mode volume: 3D SIREN + 3D TV, averaged weights, held-out stop"
                res[label] = (r.scan.data, time.perf_counter() - t)
                curves[f"{case} {label}"] = r.history
            if a.dn_slices:  # napari_strainer.restore.slices.restore: one 2D INR per slice
                from napari_strainer.io.scan import Scan
                from napari_strainer.restore.noise import make_stop_rule
                from napari_strainer.restore.slices import restore

                t = time.perf_counter()
                r = restore(Scan(noisy, np.eye(4)), task="denoise", stop=make_stop_rule("auto"),
                            device="cpu", seed=a.seed)
                res["product --mode slices (2D, shipped encoder)"] = (
                    r.scan.data, time.perf_counter() - t)
            for tv in a.dn_shared:
                t = time.perf_counter()
                best, stopped, hist = shared_slices(noisy, truth, tv=tv, steps=a.dn_shared_steps,
                                                    sigma=sigma)
                sec = time.perf_counter() - t
                label = f"shared-encoder slices + 3D TV {tv:g}"
                res[f"{label}, oracle stop"] = (best, sec)
                res[f"{label}, 0.85 sigma stop"] = (stopped, sec)
                curves[f"{case} {label}"] = hist
            _score(case, f"denoise {sigma:g}", truth, res, rows, panels, "3D TV")


def _score(case, task, truth, res, rows, panels, baseline):
    base = next(psnr(v, truth) for k, (v, _) in res.items() if k.startswith(baseline))
    for name, (img, sec) in res.items():
        p = psnr(img, truth)
        rows.append({"case": case, "task": task, "method": name, "psnr": p,
                     "ssim": ssim(img, truth), "seconds": sec,
                     f"vs {baseline}": p - base})
        panels[(case, name)] = img
        print(f"{case:28s} {name:34s} {p:6.2f} dB  {p - base:+6.2f}  {sec:6.1f} s", flush=True)
    panels[(case, "truth")] = truth


def _panel(panels, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(k for k, _ in panels))
    names_per = [[n for c, n in panels if c == case] for case in cases]
    cols = max(len(n) for n in names_per)
    fig, axes = plt.subplots(len(cases), cols, figsize=(2.2 * cols, 2.4 * len(cases)),
                             squeeze=False)
    for ax_row, case, names in zip(axes, cases, names_per):
        for ax, name in zip(ax_row, names + [None] * (cols - len(names))):
            ax.axis("off")
            if name is None:
                continue
            v = panels[(case, name)]
            # a through-plane view: the middle row, slice axis vertical
            ax.imshow(v[:, v.shape[1] // 2, :], cmap="gray", vmin=0, vmax=1, aspect="equal")
            ax.set_title(f"{case}\n{name}", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tasks", default="sr,fuse,dn")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="one case per task, 100 steps")
    p.add_argument("--sr-ls", action="store_true", help="least squares for through-plane too")
    p.add_argument("--fuse-siren", type=int, default=0,
                   help="steps of a plain SIREN fusion with the through-plane network "
                        "(width 128; 0: skip it)")
    p.add_argument("--fuse-product", type=lambda v: [int(x) for x in v.split(",") if x],
                   default=[0, 500], help="INR steps of the product's fuse runs")
    p.add_argument("--sr-product", type=int, default=1,
                   help="1: run the product's superres_volume (INR + data consistency)")
    p.add_argument("--sr-inr", type=int, default=0,
                   help="1: also the INR residual alone through this script's inr()")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="volume")
    p.add_argument("--cases", type=int, default=None, help="only the first N through-plane cases")
    p.add_argument("--dn-shared", type=lambda v: [float(x) for x in v.split(",") if x],
                   default=[], help="TV weights of the shared-encoder slice denoiser "
                   "(0.08 measured; empty: skip it)")
    p.add_argument("--dn-product", type=int, default=1,
                   help="1: run the product's denoise_volume (its defaults, sigma auto)")
    p.add_argument("--dn-inr", type=int, default=0,
                   help="1: also a width-128 3D INR through this script's inr()")
    p.add_argument("--dn-shared-steps", type=int, default=1500)
    p.add_argument("--dn-slices", type=int, default=1,
                   help="1: also the product's 2D path (denoise --mode slices, sigma auto)")
    p.add_argument("--dn-names", default="MNI 2mm,T1,EPI",
                   help="volumes to denoise (MNI 2 mm chose the defaults; the others did not)")
    p.add_argument("--dn-sigmas", default="0.05,0.1")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    # the product's defaults (napari_strainer.restore.volume): width 128, 5 layers, lr 1e-4
    a.inr = {"omega_voxel": 0.5, "width": 128, "layers": 5, "lr": 1e-4}
    a.ls_weights = [1e-4, 1e-3, 1e-2]
    a.ls_tv_weights = [1e-4, 1e-3]
    a.fuse_ls = 1  # grad only (TV: see benchmarks/README.md)
    a.tv_weights = [0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08]
    a.sr_methods = [("SIREN 3D on cubic", {"cubic_base": True, "steps": 300, "batch": 4096})
                    ][:a.sr_inr]
    a.fuse_methods = [("SIREN 3D", {"steps": a.fuse_siren, "batch": 2048})][:a.fuse_siren > 0]
    a.dn_methods = [("SIREN 3D + 3D TV", {"tv": 0.15, "steps": 500, "batch": 2048})][:a.dn_inr]
    sr_cases = [("MNI 2mm", "box", 4), ("MNI 2mm", "gaussian", 3), ("T1", "box", 2),
                ("EPI", "gaussian", 3), ("MNI 1mm", "box", 4), ("MNI 2mm sup", "box", 5)]
    fuse_names = ["MNI 2mm", "T1", "EPI"]
    dn_names, sigmas = a.dn_names.split(","), [float(v) for v in a.dn_sigmas.split(",")]
    if a.quick:
        for _, kw in a.sr_methods + a.fuse_methods + a.dn_methods:
            kw["steps"] = 100
        sr_cases, sigmas = sr_cases[:1], [0.1]
    sr_cases = sr_cases[:a.cases]
    vols = volumes()
    rows, panels, curves = [], {}, {}
    tasks = a.tasks.split(",")
    if "sr" in tasks:
        run_sr(vols, sr_cases, a, rows, panels, curves)
    if "fuse" in tasks:
        run_fuse(vols, fuse_names, a, rows, panels, curves)
    if "dn" in tasks:
        run_dn(vols, dn_names, sigmas, a, rows, panels, curves)
    print()
    print(table(rows, ["case", "method", "psnr", "ssim", "seconds"]))
    path = save(a.name, {"args": {k: v for k, v in vars(a).items()}, "rows": rows,
                         "curves": curves})
    _panel(panels, RESULTS / f"{a.name}_panel.png")
    print(f"\nwrote {path}, {RESULTS / f'{a.name}_panel.png'}")


if __name__ == "__main__":
    main()
