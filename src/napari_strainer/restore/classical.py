"""Classical methods: the baselines that ``strainer demo`` reports beside the INRs, and the
classical candidates of the denoising race (:mod:`napari_strainer.restore.race`).

* :func:`bicubic`: in-plane bicubic upsampling with pixel centres aligned (the product's
  super-resolution grid);
* :func:`tv_denoise`: 2D or 3D total-variation denoising (scikit-image's Chambolle solver);
* :func:`interpolate_slices`: B-spline interpolation along the slice axis (and in-plane) with
  voxel centres aligned (the product's through-plane grid, and its INR's starting point);
* :func:`nlm_denoise`: non-local means (dipy's blockwise 3D method; scikit-image's in 2D);
* :func:`guided_nlm`: non-local means whose weights come from a pilot estimate (a second
  stage, as BM3D's Wiener stage uses its first);
* :func:`collaborative_wiener`: BM3D's second stage (BM4D's in 3D) on a pilot estimate;
* :func:`bm4d_denoise`: BM4D when the optional ``bm4d`` package is installed (a benchmark-only
  extra under a non-commercial licence, never a dependency of this package).
"""

from __future__ import annotations

import importlib.util
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise

import numpy as np
import torch
import torch.nn.functional as F


def bicubic(low: np.ndarray, scale: int) -> np.ndarray:
    """``scale``-times bicubic upsampling of a 2D image, centres aligned (each output pixel
    sits where area-averaging ``scale x scale`` of them gives the input pixel), clipped to the
    input's range."""
    t = torch.from_numpy(np.ascontiguousarray(low, np.float32))[None, None]
    up = F.interpolate(t, scale_factor=scale, mode="bicubic", align_corners=False)[0, 0]
    return up.clamp(float(low.min()), float(low.max())).numpy()


def interpolate_slices(volume: np.ndarray, factor: int, order: int, inplane: int = 1
                       ) -> np.ndarray:
    """B-spline interpolation (``order`` 1: linear, 3: cubic) to ``factor`` times the slices
    (axis 0) and ``inplane`` times the rows and columns, voxel centres aligned as
    :func:`~napari_strainer.io.scan.upsampled_affine` places them (edges extended). Through-plane
    super-resolution starts from it (:func:`~napari_strainer.restore.volume.superres_volume`)."""
    from scipy.ndimage import zoom

    return zoom(np.asarray(volume, np.float32), (factor, inplane, inplane), order=order,
                mode="nearest", grid_mode=True)


def shares(n: int, count: int, margin: int) -> list[tuple[int, int, int, int]]:
    """``range(n)`` cut into ``count`` contiguous shares, each ``(start, stop, lo, hi)``: its
    own slices ``[lo, hi)`` widened by ``margin`` on either side (within ``[0, n)``) to
    ``[start, stop)``; the cuts depend on ``n`` and ``count`` only."""
    cuts = [round(i * n / count) for i in range(count + 1)]
    return [(max(0, lo - margin), min(n, hi + margin), lo, hi) for lo, hi in pairwise(cuts)]


NLM_MARGIN = 12
"""Slices each thread's share of a volume extends beyond it for :func:`nlm_denoise`: dipy's
blockwise NLM reaches 5 + 2 patch radii voxels, so the shares join exactly."""


