"""Helpers shared by the tests/test_io_*.py files (imported explicitly, not a pytest conftest)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest

from napari_strainer.io import sample_path

PYDICOM_DATA = Path(pydicom.__file__).parent / "data" / "test_files"
NIBABEL_DATA = Path(__import__("nibabel").__file__).parent / "tests" / "data"


def data_store() -> Path:
    """pydicom-data's folder of larger test files (a dev dependency); skip if missing."""
    try:
        import data_store as ds
    except ImportError:
        pytest.skip("pydicom-data is not installed")
    return Path(ds.__file__).parent / "data"


def copy_series(dst: Path, name: str = "mr_series") -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(sample_path(name).iterdir()):
        shutil.copy(f, dst / f.name)
    return dst


def tree(folder: Path) -> list[str]:
    """Every entry under ``folder`` (to prove that nothing was left behind)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def assert_matches_monai(path, reader, atol: float) -> None:
    """MONAI's LoadImage with ``reader`` gives (column, row, slice) in RAS: our Scan is its
    transpose, with the affine's first three columns reversed."""
    import numpy as np
    from monai.transforms import LoadImage

    from napari_strainer.io import read_scan

    img = LoadImage(reader=reader, image_only=True)(str(path))
    scan = read_scan(path)
    np.testing.assert_array_equal(np.asarray(img).transpose(2, 1, 0), scan.data)
    np.testing.assert_allclose(np.asarray(img.affine)[:, [2, 1, 0, 3]], scan.affine, atol=atol)
