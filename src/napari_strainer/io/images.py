"""2D images (PNG, JPEG, TIFF) as one-slice :class:`Scan` objects.

Colour is converted to luminance (ITU-R 601: 0.299 R + 0.587 G + 0.114 B, float32); an alpha
channel is dropped. A multi-page grayscale TIFF becomes a stack of slices. Images carry no
geometry, so the affine is the identity (1 mm pixels, index order = world order).

Writing: PNG holds one slice as uint8 or uint16; TIFF holds any number of slices in the
array's dtype (float data stays float32). Float data written to PNG is rounded and clipped to
the source dtype (``meta["dtype"]``) when that was uint8/uint16, else linearly mapped onto
uint16 with a warning.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ..errors import BadArgumentError, BadInputError
from .scan import Scan

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def is_image_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return (rgb[..., :3].astype(np.float32) @ LUMA).astype(np.float32)


def read_image(path: str | Path) -> Scan:
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: no such file")
    suffix = path.suffix.lower()
    meta: dict = {"format": "image", "modality": "OT", "description": None,
                  "series_description": ""}
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(str(path)) as tif:
                series = tif.series[0]
                axes = series.axes
                arr = series.asarray()
            if "S" in axes and arr.shape[axes.index("S")] in (3, 4):
                arr = np.moveaxis(arr, axes.index("S"), -1)
                meta["converted_from"] = "RGB"
                arr = _luminance(arr)
        else:
            from PIL import Image

            with Image.open(path) as im:
                im.load()
                mode = im.mode
                if mode in ("P", "PA", "CMYK", "YCbCr", "LA", "RGBA", "RGB", "HSV", "LAB"):
                    if mode in ("LA",):
                        arr = np.asarray(im.convert("L"))
                    else:
                        arr = _luminance(np.asarray(im.convert("RGB")))
                        meta["converted_from"] = mode
                else:
                    arr = np.asarray(im)
    except BadInputError:
        raise
    except Exception as e:  # noqa: BLE001
        text = " ".join(str(e).split())[:160] or type(e).__name__
        raise BadInputError(f"{path}: not a readable {suffix[1:].upper()} image ({text})"
                            ) from None
    arr = np.asarray(arr)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise BadInputError(f"{path}: unsupported image layout {arr.shape}")
    if 0 in arr.shape:
        raise BadInputError(f"{path}: has a zero-sized dimension (shape {arr.shape})")
    if arr.dtype.kind not in "iuf":
        raise BadInputError(f"{path}: unsupported pixel type {arr.dtype}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        if not np.isfinite(arr).any():
            raise BadInputError(f"{path}: holds no finite pixel (all NaN/Inf)")
        fin = np.isfinite(arr)
        arr = np.where(fin, arr, arr[fin].min()).astype(np.float32)
        meta["nonfinite_replaced"] = int(arr.size - fin.sum())
    meta["dtype"] = "float32" if meta.get("converted_from") else arr.dtype.name
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return Scan(np.ascontiguousarray(arr), np.eye(4), meta, path)


def _to_uint(data: np.ndarray, meta: dict) -> np.ndarray:
    if data.dtype in (np.uint8, np.uint16):
        return data
    lo, hi = float(data.min()), float(data.max())
    target = meta.get("dtype")
    if target in ("uint8", "uint16"):
        info = np.iinfo(target)
        return np.clip(np.rint(data), info.min, info.max).astype(target)
    if data.dtype.kind in "iu" and lo >= 0 and hi <= 65535:
        return data.astype(np.uint8 if hi <= 255 else np.uint16)
    warnings.warn("PNG holds integers only: intensities mapped linearly onto 0..65535 "
                  "(write TIFF or NIfTI to keep real values)", UserWarning, stacklevel=3)
    scale = 65535.0 / (hi - lo) if hi > lo else 0.0
    return np.rint((data.astype(np.float64) - lo) * scale).astype(np.uint16)


def write_image(scan: Scan, tmp_path: Path, suffix: str) -> None:
    data = np.asarray(scan.data)
    if not np.isfinite(data).all():
        raise BadArgumentError("cannot write an image holding NaN/Inf values")
    if suffix in (".tif", ".tiff"):
        import tifffile

        arr = data[0] if data.shape[0] == 1 else data
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        if arr.dtype == np.bool_:
            arr = arr.astype(np.uint8)
        tifffile.imwrite(str(tmp_path), arr, photometric="minisblack")
        return
    if suffix in (".jpg", ".jpeg"):
        raise BadArgumentError("writing JPEG is not supported (lossy); use .png or .tif")
    if data.shape[0] != 1:
        raise BadArgumentError(f"PNG holds one 2D image, the scan has {data.shape[0]} slices; "
                               "use .tif, .nii.gz or a DICOM folder")
    from PIL import Image

    Image.fromarray(_to_uint(data[0], scan.meta)).save(str(tmp_path), format="PNG")
