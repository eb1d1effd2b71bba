"""Regenerate the sample scans in this folder from data shipped in installed PyPI packages.

Run: ``python sample_data/make_samples.py`` (needs nibabel, pydicom and pydicom-data).
Independent of napari_strainer on purpose: the derived ``mr_series/`` is written with plain
pydicom so that the tests can cross-check our reader against it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

HERE = Path(__file__).resolve().parent
NIB = Path(nib.__file__).parent / "tests" / "data"
PYD = Path(pydicom.__file__).parent / "data" / "test_files"


def data_store() -> Path:
    import data_store  # the pydicom-data package

    return Path(data_store.__file__).parent / "data"


def mr_brain() -> None:
    """First volume of nibabel's example4d.nii.gz (a 128x96x24 brain EPI)."""
    img = nib.load(NIB / "example4d.nii.gz")
    vol = np.asarray(img.dataobj[..., 0])
    out = nib.Nifti1Image(vol, img.affine, header=img.header.copy())
    out.header.set_data_shape(vol.shape)
    out.header.set_xyzt_units("mm", "sec")
    nib.save(out, HERE / "mr_brain.nii.gz")


def mr_series() -> None:
    """``mr_brain.nii.gz`` written as a classic MR DICOM series, one file per axial-ish slice.

    Geometry from the NIfTI affine (RAS -> LPS), int16 pixels, no rescale; file names are
    deliberately not in slice order. Valid for the MR Image IOD (``dciodvfy`` finds no error).
    """
    img = nib.load(HERE / "mr_brain.nii.gz")
    vol = np.asarray(img.dataobj).astype(np.int16)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine
    di, dj = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    row_cos, col_cos = lps[:3, 0] / di, lps[:3, 1] / dj
    normal = np.cross(row_cos, col_cos)
    study = generate_uid(entropy_srcs=["napari-strainer sample study"])
    series = generate_uid(entropy_srcs=["napari-strainer sample mr_series"])
    frame = generate_uid(entropy_srcs=["napari-strainer sample frame"])
    folder = HERE / "mr_series"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    nz = vol.shape[2]
    fmt = lambda v: [f"{x:.6f}".rstrip("0").rstrip(".") for x in v]
    for k in range(nz):
        ipp = lps[:3, 3] + k * lps[:3, 2]
        sop = generate_uid(entropy_srcs=["napari-strainer sample mr_series", str(k)])
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = pydicom.uid.MRImageStorage
        ds.SOPInstanceUID = sop
        ds.ImageType = ["DERIVED", "PRIMARY", "OTHER"]
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20000101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.AccessionNumber = ""
        ds.Modality = "MR"
        ds.Manufacturer = "nibabel example4d (converted)"
        ds.ReferringPhysicianName = ""
        ds.SeriesDescription = "EPI brain, nibabel example4d volume 0"
        ds.PatientName = "Sample^MR"
        ds.PatientID = "SAMPLE-MR"
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = "public example data; fictional patient fields"
        ds.BodyPartExamined = "BRAIN"  # unpaired: no Laterality
        ds.PatientPosition = "HFS"
        ds.ScanningSequence = "EP"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.EchoTime = ""
        ds.EchoTrainLength = ""
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.StudyID = "1"
        ds.SeriesNumber = "4"
        ds.InstanceNumber = str(k + 1)
        ds.FrameOfReferenceUID = frame
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = fmt(ipp)
        ds.ImageOrientationPatient = fmt(np.concatenate([row_cos, col_cos]))
        ds.SliceLocation = fmt([ipp @ normal])[0]
        ds.SliceThickness = fmt([np.linalg.norm(lps[:3, 2])])[0]
        ds.PixelSpacing = fmt([dj, di])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = vol.shape[1], vol.shape[0]
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.PixelData = np.ascontiguousarray(vol[:, :, k].T).astype("<i2").tobytes()
        fm = FileMetaDataset()
        fm.MediaStorageSOPClassUID = ds.SOPClassUID
        fm.MediaStorageSOPInstanceUID = sop
        fm.TransferSyntaxUID = ExplicitVRLittleEndian
        fm.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = fm
        # names not in slice order: a reader must sort by position, not by name
        ds.save_as(folder / f"{(k * 7) % nz:03d}_{sop[-6:]}", enforce_file_format=True)


def copy_files() -> None:
    shutil.copyfile(NIB / "anatomical.nii", HERE / "mr_anatomical.nii")
    shutil.copyfile(PYD / "CT_small.dcm", HERE / "ct_small.dcm")
    ds_dir = data_store()
    shutil.copyfile(ds_dir / "emri_small.dcm", HERE / "mr_multiframe.dcm")
    shutil.copyfile(ds_dir / "eCT_Supplemental.dcm", HERE / "ct_enhanced.dcm")
    shutil.copyfile(ds_dir / "693_J2KR.dcm", HERE / "ct_j2k.dcm")


if __name__ == "__main__":
    mr_brain()
    mr_series()
    copy_files()
    total = sum(f.stat().st_size for f in HERE.rglob("*") if f.is_file())
    print(f"sample_data: {total / 1e6:.2f} MB")
