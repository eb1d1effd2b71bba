"""Small synthetic scans shared by the batch and bundle tests."""

from pathlib import Path

import nibabel as nib
import numpy as np


def make_nifti(path: Path, seed: int, shape=(2, 16, 16)) -> Path:
    """Write a smooth int16 NIfTI (oblique-free, non-unit spacing, shifted origin)."""
    z, h, w = shape
    yy, xx = np.mgrid[:h, :w]
    data = np.stack([(np.sin(xx / 3 + seed) + np.cos(yy / 4 + k)) * 100 + 300
                     for k in range(z)]).astype(np.int16)
    aff = np.diag([0.9, 0.8, 3.0, 1.0])
    aff[:3, 3] = [-10, 5, 2]
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.transpose(2, 1, 0), aff), str(path))
    return path
