"""The one intensity policy: how a scan's values map to the [0, 1] the INRs fit, and back.

MR and every modality but CT: robust per-scan percentiles (``[p0.5, p99.5]`` to [0, 1]).
CT (DICOM modality CT, read in Hounsfield units): the fixed window :data:`HU_WINDOW`, on every
path (slices, volumes, pretraining).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import BadInputError
from .scan import Scan

LOW_PCT, HIGH_PCT = 0.5, 99.5
HU_WINDOW = (-1024.0, 3071.0)  # CT: the 12-bit CT range in Hounsfield units maps to [0, 1]


@dataclass
class Intensity:
    """Intensity normalisation to [0, 1]: robust per-scan percentiles (``[p0.5, p99.5]`` maps
    to [0, 1]) for every scan but CT; CT (DICOM modality CT, read in Hounsfield units) uses the
    fixed window ``HU_WINDOW`` instead, with which CT encoders transfer better to unseen CT
    slices (benchmarks/ct_normalization.py)."""

    low: float
    high: float
    method: str = "robust_percentile"

    @classmethod
    def for_scan(cls, scan: Scan, values: np.ndarray | None = None) -> Intensity:
        """The normalisation of ``scan``: ``HU_WINDOW`` for CT, :meth:`of` its data (or of
        ``values``, a subset of it) otherwise."""
        if scan.modality.upper() == "CT":
            return cls(*HU_WINDOW, method="hu_window")
        return cls.of(scan.data if values is None else values)

    @staticmethod
    def rule() -> dict:
        """The normalisation rule as an encoder records it (what :meth:`for_scan` does)."""
        return {**Intensity(0.0, 1.0).to_dict(), "CT": Intensity(*HU_WINDOW, "hu_window")
                .to_dict()}

    @classmethod
    def of(cls, data: np.ndarray) -> Intensity:
        """Robust per-scan percentiles of ``data``."""
        finite = data[np.isfinite(data)]
        if finite.size == 0:
            raise BadInputError("scan has no finite voxel values")
        lo, hi = np.percentile(finite, [LOW_PCT, HIGH_PCT])
        if hi <= lo:
            lo, hi = float(finite.min()), float(finite.max())
        return cls(float(lo), float(hi) if hi > lo else float(lo) + 1.0)

    def forward(self, data: np.ndarray) -> np.ndarray:
        return ((np.asarray(data, np.float32) - self.low) / (self.high - self.low)).astype(
            np.float32)

    def inverse(self, norm: np.ndarray, dtype: np.dtype) -> np.ndarray:
        out = norm.astype(np.float64) * (self.high - self.low) + self.low
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            out = np.clip(np.rint(out), info.min, info.max)
        return out.astype(dtype)

    def to_dict(self) -> dict:
        if self.method == "hu_window":
            return {"method": "fixed_window", "window": list(HU_WINDOW), "units": "HU",
                    "target_range": [0.0, 1.0]}
        return {"method": "robust_percentile", "low_percentile": LOW_PCT,
                "high_percentile": HIGH_PCT, "target_range": [0.0, 1.0]}



def busy_slices(norm: np.ndarray) -> list[int]:
    """Non-empty slices of a normalised scan: > 5% of pixels above 10% of the range."""
    return [z for z in range(norm.shape[0]) if (norm[z] > 0.1).mean() > 0.05]


def pick_slices(norm: np.ndarray, max_slices: int) -> list[int]:
    """Up to ``max_slices`` evenly spaced non-empty slices (indices into axis 0)."""
    busy = busy_slices(norm)
    if not busy:
        return []
    pick = np.unique(np.linspace(0, len(busy) - 1, min(max_slices, len(busy))).round())
    return [busy[int(i)] for i in pick]

