"""Denoising by a race of denoisers judged without a clean image, and their blend.

Every candidate (non-local means and total variation at a few strengths, BM4D when it is
installed) denoises the scan. Stein's unbiased risk estimate (SURE, Monte-Carlo form: Ramani,
Blu & Unser 2008) gives each one's mean squared error on this very scan from one more run on
the scan plus a small random perturbation. The error of a weighted average of candidates is a
quadratic in the weights, so the output is the convex blend with the lowest estimated error: a
blend of two good denoisers with different errors often beats both. A second stage then runs
BM3D's collaborative Wiener filter with that blend as its pilot, and joins a second blend.

Rician data (magnitude MR): the candidates estimate the mean of the noisy magnitude; SURE uses
each voxel's Rician variance (a heteroscedastic SURE), and the blend is mapped through the
inverse of the Rician mean (:func:`~napari_strainer.restore.noise.rician_unbias`), which
takes the lifted background back to dark.

Example:
    >>> result = denoise(scan)                                          # doctest: +SKIP
    >>> result.history["race"]["winner"], result.history["race"]["psnr_estimate"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..core.fit import Progress
from ..errors import BadInputError
from ..io.atomic import atomic_file, write_json
from ..io.intensity import Intensity
from ..io.scan import Scan
from .base import Restoration
from .classical import (
    bm4d_denoise,
    collaborative_wiener,
    guided_nlm,
    has_bm4d,
    nlm_denoise,
    shares,
    tv_denoise,
)
from .noise import NoiseModel, rician_unbias, rician_variance

PROBE = 0.1
"""Size of the SURE probe's perturbation, in noise sigmas."""
SIGNAL = 2.0
"""Rician data: the risk is estimated where the pilot's magnitude is above this many sigmas,
where the noise is close to Gaussian and SURE holds; in the dark background (Rayleigh noise)
every candidate's mean falls to the noise floor, which the bias correction maps to zero."""
TV_WEIGHTS = (0.25, 0.5, 1.0)
"""Total-variation candidates: weights in noise sigmas."""
NLM = ((1.0, 1), (0.7, 1), (1.0, 2))
"""Non-local means candidates, 2D and 3D: (smoothing in noise sigmas, patch radius); the
first is the pilot. (Stronger smoothing, NLM 1.4 sigma and TV 2 sigma, got no weight on the
benchmark's brain slices and volumes.)"""
GUIDED_H = (0.5, 0.8)
"""Second-stage non-local means (``NLM2``, :func:`~napari_strainer.restore.classical.
guided_nlm`): smoothing in noise sigmas; its pilot is NLM of 1 sigma with patches of radius
:data:`GUIDE_PATCH`."""
GUIDE_PATCH = 2
GUIDED_SEARCH = {2: 5, 3: 2}
"""Search radius of the second stage: 11 x 11 pixels in 2D, 5 x 5 x 5 voxels in 3D."""
WIENER = "Wiener"
"""The second stage (:func:`~napari_strainer.restore.classical.collaborative_wiener`, the
first blend as its pilot): +0.2 to +1.3 dB over the first blend on the denoising benchmark's
volumes and slices (true sigma), about a second per 200k voxels on 2 cores."""
WIENER_BYTES = 100 * 2 ** 20
"""The Wiener stage's working set, whatever the scan's size: 2048 groups of 16 blocks at a
time (:func:`~napari_strainer.restore.classical.collaborative_wiener`)."""
BM4D_MAX_VOXELS = 500_000
"""BM4D joins the race (when installed) up to this size: it takes about 130 s per million
voxels on 2 cores, and runs twice."""
BM4D_SECONDS_PER_VOXEL = 1.3e-4
SLAB_VOXELS = 12_000_000
"""Volumes above this size race slab by slab along their first axis (a routine 256 x 256 x
176 T1 is one slab, a 512 x 512 x 300 CT seven), so memory is bounded by one slab."""
SLAB_MARGIN = 8
"""Slices each slab extends beyond its share; neighbouring slabs cross-fade over them."""