def nlm_denoise(image: np.ndarray, sigma: float, patch_radius: int = 1) -> np.ndarray:
    """Non-local means of a 2D image or a 3D volume (Gaussian weights, no Rician correction:
    the result estimates the noisy mean). ``sigma`` sets the smoothing. 3D: dipy's blockwise
    method (Coupe et al. 2008) with patches of radius ``patch_radius``, one thread per share of
    the slices (``torch.get_num_threads()``; dipy's own threads give a result that changes
    from run to run, by up to a fifth of the range on random data); 2D: scikit-image's
    (patches of ``2 patch_radius + 3`` pixels, search distance 6), whose smoothing is
    ``0.8 sigma`` for ``sigma``."""
    x = np.asarray(image, np.float32)
    if x.ndim == 2:
        from skimage.restoration import denoise_nl_means

        return denoise_nl_means(x, h=0.8 * sigma, sigma=sigma, patch_size=2 * patch_radius + 3,
                                patch_distance=6, fast_mode=True).astype(np.float32)
    from dipy.denoise.nlmeans import nlmeans

    def one(a: np.ndarray) -> np.ndarray:
        return np.asarray(nlmeans(a, sigma=sigma, rician=False, patch_radius=patch_radius,
                                  num_threads=1), np.float32)

    n = len(x)
    k = max(1, min(torch.get_num_threads(), n // (2 * NLM_MARGIN)))
    if k == 1:
        return one(x)
    parts = shares(n, k, NLM_MARGIN)
    with ThreadPoolExecutor(k) as pool:  # dipy's loop runs without the GIL
        outs = list(pool.map(lambda p: one(x[p[0]:p[1]]), parts))
    return np.concatenate([o[lo - a:hi - a] for o, (a, _, lo, hi) in zip(outs, parts)])


def guided_nlm(image: np.ndarray, guide: np.ndarray, h: float | tuple[float, ...],
               search: int = 2, patch: int = 1) -> np.ndarray | list[np.ndarray]:
    """Non-local means of ``image`` (2D or 3D) with the weights of ``guide``, a pilot
    estimate: each voxel becomes the average of the voxels within ``search`` voxels, weighted
    by ``exp(-d / h^2)``, ``d`` the mean squared difference of the guide's patches of radius
    ``patch`` around the two. The pilot's noise is low, so the weights find similar
    structure far more reliably than the noisy image's (a 1 mm MNI crop with Rician noise of
    0.05: +1.0 dB over dipy's NLM that made the pilot). Several ``h`` share the patch
    distances, the costly part: one result per ``h``, as a list."""
    hs = (h,) if np.isscalar(h) else tuple(h)
    x = torch.from_numpy(np.ascontiguousarray(image, np.float32))
    g = torch.from_numpy(np.ascontiguousarray(guide, np.float32))
    nd = x.ndim
    pad = (search,) * (2 * nd)
    xp = F.pad(x[None, None], pad, mode="replicate")[0, 0]
    gp = F.pad(g[None, None], pad, mode="replicate")[0, 0]
    pool = F.avg_pool2d if nd == 2 else F.avg_pool3d
    num = [torch.zeros_like(x) for _ in hs]
    den = [torch.zeros_like(x) for _ in hs]
    for offset in np.ndindex(*(2 * search + 1,) * nd):
        window = tuple(slice(o, o + n) for o, n in zip(offset, x.shape))
        diff = F.pad(((g - gp[window]) ** 2)[None, None], (patch,) * (2 * nd),
                     mode="replicate")
        d = pool(diff, 2 * patch + 1, stride=1)[0, 0]
        for k, hk in enumerate(hs):
            w = torch.exp(d * (-1.0 / (hk * hk)))
            num[k].addcmul_(w, xp[window])
            den[k] += w
    out = [(n / dn).numpy() for n, dn in zip(num, den)]
    return out[0] if np.isscalar(h) else out


def _dct_matrix(n: int) -> torch.Tensor:
    """The orthonormal DCT-II of length ``n`` as a matrix (rows: frequencies)."""
    k = np.arange(n)
    m = np.cos(np.pi * (2 * k[None] + 1) * k[:, None] / (2 * n)) * np.sqrt(2 / n)
    m[0] /= np.sqrt(2)
    return torch.tensor(m, dtype=torch.float32)


def _haar_matrix(n: int) -> torch.Tensor:
    """The orthonormal Haar transform of length ``n`` (a power of two) as a matrix."""
    m = np.ones((1, 1))
    while len(m) < n:
        m = np.vstack([np.kron(m, [1, 1]), np.kron(np.eye(len(m)), [1, -1])]) / np.sqrt(2)
    return torch.tensor(m, dtype=torch.float32)


def _grid_sum(t: torch.Tensor, block: int, step: int) -> torch.Tensor:
    """Sums of ``t`` over the blocks of side ``block`` whose corners lie on a grid of
    ``step`` (separable pooling, one axis at a time)."""
    nd = t.ndim
    pool = F.avg_pool2d if nd == 2 else F.avg_pool3d
    t = t[None, None]
    for ax in range(nd):
        k, s = [1] * nd, [1] * nd
        k[ax], s[ax] = block, step
        t = pool(t, tuple(k), stride=tuple(s))
    return t[0, 0] * block ** nd


def collaborative_wiener(image: np.ndarray, pilot: np.ndarray, sigma: float, *,
                         block: int | None = None, step: int = 3, search: int | None = None,
                         group: int = 16, chunk: int = 2048) -> np.ndarray:
    """BM3D's second stage (Dabov et al. 2007; BM4D's, Maggioni et al. 2013, in 3D) of a 2D
    image or a 3D volume with noise ``sigma``, given ``pilot``, an estimate of it.

    For every block of side ``block`` on a grid of ``step``, the ``group`` blocks of the pilot
    most like it (squared distance) within ``search`` pixels are stacked; the image's stack is
    filtered in a separable transform domain (DCT in the block, Haar across the stack) by the
    pilot's empirical Wiener gains ``P^2 / (P^2 + sigma^2)``, and the filtered blocks are
    averaged back with BM3D's weights (``1 / (sigma^2 sum(gain^2))`` times a Kaiser window).
    Defaults: 8 x 8 blocks searched over 15 x 15 in 2D, 4 x 4 x 4 over 7 x 7 x 7 in 3D. The
    image must have at least ``block`` pixels along every axis.
    """
    shape0 = np.shape(image)
    nd = len(shape0)
    block = block or (8 if nd == 2 else 4)
    search = search or (7 if nd == 2 else 3)
    # reflect the far edges so that the grid of block corners ends at the last block
    ends = [(-(n - block)) % step for n in shape0]
    pad = [p for e in reversed(ends) for p in (0, e)]

    def padded(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a, np.float32))
        return F.pad(t[None, None], pad, mode="reflect")[0, 0] if any(ends) else t

    x, p = padded(image), padded(pilot)
    shape = x.shape
    grid = [(n - block) // step + 1 for n in shape]
    corners = [torch.arange(g) * step for g in grid]
    strides = [math.prod(shape[i + 1:]) for i in range(nd)]
    n_ref = math.prod(grid)
    # block matching on the pilot: a running best ``group`` over every displacement
    pp = F.pad(p[None, None], (search,) * (2 * nd), mode="replicate")[0, 0]
    moves = list(np.ndindex(*(2 * search + 1,) * nd))
    best = torch.full((group, n_ref), float("inf"))
    best_i = torch.zeros((group, n_ref), dtype=torch.long)
    for c0 in range(0, len(moves), 64):
        dists = []
        for off in moves[c0:c0 + 64]:
            window = tuple(slice(o, o + n) for o, n in zip(off, shape))
            d = _grid_sum((p - pp[window]) ** 2, block, step)
            for ax in range(nd):  # the moved block must lie inside the image
                c = corners[ax] + off[ax] - search
                out = (c < 0) | (c > shape[ax] - block)
                if out.any():
                    d[(slice(None),) * ax + (out,)] = float("inf")
            dists.append(d.reshape(-1))
        ids = torch.arange(c0, c0 + len(dists))[:, None].expand(-1, n_ref)
        best, sel = torch.topk(torch.cat([best, torch.stack(dists)]), group, dim=0,
                               largest=False)
        best_i = torch.gather(torch.cat([best_i, ids]), 0, sel)
    best_i[torch.isinf(best)] = moves.index((search,) * nd)  # few moves fit: the block itself
    move_lin = torch.tensor([sum((o - search) * s for o, s in zip(off, strides))
                             for off in moves])

    def lattice(coords: list[torch.Tensor]) -> torch.Tensor:
        lin = torch.zeros([len(c) for c in coords], dtype=torch.long)
        for ax, c in enumerate(coords):
            lin = lin + (c * strides[ax]).reshape([-1 if a == ax else 1 for a in range(nd)])
        return lin.reshape(-1)

    origin = lattice(corners)
    in_block = lattice([torch.arange(block)] * nd)
    dct = _dct_matrix(block)
    kaiser = torch.tensor(np.kaiser(block, 2.0), dtype=torch.float32)
    t_block, window = dct, kaiser
    for _ in range(nd - 1):
        t_block, window = torch.kron(t_block, dct), torch.kron(window, kaiser)
    t_group = _haar_matrix(group)
    xf, pf = x.reshape(-1), p.reshape(-1)
    num, den = torch.zeros_like(xf), torch.zeros_like(xf)
    s2 = float(sigma) ** 2
    for r0 in range(0, n_ref, chunk):
        members = origin[r0:r0 + chunk, None] + move_lin[best_i[:, r0:r0 + chunk].T]
        idx = (members[:, :, None] + in_block).reshape(len(members), -1, block ** nd)
        spec = t_group @ pf[idx] @ t_block.T
        gain = spec * spec
        gain = gain / (gain + s2)
        est = t_group.T @ (gain * (t_group @ xf[idx] @ t_block.T)) @ t_block
        weight = window / (s2 * (gain * gain).sum((1, 2), keepdim=True) + 1e-12)
        weight = weight.expand_as(est)
        num.index_add_(0, idx.reshape(-1), (weight * est).reshape(-1))
        den.index_add_(0, idx.reshape(-1), weight.reshape(-1))
    out = torch.where(den > 0, num / den.clamp_min(1e-30), pf).reshape(shape)
    return out[tuple(slice(0, n) for n in shape0)].numpy()


def tv_denoise(image: np.ndarray, weight: float, iters: int | None = None) -> np.ndarray:
    """Total-variation denoising (ROF) of a 2D image or a 3D volume, scikit-image's
    Chambolle solver. ``weight`` is in the image's units (about the noise sigma and above
    removes noise; 0 returns the input). ``iters`` None: until converged (relative change
    2e-4, at most 500 iterations); a count: exactly that many (the race's candidates: a fixed
    count keeps the result a smooth function of the input, which its risk estimate relies
    on)."""
    from skimage.restoration import denoise_tv_chambolle

    x = np.asarray(image, np.float32)
    if weight <= 0:
        return x.copy()
    eps, count = (2e-4, 500) if iters is None else (0.0, iters)
    return denoise_tv_chambolle(x, weight=weight, eps=eps, max_num_iter=count).astype(
        np.float32)


def has_bm4d() -> bool:
    """Whether the optional ``bm4d`` package is installed (without importing it)."""
    return importlib.util.find_spec("bm4d") is not None


_BM4D_LOCK = threading.Lock()  # bm4d aborts the process when two threads run it at once


def bm4d_denoise(image: np.ndarray, sigma: float) -> np.ndarray | None:
    """BM4D of a 2D image (as a one-slice volume) or a 3D volume with noise ``sigma`` (the
    image's units), or ``None`` when ``bm4d`` is not installed. (bm4d 4.2.5 crashes the process
    on an 8 x 8 image; 16 x 16 works.)"""
    if not has_bm4d():
        return None
    import bm4d

    x = np.asarray(image, np.float32)
    with _BM4D_LOCK:
        out = np.asarray(bm4d.bm4d(x[:, :, None] if x.ndim == 2 else x, sigma), np.float32)
    return out[:, :, 0] if x.ndim == 2 else out
