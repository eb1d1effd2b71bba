"""NIfTI: geometry against nibabel, layouts, scaling, NaN, 4D, round trips, super-resolution."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from conftest_io import NIBABEL_DATA, assert_matches_monai

from napari_strainer.errors import BadInputError
from napari_strainer.io import read_scan, sample_path, upsampled_affine, write_scan
from napari_strainer.io.scan import Scan


def _save(tmp_path, arr, affine=None, name="x.nii.gz", **hdr):
    img = nib.Nifti1Image(arr, np.diag([1.5, 2.0, 3.0, 1.0]) if affine is None else affine)
    for k, v in hdr.items():
        img.header[k] = v
    path = tmp_path / name
    nib.save(img, path)
    return path


@pytest.mark.parametrize("name", ["mr_brain", "mr_anatomical"])
def test_matches_nibabel_up_to_axis_order(name):
    """Documented convention: data = nibabel array transposed (k, j, i); affine columns swapped."""
    path = sample_path(name)
    img = nib.load(path)
    scan = read_scan(path)
    ref = np.asarray(img.dataobj)
    assert scan.shape == ref.shape[::-1]
    np.testing.assert_array_equal(scan.data, ref.transpose(2, 1, 0))
    np.testing.assert_allclose(scan.affine[:, [2, 1, 0, 3]], img.affine, atol=1e-6)
    # a voxel's world position agrees in both conventions
    i, j, k = 5, 7, 3
    np.testing.assert_allclose(scan.affine @ [k, j, i, 1], img.affine @ [i, j, k, 1], atol=1e-5)
    assert scan.meta["format"] == "nifti" and scan.meta["dtype"] == "int16"
    assert nib.aff2axcodes(img.affine) == tuple(reversed(nib.aff2axcodes(scan.affine)))


def test_matches_monai_loadimage():
    from monai.data import NibabelReader

    assert_matches_monai(sample_path("mr_brain"), NibabelReader(), atol=1e-5)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("name", ["mr_brain", "mr_anatomical"])
def test_round_trip_exact(tmp_path, name, suffix):
    scan = read_scan(sample_path(name))
    out = write_scan(scan, tmp_path / f"out{suffix}")
    back = read_scan(out)
    np.testing.assert_array_equal(back.data, scan.data)
    assert back.data.dtype == scan.data.dtype
    np.testing.assert_allclose(back.affine, scan.affine, atol=1e-5)
    ref = nib.load(out)
    assert ref.header["sform_code"] > 0 and ref.header["qform_code"] > 0
    np.testing.assert_allclose(ref.affine, nib.load(sample_path(name)).affine, atol=1e-5)


def test_2d_and_hxwx1_layouts_restored(tmp_path):
    arr = np.arange(20, dtype=np.int16).reshape(4, 5)
    for name, data in (("two_d.nii", arr), ("hw1.nii", arr[:, :, None])):
        path = _save(tmp_path, data, name=name)
        scan = read_scan(path)
        assert scan.shape == (1, 5, 4)
        np.testing.assert_array_equal(scan.data[0], arr.T)
        out = write_scan(scan, tmp_path / f"out_{name}")
        assert nib.load(out).shape == data.shape


def test_scaling_applied_as_float32(tmp_path):
    nib.save(nib.Nifti1Image(np.arange(24, dtype=np.int16).reshape(2, 3, 4), np.eye(4)),
             tmp_path / "s.nii")
    hdr = nib.load(tmp_path / "s.nii").header.copy()
    hdr["scl_slope"], hdr["scl_inter"] = 0.5, -3.0
    with open(tmp_path / "s.nii", "r+b") as f:  # nibabel's save resets scaling; patch it in
        hdr.write_to(f)
    scan = read_scan(tmp_path / "s.nii")
    assert scan.data.dtype == np.float32 and scan.meta["dtype"] == "int16"
    np.testing.assert_allclose(scan.data.transpose(2, 1, 0),
                               np.arange(24).reshape(2, 3, 4) * 0.5 - 3.0)
    assert scan.meta["nifti_scaling"] == (0.5, -3.0)


def test_4d_needs_a_volume():
    path = NIBABEL_DATA / "example4d.nii.gz"
    with pytest.raises(BadInputError, match=r"example4d.nii.gz: is 4D with 2 volumes; pick one "
                                            r"with --volume \(0..1\)"):
        read_scan(path)
    v1 = read_scan(path, volume=1)
    np.testing.assert_array_equal(v1.data, np.asarray(nib.load(path).dataobj)[..., 1].T)
    assert v1.meta["volume"] == 1 and v1.meta["nifti_volumes"] == 2
    with pytest.raises(BadInputError, match="out of range"):
        read_scan(path, volume=2)
    # a trailing singleton 4th dimension is just a 3D volume
    assert read_scan(sample_path("mr_brain")).shape == (24, 96, 128)


def test_some_nan_replaced_all_nan_refused(tmp_path):
    arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4) + 1
    arr[0, 0, 0] = np.nan
    arr[1, 1, 1] = np.inf
    with pytest.warns(UserWarning, match="2 NaN/Inf voxels replaced"):
        scan = read_scan(_save(tmp_path, arr))
    assert scan.meta["nonfinite_replaced"] == 2
    assert np.isfinite(scan.data).all()
    assert scan.data[0, 0, 0] == 2.0  # NaN -> finite minimum
    assert scan.data[1, 1, 1] == 24.0  # +Inf -> finite maximum
    path = _save(tmp_path, np.full((2, 3, 4), np.nan, np.float32), name="nan.nii.gz")
    with pytest.raises(BadInputError, match=r"nan.nii.gz: holds no finite voxel \(all NaN/Inf\)"):
        read_scan(path)


def test_zero_sized_dimension(tmp_path):
    path = _save(tmp_path, np.zeros((4, 0, 3), np.int16), name="empty.nii")
    with pytest.raises(BadInputError, match=r"empty.nii: .*zero-sized dimension"):
        read_scan(path)


def test_superresolution_geometry_written_and_read_by_nibabel(tmp_path):
    """A grid refined with upsampled_affine covers the same physical extent in the NIfTI."""
    scan = read_scan(sample_path("mr_brain"))
    f = (1, 2, 2)
    big = np.repeat(np.repeat(scan.data, 2, axis=1), 2, axis=2).astype(np.float32)
    up = scan.derive(big, affine=upsampled_affine(scan.affine, f), description="x2 in-plane")
    out = write_scan(up, tmp_path / "sr.nii.gz")
    img = nib.load(out)
    assert img.shape == (256, 192, 24)
    np.testing.assert_allclose(img.header.get_zooms(), (1.0, 1.0, 2.2), atol=1e-5)
    src = nib.load(sample_path("mr_brain"))
    # the centre of old voxel (i, j, k) is the mean of the centres of its 2x2 children
    for i, j, k in [(0, 0, 0), (10, 20, 5), (127, 95, 23)]:
        old = src.affine @ [i, j, k, 1]
        kids = [img.affine @ [2 * i + a, 2 * j + b, k, 1] for a in (0, 1) for b in (0, 1)]
        np.testing.assert_allclose(np.mean(kids, axis=0), old, atol=1e-4)
    # and the outer corners of the grids coincide
    np.testing.assert_allclose(img.affine @ [-0.5, -0.5, -0.5, 1], src.affine @ [-0.5, -0.5, -0.5, 1],
                               atol=1e-4)
    assert bytes(img.header["descrip"]).startswith(b"x2 in-plane")


def test_scan_without_nifti_meta_writes(tmp_path):
    scan = Scan(np.random.default_rng(0).normal(size=(3, 4, 5)).astype(np.float64),
                np.diag([3.0, 2.0, 1.0, 1.0]))
    back = read_scan(write_scan(scan, tmp_path / "plain.nii.gz"))
    np.testing.assert_allclose(back.data, scan.data, rtol=1e-6)
    np.testing.assert_allclose(back.affine, scan.affine)
