"""Volumes: slice-profile operators, through-plane super-resolution, fusion of stacks and volume
denoising on real NIfTI and DICOM files (a few steps each: geometry and refusals, not quality;
quality is benchmarks/volume.py's job)."""

import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from napari_strainer.cli import main
from napari_strainer.core.fit import PlateauStop, fit
from napari_strainer.core.operators import Stack, TVPrior, profile_quadrature
from napari_strainer.core.problems import StackProblem
from napari_strainer.core.siren import BatchedSiren, SirenConfig
from napari_strainer.core.solvers import fit_grid
from napari_strainer.core.world import Grid, WorldFrame, render_grid
from napari_strainer.io import read_scan, write_scan
from napari_strainer.io.scan import Scan, upsampled_affine
from napari_strainer.restore.volume import output_grid

OBLIQUE = np.array([[0.0, 1.2, 1.6, -30], [0.0, 1.6, -1.2, 12], [2.5, 0, 0, 7], [0, 0, 0, 1]])


def test_profile_quadrature():
    o, w = profile_quadrature("box", 4.0, 1.0)
    np.testing.assert_allclose(o, [-1.5, -0.5, 0.5, 1.5])
    np.testing.assert_allclose(w, 0.25)
    o, w = profile_quadrature("box", 2.0, 1.0)  # a gap: thickness 2 of a 4 mm spacing
    np.testing.assert_allclose(o, [-0.5, 0.5])
    assert profile_quadrature("box", 1.2, 1.0)[0].tolist() == [0.0]
    o, w = profile_quadrature("gaussian", 3.0, 1.0)  # FWHM 3: odd count, centred
    assert len(o) % 2 == 1 and o[len(o) // 2] == 0 and abs(w.sum() - 1) < 1e-12
    np.testing.assert_allclose(w, w[::-1])
    sigma = 3.0 / 2.3548
    assert abs(np.sqrt((w * o ** 2).sum()) - sigma) < 0.05 * sigma
    assert len(profile_quadrature("gaussian", 4.0, 1.0)[0]) % 2 == 0


def test_stack_places_its_profile_along_its_own_normal():
    frame = WorldFrame(np.array([[-80, -80, -80], [80, 80, 80]]))
    stack = Stack(torch.zeros(4, 5, 6), OBLIQUE, frame, 0.5, thickness=5.0)
    assert stack.samples == 10 * 4 * 4  # 5 mm / 0.5 mm along the normal, 2 mm / 0.5 in-plane
    pts = stack.points(torch.tensor([0, 37]))
    world = (pts.double().numpy() * frame.half + frame.centre).reshape(2, -1, 3)
    centres = np.array([[0, 0, 0, 1], [1, 1, 1, 1]]) @ OBLIQUE.T
    w = stack.weights.double().numpy()
    np.testing.assert_allclose(w @ world[0], centres[0, :3], atol=1e-3)
    np.testing.assert_allclose(w @ world[1], centres[1, :3], atol=1e-3)
    along = (world[0] - centres[0, :3]) @ stack.normal
    np.testing.assert_allclose([along.min(), along.max()], [-2.25, 2.25], atol=1e-3)
    # in-plane footprint: a box of the pixel spacing (2 mm), sampled at 0.5 mm
    inplane = (world[0] - centres[0, :3]) @ (OBLIQUE[:3, 1] / np.linalg.norm(OBLIQUE[:3, 1]))
    np.testing.assert_allclose([inplane.min(), inplane.max()], [-0.75, 0.75], atol=1e-3)


def test_fit_volume_learns_a_thick_slice_stack():
    torch.manual_seed(0)
    z, y, x = np.mgrid[:8, :8, :8]
    truth = (np.sin(z / 2.0) + np.cos(y / 3.0) * x / 8).astype(np.float32)
    thick = truth.reshape(4, 2, 8, 8).mean(1)
    fine = Grid((8, 8, 8), np.eye(4))
    frame = WorldFrame(fine.corners_mm())
    coarse = np.eye(4)
    coarse[0, 0], coarse[0, 3] = 2, 0.5
    stack = Stack(torch.from_numpy(thick), coarse, frame, 1.0)
    assert stack.samples == 2
    net = BatchedSiren(SirenConfig(in_features=3, width=32, layers=3, shared_layers=2,
                                   omega_first=8), batch=1)
    prior = TVPrior(fine, [[1.0, 0, 0]], 1e-4, points=64)
    res = fit(net, StackProblem([stack], frame, fine, batch=128, prior=prior), steps=60, lr=3e-3)
    assert res.history["loss"][-1] < 0.05 * res.history["loss"][0]
    out = render_grid(net, fine, frame, chunk=100)
    assert out.shape == (8, 8, 8)
    # the thick slices of the rendering match the observed ones
    assert np.abs(out.numpy().reshape(4, 2, 8, 8).mean(1) - thick).mean() < 0.05


def test_fit_volume_weight_average_removes_minibatch_jitter():
    """A fast, jittery fit of a noisy volume: the averaged weights render closer to the truth
    than the last iterate, and they are what the monitor saw and what the net holds after."""
    z, y, x = np.mgrid[:12, :12, :12]
    truth = (np.sin(z / 3.0) + np.cos(y / 4.0) * x / 12).astype(np.float32)
    noisy = truth + np.random.default_rng(0).normal(0, 0.2, truth.shape).astype(np.float32)
    grid = Grid(truth.shape, np.eye(4))
    frame = WorldFrame(grid.corners_mm())
    stack = Stack(torch.from_numpy(noisy), np.eye(4), frame, 1.0)
    errors = {}
    for average in (0.0, 0.9):
        for seed in range(3):
            net = BatchedSiren(SirenConfig(in_features=3, width=32, layers=3, shared_layers=2,
                                           omega_first=4), batch=1, seed=seed)

            def mse(params=None, net=net):
                out = render_grid(net, grid, frame, params=params).numpy()
                return float(((out - truth) ** 2).mean())

            res = fit(net,
                      StackProblem([stack], frame, grid, batch=128, monitor=mse, monitor_every=50),
                      steps=150, lr=3e-3, average=average, keep_best=False, seed=seed)
            assert res.history["psnr"][-1] == pytest.approx(mse(), rel=1e-5)
            errors.setdefault(average, []).append(mse())
    assert sum(errors[0.9]) < 0.7 * sum(errors[0.0])
    with pytest.raises(ValueError, match="average"):
        fit(net, StackProblem([stack], frame, grid), steps=1, average=1.0)


def test_fit_volume_holdout_is_never_trained_and_chooses_the_kept_weights():
    """Held-out voxels (here corrupted) never pull the fit; their error picks the kept step,
    and the fit ends ``patience`` steps after it stopped improving."""
    from napari_strainer.core.problems import _split

    z, y, x = np.mgrid[:12, :12, :12]
    truth = (np.sin(z / 3.0) + np.cos(y / 4.0) * x / 12).astype(np.float32)
    grid = Grid(truth.shape, np.eye(4))
    frame = WorldFrame(grid.corners_mm())
    values = torch.from_numpy(truth.copy())
    _, (held,) = _split([Stack(values, np.eye(4), frame, 1.0)], 0.2, 0, "cpu")
    values.view(-1)[held] = 50.0  # absurd: a fit that saw them would be far off
    stack = Stack(values, np.eye(4), frame, 1.0)
    net = BatchedSiren(SirenConfig(in_features=3, width=32, layers=3, shared_layers=2,
                                   omega_first=4), batch=1, seed=0)
    res = fit(net, StackProblem([stack], frame, grid, batch=128, holdout=0.2), steps=400, lr=3e-3,
              seed=0, stop=PlateauStop(30, 0.0), validate_every=10)
    out = render_grid(net, grid, frame).numpy()
    assert np.abs(out - truth).mean() < 0.1
    h = res.history
    assert len(h["val_loss"]) == len(h["iterations"]) and min(h["val_loss"]) > 1000
    stop, best = res.stop_step[0], res.best_step[0]
    assert stop is not None and stop < 400 and stop - best >= 30 and best % 10 == 0


def _pairs_stack():
    """A smooth 8^3 truth, its grid and frame, and a stack of its slice pairs (box x2)."""
    z, y, x = np.mgrid[:8, :8, :8]
    truth = (np.sin(z / 2.0) + np.cos(y / 3.0) * x / 8).astype(np.float32)
    fine = Grid((8, 8, 8), np.eye(4))
    frame = WorldFrame(fine.corners_mm())
    coarse = np.eye(4)
    coarse[0, 0], coarse[0, 3] = 2, 0.5
    stack = Stack(torch.from_numpy(truth.reshape(4, 2, 8, 8).mean(1)), coarse, frame, 1.0)
    return truth, fine, frame, stack


def test_fit_grid_uses_every_observation_in_bounded_chunks():
    """Least squares sees all data each step: the result does not depend on the chunk size,
    and it moves from a flat start towards the observations."""
    truth, fine, frame, stack = _pairs_stack()
    init = torch.zeros(8, 8, 8)
    runs = [fit_grid([stack], fine, frame, init, steps=40, chunk=c).values.flatten()
            for c in (7, 1 << 16)]
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-4, atol=1e-5)
    err = lambda v: float(((v.reshape(8, 8, 8).numpy() - truth) ** 2).mean())
    assert err(runs[0]) < 0.2 * err(init)


