"""DICOM reading (single file, enhanced multi-frame, series folders) and derived-series writing.

Reading
    * A *file* is read with pydicom (the ``DICM`` preamble is sniffed; files without it are
      tried with ``force=True`` and accepted only if they carry a SOP Class UID).
    * An *enhanced multi-frame* file takes per-frame geometry and rescale from the Shared and
      Per-frame Functional Groups; a classic multi-frame without them uses the top-level
      geometry (RT Dose: ``GridFrameOffsetVector``).
    * A *folder*: its own DICOM files, or, when it holds none directly, every DICOM file
      below it (an export tree); files are grouped by SeriesInstanceUID (each
      multi-frame file is its own entry). Several series: :class:`BadInputError` lists them,
      pick one with ``series=`` (its number in that listing, or its SeriesInstanceUID).
    * Slices are sorted by ImagePositionPatient projected on the slice normal (row x column
      cosines); when InstanceNumber runs exactly backwards along that order the acquisition
      order is kept (so written series read back identically). Without positions the order is
      InstanceNumber, then file name, and the geometry is *assumed* (warning,
      ``meta["geometry"] == "assumed"``).
    * Slice spacing must be uniform: gaps that differ from their mean by more than 2 % (a
      missing slice, mixed acquisitions), several slices at one position (echoes, time points),
      or several orientations are refused with :class:`BadInputError` -- never silently
      resampled.
    * Values: pixel data decoded by pydicom (compressed syntaxes through the pylibjpeg
      plugins); MONOCHROME1 is inverted to MONOCHROME2 (``meta["inverted_monochrome1"]``);
      colour (RGB, YBR, PALETTE COLOR) becomes luminance; RescaleSlope/Intercept is applied and
      the result is float32 unless every slice has slope 1 and intercept 0 (then the stored
      integer dtype is kept).
    * Objects without an image (SEG, SR, RT Structure Set / Plan, waveforms, presentation
      states, DICOMDIR, ...) are refused with one line naming what they are.

Writing a derived series
    Classic single-frame MR / CT / Secondary Capture files (a folder of ``IM00001.dcm``...), or
    one file for a one-slice scan or a ``.dcm`` target (multi-slice: Multi-frame Grayscale
    Word Secondary Capture with per-frame geometry in functional groups). It carries over
    from the source series: the Patient module (name, ID, birth date, sex, age, de-identification
    flags), the General Study module (Study Instance UID, date, time, ID, accession number,
    referring physician, description), the Frame of Reference UID (a new one when the source's
    geometry was assumed), modality, body part, laterality, patient position, the burned-in
    annotation flag, manufacturer/model and a few MR/CT acquisition parameters. Nothing else
    (no private tags, no overlays, no institution or operator fields). New: SeriesInstanceUID,
    SOPInstanceUIDs, ImageType ``DERIVED\\SECONDARY`` (plus the value 3 that CT and MR need),
    SeriesDescription and DerivationDescription (the processing), SourceImageSequence and
    ReferencedSeriesSequence naming the source image each slice derives from (from every stack
    of a fusion: ``meta["sources"]``), geometry from the affine, 16-bit pixels with
    RescaleSlope/Intercept chosen to keep precision. Every object written validates with David
    Clunie's ``dciodvfy`` without errors of its own (see ``tests/test_dicom_conformance.py``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import itertools
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadArgumentError, BadInputError
from .scan import Scan

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS <-> RAS (its own inverse)
MAX_BYTES = 8 * 1024**3
SPACING_TOL = 0.02  # relative deviation of slice gaps tolerated as "uniform"

MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
SC_MF_WORD = "1.2.840.10008.5.1.4.1.1.7.3"
DICOMDIR_UID = "1.2.840.10008.1.3.10"

_NON_IMAGE_PREFIXES = {
    "1.2.840.10008.5.1.4.1.1.88.": "a structured report (SR)",
    "1.2.840.10008.5.1.4.1.1.9.": "a waveform",
    "1.2.840.10008.5.1.4.1.1.11.": "a presentation state",
    "1.2.840.10008.5.1.4.1.1.66": "a segmentation / registration / raw-data object",
    "1.2.840.10008.5.1.4.1.1.104.": "an encapsulated document",
    "1.2.840.10008.5.1.4.1.1.481.3": "an RT Structure Set",
    "1.2.840.10008.5.1.4.1.1.481.5": "an RT Plan",
    "1.2.840.10008.5.1.4.1.1.481.4": "an RT Treatment Record",
    "1.2.840.10008.5.1.4.1.1.481.6": "an RT Treatment Record",
    "1.2.840.10008.5.1.4.1.1.481.7": "an RT Treatment Record",
    "1.2.840.10008.5.1.4.1.1.481.8": "an RT Ion Plan",
    DICOMDIR_UID: "a DICOMDIR (media directory)",
}

# What a derived series carries over from its source (see the module docstring).
TEMPLATE_KEYWORDS = (
    "SpecificCharacterSet",
    # Patient
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "PatientAge", "PatientIdentityRemoved", "DeidentificationMethod",
    # Study
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
    "ReferringPhysicianName", "StudyDescription",
    # Series / frame of reference / equipment
    "Modality", "BodyPartExamined", "PatientPosition", "Laterality", "ImageLaterality",
    "FrameOfReferenceUID", "ImageType", "BurnedInAnnotation",
    "PositionReferenceIndicator", "Manufacturer", "ManufacturerModelName",
    "SeriesNumber", "SeriesDescription", "SeriesDate", "SeriesTime",
)
# MR / CT acquisition parameters (image-type modules; not written into Secondary Capture)
ACQUISITION_KEYWORDS = (
    "ScanningSequence", "SequenceVariant", "ScanOptions", "MRAcquisitionType",
    "RepetitionTime", "EchoTime", "EchoTrainLength", "MagneticFieldStrength", "FlipAngle",
    "KVP", "ConvolutionKernel", "AcquisitionNumber",
)


# --------------------------------------------------------------------------- helpers

@contextlib.contextmanager
def _quiet():
    """Silence pydicom's warnings and log lines (they can quote element values)."""
    logger = logging.getLogger("pydicom")
    was = logger.disabled
    logger.disabled = True
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        logger.disabled = was


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text.split(" - ")[0][:160]


