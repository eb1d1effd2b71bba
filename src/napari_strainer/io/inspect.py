"""``describe``: what a file or folder holds, for ``strainer info`` (no patient fields)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from .scan import Scan


def summarise(scan: Scan) -> dict[str, Any]:
    """Plain-JSON summary of a :class:`Scan` (no patient-identifying DICOM fields)."""
    data = scan.data
    finite = data[np.isfinite(data)] if data.dtype.kind == "f" else data
    try:
        codes = "".join(nib.aff2axcodes(scan.affine))
    except Exception:  # noqa: BLE001
        codes = "???"
    meta = scan.meta
    out: dict[str, Any] = {
        "path": str(scan.source) if scan.source is not None else None,
        "format": meta.get("format"),
        "modality": scan.modality,
        "shape": list(scan.shape),
        "axes": ["slice", "row", "column"],
        "spacing": [round(s, 6) for s in scan.spacing],
        "affine": [[round(float(v), 6) for v in row] for row in scan.affine],
        "orientation": codes,
        "dtype": str(data.dtype),
        "stored_dtype": meta.get("dtype"),
        "intensity_range": [float(finite.min()), float(finite.max())] if finite.size else None,
        "description": meta.get("series_description") or "",
    }
    for key in ("geometry", "nifti_volumes", "volume", "nonfinite_replaced", "rescale",
                "inverted_monochrome1", "converted_from", "n_files", "series_uid",
                "transfer_syntax", "warnings"):
        if meta.get(key) not in (None, "", []):
            value = meta[key]
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


def describe(path: str | Path, *, series: str | int | None = None,
             volume: int | None = None) -> dict[str, Any]:
    """Describe a scan file or folder.

    Keys: ``path, format, modality, shape, axes, spacing, affine`` (voxel ``(slice, row,
    column)`` to RAS+ mm), ``orientation`` (nibabel axis codes of that affine), ``dtype``
    (in memory), ``stored_dtype`` (on disk), ``intensity_range``, ``description`` and, where
    they apply, ``geometry, nifti_volumes, volume, rescale, warnings, ...``. For a folder the
    result also lists every series (``"series"``: number, UID, description, modality, slice
    count); when the folder holds several series and none is chosen, only the listing is
    returned (``"shape"`` is None). A 4D NIfTI without ``volume`` is described by its first
    volume and ``"nifti_volumes"`` says how many there are.
    """
    from . import dicom, nifti, read_scan

    path = Path(path)
    info: dict[str, Any] = {"path": str(path)}
    if path.is_dir():
        entries, skipped = dicom.scan_folder(path)
        info["series"] = [e.as_dict() for e in entries]
        if skipped:
            info["skipped"] = skipped
        if len(entries) > 1 and series is None:
            info.update(format="dicom", shape=None)
            return info
    if volume is None and path.is_file() and nifti.is_nifti_path(path):
        try:
            shape = nib.load(str(path)).shape
        except Exception:  # noqa: BLE001
            shape = ()
        core = list(shape)
        while len(core) > 3 and core[-1] == 1:
            core.pop()
        if len(core) == 4:
            volume = 0
    scan = read_scan(path, series=series, volume=volume)
    return {**summarise(scan), **info}