def test_fit_grid_data_consistency_keeps_what_the_data_leave_open():
    """With an anchor (fusion's step after the INR) least squares removes the part of the
    start that disagrees with the data and keeps the part the stack cannot see: here a pattern
    that averages to zero within each thick slice."""
    truth, fine, frame, stack = _pairs_stack()
    unseen = np.where(np.arange(8)[:, None, None] % 2 == 0, 0.2, -0.2) + np.zeros_like(truth)  # zero mean per thick slice
    wrong = np.full_like(truth, 0.3)  # the same in both halves: the stack sees it
    unseen = unseen.astype(np.float32)
    start = torch.from_numpy(truth + unseen + wrong)
    # far more steps than it needs: converged, it stops instead of amplifying float32 rounding
    out = fit_grid([stack], fine, frame, start, steps=500, smooth=0.0, anchor=1e-4)
    out = out.values.reshape(8, 8, 8).numpy()
    np.testing.assert_allclose(out, truth + unseen, atol=2e-3)


def test_superres_slice_scale_nifti(samples, tmp_path):
    src, out, hist = samples / "mr_anatomical.nii", tmp_path / "z2.nii.gz", tmp_path / "h.json"
    assert main(["superres", str(src), "-o", str(out), "--slice-scale", "2", "--steps", "3",
                 "--history", str(hist), "--quiet"]) == 0
    a, b = read_scan(src), read_scan(out)
    assert b.shape == (a.shape[0] * 2, a.shape[1], a.shape[2])
    assert b.data.dtype == a.data.dtype
    np.testing.assert_allclose(b.affine, upsampled_affine(a.affine, (2, 1, 1)), atol=1e-5)
    img = nib.load(out)  # nibabel order: the slice axis is the last
    np.testing.assert_allclose(img.header.get_zooms(), (2.0, 2.0, 1.0), atol=1e-5)
    # averaging the 2 fine slices of input slice k gives its centre
    np.testing.assert_allclose(img.affine @ [3, 4, 2 * 5 + 0.5, 1],
                               nib.load(src).affine @ [3, 4, 5, 1], atol=1e-4)
    h = json.loads(hist.read_text())
    assert h["slice_scale"] == 2 and h["profile"] == "box" and h["slice_thickness_mm"] == 2.0
    assert h["steps_done"] == 3 and h["ls_steps"] == 100
    # the data-consistency step: each pair of output slices averages to its input slice
    # (3 INR steps alone are far from it), up to the integer output's rounding (and the one
    # bright voxel whose pair would need a value beyond int16)
    pairs = b.data.astype(np.float64).reshape(a.shape[0], 2, *a.shape[1:]).mean(1)
    err = np.abs(pairs - a.data) / np.ptp(a.data)
    assert np.percentile(err, 99.9) < 1e-3 and err.mean() < 1e-4, err.max()


