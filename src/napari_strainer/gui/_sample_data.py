"""Sample data: the shipped MR and CT scans (see sample_data/README.md)."""

from __future__ import annotations

from ..io import read_scan, sample_path
from ._layers import scan_to_layer


def _sample(name: str, layer_name: str):
    return [scan_to_layer(read_scan(sample_path(name)), layer_name)]


def mr_brain():
    """3D brain MR (NIfTI)."""
    return _sample("mr_brain", "mr_brain")


def ct():
    """CT slice (DICOM)."""
    return _sample("ct", "ct")


def mr_series():
    """MR DICOM series (a folder of single-frame files)."""
    return _sample("mr_series", "mr_series")
