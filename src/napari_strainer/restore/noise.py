"""Noise estimation and the stopping rule of INR denoising.

An INR fits the clean structure first and the noise later, so denoising stops each slice
when its data residual (mean squared error against the noisy slice) falls to
``(factor * sigma)^2``. The plain discrepancy principle is ``factor = 1``; the calibrated
factor (``STOP_FACTOR``, chosen by ``benchmarks/inverse``) lets the fit go a little further,
where the best PSNR is on average.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..core.fit import StopRule
from ..errors import BadArgumentError

STOP_FACTOR = 0.85
MAD_TO_SIGMA = 1 / 0.6745


def estimate_sigma(image: np.ndarray) -> float:
    """Noise standard deviation of a 2D image or a 3D volume from the finest Haar detail band
    that is high-pass along every axis (HH, or HHH for a volume; wavelet MAD, Donoho &
    Johnstone): ``median(|band|) / 0.6745``. On a volume the third axis makes the band less
    sensitive to anatomy (brain MRI volumes with added noise: 1-4% high against 5-18% for the
    median of the slices' HH estimates, ``benchmarks/volume.py``)."""
    x = np.asarray(image, np.float64)
    for axis in range(x.ndim):
        even = (x.shape[axis] // 2) * 2
        a = np.take(x, np.arange(0, even, 2), axis)
        b = np.take(x, np.arange(1, even, 2), axis)
        x = (a - b) / np.sqrt(2.0)
    return float(np.median(np.abs(x)) * MAD_TO_SIGMA)


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
