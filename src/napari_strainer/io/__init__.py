"""Medical-scan input/output: DICOM, NIfTI and 2D images in and out of :class:`Scan`.

Public API::

    read_scan(path, *, series=None, volume=None) -> Scan
    write_scan(scan, path, *, overwrite=False, protect=()) -> Path
    describe(path, *, series=None, volume=None) -> dict
    convert(src, dst, *, series=None, volume=None, overwrite=False) -> Path
    find_scans(folder) -> list[Path]
    sample_path(name) -> Path

Conventions: ``Scan.data`` is ``(slice, row, column)``; ``Scan.affine`` maps that voxel index
to RAS+ millimetres (see :mod:`napari_strainer.io.scan`). Readers raise only
:class:`~napari_strainer.errors.BadInputError` (one line naming the file); writers raise
:class:`~napari_strainer.errors.OutputExistsError` for an existing output or an input, and
:class:`~napari_strainer.errors.BadArgumentError` for data a format cannot hold.

Output format is chosen from the path: ``.nii``/``.nii.gz`` NIfTI; ``.png``/``.tif``/
``.tiff`` image; ``.dcm``, an existing folder or a path without suffix: DICOM derived series.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import BadArgumentError, BadInputError, OutputExistsError, StrainerError
from . import dicom, images, nifti
from .atomic import TMP_MARK, atomic_dir, atomic_file, check_output
from .inspect import describe
from .scan import Scan, upsampled_affine

__all__ = [
    "SAMPLES", "Scan", "convert", "describe", "find_scans", "output_kind", "read_scan",
    "sample_path", "upsampled_affine", "write_scan",
]

#: short name -> file or folder under ``sample_data/`` (see sample_data/README.md)
SAMPLES = {
    "mr_brain": "mr_brain.nii.gz",
    "mr_anatomical": "mr_anatomical.nii",
    "ct": "ct_small.dcm",
    "ct_small": "ct_small.dcm",
    "mr_series": "mr_series",
    "mr_multiframe": "mr_multiframe.dcm",
    "ct_enhanced": "ct_enhanced.dcm",
    "ct_j2k": "ct_j2k.dcm",
}


def _path(path: str | os.PathLike) -> Path:
    return Path(os.fspath(path)).expanduser()


def read_scan(path: str | os.PathLike, *, series: str | int | None = None,
              volume: int | None = None) -> Scan:
    """Read a scan from a NIfTI file, a DICOM file or series folder, or a 2D image.

    Args:
        path: ``.nii``/``.nii.gz``; a DICOM file (any name; enhanced multi-frame too); a folder
            of DICOM files; ``.png``/``.tif``/``.tiff``/``.jpg``.
        series: for a folder holding several series: the 1-based number from the listing in
            the error message (or ``describe``), or the SeriesInstanceUID.
        volume: for a 4D NIfTI, the 0-based volume (required when there are several).

    Raises:
        BadInputError: anything wrong with the input, as one line that names it.

    Example:
        >>> scan = read_scan(sample_path("ct"))
        >>> scan.shape
        (1, 128, 128)
    """
    p = _path(path)
    try:
        if not p.exists():
            raise BadInputError(f"{p}: no such file or folder")
        if p.is_dir():
            return dicom.read_dicom_folder(p, series=series)
        if nifti.is_nifti_path(p):
            return nifti.read_nifti(p, volume=volume)
        if p.stat().st_size == 0:
            raise BadInputError(f"{p}: empty file")
        if images.is_image_path(p):
            return images.read_image(p)
        if dicom.is_dicom_file(p):
            return dicom.read_dicom_file(p)
        with open(p, "rb") as f:
            head = f.read(352)
        if head[:2] == b"\x1f\x8b" or head[344:348] in (b"n+1\0", b"ni1\0"):
            return nifti.read_nifti(p, volume=volume)
        raise BadInputError(f"{p}: not a DICOM, NIfTI or image file")
    except StrainerError:
        raise
    except MemoryError:
        raise BadInputError(f"{p}: too large to load") from None
    except Exception as e:  # noqa: BLE001 - unforeseen damage: one line
        text = " ".join(str(e).split())[:160] or type(e).__name__
        raise BadInputError(f"{p}: cannot be read ({type(e).__name__}: {text})") from None


def output_kind(path: str | os.PathLike) -> str:
    """'nifti', 'image', 'dicom-file' or 'dicom-folder', from the output path."""
    p = _path(path)
    name = p.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if p.suffix.lower() in (".png", ".tif", ".tiff", ".jpg", ".jpeg"):
        return "image"
    if p.suffix.lower() == ".dcm" and not p.is_dir():
        return "dicom-file"
    if p.is_dir() or p.suffix == "":
        return "dicom-folder"
    raise BadArgumentError(f"{path}: unknown output type {p.suffix!r}; use .nii.gz, .nii, "
                           ".dcm, .png, .tif or a folder (DICOM series)")


def _only_dicom(folder: Path) -> bool:
    for root, _dirs, files in os.walk(folder):
        for f in files:
            if not dicom.has_dicom_preamble(Path(root) / f):
                return False
    return True


def write_scan(scan: Scan, path: str | os.PathLike, *, overwrite: bool = False,
               protect=()) -> Path:
    """Write ``scan`` atomically; the format follows the path (see the module docstring).

    Args:
        scan: what to write; ``scan.meta["description"]`` names the processing (DICOM
            SeriesDescription, NIfTI descrip).
        path: output file, or folder for a DICOM series.
        overwrite: replace an existing output. Never replaces ``scan.source`` or a path in
            ``protect`` (nor a folder holding one), and never a non-empty folder that holds
            anything but DICOM files.
        protect: further input paths that must not be overwritten.

    Returns:
        The written path.

    Raises:
        OutputExistsError: the output exists (without ``overwrite``) or is an input.
        BadArgumentError: the data cannot be stored in that format (e.g. NaN in DICOM,
            several slices in a PNG).
    """
    p = _path(path)
    kind = output_kind(p)
    protected = [scan.source, *(protect if not isinstance(protect, (str, os.PathLike))
                                else [protect])]
    out = check_output(p, overwrite=overwrite, protect=protected)
    if kind == "dicom-folder" and out.is_dir() and any(out.iterdir()) and not _only_dicom(out):
        raise OutputExistsError(f"{path}: folder holds files that are not DICOM; refusing to "
                                "replace it (choose a new folder)")
    if not out.parent.is_dir():
        raise BadArgumentError(f"{path}: parent folder does not exist")
    data = np.asarray(scan.data)
    if data.ndim != 3 or 0 in data.shape:
        raise BadArgumentError(f"cannot write a scan of shape {data.shape}")
    if kind == "nifti":
        return atomic_file(out, lambda tmp: nifti.write_nifti(scan, tmp))
    if kind == "image":
        suffix = out.suffix.lower()
        return atomic_file(out, lambda tmp: images.write_image(scan, tmp, suffix))
    if kind == "dicom-file":
        return atomic_file(out, lambda tmp: dicom.write_dicom_file(scan, tmp))
    return atomic_dir(out, lambda tmp: dicom.write_dicom_series(scan, tmp))


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, series: str | int | None = None,
            volume: int | None = None, overwrite: bool = False) -> Path:
    """Read ``src`` and write it to ``dst`` (format from the path), geometry unchanged."""
    scan = read_scan(src, series=series, volume=volume)
    if not scan.meta.get("description"):
        scan.meta["description"] = f"{scan.meta.get('series_description') or 'scan'} (converted)"
    return write_scan(scan, dst, overwrite=overwrite, protect=(src,))


def find_scans(folder: str | os.PathLike) -> list[Path]:
    """The scans in ``folder`` (recursively), sorted, for batch processing.

    NIfTI files and 2D images are listed as files; a folder holding single-frame DICOM files is
    listed once (as the folder, read as a series; a folder with several series will ask for
    ``series=`` when read); a multi-frame DICOM file is listed as a file. Hidden files and our
    temporary files are skipped. ``folder`` itself is returned when it is a DICOM series folder.
    """
    root = _path(folder)
    if not root.is_dir():
        raise BadInputError(f"{root}: not a folder")
    found: set[Path] = set()
    dicom_dirs: set[Path] = set()
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and TMP_MARK not in d)
        here = Path(dirpath)
        for name in sorted(files):
            if name.startswith(".") or TMP_MARK in name:
                continue
            f = here / name
            if nifti.is_nifti_path(f) or images.is_image_path(f):
                found.add(f)
            elif name.upper() != "DICOMDIR" and dicom.is_dicom_file(f):
                try:
                    ds = dicom._dcmread(f, header_only=True)
                except BadInputError:
                    continue
                if dicom._non_image_reason(ds) or "Rows" not in ds:
                    continue
                try:
                    frames = int(ds.get("NumberOfFrames") or 1)
                except (TypeError, ValueError):
                    frames = 1
                if frames > 1:
                    found.add(f)
                else:
                    dicom_dirs.add(here)
    return sorted(found | dicom_dirs)


def sample_path(name: str) -> Path:
    """Path of a shipped sample scan by short name (``SAMPLES``) or file name.

    Looks in ``$STRAINER_SAMPLE_DATA`` if set, else in ``sample_data/`` at the repository root.
    """
    fname = SAMPLES.get(name, name)
    roots = []
    if os.environ.get("STRAINER_SAMPLE_DATA"):
        roots.append(Path(os.environ["STRAINER_SAMPLE_DATA"]))
    roots.append(Path(__file__).resolve().parents[3] / "sample_data")
    for r in roots:
        if (r / fname).exists():
            return r / fname
    if name not in SAMPLES and not any((r / name).exists() for r in roots):
        raise BadArgumentError(f"unknown sample {name!r}; choose one of {', '.join(SAMPLES)}")
    raise BadInputError(f"sample {name!r} not found in {', '.join(map(str, roots))} (set "
                        "STRAINER_SAMPLE_DATA to the sample_data folder)")