@dataclass(frozen=True)
class Candidate:
    """One denoiser of the race: ``run(image, sigma)`` in normalised units; a second stage
    (``pilot``) runs as ``run(image, sigma, pilot)`` with the first stage's blend."""

    name: str
    run: Callable[..., np.ndarray]
    pilot: bool = False

    def __call__(self, image: np.ndarray, sigma: float, pilot: np.ndarray) -> np.ndarray:
        """``run`` on ``image``, given the first stage's ``pilot`` when it takes one."""
        return self.run(image, sigma, pilot) if self.pilot else self.run(image, sigma)


class _Last:
    """``fn(x, s)`` remembered for the last two inputs (the race's image and its probe-
    shifted copy, compared by identity), so candidates that share a stage compute it once:
    the time then shows under the first candidate that needs it."""

    def __init__(self, fn: Callable):
        self.fn, self.kept = fn, []

    def __call__(self, x: np.ndarray, s: float):
        for kx, ks, value in self.kept:
            if kx is x and ks == s:
                return value
        value = self.fn(x, s)
        self.kept = [*self.kept[-1:], (x, s, value)]
        return value


def candidates(shape: tuple[int, ...]) -> list[Candidate]:
    """The race's denoisers for a 2D image or a 3D volume of ``shape``; the first is the
    pilot whose result sets the Rician variance of each voxel, the last (:data:`WIENER`, when
    the scan has a block's pixels along every axis) the second stage. BM4D joins when it is
    installed, the scan has at most :data:`BM4D_MAX_VOXELS` voxels and (3D) 8 along every
    axis."""
    ndim = len(shape)
    pilot = _Last(lambda x, s: nlm_denoise(x, s, GUIDE_PATCH))  # NLM 1s p2 and NLM2's guide
    second = _Last(lambda x, s: guided_nlm(x, pilot(x, s), tuple(f * s for f in GUIDED_H),
                                           search=GUIDED_SEARCH[ndim]))
    out = [Candidate(f"NLM {f:g}s p{p}", pilot if (f, p) == (1.0, GUIDE_PATCH) else
                     lambda x, s, f=f, p=p: nlm_denoise(x, f * s, p)) for f, p in NLM]
    out += [Candidate(f"NLM2 {f:g}s", lambda x, s, k=k: second(x, s)[k])
            for k, f in enumerate(GUIDED_H)]
    out += [Candidate(f"TV {w:g}s", lambda x, s, w=w: tv_denoise(x, w * s, iters=100))
            for w in TV_WEIGHTS]
    if (math.prod(shape) <= BM4D_MAX_VOXELS and (ndim == 2 or min(shape) >= 8)
            and has_bm4d()):
        out.append(Candidate("BM4D", bm4d_denoise))
    if min(shape) >= (8 if ndim == 2 else 4):
        out.append(Candidate(WIENER, lambda x, s, p: collaborative_wiener(x, p, s),
                             pilot=True))
    return out


def slabs(n: int, plane: int, limit: int | None = None) -> list[tuple[int, int, int, int]]:
    """Slabs along an axis of ``n`` slices of ``plane`` voxels each: ``(start, stop, lo,
    hi)``, the slab's slices and its share (the shares partition ``range(n)``). One slab up to
    ``limit`` voxels (None: :data:`SLAB_VOXELS`); the split depends on the shape and the limit
    only, so it is the same on every machine and rank."""
    count = max(1, math.ceil(n * plane / (limit or SLAB_VOXELS)))
    if count == 1 or n < 4 * SLAB_MARGIN * count:
        return [(0, n, 0, n)]
    return shares(n, count, SLAB_MARGIN)


def memory_bytes(shape: tuple[int, ...], n_candidates: int, limit: int | None = None) -> int:
    """Memory the race holds at its peak: for its largest slab every candidate's result (8
    bytes a voxel) and its shifted run (4), and 300 bytes a voxel for the probe, the shifted
    image, the variances, the blends and the Wiener stage's block matching; with several
    slabs, the whole scan's copies and the cross-fade sums; and the Wiener stage's
    :data:`WIENER_BYTES`."""
    plane = math.prod(shape[1:])
    parts = slabs(shape[0], plane, limit) if len(shape) == 3 else [(0, shape[0], 0, shape[0])]
    biggest = max(b - a for a, b, _, _ in parts) * plane
    whole = 24 * math.prod(shape) if len(parts) > 1 else 0
    return (12 * n_candidates + 300) * biggest + whole + WIENER_BYTES


