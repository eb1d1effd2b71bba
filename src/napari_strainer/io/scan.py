"""The :class:`Scan` type: voxels plus the geometry and metadata needed to write a faithful result.

Conventions (used by every reader, writer and front end):

* ``data`` is always 3D, ordered ``(slice, row, column)``; a 2D image has one slice.
  Slice-wise processing iterates over axis 0; napari shows the last two axes as the plane.
* ``affine`` is a 4x4 matrix mapping a voxel index ``(slice, row, column, 1)`` of ``data`` to
  world coordinates in millimetres, in **RAS+** (nibabel's convention: +x = patient Right,
  +y = Anterior, +z = Superior). DICOM's LPS+ is converted at the edge by flipping the sign
  of the first two world axes.
* ``meta`` holds what a writer needs to produce a faithful file (original NIfTI layout and
  header, a DICOM template dataset for derived series, modality, intensity dtype).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Scan:
    """A scan read from disk (or produced by processing one).

    Args:
        data: voxel array of shape ``(slices, rows, columns)`` in the scan's intensity units.
        affine: 4x4 voxel-index-to-RAS+ (mm) matrix for ``data``'s axis order.
        meta: format-specific metadata for writers (``"format"``, ``"modality"``, ...).
        source: the path it was read from, if any.

    Example:
        >>> scan = Scan(np.zeros((1, 4, 4), np.float32), np.eye(4))
        >>> scan.spacing
        (1.0, 1.0, 1.0)
    """

    data: np.ndarray
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    meta: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None

    def __post_init__(self) -> None:
        if self.data.ndim == 2:
            self.data = self.data[None]
        if self.data.ndim != 3:
            raise ValueError(f"Scan data must be 2D or 3D, got shape {self.data.shape}")
        self.affine = np.asarray(self.affine, dtype=np.float64)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along ``(slice, row, column)``."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def modality(self) -> str:
        return str(self.meta.get("modality", "OT"))

    @property
    def sources(self) -> list[dict]:
        """What this scan derives from: ``meta["sources"]`` (one per fused stack, each with the
        keys ``source_images, source_affine, series_uid, study_uid``), else its own metadata."""
        return self.meta.get("sources") or [self.meta]

    def derive(self, data: np.ndarray, *, affine: np.ndarray | None = None,
               description: str | None = None, derivation: str | None = None) -> Scan:
        """A new scan with processed ``data`` that keeps this scan's metadata and source link.

        ``description`` names the processing (it becomes the DICOM SeriesDescription);
        ``derivation`` details it, settings included (DICOM DerivationDescription; default:
        the description).
        """
        meta = dict(self.meta)
        if description:
            meta["description"] = description
            meta["derivation"] = derivation or description
        return replace(self, data=data, affine=self.affine if affine is None else affine,
                       meta=meta)


def upsampled_affine(affine: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Affine of a grid refined by integer ``factors`` per axis with pixel centres aligned.

    Each new voxel is ``1/f`` the size, and the first new centre sits ``(f-1)/(2f)`` old voxels
    before the old first centre, so that the new grid covers exactly the same physical extent.
    """
    affine = np.asarray(affine, dtype=np.float64)
    out = affine.copy()
    for axis, f in enumerate(factors):
        out[:3, axis] = affine[:3, axis] / f
        out[:3, 3] -= affine[:3, axis] * (f - 1) / (2 * f)
    return out