def _fail(path: Path | str, what: str) -> BadInputError:
    return BadInputError(f"{path}: {what}")


def has_dicom_preamble(path: str | Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def is_dicom_file(path: str | Path) -> bool:
    """True for a file that looks like DICOM (preamble, or a SOP Class UID when forced)."""
    path = Path(path)
    if not path.is_file() or path.name.startswith("."):
        return False
    if has_dicom_preamble(path):
        return True
    if path.suffix.lower() not in ("", ".dcm", ".dicom", ".ima", ".dic"):
        return False
    try:
        import pydicom

        with _quiet():
            ds = pydicom.dcmread(str(path), force=True, stop_before_pixels=True,
                                 specific_tags=["SOPClassUID", "SeriesInstanceUID"])
            uid = str(ds.get("SOPClassUID", "") or "")
    except Exception:  # noqa: BLE001
        return False
    return uid.startswith("1.2.840.10008.")


def _dcmread(path: Path, *, header_only: bool = False):
    import pydicom

    force = not has_dicom_preamble(path)
    try:
        with _quiet() as caught:
            ds = pydicom.dcmread(str(path), force=force, stop_before_pixels=header_only)
            if not header_only:
                # touch every element now so that truncation is found here, not later
                for _ in ds.iterall():
                    pass
    except FileNotFoundError:
        raise _fail(path, "no such file") from None
    except IsADirectoryError:
        raise _fail(path, "is a folder") from None
    except Exception as e:  # noqa: BLE001
        raise _fail(path, f"not a readable DICOM file, truncated or damaged ({_short(e)})"
                    ) from None
    if force and "SOPClassUID" not in ds and "PixelData" not in ds:
        raise _fail(path, "not a DICOM file")
    eof = [str(w.message) for w in caught if "End of file" in str(w.message)
           or "delimiter" in str(w.message)]
    if eof and not header_only:
        raise _fail(path, "truncated or damaged DICOM file (end of file reached inside an "
                          "element)")
    return ds


def _sop_class(ds) -> str:
    uid = ""
    with contextlib.suppress(Exception):
        uid = str(ds.get("SOPClassUID", "") or "")
    if not uid:
        with contextlib.suppress(Exception):
            uid = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "")
    return uid


def _uid_name(uid: str) -> str:
    try:
        from pydicom.uid import UID

        name = UID(uid).name
        return name if name and name != uid else uid
    except Exception:  # noqa: BLE001
        return uid


def _non_image_reason(ds) -> str | None:
    uid = _sop_class(ds)
    if "DirectoryRecordSequence" in ds or uid == DICOMDIR_UID:
        return "a DICOMDIR (media directory)"
    for prefix, what in _NON_IMAGE_PREFIXES.items():
        if uid.startswith(prefix):
            return f"{what} ({_uid_name(uid)})"
    return None


def _check_image(ds, path: Path) -> None:
    reason = _non_image_reason(ds)
    if reason:
        raise _fail(path, f"is {reason}, not an image")
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        what = _uid_name(_sop_class(ds)) or "unknown SOP class"
        image_class = _sop_class(ds).startswith("1.2.840.10008.5.1.4.1.1.")
        hint = "; the file may be truncated" if image_class or "Rows" in ds else ""
        raise _fail(path, f"DICOM without pixel data ({what}){hint}")


def _floats(value, n: int | None = None) -> list[float] | None:
    if value is None:
        return None
    try:
        vals = [float(v) for v in (value if isinstance(value, (list, tuple)) or
                                   hasattr(value, "__iter__") and not isinstance(value, str)
                                   else [value])]
    except (TypeError, ValueError):
        return None
    if n is not None and len(vals) != n:
        return None
    if not all(np.isfinite(vals)):
        return None
    return vals


def _get(ds, keyword: str):
    try:
        return ds.get(keyword)
    except Exception:  # noqa: BLE001
        return None


def _fg(ds, frame: int, seq: str, keyword: str):
    """An attribute from the per-frame functional group ``frame``, else the shared group."""
    for groups, idx in ((_get(ds, "PerFrameFunctionalGroupsSequence"), frame),
                        (_get(ds, "SharedFunctionalGroupsSequence"), 0)):
        if groups is None or idx >= len(groups):
            continue
        item = _get(groups[idx], seq)
        if item is not None and len(item):
            value = _get(item[0], keyword)
            if value is not None and value != "":
                return value
    return None


# --------------------------------------------------------------------------- frames

@dataclass
class _Frame:
    rows: int
    cols: int
    ipp: list[float] | None
    iop: list[float] | None
    spacing: list[float] | None  # (between rows, between columns)
    thickness: float | None
    between: float | None
    slope: float
    intercept: float
    instance: int | None
    path: Path
    index: int  # frame index in its file
    ref: tuple[str, str, int | None] = ("", "", None)  # SOP class, SOP instance, frame number
    pixels: np.ndarray | None = None


def _num(value) -> float | None:
    v = _floats(value, 1)
    return v[0] if v else None


