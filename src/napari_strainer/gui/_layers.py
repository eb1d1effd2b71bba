"""Scan <-> napari image layer, keeping the geometry.

A layer shows ``Scan.data`` with axes ``(slice, row, column)``. Its world frame is the scan's
own frame in millimetres: ``scale`` is the voxel spacing and ``translate`` the position of
the first voxel centre measured along each of the scan's axes (the affine's origin projected
on its unit column vectors). Scans with the same orientation therefore overlay exactly (a
super-resolved result sits on its input), and the full affine and the reader's metadata
ride in ``layer.metadata["strainer"]`` so that the writer can write a faithful file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadArgumentError
from ..io.scan import Scan

KEY = "strainer"


def geometry(affine: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(scale, translate)`` of a layer showing a scan with this voxel-to-RAS ``affine``."""
    affine = np.asarray(affine, np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    spacing = np.where(spacing > 0, spacing, 1.0)
    directions = affine[:3, :3] / spacing
    translate = directions.T @ affine[:3, 3]
    return tuple(float(s) for s in spacing), tuple(float(t) for t in translate)


def scan_to_layer(scan: Scan, name: str | None = None, **kwargs: Any) -> tuple:
    """A napari ``LayerDataTuple`` ``(data, kwargs, "image")`` for ``scan``."""
    scale, translate = geometry(scan.affine)
    if name is None:
        name = Path(str(scan.source)).name if scan.source else "scan"
        for suffix in (".nii.gz", ".nii", ".dcm"):
            if name.lower().endswith(suffix):
                name = name[: -len(suffix)]
    meta = {KEY: {"affine": scan.affine.copy(), "meta": dict(scan.meta),
                  "source": str(scan.source) if scan.source else None,
                  "shape": tuple(scan.shape)}}
    meta.update(kwargs.pop("metadata", {}))
    attrs = {"name": name, "scale": scale, "translate": translate, "metadata": meta,
             "rgb": False, **kwargs}
    return scan.data, attrs, "image"


def layer_to_scan(data: Any, attributes: dict) -> Scan:
    """The :class:`Scan` a layer shows: ``data`` plus the layer's ``scale``/``translate``/
    ``metadata`` (an ``Image`` layer's ``as_layer_data_tuple()`` parts, or a writer's
    ``attributes``).

    When the layer still has the geometry it was created with, the stored affine is used as
    is; when its scale or translate were changed in napari, they win (keeping the stored
    orientation); a layer from elsewhere gets an identity orientation.
    """
    arr = np.asarray(data)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise BadArgumentError(f"layer {attributes.get('name', '')!r} has {np.ndim(data)} "
                               "dimensions; a scan must be 2D or 3D (slice, row, column)")
    if attributes.get("rgb"):
        raise BadArgumentError(f"layer {attributes.get('name', '')!r} is RGB; a scan holds "
                               "one intensity per voxel")
    ndim = np.ndim(data)
    scale = np.ones(3)
    translate = np.zeros(3)
    scale[3 - ndim:] = np.asarray(attributes.get("scale", np.ones(ndim)), float)[-ndim:]
    translate[3 - ndim:] = np.asarray(attributes.get("translate", np.zeros(ndim)),
                                      float)[-ndim:]
    stored = (attributes.get("metadata") or {}).get(KEY) or {}
    meta = dict(stored.get("meta") or {})
    source = stored.get("source")
    if "affine" in stored:
        affine = np.asarray(stored["affine"], np.float64)
        s0, t0 = geometry(affine)
        same = (tuple(stored.get("shape", ())) == arr.shape
                and np.allclose(s0[3 - ndim:], scale[3 - ndim:], rtol=1e-6, atol=1e-9)
                and np.allclose(t0[3 - ndim:], translate[3 - ndim:], rtol=1e-6, atol=1e-6))
        if not same:
            directions = affine[:3, :3] / np.asarray(s0)
            affine = _affine(directions, scale, translate)
    else:
        affine = _affine(np.eye(3), scale, translate)
    return Scan(arr, affine, meta, Path(source) if source else None)


def _affine(directions: np.ndarray, scale: np.ndarray, translate: np.ndarray) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = directions * scale
    out[:3, 3] = directions @ translate  # inverse of geometry()'s projection (orthonormal)
    return out


def image_layer_scan(layer) -> Scan:
    """The :class:`Scan` shown by a napari ``Image`` layer."""
    if getattr(layer, "rgb", False):
        raise BadArgumentError(f"layer {layer.name!r} is RGB; a scan holds one intensity per "
                               "voxel")
    data = layer.data
    if getattr(layer, "multiscale", False):
        data = data[0]
    return layer_to_scan(np.asarray(data), {
        "name": layer.name, "scale": tuple(layer.scale), "translate": tuple(layer.translate),
        "metadata": layer.metadata, "rgb": False})
