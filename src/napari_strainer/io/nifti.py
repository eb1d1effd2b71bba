"""NIfTI-1/NIfTI-2 reading and writing (nibabel) in the :class:`Scan` convention.

nibabel indexes voxels ``(i, j, k)``; a :class:`Scan` stores ``data[k, j, i]`` so that axis 0
is the slice axis, and its affine is nibabel's affine with columns 0 and 2 swapped.

Choices (documented for users):

* 4D files need ``volume=`` (0-based); without it :class:`BadInputError` says how many
  volumes there are. Trailing singleton dimensions (``X x Y x Z x 1``) are dropped.
* Scaling (``scl_slope``/``scl_inter``) is applied; the result is float32 when the scaling is
  not the identity, else the stored integer dtype is kept.
* NaN / +-Inf: an all-non-finite volume is an error; otherwise non-finite voxels are replaced
  by the minimum (NaN, -Inf) or maximum (+Inf) finite value, with a warning, and the count is
  recorded in ``meta["nonfinite_replaced"]``.
* A zero-sized dimension is an error.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np

from ..errors import BadInputError
from .scan import Scan

NIFTI_SUFFIXES = (".nii", ".nii.gz")
MAX_BYTES = 8 * 1024**3

# (i, j, k) <-> (k, j, i): the permutation is its own inverse.
SWAP = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)


def is_nifti_path(path: str | Path) -> bool:
    name = str(path).lower()
    return name.endswith((".nii", ".nii.gz"))


def _fail(path: Path, what: str) -> BadInputError:
    return BadInputError(f"{path}: {what}")


def read_nifti(path: str | Path, *, volume: int | None = None) -> Scan:
    """Read a 2D, 3D or 4D NIfTI file as a :class:`Scan` (see the module notes)."""
    path = Path(path)
    try:
        img = nib.load(str(path))
    except FileNotFoundError:
        raise _fail(path, "no such file") from None
    except Exception as e:  # noqa: BLE001 - nibabel raises many types
        raise _fail(path, f"not a readable NIfTI file ({_short(e)})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise _fail(path, f"not a NIfTI image ({type(img).__name__})")
    hdr = img.header
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 0 or any(s <= 0 for s in shape):
        raise _fail(path, f"has a zero-sized dimension (shape {shape})")
    try:
        dtype = np.dtype(hdr.get_data_dtype())
    except Exception as e:  # noqa: BLE001
        raise _fail(path, f"unsupported NIfTI datatype ({_short(e)})") from None
    if dtype.fields is not None or dtype.kind == "c":
        raise _fail(path, f"unsupported voxel type {dtype} (RGB/complex NIfTI); "
                          "expected scalar intensities")
    if int(np.prod(shape, dtype=np.float64)) * dtype.itemsize > MAX_BYTES:
        raise _fail(path, f"too large ({shape}, {dtype})")

    core = list(shape)
    while len(core) > 3 and core[-1] == 1:
        core.pop()
    if len(core) > 4:
        raise _fail(path, f"has {len(core)} dimensions {shape}; only 2D, 3D and 4D are supported")
    n_vol = core[3] if len(core) == 4 else 1
    if len(core) == 4:
        if volume is None:
            raise _fail(path, f"is 4D with {n_vol} volumes; pick one with --volume "
                              f"(0..{n_vol - 1})")
        if not 0 <= volume < n_vol:
            raise _fail(path, f"has {n_vol} volumes; --volume {volume} is out of range "
                              f"(0..{n_vol - 1})")
    elif volume not in (None, 0):
        raise _fail(path, f"is not 4D; --volume {volume} does not apply")

    if len(core) < 2:
        raise _fail(path, f"is 1D (shape {shape}); expected a 2D, 3D or 4D image")
    try:
        # nibabel moves scl_slope/scl_inter from the header to the array proxy on load
        slope = float(getattr(img.dataobj, "slope", 1.0))
        inter = float(getattr(img.dataobj, "inter", 0.0))
        raw = np.asarray(img.dataobj.get_unscaled()).reshape(core)
        if len(core) == 4:
            raw = raw[..., volume]
    except MemoryError:
        raise _fail(path, f"too large to load ({shape})") from None
    except Exception as e:  # noqa: BLE001
        raise _fail(path, f"voxel data cannot be read, the file may be truncated ({_short(e)})"
                    ) from None
    if raw.ndim == 2:
        raw = raw[:, :, None]

    meta: dict = {"format": "nifti", "modality": "OT", "dtype": dtype.name,
                  "nifti_shape": shape, "nifti_ndim": len(core), "nifti_header": hdr.copy(),
                  "description": None, "series_description": _descrip(hdr)}
    if n_vol > 1:
        meta["nifti_volumes"] = n_vol
        meta["volume"] = volume
    trivial = slope == 1.0 and inter == 0.0
    if trivial:
        data = raw
        if data.dtype.kind == "f" and data.dtype != np.float32 and data.dtype.itemsize < 4:
            data = data.astype(np.float32)
    else:
        data = raw.astype(np.float32) * np.float32(slope) + np.float32(inter)
        meta["nifti_scaling"] = (float(slope), float(inter))
    if data.dtype == np.float64:
        data = data.astype(np.float32)
    if data.dtype.kind == "f":
        finite = np.isfinite(data)
        if not finite.all():
            n_bad = int(data.size - np.count_nonzero(finite))
            if n_bad == data.size:
                raise _fail(path, "holds no finite voxel (all NaN/Inf)")
            lo, hi = data[finite].min(), data[finite].max()
            data = np.where(np.isnan(data) | np.isneginf(data), lo, data)
            data = np.where(np.isposinf(data), hi, data).astype(np.float32)
            meta["nonfinite_replaced"] = n_bad
            msg = (f"{path}: {n_bad} NaN/Inf voxels replaced by the finite minimum/maximum "
                   f"({lo:g}/{hi:g})")
            meta.setdefault("warnings", []).append(msg)
            warnings.warn(msg, UserWarning, stacklevel=3)
    if not data.dtype.isnative:
        data = data.astype(data.dtype.newbyteorder("="))
    if data.dtype == np.bool_:
        data = data.astype(np.uint8)
    affine = img.affine
    if affine is None or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        zooms = [float(z) if z and np.isfinite(z) and z > 0 else 1.0 for z in hdr.get_zooms()[:3]]
        zooms += [1.0] * (3 - len(zooms))
        affine = np.diag(zooms + [1.0])
        meta.setdefault("warnings", []).append(f"{path}: no usable affine; using voxel sizes")
    data = np.ascontiguousarray(data.transpose(2, 1, 0))
    return Scan(data, np.asarray(affine, np.float64) @ SWAP, meta, path)


def _descrip(hdr) -> str:
    try:
        return bytes(hdr["descrip"]).split(b"\0")[0].decode("ascii", "replace").strip()
    except Exception:  # noqa: BLE001
        return ""


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:160]


def _writable(data: np.ndarray) -> np.ndarray:
    if data.dtype == np.bool_:
        return data.astype(np.uint8)
    if data.dtype.kind == "f":
        return data.astype(np.float32)
    if data.dtype.kind in "iu" and data.dtype.itemsize == 8:
        lo, hi = (int(data.min()), int(data.max())) if data.size else (0, 0)
        if np.iinfo(np.int32).min <= lo and hi <= np.iinfo(np.int32).max:
            return data.astype(np.int32)
        return data.astype(np.float32)
    if data.dtype.kind not in "iuf":
        raise BadInputError(f"cannot write voxels of type {data.dtype} as NIfTI")
    return data


def nifti_image(scan: Scan) -> nib.Nifti1Image:
    """The nibabel image for ``scan`` (inverse of :func:`read_nifti`'s transpose)."""
    data = _writable(np.asarray(scan.data)).transpose(2, 1, 0)
    affine = np.asarray(scan.affine, np.float64) @ SWAP
    src_hdr = scan.meta.get("nifti_header")
    if scan.meta.get("nifti_ndim") == 2 and data.shape[2] == 1:
        data = data[:, :, 0]
    hdr = nib.Nifti1Header()
    sform_code = qform_code = 1
    if src_hdr is not None:
        with contextlib.suppress(Exception):  # a damaged source header: keep the defaults
            hdr.set_xyzt_units(*src_hdr.get_xyzt_units())
            sform_code = int(src_hdr["sform_code"]) or 1
            qform_code = int(src_hdr["qform_code"]) or 1
    else:
        hdr.set_xyzt_units("mm", "sec")
    img = nib.Nifti1Image(np.ascontiguousarray(data), affine, header=hdr)
    img.set_data_dtype(data.dtype)
    img.header.set_slope_inter(np.nan, np.nan)
    img.set_sform(affine, sform_code)
    img.set_qform(affine, qform_code)
    desc = scan.meta.get("description") or scan.meta.get("series_description") or ""
    img.header["descrip"] = str(desc).encode("ascii", "replace")[:79]
    return img


def write_nifti(scan: Scan, tmp_path: Path) -> None:
    """Write ``scan`` to ``tmp_path`` (the atomic wrapper renames it into place)."""
    nib.save(nifti_image(scan), str(tmp_path))
