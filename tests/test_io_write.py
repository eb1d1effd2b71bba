"""Writers: inputs never overwritten, existing outputs refused, atomic (no partial output)."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import tifffile
from conftest_io import copy_series, tree
from PIL import Image

from napari_strainer.errors import BadArgumentError, OutputExistsError
from napari_strainer.io import convert, dicom, nifti, read_scan, sample_path, write_scan
from napari_strainer.io.scan import Scan


@pytest.fixture
def mr(tmp_path):
    src = copy_series(tmp_path / "in")
    return read_scan(src)


def test_refuses_existing_output_unless_overwrite(tmp_path, mr):
    out = write_scan(mr, tmp_path / "a.nii.gz")
    before = out.read_bytes()
    with pytest.raises(OutputExistsError, match=r"a.nii.gz: output exists \(use --overwrite"):
        write_scan(mr.derive(mr.data * 0), out)
    assert out.read_bytes() == before
    write_scan(mr.derive(mr.data * 0), out, overwrite=True)
    assert read_scan(out).data.max() == 0


@pytest.mark.parametrize("overwrite", [False, True])
def test_never_overwrites_an_input(tmp_path, mr, overwrite):
    files = {f: f.read_bytes() for f in mr.source.iterdir()}
    with pytest.raises(OutputExistsError, match="refusing to overwrite an input"):
        write_scan(mr, mr.source, overwrite=overwrite)
    with pytest.raises(OutputExistsError, match="holds an input"):
        write_scan(mr, tmp_path, overwrite=overwrite)  # replacing the parent would delete it
    nii = write_scan(mr, tmp_path / "x.nii")
    scan = read_scan(nii)
    with pytest.raises(OutputExistsError, match="refusing to overwrite an input"):
        write_scan(scan, nii, overwrite=overwrite)
    other = tmp_path / "other.nii"
    other.write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="refusing to overwrite an input"):
        write_scan(scan, tmp_path / "." / "other.nii", overwrite=overwrite, protect=[other])
    assert other.read_bytes() == b"precious"
    assert {f: f.read_bytes() for f in mr.source.iterdir()} == files


def test_convert_protects_its_source(tmp_path):
    src = tmp_path / "ct.dcm"
    src.write_bytes(sample_path("ct").read_bytes())
    with pytest.raises(OutputExistsError):
        convert(src, src, overwrite=True)
    out = convert(src, tmp_path / "ct.nii.gz")
    back = convert(out, tmp_path / "ct_again.dcm")
    np.testing.assert_array_equal(read_scan(back).data, read_scan(src).data)
    np.testing.assert_allclose(read_scan(back).affine, read_scan(src).affine, atol=1e-5)


def test_folder_output_with_foreign_files_is_never_replaced(tmp_path, mr):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.docx").write_bytes(b"do not delete")
    with pytest.raises(OutputExistsError, match="not DICOM; refusing to replace it"):
        write_scan(mr, folder, overwrite=True)
    assert (folder / "thesis.docx").read_bytes() == b"do not delete"


def test_empty_existing_folder_is_a_valid_dicom_target(tmp_path, mr):
    (tmp_path / "out").mkdir()
    out = write_scan(mr, tmp_path / "out")
    assert len(list(out.iterdir())) == 24
    again = write_scan(mr.derive(mr.data + 1), out, overwrite=True)  # replaces the old series
    assert len(list(again.iterdir())) == 24
    assert read_scan(again).data.min() == mr.data.min() + 1


def test_failing_folder_write_leaves_nothing(tmp_path, mr, monkeypatch):
    calls = {"n": 0}
    real = dicom._save

    def flaky(ds, path):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        real(ds, path)

    monkeypatch.setattr(dicom, "_save", flaky)
    before = tree(tmp_path)
    with pytest.raises(OSError, match="disk full"):
        write_scan(mr, tmp_path / "series")
    assert tree(tmp_path) == before


def test_failing_overwrite_keeps_the_old_output(tmp_path, mr, monkeypatch):
    out = write_scan(mr, tmp_path / "keep.nii.gz")
    old = out.read_bytes()

    def boom(scan, tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(nifti, "write_nifti", boom)
    before = tree(tmp_path)
    with pytest.raises(OSError):
        write_scan(mr, out, overwrite=True)
    assert out.read_bytes() == old and tree(tmp_path) == before


def test_unwritable_data_refused_before_anything_is_written(tmp_path):
    bad = Scan(np.array([[[np.nan, 1.0]]], np.float32))
    with pytest.raises(BadArgumentError, match="NaN"):
        write_scan(bad, tmp_path / "nan_series")
    with pytest.raises(BadArgumentError, match="PNG holds one 2D image"):
        write_scan(Scan(np.zeros((2, 3, 3), np.uint8)), tmp_path / "two.png")
    with pytest.raises(BadArgumentError, match="unknown output type"):
        write_scan(Scan(np.zeros((1, 3, 3))), tmp_path / "x.xyz")
    assert tree(tmp_path) == []


def test_png_and_tiff_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 65535, size=(20, 30), dtype=np.uint16)
    Image.fromarray(gray).save(tmp_path / "g.png")
    scan = read_scan(tmp_path / "g.png")
    assert scan.shape == (1, 20, 30) and scan.meta["format"] == "image"
    np.testing.assert_array_equal(scan.data[0], gray)
    back = read_scan(write_scan(scan, tmp_path / "g2.png"))
    np.testing.assert_array_equal(back.data, scan.data)
    rgb = rng.integers(0, 255, size=(8, 9, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    lum = read_scan(tmp_path / "c.png")
    np.testing.assert_allclose(lum.data[0], rgb @ [0.299, 0.587, 0.114], atol=1e-3)
    assert lum.meta["converted_from"] == "RGB"
    floats = Scan(rng.normal(size=(3, 5, 6)).astype(np.float32))
    tif = write_scan(floats, tmp_path / "f.tif")
    np.testing.assert_array_equal(tifffile.imread(tif), floats.data)
    np.testing.assert_array_equal(read_scan(tif).data, floats.data)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    np.testing.assert_allclose(read_scan(tmp_path / "rgb.tif").data[0],
                               rgb @ [0.299, 0.587, 0.114], atol=1e-3)


def test_png_to_dicom_secondary_capture(tmp_path):
    img = np.arange(12, dtype=np.uint8).reshape(3, 4)
    Image.fromarray(img).save(tmp_path / "s.png")
    out = write_scan(read_scan(tmp_path / "s.png"), tmp_path / "s.dcm")
    ds = pydicom.dcmread(out)
    assert ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage and ds.Modality == "OT"
    np.testing.assert_array_equal(read_scan(out).data[0], img)
