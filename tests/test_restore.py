"""Super-resolution and denoising: output geometry on real scans, noise estimate, stop rule."""

import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from napari_strainer.cli import main
from napari_strainer.core import BatchedSiren, Identity, SirenConfig, fit
from napari_strainer.core.problems import ImageProblem
from napari_strainer.io import read_scan
from napari_strainer.io.scan import Scan
from napari_strainer.restore.noise import DiscrepancyStop, estimate_sigma
from napari_strainer.restore.slices import restore


def test_superres_nifti_geometry(tiny_encoder, samples, tmp_path):
    src, out = samples / "mr_anatomical.nii", tmp_path / "x2.nii.gz"
    assert main(["superres", str(src), "-o", str(out), "--scale", "2", "--encoder",
                 str(tiny_encoder), "--steps", "2", "--quiet"]) == 0
    a, b = nib.load(src), nib.load(out)
    # nibabel order (i, j, k): k is the slice axis, i and j are refined
    assert b.shape == (a.shape[0] * 2, a.shape[1] * 2, a.shape[2])
    np.testing.assert_allclose(b.header.get_zooms()[:2], np.array(a.header.get_zooms()[:2]) / 2)
    np.testing.assert_allclose(b.header.get_zooms()[2], a.header.get_zooms()[2])
    # the mean of the first 2x2 block of fine centres is the first coarse centre
    np.testing.assert_allclose(b.affine @ [0.5, 0.5, 0, 1], a.affine @ [0, 0, 0, 1], atol=1e-4)
    np.testing.assert_allclose(b.affine @ [7.5, 3.5, 2, 1], a.affine @ [3.5, 1.5, 2, 1],
                               atol=1e-4)


def test_superres_dicom_series_to_dicom(tiny_encoder, samples, tmp_path):
    out = tmp_path / "sr_series"
    assert main(["superres", str(samples / "mr_series"), "-o", str(out), "--scale", "2",
                 "--encoder", str(tiny_encoder), "--steps", "1", "--quiet"]) == 0
    src, res = read_scan(samples / "mr_series"), read_scan(out)
    assert res.shape == (src.shape[0], src.shape[1] * 2, src.shape[2] * 2)
    np.testing.assert_allclose(res.spacing[1:], np.array(src.spacing[1:]) / 2, rtol=1e-4)
    np.testing.assert_allclose(res.affine @ [0, 0.5, 0.5, 1], src.affine @ [0, 0, 0, 1],
                               atol=1e-3)
    ds = pydicom.dcmread(next(out.iterdir()))  # the settings are recorded in the series
    assert ds.SeriesDescription == "INR super-resolution x2 (STRAINER, napari-strainer)"
    assert ds.DerivationDescription.startswith(ds.SeriesDescription + ": route ")
    assert "at most 1 Adam steps per slice at lr 0.0001" in ds.DerivationDescription
    assert ds.DerivationDescription.endswith("seed 0")


def test_estimate_sigma_on_real_slice():
    clean = read_scan_norm()
    rng = np.random.default_rng(0)
    for sigma in (0.05, 0.1):
        est = estimate_sigma(clean + rng.normal(0, sigma, clean.shape))
        assert abs(est / sigma - 1) < 0.25, est


def test_estimate_sigma_of_a_volume():
    """3D input: the band that is high-pass along all three axes (odd sizes are cropped);
    a linear ramp along every axis leaves it unchanged."""
    rng = np.random.default_rng(1)
    noise = rng.normal(0, 0.1, (21, 41, 39))
    assert estimate_sigma(noise) == pytest.approx(0.1, rel=0.08)
    z, y, x = np.mgrid[:21, :41, :39]
    assert estimate_sigma(noise + 0.3 * z + 0.1 * y - 0.2 * x) == pytest.approx(
        estimate_sigma(noise), rel=1e-9)


def read_scan_norm():
    from napari_strainer.io import sample_path
    from napari_strainer.io.intensity import Intensity

    s = read_scan(sample_path("mr_brain"))
    return Intensity.of(s.data).forward(s.data)[12].astype(np.float64)


def test_stop_rule_stops_each_member_and_keeps_its_snapshot():
    cfg = SirenConfig(width=32, layers=4, shared_layers=3)
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 64, 1, generator=g)
    net = BatchedSiren(cfg, batch=2)
    rule = DiscrepancyStop(np.array([0.25, 0.01]), factor=1.0)  # member 0 stops much earlier
    res = fit(net, ImageProblem(target, Identity((8, 8))), steps=300, lr=1e-3, stop=rule,
              log_every=1)
    assert res.stop_step[0] is not None
    assert res.stop_step[1] is None or res.stop_step[1] > res.stop_step[0]
    with torch.no_grad():
        from napari_strainer.core.coords import grid

        loss0 = ((net(grid((8, 8)))[0] - target[0]) ** 2).mean().item()
    # the kept weights are those where the residual just crossed sigma, not later ones
    assert 0.02 < loss0 <= 0.25**2


def test_denoise_cli_records_stop(tiny_encoder, samples, tmp_path):
    hist = tmp_path / "h.json"
    assert main(["denoise", str(samples / "mr_anatomical.nii"), "-o", str(tmp_path / "d.nii"),
                 "--mode", "slices", "--encoder", str(tiny_encoder), "--sigma", "30000",
                 "--steps", "30",
                 "--history", str(hist), "--quiet", "--batch-size", "25"]) == 0
    h = json.loads(hist.read_text())
    assert h["task"] == "denoise" and len(h["stop_step"]) == 25
    assert all(s is not None for s in h["stop_step"]), h["stop_step"]
    assert "discrepancy" in h["stop_reason"]
    assert h["iterations"][-1] < 30  # every slice stopped: the loop ended early


def test_restore_keeps_units_and_dtype():
    """A real slice fitted for a while comes back in the scan's units (PSNR > 25 dB)."""
    s = read_scan_norm()[::3, ::3]
    raw = (s * 1000 + 50).astype(np.int16)
    scan = Scan(raw[None], np.eye(4))
    r = restore(scan, task="fit", encoder="default", steps=150, reference=scan, device="cpu")
    assert r.scan.data.dtype == np.int16
    assert r.history["psnr"][-1] > 25


def test_restore_bad_arguments(tiny_encoder):
    from napari_strainer.errors import BadArgumentError

    scan = Scan(np.zeros((1, 8, 8), np.float32), np.eye(4))
    with pytest.raises(BadArgumentError, match="--scale"):
        restore(scan, task="superres", scale=0, encoder=str(tiny_encoder))
    with pytest.raises(BadArgumentError, match="--freeze must be between 0 and 3"):
        restore(scan, task="fit", freeze=4, encoder=str(tiny_encoder))
    with pytest.raises(BadArgumentError, match="GiB"):
        restore(Scan(np.zeros((300, 512, 512), np.float32)), task="superres", scale=4,
                encoder=str(tiny_encoder))
    with pytest.raises(BadArgumentError, match="unknown task"):
        restore(scan, task="inpaint")
