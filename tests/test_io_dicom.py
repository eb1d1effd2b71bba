"""DICOM: samples, series sorting, multi-series folders, pixels, cross-checks, derived series."""

from __future__ import annotations

import os
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest_io import PYDICOM_DATA, assert_matches_monai, copy_series, data_store

from napari_strainer.errors import BadInputError
from napari_strainer.io import read_scan, sample_path, write_scan

SERIES_SHAPE = (24, 96, 128)


def test_series_sample_equals_its_nifti_source():
    """mr_series was written from mr_brain.nii.gz with plain pydicom: same voxels and affine."""
    series, nii = read_scan(sample_path("mr_series")), read_scan(sample_path("mr_brain"))
    assert series.shape == SERIES_SHAPE and series.meta["n_files"] == 24
    np.testing.assert_array_equal(series.data, nii.data)
    np.testing.assert_allclose(series.affine, nii.affine, atol=1e-5)
    assert series.meta["format"] == "dicom" and series.meta["modality"] == "MR"
    assert series.meta["geometry"] == "patient" and series.data.dtype == np.int16


def test_series_matches_monai_loadimage():
    """MONAI's PydicomReader gives (column, row, slice) in RAS: ours is its transpose."""
    from monai.data import PydicomReader

    assert_matches_monai(sample_path("mr_series"), PydicomReader(), atol=1e-4)


def test_ct_matches_pydicom_and_has_hounsfield_units():
    ds = pydicom.dcmread(sample_path("ct"))
    scan = read_scan(sample_path("ct"))
    assert scan.shape == (1, 128, 128) and scan.data.dtype == np.float32
    np.testing.assert_array_equal(scan.data[0], ds.pixel_array * float(ds.RescaleSlope)
                                  + float(ds.RescaleIntercept))
    assert scan.meta["dtype"] == "int16" and scan.meta["rescale"] == (1.0, -1024.0)
    # voxel (row 10, col 20) -> IPP + 20 * dc * row_cosine + 10 * dr * col_cosine (LPS)
    ipp, (dr, dc) = np.array(ds.ImagePositionPatient, float), ds.PixelSpacing
    iop = np.array(ds.ImageOrientationPatient, float)
    lps = ipp + 20 * float(dc) * iop[:3] + 10 * float(dr) * iop[3:]
    ras = scan.affine @ [0, 10, 20, 1]
    np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-5)


def test_enhanced_ct_uses_functional_groups():
    ds = pydicom.dcmread(sample_path("ct_enhanced"))
    scan = read_scan(sample_path("ct_enhanced"))
    assert scan.shape == (2, 512, 512)
    np.testing.assert_allclose(scan.spacing, (10.0, 0.388672, 0.388672), atol=1e-6)
    pos = [np.array(f.PlanePositionSequence[0].ImagePositionPatient, float)
           for f in ds.PerFrameFunctionalGroupsSequence]
    np.testing.assert_allclose(scan.affine[:3, 3], pos[0] * [-1, -1, 1], atol=1e-5)
    np.testing.assert_allclose(scan.data, ds.pixel_array.astype(np.float32) - 1024.0)


def test_multiframe_without_geometry_warns():
    with pytest.warns(UserWarning, match="no patient geometry"):
        scan = read_scan(sample_path("mr_multiframe"))
    assert scan.shape == (10, 64, 64) and scan.meta["geometry"] == "assumed"
    assert scan.spacing == pytest.approx((1.2, 1.0, 1.0))


@pytest.mark.parametrize("variant", ["MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
                                     "MR_small_RLE.dcm", "MR_small_bigendian.dcm",
                                     "MR_small_implicit.dcm"])
def test_compressed_and_other_syntaxes_decode_identically(variant):
    ref = read_scan(PYDICOM_DATA / "MR_small.dcm")
    scan = read_scan(PYDICOM_DATA / variant)
    np.testing.assert_array_equal(scan.data, ref.data)
    np.testing.assert_allclose(scan.affine, ref.affine)


def test_jpeg2000_ct_sample_decodes():
    scan = read_scan(sample_path("ct_j2k"))
    assert scan.shape == (1, 512, 512)
    unc = data_store() / "693_UNCR.dcm"
    np.testing.assert_array_equal(scan.data, read_scan(unc).data)