def _frames_of(ds, path: Path) -> list[_Frame]:
    rows, cols = int(_get(ds, "Rows") or 0), int(_get(ds, "Columns") or 0)
    if rows <= 0 or cols <= 0:
        raise _fail(path, f"has a zero-sized image ({rows} x {cols})")
    try:
        n = int(_get(ds, "NumberOfFrames") or 1)
    except (TypeError, ValueError):
        raise _fail(path, "has an invalid NumberOfFrames") from None
    if n <= 0:
        raise _fail(path, "has zero frames")
    spp = int(_get(ds, "SamplesPerPixel") or 1)
    bits = int(_get(ds, "BitsAllocated") or 16)
    if rows * cols * n * max(spp, 1) * max(bits // 8, 1) > MAX_BYTES:
        raise _fail(path, f"too large ({n} x {rows} x {cols})")
    instance = None
    with contextlib.suppress(Exception):
        instance = int(_get(ds, "InstanceNumber"))
    top_ipp = _floats(_get(ds, "ImagePositionPatient"), 3)
    top_iop = _floats(_get(ds, "ImageOrientationPatient"), 6)
    top_sp = _floats(_get(ds, "PixelSpacing"), 2) or _floats(_get(ds, "ImagerPixelSpacing"), 2)
    top_th = _num(_get(ds, "SliceThickness"))
    top_bt = _num(_get(ds, "SpacingBetweenSlices"))
    top_slope = _num(_get(ds, "RescaleSlope"))
    top_inter = _num(_get(ds, "RescaleIntercept"))
    enhanced = _get(ds, "PerFrameFunctionalGroupsSequence") is not None or \
        _get(ds, "SharedFunctionalGroupsSequence") is not None
    offsets = _floats(_get(ds, "GridFrameOffsetVector"))
    sop = (_sop_class(ds), str(_get(ds, "SOPInstanceUID") or ""))
    frames = []
    for f in range(n):
        ipp, iop, sp, th, bt, slope, inter = top_ipp, top_iop, top_sp, top_th, top_bt, \
            top_slope, top_inter
        if enhanced:
            ipp = _floats(_fg(ds, f, "PlanePositionSequence", "ImagePositionPatient"), 3) or ipp
            iop = _floats(_fg(ds, f, "PlaneOrientationSequence", "ImageOrientationPatient"),
                          6) or iop
            sp = _floats(_fg(ds, f, "PixelMeasuresSequence", "PixelSpacing"), 2) or sp
            th = _num(_fg(ds, f, "PixelMeasuresSequence", "SliceThickness")) or th
            bt = _num(_fg(ds, f, "PixelMeasuresSequence", "SpacingBetweenSlices")) or bt
            s = _num(_fg(ds, f, "PixelValueTransformationSequence", "RescaleSlope"))
            i = _num(_fg(ds, f, "PixelValueTransformationSequence", "RescaleIntercept"))
            slope = s if s is not None else slope
            inter = i if i is not None else inter
        elif n > 1 and ipp is not None and iop is not None:
            normal = np.cross(iop[:3], iop[3:])
            if offsets is not None and len(offsets) == n:
                step = offsets[f]
            else:
                step = f * (bt or th or 1.0)
            ipp = list(np.asarray(ipp) + normal * step)
        if slope is None or slope == 0:
            slope = 1.0
        frames.append(_Frame(rows, cols, ipp, iop, sp, th, bt, float(slope),
                             float(inter or 0.0), instance if n == 1 else f + 1, path, f,
                             (*sop, f + 1 if n > 1 else None)))
    return frames


def _pixels(ds, path: Path, meta: dict) -> np.ndarray:
    """Stored values as (frames, rows, cols), MONOCHROME1 inverted, colour to luminance."""
    try:
        with _quiet():
            arr = ds.pixel_array
    except MemoryError:
        raise _fail(path, "pixel data too large to decode") from None
    except Exception as e:  # noqa: BLE001
        ts = ""
        with contextlib.suppress(Exception):
            ts = ds.file_meta.TransferSyntaxUID.name
        what = f" ({ts})" if ts else ""
        raise _fail(path, f"pixel data cannot be decoded{what}: {_short(e)}") from None
    arr = np.asarray(arr)
    n = int(_get(ds, "NumberOfFrames") or 1)
    photometric = str(_get(ds, "PhotometricInterpretation") or "MONOCHROME2").strip().upper()
    spp = int(_get(ds, "SamplesPerPixel") or 1)
    meta["photometric"] = photometric
    if photometric == "PALETTE COLOR":
        try:
            from pydicom.pixels import apply_color_lut

            with _quiet():
                arr = apply_color_lut(arr, ds)
        except Exception as e:  # noqa: BLE001
            raise _fail(path, f"palette colour cannot be applied ({_short(e)})") from None
        spp = 3
    if spp >= 3 or (arr.ndim >= 3 and arr.shape[-1] == 3 and photometric not in
                    ("MONOCHROME1", "MONOCHROME2")):
        meta["converted_from"] = photometric
        arr = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[0] != n:
        raise _fail(path, f"decoded pixel data has an unexpected shape {arr.shape}")
    if photometric == "MONOCHROME1":
        bits = int(_get(ds, "BitsStored") or arr.dtype.itemsize * 8)
        if arr.dtype.kind == "u":
            arr = (2**bits - 1) - arr.astype(np.int64)
            arr = arr.astype(np.uint16 if bits <= 16 else np.uint32)
        elif arr.dtype.kind == "i":
            arr = (-1 - arr.astype(np.int64)).astype(arr.dtype)
        else:
            arr = arr.max() + arr.min() - arr
        meta["inverted_monochrome1"] = True
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


# --------------------------------------------------------------------------- assembly

def _template(ds):
    from pydicom.dataset import Dataset

    tpl = Dataset()
    for kw in TEMPLATE_KEYWORDS + ACQUISITION_KEYWORDS:
        with contextlib.suppress(Exception):
            if kw in ds:
                tpl.add(ds[kw])
    frame_laterality = _fg(ds, 0, "FrameAnatomySequence", "FrameLaterality")  # enhanced
    if "ImageLaterality" not in tpl and frame_laterality in ("R", "L", "U", "B"):
        tpl.ImageLaterality = frame_laterality
    return tpl


def _unit(v: np.ndarray, what: str, path: Path) -> np.ndarray:
    n = float(np.linalg.norm(v))
    if not np.isfinite(n) or n < 1e-6:
        raise _fail(path, f"ImageOrientationPatient has a degenerate {what} cosine")
    return v / n


def _assemble(frames: list[_Frame], path: Path, meta: dict) -> tuple[np.ndarray, np.ndarray]:
    """Sort frames in space, check the geometry and return ``(data, ras_affine)``."""
    shapes = {(f.rows, f.cols) for f in frames}
    for f in frames:
        if f.pixels is not None and f.pixels.shape != (f.rows, f.cols):
            raise _fail(f.path, "pixel data does not match Rows/Columns")
    if len(shapes) > 1:
        raise _fail(path, f"slices have different sizes {sorted(shapes)}; not one volume")
    geometric = all(f.ipp is not None and f.iop is not None for f in frames)
    sp = frames[0].spacing or [1.0, 1.0]
    if not all(s > 0 for s in sp):
        sp = [1.0, 1.0]
    if geometric:
        iops = np.array([f.iop for f in frames])
        if np.abs(iops - iops[0]).max() > 1e-3:
            raise _fail(path, "slices have different orientations (a localiser or several "
                              "stacks); not one volume")
        r = _unit(np.asarray(frames[0].iop[:3]), "row", path)
        c = _unit(np.asarray(frames[0].iop[3:]), "column", path)
        normal = np.cross(r, c)
        if np.linalg.norm(normal) < 1e-3:
            raise _fail(path, "ImageOrientationPatient row and column cosines are parallel")
        normal /= np.linalg.norm(normal)
        pos = np.array([f.ipp for f in frames], dtype=np.float64)
        proj = pos @ normal
        keys = [(p, f.instance if f.instance is not None else 0, str(f.path), f.index)
                for p, f in zip(proj, frames)]
        order = sorted(range(len(frames)), key=lambda k: keys[k])
        inst = [frames[k].instance for k in order]
        if len(order) > 1 and None not in inst and all(a > b for a, b in itertools.pairwise(inst)):
            order = order[::-1]
        frames = [frames[k] for k in order]
        pos = pos[order]
        if len(frames) > 1:
            gaps = np.diff(pos @ normal)
            total = pos[-1] - pos[0]
            step = total / (len(frames) - 1)
            dist = float(np.linalg.norm(step))
            if np.min(np.abs(gaps)) < 1e-4 * max(dist, 1.0) or dist < 1e-6:
                n_pos = len(np.unique(np.round(proj, 3)))
                raise _fail(path, f"{len(frames)} slices at only {n_pos} positions (several "
                                  "echoes, time points or stacks in one series); not supported")
            expected = pos[0] + np.outer(np.arange(len(frames)), step)
            dev = np.linalg.norm(pos - expected, axis=1).max()
            if dev > SPACING_TOL * dist:
                ag = np.abs(gaps)
                raise _fail(path, f"slice spacing is not uniform (gaps {ag.min():.4g} to "
                                  f"{ag.max():.4g} mm over {len(frames)} slices: a missing "
                                  "slice or mixed acquisitions); not resampled")
        else:
            thick = frames[0].between or frames[0].thickness or 1.0
            step = normal * thick
        meta["geometry"] = "patient"
        origin = pos[0]
    else:
        frames = sorted(frames, key=lambda f: (f.instance if f.instance is not None else 0,
                                               str(f.path), f.index))
        r, c = np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
        thick = frames[0].between or frames[0].thickness or 1.0
        step = np.array([0, 0, thick])
        origin = np.zeros(3)
        meta["geometry"] = "assumed"
        msg = (f"{path}: no patient geometry (ImagePositionPatient/ImageOrientationPatient); "
               f"assuming axial slices, {sp[0]:g} x {sp[1]:g} mm pixels, {thick:g} mm apart")
        meta.setdefault("warnings", []).append(msg)
        warnings.warn(msg, UserWarning, stacklevel=4)
    affine = np.eye(4)
    affine[:3, 0] = step
    affine[:3, 1] = c * sp[0]
    affine[:3, 2] = r * sp[1]
    affine[:3, 3] = origin
    affine = LPS @ affine
    meta["source_images"] = [f.ref for f in frames]  # in slice order, for derived references
    meta["source_affine"] = affine
    meta["slice_thickness"] = frames[0].thickness
    meta["slice_spacing"] = float(np.linalg.norm(step))

    stored = np.stack([f.pixels for f in frames])
    slopes = np.array([f.slope for f in frames])
    inters = np.array([f.intercept for f in frames])
    meta["dtype"] = stored.dtype.name
    if np.all(slopes == 1.0) and np.all(inters == 0.0) and stored.dtype.kind in "iu":
        data = stored
    else:
        data = stored.astype(np.float32) * slopes.astype(np.float32)[:, None, None] + \
            inters.astype(np.float32)[:, None, None]
        if len(set(slopes)) == 1 and len(set(inters)) == 1:
            meta["rescale"] = (float(slopes[0]), float(inters[0]))
        else:
            meta["rescale"] = "per-slice"
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise _fail(path, "rescaled values are not finite (bad RescaleSlope/Intercept)")
    if data.dtype == np.float64:
        data = data.astype(np.float32)
    return np.ascontiguousarray(data), affine


def _base_meta(ds, path: Path) -> dict:
    def text(kw):
        v = _get(ds, kw)
        return "" if v is None else str(v)

    ts = ""
    with contextlib.suppress(Exception):
        ts = str(ds.file_meta.TransferSyntaxUID)
    return {"format": "dicom", "modality": text("Modality") or "OT", "description": None,
            "series_description": text("SeriesDescription"),
            "series_uid": text("SeriesInstanceUID"), "study_uid": text("StudyInstanceUID"),
            "series_number": text("SeriesNumber"), "sop_class": _sop_class(ds),
            "transfer_syntax": ts, "dicom_template": _template(ds)}


def read_dicom_file(path: str | Path) -> Scan:
    """One DICOM file: a single image or a (enhanced) multi-frame volume."""
    path = Path(path)
    ds = _dcmread(path)
    _check_image(ds, path)
    meta = _base_meta(ds, path)
    frames = _frames_of(ds, path)
    pixels = _pixels(ds, path, meta)
    for f in frames:
        f.pixels = pixels[f.index]
    data, affine = _assemble(frames, path, meta)
    meta["n_files"] = 1
    return Scan(data, affine, meta, path)


# --------------------------------------------------------------------------- folders

@dataclass
class SeriesEntry:
    """One series found in a folder (``number`` is 1-based, in listing order)."""

    number: int
    uid: str
    description: str
    modality: str
    slices: int
    files: list[Path] = field(default_factory=list)
    series_number: int | None = None
    multiframe: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"number": self.number, "uid": self.uid, "description": self.description,
                "modality": self.modality, "slices": self.slices, "files": len(self.files)}


