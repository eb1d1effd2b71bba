"""The planner: one decision of how a scan is restored, shown by ``--plan``, carried out by run."""

import json
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

from napari_strainer.cli import main
from napari_strainer.errors import BadArgumentError, BadInputError
from napari_strainer.io import read_scan
from napari_strainer.io.scan import Scan
from napari_strainer.restore.plan import Options, make_plan, run


def _volume(path, shape=(48, 56, 24), seed=0):
    """A NIfTI volume with structure and noise, ``shape`` in NIfTI (x, y, z) order."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    data = 800 * (x * x + y * y + z * z < 0.6) + 200 * np.sin(4 * x) + 40 * rng.normal(
        size=shape)
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.diag([1.0, 1.0, 2.0, 1.0])), path)
    return path


def test_plan_flag_prints_path_and_eta_quickly_and_writes_nothing(tmp_path):
    """The bar: ``strainer denoise SCAN -o OUT --plan`` on 48 x 56 x 24 voxels."""
    src = _volume(tmp_path / "v.nii.gz")
    out, hist = tmp_path / "out.nii.gz", tmp_path / "h.json"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "napari_strainer.cli", "denoise", str(src),
                           "-o", str(out), "--history", str(hist), "--plan"],
                          check=False, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    assert seconds < 30
    text = proc.stdout
    assert "path: race" in text and "ETA: about " in text and "cpu (" in text
    assert "noise: " in text and ", sigma " in text and "why: mode auto" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.nii.gz"]


def test_plan_names_each_path_and_its_reason(samples, tmp_path, capsys):
    src = _volume(tmp_path / "v.nii.gz", shape=(20, 24, 8))
    cases = [
        (["denoise", str(src), "--mode", "slices"], "path: slices", "--mode slices"),
        (["denoise", str(samples / "ct_small.dcm")], "path: race", "mode auto"),
        (["denoise", str(src), "--mode", "volume"], "path: volume", "--mode volume"),
        (["superres", str(src), "--scale", "2"], "path: slices", "super-resolution x2"),
        (["superres", str(src), "--slice-scale", "2"], "path: volume", "--slice-scale 2"),
        (["fit", str(src), "--encoder", "none"], "route: auto: SIREN", "batch(es)"),
        (["fuse", str(src), str(src)], "path: fuse", "first stack's orientation"),
    ]
    for args, path, why in cases:
        assert main([*args, "-o", str(tmp_path / "o.nii.gz"), "--plan"]) == 0, args
        text = capsys.readouterr().out
        assert path in text and why in text, (args, text)
        assert "ETA: " in text and "memory: about " in text
    assert not (tmp_path / "o.nii.gz").exists()


def test_run_follows_the_plan_and_records_it(tmp_path):
    scan = read_scan(_volume(tmp_path / "v.nii.gz", shape=(16, 16, 6)))
    plan = make_plan(scan, Options(task="denoise", steps=3, seed=1, mode="volume"), eta=False)
    assert plan.path == "volume" and plan.eta_seconds is None
    res = run(plan)
    assert res.history["task"] == "denoise_volume"
    assert res.history["plan"]["path"] == "volume" and res.scan.shape == scan.shape
    plan = make_plan(scan, Options(task="denoise", mode="slices", encoder="none", steps=3))
    assert plan.path == "slices" and plan.eta_seconds > 0
    res = run(plan)
    assert res.history["plan"]["path"] == "slices" and "route" in res.history


@pytest.mark.parametrize("options, message", [
    ({"task": "superres", "scale": None}, "superres needs --scale"),
    ({"task": "denoise", "sigma": "loud"}, "--sigma must be auto, none or a noise level"),
    ({"task": "denoise", "sigma": -1}, "--sigma must be a finite noise level > 0"),
    ({"task": "denoise", "sigma": "inf"}, "--sigma must be a finite noise level > 0"),
    ({"task": "denoise", "sigma": 0}, "--sigma 0 means a scan without noise"),
    ({"task": "fit", "holdout": 0.9}, "--holdout must be in (0, 0.5]"),
    ({"task": "fit", "init": "warm"}, "--init must be one of auto, fixed"),
    ({"task": "superres", "slice_scale": 1}, "--slice-scale must be an integer >= 2"),
    ({"task": "fuse", "encoder": "enc.safetensors"}, "the volume methods fit a 3D SIREN"),
    ({"task": "paint"}, "unknown task 'paint'"),
])
def test_options_refuse_bad_values_in_one_line(options, message):
    with pytest.raises(BadArgumentError) as e:
        Options(**options)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_plan_checks_the_scan_once(samples, tmp_path):
    ct = read_scan(samples / "ct_small.dcm")
    with pytest.raises(BadInputError, match="needs a 3D scan"):
        make_plan(ct, Options(task="superres", slice_scale=2, scale=None))
    with pytest.raises(BadArgumentError, match="output needing"):
        make_plan(ct, Options(task="superres", scale=200))
    with pytest.raises(BadArgumentError, match="--reference has shape"):
        make_plan(ct, Options(task="fit"), reference=Scan(np.zeros((1, 4, 4), np.float32)))
    with pytest.raises(BadArgumentError, match="--freeze must be between 0 and 0"):
        make_plan(ct, Options(task="fit", encoder="none", freeze=2))


def test_ct_uses_the_hu_window_on_every_path(samples, tmp_path):
    """One intensity policy: a CT volume is HU-windowed on the volume path as on slices."""
    ct = read_scan(samples / "ct_small.dcm")
    vol = ct.derive(np.repeat(ct.data[:, 52:76, 52:76], 4, axis=0))
    assert vol.modality == "CT"
    res = run(make_plan(vol, Options(task="denoise", mode="volume", encoder="none", steps=2),
                        eta=False))
    assert res.history["normalization"]["method"] == "fixed_window"
    res = run(make_plan(vol, Options(task="superres", slice_scale=2, scale=None, steps=2,
                                     ls_steps=1, encoder="none"), eta=False))
    assert res.history["normalization"]["method"] == "fixed_window"
    mr = read_scan(samples / "mr_brain.nii.gz")
    res = run(make_plan(mr.derive(mr.data[10:14, 40:56, 40:56]), Options(
        task="denoise", mode="volume", encoder="none", steps=2), eta=False))
    assert res.history["normalization"]["method"] == "robust_percentile"
    json.dumps(res.history, default=str)


def test_a_constant_scan_is_returned_at_once(tmp_path, capsys):
    """Nothing to fit: one line says so and the output is the constant on the output grid."""
    src = tmp_path / "zero.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 10), np.float32), np.eye(4)), src)
    for verb, extra, shape in (("denoise", [], (10, 20, 20)),
                               ("superres", ["--slice-scale", "2"], (20, 20, 20))):
        out = tmp_path / f"{verb}.nii.gz"
        t0 = time.perf_counter()
        assert main([verb, str(src), "-o", str(out), *extra]) == 0
        assert time.perf_counter() - t0 < 10
        assert "the scan is constant (0 in every voxel)" in capsys.readouterr().out
        res = read_scan(out)
        assert res.shape == shape and not res.data.any()
