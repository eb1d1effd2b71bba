"""Every bad input gets one BadInputError line that names the file and says what is wrong."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest_io import PYDICOM_DATA, copy_series

from napari_strainer.errors import BadInputError
from napari_strainer.io import read_scan, sample_path


def truncated_dicom(tmp: Path) -> Path:
    data = sample_path("ct").read_bytes()
    (tmp / "half.dcm").write_bytes(data[: len(data) // 2])
    return tmp / "half.dcm"


def truncated_header(tmp: Path) -> Path:
    (tmp / "head.dcm").write_bytes(sample_path("ct").read_bytes()[:700])
    return tmp / "head.dcm"


def pydicom_truncated(tmp: Path) -> Path:
    return PYDICOM_DATA / "MR_truncated.dcm"


def text_file(tmp: Path) -> Path:
    (tmp / "notes.txt").write_text("not a scan\n")
    return tmp / "notes.txt"


def text_as_dcm(tmp: Path) -> Path:
    (tmp / "fake.dcm").write_text("hello, I am not DICOM\n" * 20)
    return tmp / "fake.dcm"


def empty_file(tmp: Path) -> Path:
    (tmp / "empty.dcm").write_bytes(b"")
    return tmp / "empty.dcm"


def missing(tmp: Path) -> Path:
    return tmp / "nowhere.nii.gz"


def no_pixel_data(tmp: Path) -> Path:
    ds = pydicom.dcmread(sample_path("ct"))
    del ds.PixelData
    ds.save_as(tmp / "nopix.dcm")
    return tmp / "nopix.dcm"


def rt_plan(tmp: Path) -> Path:
    return PYDICOM_DATA / "rtplan.dcm"


def rt_struct(tmp: Path) -> Path:
    return PYDICOM_DATA / "rtstruct.dcm"


def structured_report(tmp: Path) -> Path:
    return PYDICOM_DATA / "test-SR.dcm"


def segmentation(tmp: Path) -> Path:
    return PYDICOM_DATA / "liver_1frame.dcm"


def waveform(tmp: Path) -> Path:
    return PYDICOM_DATA / "waveform_ecg.dcm"


def dicomdir(tmp: Path) -> Path:
    return PYDICOM_DATA / "dicomdirtests" / "TINY_ALPHA" / "DICOMDIR"


def empty_folder(tmp: Path) -> Path:
    (tmp / "empty").mkdir()
    return tmp / "empty"


def folder_of_non_images(tmp: Path) -> Path:
    (tmp / "reports").mkdir()
    shutil.copy(PYDICOM_DATA / "test-SR.dcm", tmp / "reports" / "a.dcm")
    shutil.copy(PYDICOM_DATA / "rtplan.dcm", tmp / "reports" / "b")
    return tmp / "reports"


def two_series(tmp: Path) -> Path:
    copy_series(tmp / "two")  # two series mixed in one folder
    shutil.copy(sample_path("ct"), tmp / "two" / "ct.dcm")
    return tmp / "two"


def missing_slice(tmp: Path) -> Path:
    folder = copy_series(tmp / "gap")
    victim = next(f for f in folder.iterdir() if pydicom.dcmread(f).InstanceNumber == 12)
    victim.unlink()
    return folder


def duplicate_positions(tmp: Path) -> Path:
    folder = copy_series(tmp / "dup")
    for f in sorted(folder.iterdir())[:3]:
        ds = pydicom.dcmread(f)
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.InstanceNumber = ds.InstanceNumber + 100
        ds.save_as(folder / f"echo2_{f.name}")
    return folder


def mixed_orientation(tmp: Path) -> Path:
    return PYDICOM_DATA / "dicomdirtests" / "98892003" / "MR700"


def truncated_slice_in_series(tmp: Path) -> Path:
    folder = copy_series(tmp / "trunc")
    f = sorted(folder.iterdir())[5]
    f.write_bytes(f.read_bytes()[:-5000])
    return folder


def unreadable_compressed(tmp: Path) -> Path:
    ds = pydicom.dcmread(PYDICOM_DATA / "MR_small_jp2klossless.dcm")
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder installed
    ds.save_as(tmp / "mpeg.dcm")
    return tmp / "mpeg.dcm"


def corrupt_jpeg2000(tmp: Path) -> Path:
    data = bytearray((PYDICOM_DATA / "MR_small_jp2klossless.dcm").read_bytes())
    data[-2000:-40] = bytes(1960)  # zero a stretch of the codestream
    (tmp / "j2k_bad.dcm").write_bytes(bytes(data))
    return tmp / "j2k_bad.dcm"


def zero_rows_dicom(tmp: Path) -> Path:
    ds = pydicom.dcmread(sample_path("ct"))
    ds.Rows = 0
    ds.save_as(tmp / "zero.dcm")
    return tmp / "zero.dcm"


def all_nan_nifti(tmp: Path) -> Path:
    nib.save(nib.Nifti1Image(np.full((3, 4, 5), np.nan, np.float32), np.eye(4)), tmp / "nan.nii")
    return tmp / "nan.nii"


def zero_sized_nifti(tmp: Path) -> Path:
    nib.save(nib.Nifti1Image(np.zeros((3, 0, 5), np.int16), np.eye(4)), tmp / "zero.nii.gz")
    return tmp / "zero.nii.gz"


def four_d_nifti(tmp: Path) -> Path:
    return Path(nib.__file__).parent / "tests" / "data" / "example4d.nii.gz"


def truncated_nifti_gz(tmp: Path) -> Path:
    data = sample_path("mr_brain").read_bytes()
    (tmp / "cut.nii.gz").write_bytes(data[: len(data) // 3])
    return tmp / "cut.nii.gz"


def truncated_nifti(tmp: Path) -> Path:
    data = sample_path("mr_anatomical").read_bytes()
    (tmp / "cut.nii").write_bytes(data[:30000])
    return tmp / "cut.nii"


def nifti_header_garbage(tmp: Path) -> Path:
    (tmp / "junk.nii").write_bytes(b"\x00" * 400)
    return tmp / "junk.nii"


def gzip_not_nifti(tmp: Path) -> Path:
    (tmp / "text.nii.gz").write_bytes(gzip.compress(b"plain text " * 100))
    return tmp / "text.nii.gz"


def corrupt_png(tmp: Path) -> Path:
    (tmp / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    return tmp / "broken.png"


BAD = {
    truncated_dicom: r"not a readable DICOM file, truncated or damaged|pixel data cannot be",
    truncated_header: r"DICOM without pixel data \(CT Image Storage\); the file may be trunc",
    pydicom_truncated: r"pixel data cannot be decoded|truncated",
    text_file: r"not a DICOM, NIfTI or image file",
    text_as_dcm: r"not a DICOM, NIfTI or image file",
    empty_file: r"empty file",
    missing: r"no such file",
    no_pixel_data: r"DICOM without pixel data \(CT Image Storage\)",  # + "may be truncated"
    rt_plan: r"is an RT Plan .*, not an image",
    rt_struct: r"is an RT Structure Set .*, not an image",
    structured_report: r"is a structured report \(SR\) .*, not an image",
    segmentation: r"is a segmentation .*, not an image",
    waveform: r"is a waveform .*, not an image",
    dicomdir: r"is a DICOMDIR \(media directory\), not an image",
    empty_folder: r"holds no DICOM files",
    folder_of_non_images: r"holds no DICOM image \(found 1 RT Plan, 1 structured report\)",
    two_series: r"holds 2 DICOM series; pick one with --series",
    missing_slice: r"slice spacing is not uniform \(gaps 2\.2 to 4\.4 mm over 23 slices",
    duplicate_positions: r"27 slices at only 24 positions",
    mixed_orientation: r"slices have different orientations",
    truncated_slice_in_series: r"trunc/\w+: pixel data cannot be decoded .*less than expected",
    unreadable_compressed: r"pixel data cannot be decoded \(MPEG2",
    corrupt_jpeg2000: r"truncated or damaged DICOM file",
    zero_rows_dicom: r"zero-sized image",
    all_nan_nifti: r"holds no finite voxel \(all NaN/Inf\)",
    zero_sized_nifti: r"zero-sized dimension",
    four_d_nifti: r"is 4D with 2 volumes; pick one with --volume",
    truncated_nifti_gz: r"voxel data cannot be read, the file may be truncated|not a readable",
    truncated_nifti: r"voxel data cannot be read, the file may be truncated",
    nifti_header_garbage: r"not a readable NIfTI file",
    gzip_not_nifti: r"not a readable NIfTI file",
    corrupt_png: r"not a readable PNG image",
}


@pytest.mark.parametrize("make", list(BAD), ids=[f.__name__ for f in BAD])
def test_bad_input_one_clear_line(tmp_path, make):
    path = make(tmp_path)
    with pytest.raises(BadInputError) as err:
        read_scan(path)
    msg = str(err.value)
    assert msg.startswith((f"{path}: ", f"{path}/")), msg  # names the file
    assert "\n" not in msg and len(msg) < 900
    assert err.value.__cause__ is None  # no chained traceback to show
    import re

    assert re.search(BAD[make], msg), msg


def test_no_patient_fields_in_messages(tmp_path):
    """Errors and warnings never quote patient-identifying values."""
    ds = pydicom.dcmread(sample_path("ct"))
    ds.PatientName = "Secret^Person"
    ds.PatientID = "ID-424242"
    ds.InstitutionName = "Hidden Hospital"
    ds.PatientBirthDate = "19010101"
    ds.Rows = 0
    ds.save_as(tmp_path / "p.dcm")
    with pytest.raises(BadInputError) as err:
        read_scan(tmp_path / "p.dcm")
    for secret in ("Secret", "424242", "Hidden", "19010101"):
        assert secret not in str(err.value)
