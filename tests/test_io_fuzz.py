"""Property tests: damaged real files raise BadInputError (or read), never anything else."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
from conftest_io import PYDICOM_DATA
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from napari_strainer.errors import BadInputError
from napari_strainer.io import read_scan, sample_path

FILES = {
    "ct.dcm": sample_path("ct").read_bytes(),
    "mf.dcm": sample_path("mr_multiframe").read_bytes(),
    "j2k.dcm": (PYDICOM_DATA / "MR_small_jp2klossless.dcm").read_bytes(),
    "anat.nii": sample_path("mr_anatomical").read_bytes(),
    "brain.nii.gz": sample_path("mr_brain").read_bytes(),
}
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


def _read(name: str, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                scan = read_scan(path)
            except BadInputError as e:
                msg = str(e)
                assert msg.startswith(str(path)) and "\n" not in msg
                return
        assert scan.data.ndim == 3 and 0 not in scan.data.shape
        assert np.all(np.isfinite(scan.affine))
        if scan.data.dtype.kind == "f":
            assert np.isfinite(scan.data).all()


names = st.sampled_from(sorted(FILES))


@SETTINGS
@given(name=names, frac=st.floats(0.0, 1.0))
def test_truncated_files(name, frac):
    data = FILES[name]
    _read(name, data[: int(len(data) * frac)])


@SETTINGS
@given(name=names, edits=st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 255)),
                                  min_size=1, max_size=12),
       header_only=st.booleans())
def test_mutated_bytes(name, edits, header_only):
    data = bytearray(FILES[name])
    span = min(len(data), 1600) if header_only else len(data)  # headers are the fragile part
    for where, value in edits:
        data[int(where * (span - 1))] = value
    _read(name, bytes(data))


@SETTINGS
@given(name=names, where=st.floats(0.0, 1.0), junk=st.binary(min_size=1, max_size=64))
def test_inserted_bytes(name, where, junk):
    data = FILES[name]
    k = int(where * min(len(data), 2000))
    _read(name, data[:k] + junk + data[k:])