def test_superres_slice_and_inplane_dicom_series(samples, tmp_path):
    series, out = tmp_path / "series", tmp_path / "sr_series"
    write_scan(read_scan(samples / "mr_anatomical.nii"), series)
    assert main(["superres", str(series), "-o", str(out), "--slice-scale", "2",
                 "--scale", "2", "--slice-profile", "gaussian", "--slice-thickness", "3",
                 "--steps", "1", "--quiet"]) == 0
    src, res = read_scan(series), read_scan(out)
    assert res.shape == (src.shape[0] * 2, src.shape[1] * 2, src.shape[2] * 2)
    assert len(list(out.iterdir())) == src.shape[0] * 2  # one file per new slice
    np.testing.assert_allclose(res.affine, upsampled_affine(src.affine, (2, 2, 2)), atol=1e-3)
    assert res.meta["slice_spacing"] == pytest.approx(src.spacing[0] / 2, rel=1e-4)
    ds = pydicom.dcmread(next(out.iterdir()))  # the settings are recorded in the series
    assert "gaussian slice profile of 3 mm" in ds.DerivationDescription
    assert "1 Adam steps" in ds.DerivationDescription and "seed 0" in ds.DerivationDescription
    assert ds.SeriesDescription in ds.DerivationDescription


def test_superres_thickness_from_dicom(samples):
    from napari_strainer.restore.volume import scan_thickness

    assert scan_thickness(read_scan(samples / "mr_series")) == pytest.approx(2.2, rel=1e-3)
    scan = read_scan(samples / "mr_anatomical.nii")
    assert scan_thickness(scan) == 2.0


