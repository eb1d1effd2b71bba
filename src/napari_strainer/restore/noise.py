"""Noise models, noise estimation and the stopping rule of INR denoising.

Magnitude MR images carry Rician noise (the magnitude of complex Gaussian noise of standard
deviation sigma): the mean of a voxel is lifted above its true value, by sigma * sqrt(pi / 2)
where the true value is zero. :func:`noise_model` picks Rician for magnitude data (MR and any
non-negative scan) and Gaussian for CT and data with negative values; :func:`rician_unbias`
maps an estimate of the noisy mean back to the true magnitude.

An INR fits the clean structure first and the noise later, so denoising stops each slice
when its data residual (mean squared error against the noisy slice) falls to
``(factor * sigma)^2``. The plain discrepancy principle is ``factor = 1``; the calibrated
factor (``STOP_FACTOR``, chosen by ``benchmarks/inverse``) lets the fit go a little further,
where the best PSNR is on average.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from scipy.special import gammaln, hyp1f1, i0e, i1e

from ..core.fit import StopRule
from ..errors import BadArgumentError

STOP_FACTOR = 0.85
MAD_TO_SIGMA = 1 / 0.6745
NOISE_KINDS = ("auto", "rician", "gaussian")
SIGNAL_SNR = 4.0
""":func:`estimate_sigma` with ``signal_only``: the detail coefficients of blocks whose mean
is above this many sigma, where Rician noise is close to Gaussian of the same sigma."""


def _haar(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The finest Haar band that is high-pass along every axis, and the block means."""
    x = np.asarray(image, np.float64)
    mean = x
    for axis in range(x.ndim):
        even = (x.shape[axis] // 2) * 2
        if even == 0:
            continue
        a, b = (np.take(x, np.arange(i, even, 2), axis) for i in (0, 1))
        x = (a - b) / np.sqrt(2.0)
        a, b = (np.take(mean, np.arange(i, even, 2), axis) for i in (0, 1))
        mean = (a + b) / 2
    return x, mean


def estimate_sigma(image: np.ndarray, *, signal_only: bool = False, flat: bool = False,
                   coils: int = 1) -> float:
    """Noise standard deviation of a 2D image or a 3D volume from the finest Haar detail band
    that is high-pass along every axis (HH, or HHH for a volume; wavelet MAD, Donoho &
    Johnstone): ``median(|band|) / 0.6745``. On a volume the third axis makes the band less
    sensitive to anatomy (brain MRI volumes with added noise: 1-4% high against 5-18% for the
    median of the slices' HH estimates, ``benchmarks/volume.py``).

    ``signal_only`` (magnitude data): only the blocks whose mean is above
    :data:`SIGNAL_SNR` sigma count (iterated), where Rician noise has the Gaussian's spread (the
    dark background, where it is about 0.66 sigma, would pull the estimate down), and of those
    the flatter half (the gradient of the block means at most its median), where edges do not
    push it up. With ``coils`` > 1 (non-central chi) the threshold is raised by how much
    higher their noise floor is than one coil's. ``flat`` alone: the flatter half of every
    block (the demo's real MR slice with Gaussian noise of 51.1: 53.6, against 56.8 from every
    block). A whole 1 mm MNI brain with Rician noise of 0.05: 0.0500, against 0.036 from
    every block and 0.040 from dipy's ``estimate_sigma``; a phantom of sharp-edged ellipsoids:
    0.0497 against 0.056 from the bright blocks alone.
    """
    band, mean = _haar(image)
    sigma = float(np.median(np.abs(band)) * MAD_TO_SIGMA)
    if not (signal_only or flat):
        return sigma
    structure = np.sqrt(sum(np.gradient(mean, axis=a) ** 2 for a in range(mean.ndim)
                            if mean.shape[a] > 1))
    if not signal_only:
        calm = structure <= np.median(structure)
        return float(np.median(np.abs(band[calm])) * MAD_TO_SIGMA)
    lift = float(_mean_table(coils)[0] - _mean_table(1)[0])
    for _ in range(3):
        bright = mean > (SIGNAL_SNR + lift) * sigma
        if bright.sum() < 256:
            break
        flat = bright & (structure <= np.median(structure[bright]))
        sigma = float(np.median(np.abs(band[flat])) * MAD_TO_SIGMA)
    return sigma


@dataclass
class NoiseModel:
    """The noise of a scan: ``kind`` (``rician`` or ``gaussian``), its standard deviation
    ``sigma`` in the scan's units, and how each was decided (shown in plans and histories)."""

    kind: str
    sigma: float
    why: str
    source: str
    coils: int = 1
    """Rician with several coils: the non-central chi of their root sum of squares."""

    def text(self) -> str:
        kind = (self.kind if self.coils == 1 else
                f"non-central chi of {self.coils} coils")
        return f"{kind} ({self.why}), sigma {self.sigma:.4g} in scan units ({self.source})"

    def to_dict(self) -> dict:
        return {"model": self.kind, "sigma": self.sigma, "coils": self.coils, "why": self.why,
                "source": self.source, "text": self.text()}


def noise_model(data: np.ndarray, modality: str, noise: str = "auto", sigma="auto", *,
                coils: int = 1, name: str = "the scan") -> NoiseModel:
    """The noise model of a scan's finite ``data``.

    Args:
        modality: the scan's DICOM modality (``CT``: Gaussian under ``auto``).
        noise: ``auto`` (Rician for magnitude data: MR and any scan without negative values;
            Gaussian for CT and data with negative values), ``rician`` or ``gaussian``.
        sigma: ``auto`` (:func:`estimate_sigma`, ``flat``; ``signal_only`` for Rician) or a value in
            the scan's units (``none`` counts as ``auto``).
        coils: magnitude data combined as the root sum of squares of this many coils: the
            non-central chi model (``1``: Rician); sigma is each coil's.
        name: the file, for messages.

    Raises:
        BadArgumentError: an unknown ``noise``, ``rician`` on data with negative values, or
            ``coils`` other than 1 with Gaussian noise.
    """
    if int(coils) != coils or coils < 1:
        raise BadArgumentError(f"--coils must be an integer >= 1, got {coils}")
    if noise not in NOISE_KINDS:
        raise BadArgumentError(f"--noise must be one of {', '.join(NOISE_KINDS)}, got "
                               f"{noise!r}")
    low = float(np.min(data))
    if noise == "rician" and low < 0:
        raise BadArgumentError(f"{name}: --noise rician needs magnitude data (>= 0), this "
                               f"scan goes down to {low:g} (CT in HU, or phase?); use "
                               f"--noise gaussian")
    if noise == "auto":
        if modality.upper() == "CT":
            kind, why = "gaussian", "CT"
        elif low < 0:
            kind, why = "gaussian", f"the scan has negative values (down to {low:g})"
        else:
            kind, why = "rician", ("magnitude MR" if modality.upper() == "MR" else
                                   "magnitude data: no negative values")
    else:
        kind, why = noise, f"--noise {noise}"
    if coils > 1 and kind == "gaussian":
        raise BadArgumentError(f"{name}: --coils {coils} describes magnitude data, but the "
                               f"noise is Gaussian here ({why}); use --noise rician")
    coils = int(coils)
    sigma = parse_sigma(sigma)
    if isinstance(sigma, float):
        return NoiseModel(kind, sigma, why, "given", coils)
    scale = float(np.percentile(np.abs(data), 99.5)) or 1.0
    est = estimate_sigma(np.squeeze(data) / scale, signal_only=kind == "rician",
                         flat=True, coils=coils) * scale
    if not est > 0:
        raise BadArgumentError(f"{name}: no noise found (estimated sigma 0); give --sigma")
    return NoiseModel(kind, est, why, "estimated from the finest wavelet band, flatter half" +
                      (" where the signal is above 4 sigma" if kind == "rician" else ""), coils)


_NU = np.linspace(0.0, 40.0, 16001)


@cache
def _mean_table(coils: int) -> np.ndarray:
    """The mean of a non-central chi variable of sigma 1, ``2 coils`` degrees of freedom and
    true value ``_NU`` (``coils = 1``: Rician): ``sqrt(2) Gamma(L + 1/2) / Gamma(L)
    1F1(-1/2; L; -nu^2 / 2)``, in the Laguerre form for one coil."""
    if coils == 1:
        t = _NU ** 2 / 4
        return np.sqrt(np.pi / 2) * ((1 + 2 * t) * i0e(t) + 2 * t * i1e(t))
    lead = math.sqrt(2) * math.exp(gammaln(coils + 0.5) - gammaln(coils))
    return lead * hyp1f1(-0.5, coils, -(_NU ** 2) / 2)


def rician_mean(value: np.ndarray, sigma: float, coils: int = 1) -> np.ndarray:
    """The mean of the Rician magnitude of true value ``value`` and noise ``sigma``; with
    ``coils`` > 1, of the non-central chi magnitude of a root-sum-of-squares combination of
    that many coils (each with noise ``sigma``)."""
    r = np.abs(np.asarray(value, np.float64)) / sigma
    return sigma * np.where(r < _NU[-1], np.interp(r, _NU, _mean_table(coils)),
                            np.sqrt(r ** 2 + 2 * coils - 1))


def rician_unbias(mean: np.ndarray, sigma: float, coils: int = 1) -> np.ndarray:
    """The true magnitude whose Rician (``coils`` > 1: non-central chi) mean is ``mean`` (0
    where ``mean`` is at or below the noise floor, ``sigma * sqrt(pi / 2)`` for one coil): the
    inverse of :func:`rician_mean`."""
    table = _mean_table(coils)
    r = np.maximum(np.asarray(mean, np.float64) / sigma, 0.0)
    far = np.sqrt(np.maximum(r ** 2 - (2 * coils - 1), 0.0))
    return np.where(r >= table[-1], far, np.interp(r, table, _NU)) * sigma


def rician_variance(value: np.ndarray, sigma: float, coils: int = 1) -> np.ndarray:
    """The variance of the Rician (non-central chi) magnitude of true value ``value``: from
    ``sigma**2`` where the signal is high down to ``(2 - pi / 2) sigma**2`` (one coil) where
    it is zero."""
    value = np.asarray(value, np.float64)
    return value ** 2 + 2 * coils * sigma ** 2 - rician_mean(value, sigma, coils) ** 2


class DiscrepancyStop(StopRule):
    """Stop member ``b`` once its data MSE <= ``(factor * sigma_b)^2`` (normalised units)."""

    def __init__(self, sigma: np.ndarray, factor: float = STOP_FACTOR):
        self.sigma = np.asarray(sigma, np.float64)
        self.factor = factor
        self.reason = (f"data residual reached {factor:g} x noise sigma "
                       f"(discrepancy rule, factor calibrated by benchmarks/inverse)")
        self._threshold: torch.Tensor | None = None

    def __call__(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        if self._threshold is None:
            self._threshold = torch.as_tensor((self.factor * self.sigma) ** 2,
                                              dtype=loss.dtype, device=loss.device)
        return loss <= self._threshold


def parse_sigma(sigma) -> str | float:
    """``--sigma`` as the one place reads it: ``"auto"``, ``"none"`` or a finite noise level
    > 0 in the scan's units (BadArgumentError otherwise)."""
    if sigma is None or (isinstance(sigma, str) and sigma.lower() in ("auto", "none")):
        return "none" if sigma is None else sigma.lower()
    try:
        value = float(sigma)
    except (TypeError, ValueError):
        raise BadArgumentError(f"--sigma must be auto, none or a noise level > 0, got "
                               f"{sigma!r}") from None
    if not math.isfinite(value) or value < 0:
        raise BadArgumentError(f"--sigma must be a finite noise level > 0, got {sigma}")
    if value == 0:
        raise BadArgumentError("--sigma 0 means a scan without noise: nothing to denoise "
                               "(give the noise level, auto or none)")
    return value


def make_stop_rule(sigma):
    """A factory ``rule(norm_slices, units_per_norm) -> StopRule`` for ``--sigma``, or None.

    ``restore`` calls it per batch of normalised slices, with the scan's intensity units per
    normalised unit (it has computed the scan's normalisation already).

    Args:
        sigma: ``"auto"`` (estimate per slice), ``"none"`` (no rule: run all steps) or a noise
            standard deviation in the scan's intensity units.
    """
    sigma = parse_sigma(sigma)
    if sigma == "none":
        return None

    def rule(norm_slices: np.ndarray, units_per_norm: float) -> DiscrepancyStop:
        if sigma == "auto":
            est = np.array([estimate_sigma(s) for s in norm_slices])
        else:
            est = np.full(len(norm_slices), sigma / units_per_norm)
        return DiscrepancyStop(est)

    return rule