def test_monochrome1_inverted_and_signed(tmp_path):
    ds = pydicom.dcmread(sample_path("ct"))
    ref = read_scan(sample_path("ct"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "m1.dcm")
    scan = read_scan(tmp_path / "m1.dcm")
    assert scan.meta["inverted_monochrome1"] is True
    # signed 16-bit stored value v becomes -1 - v, then the rescale applies
    np.testing.assert_array_equal(scan.data, (-1 - (ref.data + 1024)) - 1024)
    assert ref.meta["dtype"] == "int16"


def test_monochrome1_real_radiograph():
    path = data_store() / "RG3_J2KR.dcm"
    scan = read_scan(path)
    raw = pydicom.dcmread(path).pixel_array
    bits = pydicom.dcmread(path, stop_before_pixels=True).BitsStored
    np.testing.assert_array_equal(scan.data[0], (2**bits - 1) - raw.astype(np.int64))


def test_shuffled_and_renamed_series_reads_identically(tmp_path):
    ref = read_scan(sample_path("mr_series"))
    files = sorted(sample_path("mr_series").iterdir())
    rng = np.random.default_rng(1)
    dst = tmp_path / "shuffled"
    dst.mkdir()
    for new, f in zip(rng.permutation(len(files)), files):  # new names in random order
        shutil.copy(f, dst / f"slice{new:02d}.dcm")
    scan = read_scan(dst)
    np.testing.assert_array_equal(scan.data, ref.data)
    np.testing.assert_array_equal(scan.affine, ref.affine)


def test_instance_number_fallback_without_positions(tmp_path):
    src = copy_series(tmp_path / "s")
    for f in src.iterdir():
        ds = pydicom.dcmread(f)
        del ds.ImagePositionPatient
        ds.save_as(f)
    with pytest.warns(UserWarning, match="no patient geometry"):
        scan = read_scan(src)
    np.testing.assert_array_equal(scan.data, read_scan(sample_path("mr_series")).data)


def _multi_series(tmp_path):
    copy_series(tmp_path / "study")  # both series mixed in one folder
    shutil.copy(sample_path("ct"), tmp_path / "study" / "ct.dcm")
    return tmp_path / "study"


def test_several_series_listed_and_picked(tmp_path):
    folder = _multi_series(tmp_path)
    with pytest.raises(BadInputError) as err:
        read_scan(folder)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{folder}: holds 2 DICOM series; pick one with --series NUMBER or UID:")
    ct_uid = pydicom.dcmread(sample_path("ct")).SeriesInstanceUID
    assert ct_uid in msg and "24 slices" in msg and "1 slices" in msg
    mr = read_scan(folder, series=2)  # listing order: by SeriesNumber (CT 1 then MR 4)
    assert mr.shape == SERIES_SHAPE
    ct = read_scan(folder, series=ct_uid)
    assert ct.shape == (1, 128, 128)
    assert read_scan(folder, series="1").shape == (1, 128, 128)
    with pytest.raises(BadInputError, match="no series '7'"):
        read_scan(folder, series=7)


def test_derived_series_round_trip_and_attributes(tmp_path):
    src = read_scan(sample_path("mr_series"))
    out_scan = src.derive(src.data.astype(np.float32) * 0.37 + 1.5, description="STRAINER fit")
    out = write_scan(out_scan, tmp_path / "derived")
    files = sorted(out.iterdir())
    assert len(files) == 24
    back = read_scan(out)
    step = (out_scan.data.max() - out_scan.data.min()) / 65535
    np.testing.assert_allclose(back.data, out_scan.data, atol=step * 0.51 + 1e-4)
    np.testing.assert_allclose(back.affine, src.affine, atol=1e-5)
    old = pydicom.dcmread(next(sample_path("mr_series").iterdir()))
    sops = set()
    for f in files:
        ds = pydicom.dcmread(f)
        assert ds.StudyInstanceUID == old.StudyInstanceUID
        assert ds.FrameOfReferenceUID == old.FrameOfReferenceUID
        assert ds.SeriesInstanceUID != old.SeriesInstanceUID
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "OTHER"]
        assert ds.SeriesDescription == "STRAINER fit"
        assert ds.PatientID == old.PatientID  # same patient, same study
        assert ds.SOPClassUID == pydicom.uid.MRImageStorage
        assert ds.BitsAllocated == 16 and ds.Rows == 96 and ds.Columns == 128
        assert not any(e.tag.is_private for e in ds)
        sops.add(ds.SOPInstanceUID)
    assert len(sops) == 24


def test_series_round_trip_exact_for_integers(tmp_path):
    src = read_scan(sample_path("mr_series"))
    back = read_scan(write_scan(src, tmp_path / "copy"))
    np.testing.assert_array_equal(back.data, src.data)
    np.testing.assert_allclose(back.affine, src.affine, atol=1e-6)


def test_nifti_to_dicom_from_scratch_and_back(tmp_path):
    """A NIfTI source has no DICOM template: a fresh Secondary Capture study is built."""
    src = read_scan(sample_path("mr_anatomical"))
    out = write_scan(src, tmp_path / "anat")
    ds = pydicom.dcmread(min(out.iterdir()))
    assert ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert ds.PatientName == "" and ds.StudyInstanceUID
    back = read_scan(out)
    np.testing.assert_array_equal(back.data, src.data)
    np.testing.assert_allclose(back.affine, src.affine, atol=1e-5)
    # and nibabel agrees with the affine of the NIfTI written from the DICOM
    nii = write_scan(back, tmp_path / "anat.nii.gz")
    np.testing.assert_allclose(nib.load(nii).affine, nib.load(sample_path("mr_anatomical")).affine,
                               atol=1e-5)


def test_multislice_dcm_file_is_multiframe(tmp_path):
    src = read_scan(sample_path("mr_brain"))
    out = write_scan(src.derive(src.data.astype(np.float32) - 100.25), tmp_path / "vol.dcm")
    assert out.is_file()
    back = read_scan(out)
    np.testing.assert_allclose(back.data, src.data - 100.25, atol=0.02)
    np.testing.assert_allclose(back.affine, src.affine, atol=1e-5)


def test_one_slice_dcm_is_one_file(tmp_path):
    src = read_scan(sample_path("ct"))
    out = write_scan(src, tmp_path / "ct_copy.dcm")
    back = read_scan(out)
    np.testing.assert_array_equal(back.data, src.data)
    np.testing.assert_allclose(back.affine, src.affine, atol=1e-6)
    assert pydicom.dcmread(out).SOPClassUID == pydicom.uid.CTImageStorage
    assert os.listdir(tmp_path) == ["ct_copy.dcm"]


def test_export_tree_is_searched_when_the_folder_has_no_files(tmp_path):
    copy_series(tmp_path / "export" / "PAT1" / "ST1" / "SE1")
    (tmp_path / "export" / "PAT1" / "ST1" / "SE2").mkdir()
    shutil.copy(sample_path("ct"), tmp_path / "export" / "PAT1" / "ST1" / "SE2" / "IM1")
    with pytest.raises(BadInputError, match="holds 2 DICOM series"):
        read_scan(tmp_path / "export")
    assert read_scan(tmp_path / "export", series=2).shape == SERIES_SHAPE