def _walk_files(folder: Path) -> list[Path]:
    """The files of ``folder`` itself when it holds DICOM files, else of its whole tree."""
    direct = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if any(is_dicom_file(p) for p in direct if p.name.upper() != "DICOMDIR"):
        return direct
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [Path(root) / f for f in sorted(files) if not f.startswith(".")]
    return out


def scan_folder(folder: str | Path) -> tuple[list[SeriesEntry], dict[str, int]]:
    """Group the DICOM image files under ``folder`` into series.

    Returns the entries and a count of skipped objects by kind (non-image DICOM, unreadable).
    """
    folder = Path(folder)
    groups: dict[str, list] = {}
    skipped: dict[str, int] = {}
    for p in _walk_files(folder):
        if p.name.upper() == "DICOMDIR" or not is_dicom_file(p):
            if p.name.upper() == "DICOMDIR":
                skipped["DICOMDIR"] = skipped.get("DICOMDIR", 0) + 1
            continue
        try:
            ds = _dcmread(p, header_only=True)
        except BadInputError:
            skipped["unreadable"] = skipped.get("unreadable", 0) + 1
            continue
        reason = _non_image_reason(ds)
        if reason or "Rows" not in ds:
            key = (reason or "no image").split(" (")[0].removeprefix("a ").removeprefix("an ")
            skipped[key] = skipped.get(key, 0) + 1
            continue
        try:
            nf = int(_get(ds, "NumberOfFrames") or 1)
        except (TypeError, ValueError):
            nf = 1
        uid = str(_get(ds, "SeriesInstanceUID") or "") or f"(no UID) {p.parent}"
        key = f"{uid}\0{p}" if nf > 1 else uid
        groups.setdefault(key, []).append((p, ds, nf))
    entries = []
    for key, items in groups.items():
        ds = items[0][1]
        try:
            sn = int(_get(ds, "SeriesNumber"))
        except (TypeError, ValueError):
            sn = None
        entries.append(SeriesEntry(0, key.split("\0")[0], str(_get(ds, "SeriesDescription") or ""),
                                   str(_get(ds, "Modality") or "OT"),
                                   sum(nf for _, _, nf in items), [p for p, _, _ in items], sn,
                                   items[0][2] > 1))
    entries.sort(key=lambda e: (e.series_number if e.series_number is not None else 1 << 30,
                                e.uid, str(e.files[0])))
    for i, e in enumerate(entries, 1):
        e.number = i
    return entries, skipped


