"""napari readers: NIfTI files, DICOM files and DICOM series folders -> image layers."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import StrainerError
from ..io import dicom, nifti, read_scan
from ._layers import scan_to_layer


def _paths(path) -> list[str]:
    return [os.fspath(p) for p in path] if isinstance(path, (list, tuple)) else [
        os.fspath(path)]


def _read(path):
    """Reader function: one image layer per path (errors surface as napari notifications)."""
    return [scan_to_layer(read_scan(p)) for p in _paths(path)]


def get_nifti_reader(path):
    """``*.nii`` / ``*.nii.gz``."""
    paths = _paths(path)
    return _read if paths and all(nifti.is_nifti_path(p) for p in paths) else None


def get_dicom_reader(path):
    """A DICOM file (``*.dcm``, ``*.ima``, ``*.dicom``) or a folder holding a DICOM series."""
    paths = _paths(path)
    if not paths:
        return None
    for p in map(Path, paths):
        if p.is_dir():
            if not _holds_dicom(p):
                return None
        elif not p.is_file() or not dicom.is_dicom_file(p):
            return None
    return _read


def _holds_dicom(folder: Path, limit: int = 200) -> bool:
    seen = 0
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.startswith("."):
                continue
            try:
                if dicom.is_dicom_file(Path(root) / name):
                    return True
            except (OSError, StrainerError):
                pass
            seen += 1
            if seen >= limit:
                return False
    return False
