"""describe (strainer info), find_scans (batch input), sample_path, privacy."""

from __future__ import annotations

import json
import shutil

import pydicom
import pytest
from conftest_io import copy_series

from napari_strainer.errors import BadArgumentError
from napari_strainer.io import SAMPLES, describe, find_scans, sample_path


def test_every_sample_is_described_as_json():
    for name in SAMPLES:
        info = describe(sample_path(name))
        json.dumps(info)  # plain JSON, no numpy or pydicom objects
        assert len(info["shape"]) == 3 and len(info["affine"]) == 4
        assert info["orientation"] and info["intensity_range"][0] <= info["intensity_range"][1]
    info = describe(sample_path("mr_series"))
    assert info["shape"] == [24, 96, 128] and info["format"] == "dicom"
    assert info["orientation"] == "SAL" and info["modality"] == "MR"
    assert info["series"][0]["slices"] == 24
    assert info["spacing"] == pytest.approx([2.2, 2.0, 2.0], abs=1e-5)


def test_describe_folder_with_two_series_lists_them(tmp_path):
    copy_series(tmp_path / "mr")
    (tmp_path / "ct").mkdir()
    shutil.copy(sample_path("ct"), tmp_path / "ct" / "ct.dcm")
    info = describe(tmp_path)
    assert info["shape"] is None
    assert [(s["number"], s["modality"], s["slices"]) for s in info["series"]] == \
        [(1, "CT", 1), (2, "MR", 24)]
    assert describe(tmp_path, series=2)["shape"] == [24, 96, 128]


def test_describe_4d_nifti_reports_volumes():
    from pathlib import Path

    import nibabel as nib

    info = describe(Path(nib.__file__).parent / "tests" / "data" / "example4d.nii.gz")
    assert info["nifti_volumes"] == 2 and info["volume"] == 0


def test_no_patient_fields_in_describe(tmp_path):
    ds = pydicom.dcmread(sample_path("ct"))
    ds.PatientName, ds.PatientID, ds.InstitutionName = "Secret^Person", "ID-4242", "Hidden Hosp"
    ds.PatientBirthDate, ds.AccessionNumber = "19010101", "ACC999"
    ds.save_as(tmp_path / "p.dcm")
    text = json.dumps(describe(tmp_path / "p.dcm")) + json.dumps(describe(tmp_path))
    text += json.dumps(describe(sample_path("mr_series"))) + json.dumps(describe(sample_path("ct")))
    for secret in ("Secret", "4242", "Hidden", "19010101", "ACC999"):
        assert secret not in text


def test_find_scans(tmp_path):
    copy_series(tmp_path / "patient" / "series1")
    shutil.copy(sample_path("mr_multiframe"), tmp_path / "patient" / "mf.dcm")
    shutil.copy(sample_path("mr_brain"), tmp_path / "brain.nii.gz")
    shutil.copy(sample_path("ct"), tmp_path / "ctdir_ct.dcm")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden.nii.gz").write_bytes(b"x")
    import numpy as np
    from PIL import Image

    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "im.png")
    found = [p.relative_to(tmp_path).as_posix() for p in find_scans(tmp_path)]
    assert found == [".", "brain.nii.gz", "im.png", "patient/mf.dcm", "patient/series1"]
    assert find_scans(sample_path("mr_series")) == [sample_path("mr_series")]
    # the root folder's own DICOM file is one series, not mixed with the subfolders
    from napari_strainer.io import read_scan

    assert read_scan(tmp_path).shape == (1, 128, 128)


def test_sample_path(monkeypatch, tmp_path):
    assert sample_path("mr_brain").name == "mr_brain.nii.gz"
    assert sample_path("ct").is_file() and sample_path("mr_series").is_dir()
    with pytest.raises(BadArgumentError, match="unknown sample 'nope'"):
        sample_path("nope")
    monkeypatch.setenv("STRAINER_SAMPLE_DATA", str(tmp_path))
    (tmp_path / "ct_small.dcm").write_bytes(b"x")
    assert sample_path("ct") == tmp_path / "ct_small.dcm"