def series_listing(entries: list[SeriesEntry]) -> str:
    return "; ".join(f"{e.number}) {e.uid} {e.modality} '{e.description}' {e.slices} slices"
                     for e in entries)


def pick_series(folder: Path, entries: list[SeriesEntry], series: str | int | None,
                skipped: dict[str, int]) -> SeriesEntry:
    if not entries:
        if skipped:
            found = ", ".join(f"{n} {k}" for k, n in sorted(skipped.items()))
            raise _fail(folder, f"holds no DICOM image (found {found})")
        raise _fail(folder, "holds no DICOM files (empty folder or other file types)")
    if series is None or str(series).strip() == "":
        if len(entries) == 1:
            return entries[0]
        raise _fail(folder, f"holds {len(entries)} DICOM series; pick one with --series "
                            f"NUMBER or UID: {series_listing(entries)}")
    text = str(series).strip()
    if text.isdigit() and not (len(text) > 3 and "." in text):
        k = int(text)
        if 1 <= k <= len(entries):
            return entries[k - 1]
    matches = [e for e in entries if e.uid == text]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise _fail(folder, f"series UID {text} names {len(matches)} multi-frame files; pick "
                            f"one by number: {series_listing(entries)}")
    raise _fail(folder, f"no series {text!r}; choose a number 1..{len(entries)} or a UID: "
                        f"{series_listing(entries)}")


def read_dicom_folder(folder: str | Path, *, series: str | int | None = None) -> Scan:
    folder = Path(folder)
    entries, skipped = scan_folder(folder)
    entry = pick_series(folder, entries, series, skipped)
    if entry.multiframe:
        scan = read_dicom_file(entry.files[0])
        scan.meta["series_number_in_folder"] = entry.number
        return scan
    frames: list[_Frame] = []
    meta: dict = {}
    first = None
    for p in entry.files:
        ds = _dcmread(p)
        _check_image(ds, p)
        fmeta: dict = {}
        fr = _frames_of(ds, p)
        px = _pixels(ds, p, fmeta)
        fr[0].pixels = px[0]
        frames.append(fr[0])
        if first is None:
            first = ds
            meta = _base_meta(ds, folder)
        for k in ("inverted_monochrome1", "converted_from", "photometric"):
            if k in fmeta:
                meta[k] = fmeta[k]
    dtypes = {f.pixels.dtype for f in frames}
    if len(dtypes) > 1:
        common = np.result_type(*dtypes)
        for f in frames:
            f.pixels = f.pixels.astype(common)
    data, affine = _assemble(frames, folder, meta)
    # the template comes from the first slice in space (deterministic under shuffling)
    meta["dicom_template"] = _template(_dcmread(frames[0].path, header_only=True))
    meta["n_files"] = len(entry.files)
    meta["series_number_in_folder"] = entry.number
    return Scan(data, affine, meta, folder)


