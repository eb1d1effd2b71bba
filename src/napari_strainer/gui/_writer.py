"""napari writers: an image layer -> NIfTI file, DICOM file or DICOM derived series folder.

The layer's ``metadata["strainer"]`` (set by our readers and widgets) carries the source
affine and header/DICOM template, so a restored layer is written with its real geometry.
"""

from __future__ import annotations

from typing import Any

from ..io import write_scan
from ._layers import layer_to_scan


def write_image(path: str, data: Any, attributes: dict) -> list[str]:
    """Write one image layer; the format follows ``path`` (see :func:`io.write_scan`).

    napari asks before replacing an existing file, so an existing output is replaced
    (never the layer's own source file).
    """
    scan = layer_to_scan(data, attributes)
    if not scan.meta.get("description"):
        scan.meta["description"] = f"{attributes.get('name') or 'layer'} (napari-strainer)"
    return [str(write_scan(scan, path, overwrite=True))]