def estimate_seconds(data: np.ndarray) -> float:
    """Seconds the race will take on ``data`` (one slice: 2D), from timing every candidate
    on a crop of at most 32^3 voxels (2D: 128^2) after an untimed run on a tiny one (imports),
    scaled by the voxel count (a few seconds; small crops run slower per voxel, so the
    estimate errs long)."""
    x = np.asarray(data[0] if data.shape[0] == 1 else data, np.float32)
    side = 128 if x.ndim == 2 else 32
    crop = x[tuple(slice(max(0, (n - side) // 2), max(0, (n - side) // 2) + side)
                   for n in x.shape)]
    crop = crop / (float(np.abs(crop).max()) or 1.0)

    for c in candidates(x.shape):  # untimed: imports and first-call set-up
        if c.name != "BM4D":
            tiny = crop[tuple(slice(0, 16 if x.ndim == 2 else 8) for _ in x.shape)]
            c(tiny, 0.05, tiny)
    total = 0.0
    for c in candidates(x.shape):
        if c.name == "BM4D":
            total += BM4D_SECONDS_PER_VOXEL * crop.size
            continue
        t0 = time.perf_counter()
        c(crop, 0.05, crop)
        total += time.perf_counter() - t0
    return 2 * total * x.size / crop.size


@dataclass
class RaceResult:
    """What the race found, in normalised units: ``mean`` (the blend's estimate of the noisy
    mean), the SURE risk (mean squared error) of each candidate and of the blend over
    ``region`` (Rician: where the signal is above :data:`SIGNAL` sigmas; else everywhere), the
    blend's weights and each candidate's seconds."""

    mean: np.ndarray
    weights: dict[str, float]
    risks: dict[str, float]
    risk: float
    seconds: dict[str, float]
    region: np.ndarray
    background: str | None = None
    """Rician: the candidate used where the signal is below :data:`SIGNAL` sigmas (in the
    second stage's pilot when there is one)."""
    slabs: int = 1
    """Slabs raced (:func:`slabs`); with several, the weights and risks are their average."""

    @property
    def winner(self) -> str:
        """``"NLM 1s p2"`` or ``"blend 0.6 NLM 1s p2 + 0.4 TV 0.5s"``."""
        used = sorted(((w, k) for k, w in self.weights.items() if w >= 0.005), reverse=True)
        text = used[0][1] if len(used) == 1 else "blend " + " + ".join(
            f"{w:.2f} {k}" for w, k in used)
        text += f" (mean over {self.slabs} slabs)" if self.slabs > 1 else ""
        return text + (f"; background {self.background}" if self.background else "")


def race(y: np.ndarray, sigma: float, kind: str, cands: list[Candidate], *, seed: int = 0,
         coils: int = 1, callback: Callable[[Progress], None] | None = None,
         cancel=None) -> RaceResult:
    """Run ``cands`` on the normalised image ``y`` (noise ``sigma``, ``kind`` rician or
    gaussian), estimate each one's risk with Monte-Carlo SURE and blend them; second-stage
    candidates run last, with the blend of the others as their pilot (on the shifted image:
    the same blend of the others' shifted runs, so SURE sees the pilot move too).

    Args:
        coils: Rician data from a root sum of squares of this many coils (non-central chi).
        callback: a :class:`~napari_strainer.core.fit.Progress` after each run (two per
            candidate).
        cancel: object with ``is_set()``; the candidates finished so far are raced. After
            the first (the pilot), a candidate still running is left behind within a tenth
            of a second (it finishes in the background, its result unused).
    """
    rng = np.random.default_rng(seed)
    probe = rng.choice(np.array([-1.0, 1.0], np.float32), size=y.shape)
    eps = PROBE * sigma
    shifted = y + eps * probe
    outs, moved, divs, seconds, var, region = {}, {}, {}, {}, None, None
    t_start = time.perf_counter()
    order = [c for c in cands if not c.pilot] + [c for c in cands if c.pilot]
    w, dark, pilots = None, None, (None, None)
    for i, c in enumerate(order):
        if cancel is not None and cancel.is_set() and outs:
            break
        if c.pilot and w is None:  # the first stage's result (and its shifted twin) as pilot
            w, _, _ = _blend(outs, divs, y, var, region)
            first, dark = _combine(outs, w, kind, region, sigma, coils)
            pilots = [first, _combine(moved, w, kind, region, sigma, coils, dark)[0]]
        t0 = time.perf_counter()
        try:
            f, g = _abandonable(lambda c=c, p=pilots: (c(y, sigma, p[0]),
                                                       c(shifted, sigma, p[1])),
                                cancel if outs else None)
        except _Stopped:
            break
        seconds[c.name] = time.perf_counter() - t0
        if var is None:
            if kind == "rician":
                pilot = rician_unbias(f, sigma, coils)
                region = pilot > SIGNAL * sigma
                var = rician_variance(pilot[region], sigma, coils)
            else:
                region = np.ones(y.shape, bool)
                var = np.full(int(region.sum()), sigma ** 2)
        outs[c.name], moved[c.name] = f, np.asarray(g, np.float32)
        divs[c.name] = float(np.sum(var * probe[region] * (g[region].astype(np.float64) -
                                                          f[region])) / eps)
        if callback is not None:
            callback(Progress(2 * i + 2, 2 * len(cands), float(np.mean((f - y) ** 2)), None,
                              time.perf_counter() - t_start, lambda f=f: f, phase=c.name))
    del moved
    staged = w is not None  # the second stage's pilot carries the background
    w, risks, risk = _blend(outs, divs, y, var, region)
    if staged:
        mean = _weighted(outs, w)
    else:
        mean, dark = _combine(outs, w, kind, region, sigma, coils)
    names = list(outs)
    return RaceResult(np.asarray(mean, np.float32), dict(zip(names, map(float, w))), risks,
                      risk, seconds, region, dark)


def _weighted(outs: dict[str, np.ndarray], w: np.ndarray) -> np.ndarray:
    """The sum of ``outs`` weighted by ``w`` (in their order), skipping zero weights."""
    return sum(wi * out for wi, out in zip(w, outs.values()) if wi > 0)


def _combine(outs: dict[str, np.ndarray], w: np.ndarray, kind: str, region: np.ndarray,
             sigma: float, coils: int, dark: str | None = None) -> tuple[np.ndarray, str | None]:
    """The blend of ``outs`` with weights ``w``; Rician data with a background: the candidate
    ``dark`` (None: the one that leaves the least magnitude after bias correction outside
    ``region``, where the truth is about zero) faded in below :data:`SIGNAL` sigmas of the
    blend. Returns the result and ``dark``."""
    mean = _weighted(outs, w)
    if kind != "rician" or region.all():
        return mean, None
    if dark is None:
        left = {k: float(np.mean(rician_unbias(v[~region], sigma, coils) ** 2))
                for k, v in outs.items()}
        dark = min(left, key=left.get)
    alpha = np.clip(rician_unbias(mean, sigma, coils) / sigma - (SIGNAL - 1), 0.0, 1.0)
    return alpha * mean + (1 - alpha) * outs[dark], dark


def _blend(outs: dict[str, np.ndarray], divs: dict[str, float], y: np.ndarray,
           var: np.ndarray, region: np.ndarray) -> tuple[np.ndarray, dict[str, float], float]:
    """The convex weights of the candidates ``outs`` with the lowest SURE risk over
    ``region`` (``divs``: each one's divergence term, ``var``: the noise variance of each
    voxel there), each candidate's risk and the blend's."""
    names = list(outs)
    flat = [outs[k][region].astype(np.float64) for k in names]
    yv = y[region].astype(np.float64)
    gram = np.array([[a @ b for b in flat] for a in flat])
    lin = np.array([a @ yv for a in flat]) - np.array([divs[k] for k in names])
    const = yv @ yv - float(var.sum())
    n = yv.size

    def risk(w: np.ndarray) -> float:
        return float((w @ gram @ w - 2 * lin @ w + const) / n)

    k = len(names)
    risks = {name: risk(np.eye(k)[i]) for i, name in enumerate(names)}
    w = _best_blend(gram, lin)
    if risk(w) > min(risks.values()):  # rounding: never worse than the best candidate
        w = np.eye(k)[int(np.argmin(list(risks.values())))]
    return w, risks, risk(w)


class _Stopped(Exception):
    """The user stopped the race while a candidate was running."""


def _abandonable(fn: Callable, cancel):
    """``fn()``, run in a daemon thread polled every 0.1 s when ``cancel`` is given, so that a
    stop returns at once (:class:`_Stopped`) instead of after a candidate that may take
    minutes on a large volume; exceptions of ``fn`` are raised here."""
    if cancel is None:
        return fn()
    box: dict = {}

    def work() -> None:
        try:
            box["value"] = fn()
        except Exception as e:  # noqa: BLE001 - raised again in the caller
            box["error"] = e

    thread = threading.Thread(target=work, daemon=True, name="race-candidate")
    thread.start()
    while thread.is_alive():
        thread.join(0.1)
        if thread.is_alive() and cancel.is_set():
            raise _Stopped
    if "error" in box:
        raise box["error"]
    return box["value"]


def _best_blend(gram: np.ndarray, lin: np.ndarray) -> np.ndarray:
    """The weights ``w >= 0, sum(w) = 1`` minimising ``w' gram w - 2 lin' w``, exactly: the
    best of the equality-constrained solutions on every subset of candidates (a handful)."""
    k = len(lin)
    best, best_value = None, np.inf
    for mask in range(1, 2 ** k):
        idx = [i for i in range(k) if mask >> i & 1]
        n = len(idx)
        kkt = np.zeros((n + 1, n + 1))
        kkt[:n, :n] = gram[np.ix_(idx, idx)]
        kkt[:n, n] = kkt[n, :n] = 1.0
        try:
            sol = np.linalg.solve(kkt, np.concatenate([lin[idx], [1.0]]))
        except np.linalg.LinAlgError:
            continue
        if np.any(sol[:n] < 0):
            continue
        w = np.zeros(k)
        w[idx] = sol[:n]
        value = w @ gram @ w - 2 * lin @ w
        if value < best_value:
            best, best_value = w, value
    return best


def _fade(a: int, b: int, lo: int, hi: int, n: int) -> np.ndarray:
    """Weights over the slices ``[a, b)`` of the slab whose share is ``[lo, hi)``: 1 inside,
    linear ramps over the margins shared with a neighbour; the slabs' weights sum to 1."""
    z = np.arange(a, b) + 0.5
    up = (z - lo + SLAB_MARGIN) / (2 * SLAB_MARGIN) if lo > 0 else np.ones(b - a)
    down = (hi + SLAB_MARGIN - z) / (2 * SLAB_MARGIN) if hi < n else np.ones(b - a)
    return np.clip(np.minimum(up, down), 0.0, 1.0)


def _merge(done: list[tuple[int, RaceResult]], count: int) -> RaceResult:
    """One slab's result as it is; several: weights, risks and seconds averaged over the
    slabs' shares (seconds summed), the background most slabs chose."""
    if count == 1:
        return done[0][1]
    total = sum(n for n, _ in done)
    names = list(dict.fromkeys(k for _, r in done for k in r.weights))

    def avg(key: str) -> dict[str, float]:
        return {k: sum(n * getattr(r, key).get(k, 0.0) for n, r in done) / total
                for k in names}

    backs = [r.background for _, r in done if r.background]
    return RaceResult(np.empty(0, np.float32), avg("weights"), avg("risks"),
                      sum(n * r.risk for n, r in done) / total,
                      {k: sum(r.seconds.get(k, 0.0) for _, r in done) for k in names},
                      np.empty(0, bool), max(set(backs), key=backs.count) if backs else None,
                      slabs=count)


class _SlabStore:
    """Finished slabs in ``workdir``: the slab's result (float32 ``.npy``, read without
    pickle) and its race statistics (``.json``, written last: its presence marks the slab
    finished). A ``key.json`` of another scan, model or split empties the folder first;
    ``earlier`` holds the slabs finished before this run (what a rerun resumes), the same
    on every rank."""

    def __init__(self, workdir, key: dict, rank: int, world: int):
        self.dir = Path(workdir)
        key = json.loads(json.dumps(key, default=str))
        if rank == 0:
            path = self.dir / "key.json"
            if path.exists() and json.loads(path.read_text()) != key:
                shutil.rmtree(self.dir)
            if not path.exists():
                write_json(path, key)
        if world > 1:
            _barrier()  # the folder is this run's
        self.earlier = {int(p.stem[4:]) for p in self.dir.glob("slab*.json")}
        if world > 1:
            _barrier()  # every rank has looked before any races

    def save(self, i: int, mean: np.ndarray, res: RaceResult) -> None:
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.save(f, mean)

        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_file(self.dir / f"slab{i:03d}.npy", write)
        write_json(self.dir / f"slab{i:03d}.json", {
            "weights": res.weights, "risks": res.risks, "risk": res.risk,
            "seconds": res.seconds, "background": res.background})

    def load(self, i: int) -> tuple[np.ndarray, RaceResult] | None:
        stats = self.dir / f"slab{i:03d}.json"
        if not stats.exists():
            return None
        d = json.loads(stats.read_text())
        mean = np.load(self.dir / f"slab{i:03d}.npy", allow_pickle=False)
        return mean, RaceResult(np.empty(0, np.float32), d["weights"], d["risks"], d["risk"],
                                d["seconds"], np.empty(0, bool), d["background"])


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def check_finite(scan: Scan) -> None:
    """Refuse a scan with NaN or infinite voxels, with their count (BadInputError)."""
    bad = int(np.count_nonzero(~np.isfinite(scan.data)))
    if bad:
        raise BadInputError(f"{scan.source or 'the scan'}: {bad} voxels are not finite "
                            f"(NaN or infinite); mask or fill them before denoising")


def denoise(scan: Scan, model: NoiseModel, *, seed: int = 0,
            callback: Callable[[Progress], None] | None = None, cancel=None,
            slab_voxels: int | None = None, workdir: str | os.PathLike | None = None,
            key: dict | None = None, rank: int = 0, world: int = 1) -> Restoration:
    """Denoise ``scan`` (one slice: in 2D; several: as a volume) under the noise ``model``.

    The history records the noise model, every candidate's estimated risk and time, the
    blend's weights (``race.winner``) and its estimated PSNR (``race.psnr_estimate``, on the
    scan's robust range, from SURE's mean squared error).

    Args:
        slab_voxels: largest slab (None: :data:`SLAB_VOXELS`).
        workdir: keeps each finished slab (``slabNNN.npy`` and ``.json``); a rerun with the
            same scan, model and ``key`` reuses them (``race.slabs_resumed``).
        rank, world: with ``world`` processes of an initialised ``torch.distributed`` group
            sharing ``workdir``, this one races slabs ``rank, rank + world, ...``; every
            process then returns the whole result.
    """
    check_finite(scan)
    data = np.asarray(scan.data, np.float64)
    flat2d = data.shape[0] == 1
    rician = model.kind == "rician"
    offset = 0.0 if rician else float(np.percentile(data, 0.5))
    scale = float(np.percentile(data, 99.5)) - offset
    scale = scale if scale > 0 else float(np.ptp(data)) or 1.0
    norm = Intensity(offset, offset + scale)  # the race's units (Rician: zero stays zero)
    y = (((data[0] if flat2d else data) - offset) / scale).astype(np.float32)
    del data
    sigma = model.sigma / scale
    cands = candidates(y.shape)
    parts = (slabs(len(y), math.prod(y.shape[1:]), slab_voxels) if y.ndim == 3
             else [(0, len(y), 0, len(y))])
    store = _SlabStore(workdir, {**(key or {}), "shape": list(y.shape), "seed": seed,
                                 "noise": model.to_dict(), "slabs": parts}, rank, world) \
        if workdir is not None else None
    shown = Intensity.for_scan(scan)
    per_slab = 2 * len(cands)

    def report(i: int, a: int, b: int, p: Progress) -> None:
        # previews as the fitting loop's, [*scan shape, 1] in [0, 1]: the slab raced so far
        # inside the noisy scan
        def preview() -> torch.Tensor:
            full = y.copy()
            full[a:b] = np.asarray(p.preview()).reshape(full[a:b].shape)
            units = norm.inverse(full.reshape(scan.shape), np.float64)
            return torch.from_numpy(shown.forward(units))[..., None]

        phase = p.phase if len(parts) == 1 else f"slab {i + 1}/{len(parts)}: {p.phase}"
        callback(replace(p, step=i * per_slab + p.step, total=len(parts) * per_slab,
                         phase=phase, preview=preview,
                         slices=(a, b) if len(parts) > 1 else None))

    means: dict[int, np.ndarray] = {}
    results: dict[int, RaceResult] = {}
    resumed = 0
    for i, (a, b, _, _) in enumerate(parts):
        if store is not None and i in store.earlier:
            means[i], results[i] = store.load(i)
            resumed += 1
        elif i % world != rank:
            continue  # another process's slab
        elif cancel is not None and cancel.is_set() and results:
            means[i] = (rician_unbias(y[a:b], sigma, model.coils) if rician
                        else y[a:b])  # left as scanned
        else:
            res = race(y[a:b], sigma, model.kind, cands, seed=seed + i, coils=model.coils,
                       cancel=cancel,
                       callback=(lambda p, i=i, a=a, b=b: report(i, a, b, p))
                       if callback is not None else None)
            mean = rician_unbias(res.mean, sigma, model.coils) if rician else res.mean
            means[i], results[i] = np.asarray(mean, np.float32), res
            if store is not None and not (cancel is not None and cancel.is_set()):
                store.save(i, means[i], res)  # a stopped slab is not finished
    if world > 1:
        _barrier()  # every slab is in the store
        for i in range(len(parts)):
            if i not in means:
                means[i], results[i] = store.load(i)
    if len(parts) == 1:
        clean = means.pop(0).astype(np.float64)
    else:
        clean = np.zeros(y.shape, np.float64)
        for i, (a, b, lo, hi) in enumerate(parts):  # in slab order on every process
            clean[a:b] += _fade(a, b, lo, hi, len(y))[:, None, None] * means.pop(i)
    if world > 1:
        _barrier()  # every process has read the store
    res = _merge([(hi - lo, results[i]) for i, (_, _, lo, hi) in enumerate(parts)
                  if i in results], len(parts))
    out = norm.inverse(clean[None] if flat2d else clean, scan.data.dtype)
    # an estimated error below zero means the noise level is set too high for this scan (e.g.
    # anatomy finer than the voxels counted as noise): SURE then favours too little smoothing
    trusted = min(res.risks.values()) > 0 and res.risk > 0
    psnr_est = 10 * math.log10(1.0 / res.risk) if trusted else None
    history = {"task": "denoise", "path": "race", "noise": model.to_dict(),
               "race": {"winner": res.winner, "weights": res.weights,
                        "risks": {k: v * scale ** 2 for k, v in res.risks.items()},
                        "risk": res.risk * scale ** 2, "psnr_estimate": psnr_est,
                        "psnr_range": scale, "seconds": res.seconds,
                        "warning": None if trusted else (
                            f"a candidate's estimated error is below zero: sigma "
                            f"{model.sigma:.4g} is probably too high for this scan; give "
                            f"--sigma"),
                        "candidates": [c.name for c in cands], "slabs": len(parts),
                        "slabs_resumed": resumed},
               "stop_reason": f"{res.winner} (lowest estimated error, SURE)",
               "steps_done": 0}
    desc = "denoised: race of NLM, TV (and BM4D) judged by SURE (napari-strainer)"
    how = f"{desc}; {model.text()}; {res.winner}" + (
        f"; estimated PSNR {psnr_est:.1f} dB" if trusted else "")
    return Restoration(scan.derive(out, description=desc, derivation=how), history)