def read_dicom(path: str | Path, *, series: str | int | None = None) -> Scan:
    path = Path(path)
    if path.is_dir():
        return read_dicom_folder(path, series=series)
    return read_dicom_file(path)


# --------------------------------------------------------------------------- writing

def _ds_number(x: float) -> str:
    from pydicom.valuerep import format_number_as_ds

    return format_number_as_ds(float(x)) if not float(x).is_integer() or abs(x) >= 1e15 \
        else str(int(x))


def quantise(data: np.ndarray) -> tuple[np.ndarray, float, float]:
    """16-bit stored values plus (slope, intercept) that reproduce ``data`` closely.

    Integer-valued data that fits 16 bits is stored exactly (slope 1); other data is mapped
    onto the full uint16 range (quantisation step ``(max - min) / 65535``).
    """
    data = np.asarray(data)
    if data.size == 0:
        raise BadArgumentError("cannot write an empty scan")
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise BadArgumentError("cannot write a scan holding NaN/Inf values as DICOM")
    lo, hi = float(data.min()), float(data.max())
    integral = data.dtype.kind in "iub" or bool(np.all(data == np.round(data)))
    if integral:
        if lo >= 0 and hi <= 65535:
            return data.astype(np.uint16), 1.0, 0.0
        if lo >= -32768 and hi <= 32767:
            return data.astype(np.int16), 1.0, 0.0
        if hi - lo <= 65535:
            return (data.astype(np.float64) - lo).astype(np.uint16), 1.0, lo
    inter = float(_ds_number(lo))
    slope = float(_ds_number((hi - lo) / 65535.0)) if hi > lo else 1.0
    if slope <= 0:
        slope = 1.0
    stored = np.clip(np.rint((data.astype(np.float64) - inter) / slope), 0, 65535)
    return stored.astype(np.uint16), slope, inter


def _geometry(affine: np.ndarray, n: int) -> tuple[list[float], list[np.ndarray], list[float],
                                                   float, np.ndarray]:
    """IOP, per-slice IPP, PixelSpacing, slice spacing and normal from a RAS affine."""
    a = LPS @ np.asarray(affine, np.float64)
    col, row, step = a[:3, 2], a[:3, 1], a[:3, 0]
    dc, dr = float(np.linalg.norm(col)), float(np.linalg.norm(row))
    if dc <= 0 or dr <= 0:
        raise BadArgumentError("the scan's affine has a zero pixel size; cannot write DICOM")
    r, c = col / dc, row / dr
    if abs(float(r @ c)) > 1e-4:
        raise BadArgumentError("the scan's affine shears rows against columns; DICOM cannot "
                               "store it (write NIfTI instead)")
    iop = [float(v) for v in np.concatenate([r, c])]
    ipps = [a[:3, 3] + k * step for k in range(n)]
    normal = np.cross(r, c)
    return iop, ipps, [dr, dc], float(np.linalg.norm(step)), normal


def _fmt(values) -> list[str]:
    return [_ds_number(round(float(v), 6)) for v in values]