def _orthogonal_stacks(samples, tmp_path, f=2):
    """Three NIfTI stacks of the sample T1, each f times thicker along its own axis."""
    scan = read_scan(samples / "mr_anatomical.nii")
    data = scan.data[:24, :40, :32].astype(np.float32)
    paths = []
    for axis in range(3):
        thick = np.moveaxis(data, axis, 0)
        thick = thick.reshape(thick.shape[0] // f, f, *thick.shape[1:]).mean(1)
        perm = [axis] + [i for i in range(3) if i != axis]
        aff = upsampled_affine(scan.affine, (1, 1, 1)).copy()
        aff[:3, 3] += aff[:3, axis] * (f - 1) / 2
        aff[:3, axis] *= f
        aff[:, :3] = aff[:, perm]
        p = tmp_path / f"stack{axis}.nii.gz"
        write_scan(Scan(thick.astype(np.int16) * (axis + 1), aff, {"format": "nifti"}), p)
        paths.append(p)
    return scan, paths


def test_fuse_orthogonal_stacks(samples, tmp_path):
    scan, paths = _orthogonal_stacks(samples, tmp_path)
    out, hist = tmp_path / "fused.nii.gz", tmp_path / "h.json"
    assert main(["fuse", *map(str, paths), "-o", str(out), "--steps", "2", "--ls-steps", "5",
                 "--history", str(hist), "--quiet"]) == 0
    first, res = read_scan(paths[0]), read_scan(out)
    # the first stack's orientation and field of view, isotropic at the finest spacing (2 mm)
    assert res.shape == (24, 40, 32)
    np.testing.assert_allclose(res.spacing, (2, 2, 2), atol=1e-5)
    np.testing.assert_allclose(res.affine, upsampled_affine(first.affine, (2, 1, 1)),
                               atol=1e-5)
    np.testing.assert_allclose(res.affine[:3, 3], scan.affine[:3, 3], atol=1e-5)
    h = json.loads(hist.read_text())
    assert h["stacks"] == 3 and h["spacing_mm"] == 2.0 and len(h["normalization"]["per_stack"])
    assert h["ls_steps"] == 5 and h["steps_done"] == 2


def test_output_grid_with_a_non_integer_spacing():
    first = Scan(np.zeros((5, 6, 7), np.float32), OBLIQUE)
    g = output_grid(first, 1.5)
    assert g.shape == (8, 8, 9)
    np.testing.assert_allclose(g.spacing, 1.5)
    np.testing.assert_allclose(g.corners_mm().mean(0), Grid(first.shape,
                                                            OBLIQUE).corners_mm().mean(0))


def _refused(capsys, argv, out):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("strainer") and "error:" in err and "\n" not in err
    assert not out.exists()
    return err


def test_fuse_refusals(samples, tmp_path, capsys):
    _, paths = _orthogonal_stacks(samples, tmp_path)
    out = tmp_path / "out.nii.gz"
    assert "at least two" in _refused(capsys, ["fuse", str(paths[0]), "-o", str(out)], out)
    far = tmp_path / "far.nii.gz"
    moved = read_scan(paths[1])
    moved.affine[:3, 3] += 1000
    write_scan(moved, far)
    err = _refused(capsys, ["fuse", str(paths[0]), str(far), "-o", str(out)], out)
    assert "does not overlap" in err
    err = _refused(capsys, ["fuse", str(paths[0]), str(samples / "ct_small.dcm"), "-o",
                            str(out)], out)
    assert "2D" in err
    err = _refused(capsys, ["fuse", *map(str, paths), "-o", str(out), "--spacing", "0.01"], out)
    assert "GiB" in err
    err = _refused(capsys, ["fuse", *map(str, paths), "-o", str(out), "--encoder", "x.st"], out)
    assert "--encoder" in err
    # DICOM series from different frames of reference
    series = read_scan(samples / "mr_series")
    a, b = tmp_path / "a", tmp_path / "b"
    write_scan(series, a)
    other = read_scan(samples / "mr_series")
    tpl = other.meta["dicom_template"].copy()
    tpl.FrameOfReferenceUID = "1.2.3.4.5"
    other.meta["dicom_template"] = tpl
    write_scan(other, b)
    err = _refused(capsys, ["fuse", str(a), str(b), "-o", str(out)], out)
    assert "frames of reference" in err


@pytest.mark.parametrize("args, text", [
    (["--slice-scale", "1"], "integer >= 2"),
    (["--slice-scale", "2.5"], "integer >= 2"),
    (["--slice-scale", "100000"], "GiB"),
    (["--slice-scale", "2", "--encoder", "my.safetensors"], "--encoder none"),
    ([], "--slice-scale"),
])
def test_superres_refusals(samples, tmp_path, capsys, args, text):
    out = tmp_path / "out.nii.gz"
    err = _refused(capsys, ["superres", str(samples / "mr_anatomical.nii"), "-o", str(out),
                            *args], out)
    assert text in err


def test_superres_refuses_a_2d_input(samples, tmp_path, capsys):
    out = tmp_path / "out.nii.gz"
    err = _refused(capsys, ["superres", str(samples / "ct_small.dcm"), "-o", str(out),
                            "--slice-scale", "2"], out)
    assert "2D" in err


def test_denoise_volume_and_slices_modes(samples, tmp_path, tiny_encoder, capsys):
    src = samples / "mr_anatomical.nii"
    vol, hv = tmp_path / "v.nii.gz", tmp_path / "v.json"
    assert main(["denoise", str(src), "-o", str(vol), "--mode", "volume", "--steps", "3",
                 "--history", str(hv), "--quiet"]) == 0
    h = json.loads(hv.read_text())
    assert h["task"] == "denoise_volume" and h["sigma"] > 0 and h["tv_weight"] > 0
    res = read_scan(vol)
    assert res.shape == read_scan(src).shape
    np.testing.assert_allclose(res.affine, read_scan(src).affine, atol=1e-5)
    sl, hs = tmp_path / "s.nii.gz", tmp_path / "s.json"
    assert main(["denoise", str(src), "-o", str(sl), "--steps", "2", "--mode", "slices",
                 "--encoder", str(tiny_encoder), "--history", str(hs), "--quiet"]) == 0
    assert "freeze" in json.loads(hs.read_text())
    # the default (auto) denoises by the race of denoisers; an encoder is not used there, and
    # the CLI says so
    au, ha = tmp_path / "a.nii.gz", tmp_path / "a.json"
    assert main(["denoise", str(src), "-o", str(au), "--steps", "2", "--encoder",
                 str(tiny_encoder), "--history", str(ha)]) == 0
    assert json.loads(ha.read_text())["path"] == "race"
    assert "race uses no encoder; --mode slices uses" in capsys.readouterr().err
    # a 2D input takes the slice path whatever the mode
    ct = tmp_path / "ct.nii.gz"
    assert main(["denoise", str(samples / "ct_small.dcm"), "-o", str(ct), "--steps", "2",
                 "--mode", "volume",
                 "--encoder", str(tiny_encoder), "--quiet"]) == 0


def _dicom_stacks(samples, tmp_path, f=2):
    """Three DICOM series of one study and frame of reference: the centre of the sample MR
    series, each f times thicker along its own axis (new series written from the sample's)."""
    series = read_scan(samples / "mr_series")
    data = series.data[:, 28:68, 48:80].astype(np.float32)
    crop = series.affine.copy()
    crop[:3, 3] += crop[:3, :3] @ [0, 28, 48]
    paths = []
    for axis in range(3):
        thick = np.moveaxis(data, axis, 0)
        thick = thick[:thick.shape[0] // f * f].reshape(-1, f, *thick.shape[1:]).mean(1)
        aff = crop.copy()
        aff[:3, 3] += aff[:3, axis] * (f - 1) / 2
        aff[:3, axis] *= f
        aff[:, :3] = aff[:, [axis] + [i for i in range(3) if i != axis]]
        stack = series.derive(np.rint(thick).astype(np.int16), affine=aff,
                              description=f"stack {axis}")
        paths.append(write_scan(stack, tmp_path / f"stack{axis}"))
    return paths


def test_fused_dicom_series_references_every_stack(samples, tmp_path):
    """Each fused slice references, from every stack, the source slice nearest its centre, and
    each stack's series (all in the output's study)."""
    paths = _dicom_stacks(samples, tmp_path)
    out = tmp_path / "fused"
    assert main(["fuse", *map(str, paths), "-o", str(out), "--steps", "0", "--ls-steps", "2",
                 "--quiet"]) == 0
    stacks = [[pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(p.iterdir())]
              for p in paths]
    by_uid = {ds.SOPInstanceUID: (k, ds) for k, st in enumerate(stacks) for ds in st}
    files = sorted(out.iterdir())
    assert len(files) > 10
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        along_row, along_col = np.array(ds.ImageOrientationPatient, float).reshape(2, 3)
        centre = np.array(ds.ImagePositionPatient, float) + (
            along_row * (ds.Columns - 1) * ds.PixelSpacing[1]
            + along_col * (ds.Rows - 1) * ds.PixelSpacing[0]) / 2
        seen = set()
        for ref in ds.SourceImageSequence:
            k, src = by_uid[ref.ReferencedSOPInstanceUID]  # a real image of an input stack
            assert ref.ReferencedSOPClassUID == src.SOPClassUID
            iop = np.array(src.ImageOrientationPatient, float)
            normal = np.cross(iop[:3], iop[3:])
            along = (centre - np.array(src.ImagePositionPatient, float)) @ normal
            assert abs(along) <= src.SpacingBetweenSlices / 2 + 1e-3  # the nearest slice
            seen.add(k)
        assert seen == {0, 1, 2}
        assert len(ds.SourceImageSequence) == 3
        assert {s.SeriesInstanceUID: [i.ReferencedSOPInstanceUID
                                      for i in s.ReferencedInstanceSequence]
                for s in ds.ReferencedSeriesSequence} == {
            st[0].SeriesInstanceUID: [r.ReferencedSOPInstanceUID for r in ds.SourceImageSequence
                                      if by_uid[r.ReferencedSOPInstanceUID][0] == k]
            for k, st in enumerate(stacks)}
        assert ds.StudyInstanceUID == stacks[0][0].StudyInstanceUID