def _item(**attributes):
    """A one-item Sequence holding ``attributes``."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    it = Dataset()
    for k, v in attributes.items():
        setattr(it, k, v)
    return Sequence([it])


def _values(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def _image_type(source_type, source_class: str, sop_class: str) -> list[str]:
    """``DERIVED\\SECONDARY`` plus the value 3 that the CT and MR image IODs require.

    The source's value 3 is kept when it means the same in the target IOD (CT: AXIAL or
    LOCALIZER; MR: a classic MR source), else AXIAL (CT) or OTHER (MR).
    """
    third = (_values(source_type)[2:3] or [""])[0].strip().upper()
    if sop_class == CT_STORAGE:
        return ["DERIVED", "SECONDARY", third if third in ("AXIAL", "LOCALIZER") else "AXIAL"]
    if sop_class == MR_STORAGE:
        return ["DERIVED", "SECONDARY", third if third and source_class == MR_STORAGE
                else "OTHER"]
    return ["DERIVED", "SECONDARY"]


def patient_orientation(iop) -> list[str]:
    """PatientOrientation (row direction, column direction) from ImageOrientationPatient.

    Letters L/R, P/A, H/F for the LPS axes, strongest first (several letters when oblique).
    """
    out = []
    for v in (np.asarray(iop[:3], float), np.asarray(iop[3:], float)):
        order = np.argsort(-np.abs(v), kind="stable")
        out.append("".join(("LR", "PA", "HF")[i][0 if v[i] > 0 else 1] for i in order
                           if abs(v[i]) > 1e-4))
    return out


def _nearest(src: dict, scan: Scan, n: int) -> list[tuple[str, str, int | None] | None]:
    """For each of the ``n`` output slices, the slice of source ``src`` whose centre is nearest
    along the source's slice axis to the output slice's centre, or None (outside the source or
    no source images)."""
    refs, src_affine = src.get("source_images"), src.get("source_affine")
    if not refs or src_affine is None or not all(r[1] for r in refs):
        return [None] * n
    rows, cols = scan.data.shape[1:]
    centres = np.array([[k, (rows - 1) / 2, (cols - 1) / 2, 1.0] for k in range(n)])
    idx = (np.linalg.inv(np.asarray(src_affine, float)) @ (scan.affine @ centres.T))[0]
    return [refs[round(i)] if -0.5 <= i <= len(refs) - 0.5 else None for i in idx]


def _source_refs(scan: Scan, n: int) -> list[list[tuple[int, tuple[str, str, int | None]]]]:
    """For each of the ``n`` output slices, ``(source number, source image)`` pairs: from each
    source (:attr:`Scan.sources`) the slice it derives from, by :func:`_nearest` (the same
    slice when the geometry is kept; super-resolution and resampling map onto the slice they
    lie in)."""
    per_source = [_nearest(src, scan, n) for src in scan.sources]
    return [[(j, refs[k]) for j, refs in enumerate(per_source) if refs[k] is not None]
            for k in range(n)]


def _add_references(ds, scan: Scan, refs) -> None:
    """SourceImageSequence and ReferencedSeriesSequence pointing back at the source images
    ``refs`` (``(source number, image)`` pairs from :func:`_source_refs`)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    refs = list(dict.fromkeys(refs))
    if not refs:
        return
    purpose = _item(CodeValue="121322", CodingSchemeDesignator="DCM",
                    CodeMeaning="Source image for image processing operation")
    items = []
    for cls, uid, frame in dict.fromkeys(r for _, r in refs):
        it = Dataset()
        it.ReferencedSOPClassUID = cls
        it.ReferencedSOPInstanceUID = uid
        if frame is not None:
            it.ReferencedFrameNumber = str(frame)
        it.PurposeOfReferenceCodeSequence = purpose
        items.append(it)
    ds.SourceImageSequence = Sequence(items)
    sources = scan.sources
    by_series: dict[str, dict] = {}  # series UID -> its referenced (class, instance) pairs
    for j, (cls, uid, _) in refs:
        series = str(sources[j].get("series_uid") or "")
        if series and sources[j].get("study_uid") == ds.StudyInstanceUID:  # Type 1C
            by_series.setdefault(series, {})[cls, uid] = None
    series_items = []
    for series, pairs in by_series.items():
        instances = []
        for cls, uid in pairs:
            it = Dataset()
            it.ReferencedSOPClassUID = cls
            it.ReferencedSOPInstanceUID = uid
            instances.append(it)
        it = Dataset()
        it.SeriesInstanceUID = series
        it.ReferencedInstanceSequence = Sequence(instances)
        series_items.append(it)
    if series_items:
        ds.ReferencedSeriesSequence = Sequence(series_items)


def _new_dataset(scan: Scan, sop_class: str, series_uid: str, study_uid: str, for_uid: str,
                 now: _dt.datetime):
    """One instance of a derived series; ``now`` is the series' creation time (one per series,
    so that converters do not split the series on differing dates and times)."""
    import copy

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    tpl = scan.meta.get("dicom_template")
    ds = Dataset()
    if tpl is not None:
        for elem in tpl:
            ds.add(copy.deepcopy(elem))  # never modify the source's template
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    if "StudyInstanceUID" not in ds:  # a new study, made now
        ds.StudyDate, ds.StudyTime = date, time
    modality = str(scan.meta.get("modality") or ds.get("Modality") or "OT")
    ds.SpecificCharacterSet = ds.get("SpecificCharacterSet") or "ISO_IR 100"
    ds.SOPClassUID = sop_class
    sop = generate_uid()
    ds.SOPInstanceUID = sop
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
               "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
               "PositionReferenceIndicator", "Manufacturer"):
        if kw not in ds:
            setattr(ds, kw, "")
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = for_uid
    ds.Modality = modality
    if "Laterality" not in ds and "ImageLaterality" not in ds and \
            not str(ds.get("BodyPartExamined") or "").strip():
        ds.Laterality = ""  # Type 2C: the body part, hence its laterality, is unknown
    try:
        src_number = int(ds.get("SeriesNumber") or 0)
    except (TypeError, ValueError):
        src_number = 0
    ds.SeriesNumber = str(src_number + 1000 if src_number else 1000)
    desc = scan.meta.get("description") or (
        f"{scan.meta.get('series_description') or 'scan'} (napari-strainer)")
    ds.SeriesDescription = str(desc)[:64]
    ds.DerivationDescription = str(scan.meta.get("derivation") or desc)[:1024]
    ds.ImageType = _image_type(ds.get("ImageType"), scan.meta.get("sop_class", ""), sop_class)
    ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = date
    ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = time
    ds.SoftwareVersions = "napari-strainer"
    if sop_class in (MR_STORAGE, CT_STORAGE) and "PatientPosition" not in ds:
        ds.PatientPosition = ""
    if sop_class == MR_STORAGE:
        for kw, default in (("ScanningSequence", "RM"), ("SequenceVariant", "NONE"),
                            ("ScanOptions", ""), ("MRAcquisitionType", ""),
                            ("RepetitionTime", ""), ("EchoTime", ""), ("EchoTrainLength", "")):
            if kw not in ds or ds[kw].value in (None, ""):
                setattr(ds, kw, default)
    if sop_class == CT_STORAGE:
        for kw in ("KVP", "AcquisitionNumber"):
            if kw not in ds:
                setattr(ds, kw, "")
    if sop_class in (SC_STORAGE, SC_MF_WORD):
        ds.ConversionType = "WSD"
        for kw in ACQUISITION_KEYWORDS:
            if kw in ds:
                delattr(ds, kw)
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = sop_class
    fm.MediaStorageSOPInstanceUID = sop
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    fm.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = fm
    return ds


def _set_pixels(ds, stored: np.ndarray, slope: float, inter: float, lo: float, hi: float):
    from pydicom.uid import ExplicitVRLittleEndian

    frames = stored if stored.ndim == 3 else stored[None]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(frames.shape[1]), int(frames.shape[2])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if stored.dtype == np.int16 else 0
    # The MR IOD has no Modality LUT: rescale only when the values need it (warned as such).
    if ds.SOPClassUID != MR_STORAGE or slope != 1.0 or inter != 0.0:
        ds.RescaleSlope = _ds_number(slope)
        ds.RescaleIntercept = _ds_number(inter)
        if ds.SOPClassUID != MR_STORAGE:
            ds.RescaleType = "HU" if ds.SOPClassUID == CT_STORAGE else "US"
    ds.WindowCenter = _ds_number(round((lo + hi) / 2, 4))
    ds.WindowWidth = _ds_number(round(max(hi - lo, 1.0), 4))
    ds.PixelData = np.ascontiguousarray(stored.astype(stored.dtype.newbyteorder("<"))).tobytes()
    ds["PixelData"].VR = "OW"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian


def _save(ds, path: Path) -> None:
    with _quiet():
        ds.save_as(str(path), enforce_file_format=True)


def _uids(scan: Scan) -> tuple[str, str, str]:
    """New series UID; the source's study UID and, unless its geometry was assumed, its Frame
    of Reference UID (new ones for a source that has none)."""
    from pydicom.uid import generate_uid

    tpl = scan.meta.get("dicom_template")
    study = str(tpl.get("StudyInstanceUID", "") or "") if tpl is not None else ""
    frame = str(tpl.get("FrameOfReferenceUID", "") or "") if tpl is not None else ""
    if scan.meta.get("geometry") == "assumed":
        frame = ""
    return generate_uid(), study or generate_uid(), frame or generate_uid()


def _sop_for(scan: Scan) -> str:
    modality = str(scan.meta.get("modality") or "").upper()
    return {"MR": MR_STORAGE, "CT": CT_STORAGE}.get(modality, SC_STORAGE)


def _thickness(scan: Scan, spacing: float) -> float:
    th, sp = scan.meta.get("slice_thickness"), scan.meta.get("slice_spacing")
    if th and sp and abs(float(sp) - spacing) < 1e-4 * max(spacing, 1.0):
        return float(th)
    return spacing


def write_dicom_series(scan: Scan, folder: Path) -> None:
    """One classic single-frame file per slice (``IM00001.dcm``...) into ``folder``."""
    data = np.asarray(scan.data)
    stored, slope, inter = quantise(data)
    lo, hi = float(data.min()), float(data.max())
    n = data.shape[0]
    iop, ipps, spacing, step, normal = _geometry(scan.affine, n)
    if n == 1:
        step = float(scan.meta.get("slice_spacing") or scan.spacing[0] or 1.0)
    series_uid, study_uid, for_uid = _uids(scan)
    sop = _sop_for(scan)
    refs = _source_refs(scan, n)
    now = _dt.datetime.now()
    for k in range(n):
        ds = _new_dataset(scan, sop, series_uid, study_uid, for_uid, now)
        ds.InstanceNumber = str(k + 1)
        if sop == SC_STORAGE:  # no Image Plane module in the SC IOD: Type 2C
            ds.PatientOrientation = patient_orientation(iop)
        ds.ImagePositionPatient = _fmt(ipps[k])
        ds.ImageOrientationPatient = _fmt(iop)
        ds.PixelSpacing = _fmt(spacing)
        ds.SliceThickness = _ds_number(round(_thickness(scan, step), 6))
        ds.SpacingBetweenSlices = _ds_number(round(step, 6))
        ds.SliceLocation = _ds_number(round(float(ipps[k] @ normal), 6))
        _add_references(ds, scan, refs[k])
        _set_pixels(ds, stored[k], slope, inter, lo, hi)
        _save(ds, folder / f"IM{k + 1:05d}.dcm")


def write_dicom_file(scan: Scan, path: Path) -> None:
    """One file: a classic image for one slice, else a multi-frame Secondary Capture."""
    data = np.asarray(scan.data)
    n = data.shape[0]
    if n == 1:
        import tempfile

        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".strainer-tmp-") as tmp:
            write_dicom_series(scan, Path(tmp))
            os.replace(Path(tmp) / "IM00001.dcm", path)
        return
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.tag import Tag

    stored, slope, inter = quantise(data)
    if stored.dtype == np.int16:  # the multi-frame word SC IOD wants unsigned pixels
        stored = (stored.astype(np.int32) + 32768).astype(np.uint16)
        inter -= 32768 * slope
    lo, hi = float(data.min()), float(data.max())
    iop, ipps, spacing, step, normal = _geometry(scan.affine, n)
    series_uid, study_uid, for_uid = _uids(scan)
    ds = _new_dataset(scan, SC_MF_WORD, series_uid, study_uid, for_uid, _dt.datetime.now())
    ds.InstanceNumber = "1"
    ds.PatientOrientation = patient_orientation(iop)
    ds.PresentationLUTShape = "IDENTITY"
    # Type 1 here: the source's answer (text burned into its pixels survives processing)
    ds.BurnedInAnnotation = str(ds.get("BurnedInAnnotation") or "NO")
    ds.NumberOfFrames = str(n)
    ds.FrameIncrementPointer = Tag("SliceLocationVector")
    ds.SliceLocationVector = _fmt([float(p @ normal) for p in ipps])
    shared = Dataset()
    shared.PlaneOrientationSequence = _item(ImageOrientationPatient=_fmt(iop))
    shared.PixelMeasuresSequence = _item(
        PixelSpacing=_fmt(spacing), SliceThickness=_ds_number(round(_thickness(scan, step), 6)),
        SpacingBetweenSlices=_ds_number(round(step, 6)))
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per = []
    for k in range(n):
        g = Dataset()
        g.PlanePositionSequence = _item(ImagePositionPatient=_fmt(ipps[k]))
        per.append(g)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    ds.PixelSpacing = _fmt(spacing)
    _add_references(ds, scan, [r for rs in _source_refs(scan, n) for r in rs])
    _set_pixels(ds, stored, slope, inter, lo, hi)  # rescale at the top level (SC Multi-frame)
    _save(ds, path)
