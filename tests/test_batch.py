"""Batch processing of scan folders: datalist and naming, sharding, skip/resume, atomic
outputs, per-scan errors, and a real kill-and-resume of ``strainer batch``."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import make_nifti

from napari_strainer.batch import (
    TaskOptions,
    datalist,
    manifest_path,
    read_manifest,
    run_items,
    shard,
)
from napari_strainer.cli import main
from napari_strainer.core.siren import SirenConfig
from napari_strainer.io import read_scan, upsampled_affine, write_scan
from napari_strainer.pretrain.distributed import shard_bounds
from napari_strainer.pretrain.train import pretrain

ROOT = Path(__file__).resolve().parents[1]
TINY = SirenConfig(width=16, layers=4, shared_layers=3)


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("enc") / "tiny.safetensors"
    pretrain(torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)), out,
             config=TINY, steps=3, device="cpu")
    return out


@pytest.fixture
def folder(tmp_path) -> Path:
    src = tmp_path / "in"
    for i in range(3):
        make_nifti(src / f"scan{i}.nii.gz", i)
    # a DICOM series folder (derived series written by our writer)
    series = read_scan(src / "scan0.nii.gz")
    write_scan(series.derive(series.data, description="test series"), src / "series")
    return src


def options(encoder, **kw) -> TaskOptions:
    return TaskOptions(**{"task": "fit", "encoder": str(encoder), "steps": 3, "device": "cpu",
                          **kw})


def test_shard_covers_every_item_exactly_once():
    for n in range(8):
        items = list(range(n))
        for world in range(1, 5):
            parts = [shard(items, r, world) for r in range(world)]
            assert sorted(x for part in parts for x in part) == items
            bounds = [shard_bounds(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(bounds[k][1] == bounds[k + 1][0] for k in range(world - 1))
            assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1


def test_datalist_names_outputs_like_inputs(folder, tmp_path):
    make_nifti(folder / "sub" / "scan0.nii", 5)  # nested, same stem as a top-level scan
    make_nifti(folder / "dup.nii", 1)
    make_nifti(folder / "dup.nii.gz", 2)  # same stem twice in one folder
    out = tmp_path / "out"
    items = datalist(folder, out)
    names = {Path(it["output"]).relative_to(out).as_posix() for it in items}
    assert names == {"scan0.nii.gz", "scan1.nii.gz", "scan2.nii.gz", "series.nii.gz",
                     "sub/scan0.nii.gz", "dup_nii.nii.gz", "dup_niigz.nii.gz"}
    dicom = {Path(it["output"]).name for it in datalist(folder, out, "dicom")}
    assert {"scan0", "series", "dup_nii", "dup_niigz"} <= dicom
    # outputs written inside the input folder are not taken as inputs
    inner = folder / "results"
    make_nifti(inner / "scan9.nii.gz", 9)
    assert all("results" not in it["image"] for it in datalist(folder, inner))


def test_sample_data_folder_lists_every_sample(tmp_path):
    items = datalist(ROOT / "sample_data", tmp_path)
    names = {it["name"] for it in items}
    assert {"mr_brain.nii.gz", "mr_series", "ct_small.dcm", "mr_multiframe.dcm"} <= names
    for it in items:  # every entry reads as one scan
        assert min(read_scan(it["image"], series=it["series"]).shape) >= 1


def test_run_skips_finished_outputs_and_never_touches_inputs(folder, tmp_path, encoder):
    before = tree_digest(folder)
    out = tmp_path / "out"
    items = datalist(folder, out)
    first = run_items(items, options(encoder), out, quiet=True)
    assert first.count("done") == 4 and not first.failed
    runs = {it["name"]: read_manifest(manifest_path(it, out))["run_id"] for it in items}
    again = run_items(items, options(encoder), out, quiet=True)
    assert again.count("skipped") == 4
    assert {it["name"]: read_manifest(manifest_path(it, out))["run_id"]
            for it in items} == runs
    # other parameters: the batch's own outputs are redone
    other = run_items(items, options(encoder, steps=4), out, quiet=True)
    assert other.count("done") == 4
    assert tree_digest(folder) == before
    assert json.loads((out / ".strainer" / "summary.json").read_text())["failed"] == []


def test_half_finished_output_is_redone_and_foreign_output_kept(folder, tmp_path, encoder):
    out = tmp_path / "out"
    items = datalist(folder, out)
    run_items(items, options(encoder), out, quiet=True)
    a, b = items[0], items[1]
    # killed after writing the output but before the manifest said done
    m = read_manifest(manifest_path(a, out))
    m["status"] = "running"
    manifest_path(a, out).write_text(json.dumps(m))
    # an output this batch did not write
    manifest_path(b, out).unlink()
    # a temporary file of a killed write
    (out / ".scan1.nii.strainer-tmp-123.gz").write_bytes(b"partial")
    res = {r.name: r for r in run_items(items, options(encoder), out, quiet=True).results}
    assert res[a["name"]].status == "done"
    assert res[b["name"]].status == "failed" and "--overwrite" in res[b["name"]].error
    res = run_items(items, options(encoder), out, quiet=True, overwrite=True)
    assert res.count("done") == 4


def test_superres_output_geometry(folder, tmp_path, encoder):
    out = tmp_path / "out"
    items = [it for it in datalist(folder, out) if it["name"] == "scan1.nii.gz"]
    run_items(items, options(encoder, task="superres", scale=2), out, quiet=True)
    src, res = read_scan(items[0]["image"]), read_scan(items[0]["output"])
    assert res.shape == (2, 32, 32) and res.data.dtype == src.data.dtype
    np.testing.assert_allclose(res.affine, upsampled_affine(src.affine, (1, 2, 2)), atol=1e-5)


def test_bad_scan_is_reported_and_others_finish(folder, tmp_path, encoder, capsys):
    (folder / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["batch", "denoise", str(folder), str(out), "--mode", "slices", "--encoder",
              str(encoder), "--steps", "3", "--device", "cpu", "--format", "dicom"])
    assert e.value.code == 1
    text = capsys.readouterr().out
    assert "4 processed" in text and "1 failed" in text and "FAILED broken.nii.gz" in text
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "scan0", "scan1", "scan2", "series"]
    assert read_scan(out / "series").shape == (2, 16, 16)
    # a clean folder exits 0
    (folder / "broken.nii.gz").unlink()
    assert main(["batch", "fit", str(folder), str(out / "again"), "--encoder", str(encoder),
                 "--steps", "3", "--device", "cpu", "--quiet"]) == 0


def test_killed_run_resumes_without_redoing_finished_scans(tmp_path, encoder):
    src, out = tmp_path / "in", tmp_path / "out"
    for i in range(6):
        make_nifti(src / f"s{i}.nii.gz", i, shape=(3, 32, 32))
    cmd = [sys.executable, "-m", "napari_strainer.cli", "batch", "fit", str(src), str(out),
           "--encoder", str(encoder), "--steps", "60", "--device", "cpu", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    state = out / ".strainer"
    deadline = time.time() + 90
    done: dict[str, str] = {}
    while time.time() < deadline and proc.poll() is None:
        for m in state.glob("*.json") if state.is_dir() else []:
            d = read_manifest(m)
            if d and d.get("status") == "done":
                done[m.name] = d["run_id"]
        if done:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(30)
    assert done, "no scan finished before the deadline"
    finished_before = {m.name: read_manifest(m)["run_id"] for m in state.glob("s*.json")
                       if read_manifest(m)["status"] == "done"}
    if len(finished_before) == 6:
        pytest.skip("the run finished before it could be killed")
    rerun = subprocess.run(cmd[:-1], check=False, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{6 - len(finished_before)} processed, {len(finished_before)} skipped" in rerun.stdout
    for i in range(6):  # every output complete, and scans finished before the kill untouched
        m = read_manifest(state / f"s{i}.nii.gz.json")
        assert m["status"] == "done"
        assert read_scan(out / f"s{i}.nii.gz").shape == (3, 32, 32)
        if f"s{i}.nii.gz.json" in finished_before:
            assert m["run_id"] == finished_before[f"s{i}.nii.gz.json"]
        else:
            assert m["run_id"] not in finished_before.values()
    assert not [p for p in out.iterdir() if "strainer-tmp" in p.name]


def test_batch_slice_scale_routes_3d_scans_through_the_volume_path(tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    make_nifti(src / "scan.nii.gz", 0)
    make_nifti(src / "flat.nii.gz", 3, shape=(1, 16, 16))  # a 2D scan: fails on its own
    argv = ["batch", "superres", str(src), str(out), "--slice-scale", "2", "--steps", "2",
            "--slice-profile", "gaussian", "--slice-thickness", "4", "--device", "cpu"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 1
    text = capsys.readouterr().out
    assert "1 processed" in text and "1 failed" in text
    (failed,) = [line for line in text.splitlines() if "FAILED" in line]
    assert failed.startswith("  FAILED flat.nii.gz:") and "2D" in failed
    a, b = read_scan(src / "scan.nii.gz"), read_scan(out / "scan.nii.gz")
    assert b.shape == (4, 16, 16) and b.data.dtype == a.data.dtype
    np.testing.assert_allclose(b.affine, upsampled_affine(a.affine, (2, 1, 1)), atol=1e-5)
    manifest = out / ".strainer" / "scan.nii.gz.json"
    m = read_manifest(manifest)
    assert m["status"] == "done" and m["shape"] == [4, 16, 16]
    assert m["params"]["slice_scale"] == 2 and m["params"]["slice_profile"] == "gaussian"
    assert m["params"]["slice_thickness"] == 4 and m["params"]["encoder"] == "none"
    (src / "flat.nii.gz").unlink()
    assert main([*argv, "--quiet"]) == 0  # the finished scan is skipped
    assert read_manifest(manifest)["run_id"] == m["run_id"]
    # another through-plane parameter is another job: the output is redone
    argv[argv.index("--slice-thickness") + 1] = "3"
    assert main([*argv, "--quiet"]) == 0
    assert read_manifest(manifest)["run_id"] != m["run_id"]


def test_batch_denoise_volume_mode(tmp_path, capsys):
    """``--mode volume``: 3D scans are denoised by one 3D INR, 2D scans slice by slice; the
    mode is a parameter of the job (another mode redoes the output)."""
    src, out = tmp_path / "in", tmp_path / "out"
    make_nifti(src / "scan.nii.gz", 0)
    make_nifti(src / "flat.nii.gz", 3, shape=(1, 16, 16))
    argv = ["batch", "denoise", str(src), str(out), "--mode", "volume", "--steps", "2",
            "--device", "cpu", "--quiet"]
    assert main(argv) == 0
    m = read_manifest(out / ".strainer" / "scan.nii.gz.json")
    assert m["status"] == "done" and m["params"]["mode"] == "volume"
    assert m["params"]["encoder"] == "none" and m["shape"] == [2, 16, 16]
    a, b = read_scan(src / "scan.nii.gz"), read_scan(out / "scan.nii.gz")
    assert b.shape == a.shape and b.data.dtype == a.data.dtype
    np.testing.assert_allclose(b.affine, a.affine, atol=1e-5)
    flat = read_manifest(out / ".strainer" / "flat.nii.gz.json")
    assert flat["status"] == "done" and read_scan(out / "flat.nii.gz").shape == (1, 16, 16)
    assert "mode" not in TaskOptions(task="denoise", mode="slices").params()
    assert TaskOptions(task="denoise").params()["mode"] == "auto"  # the default since then
    assert "mode" not in TaskOptions(task="fit", mode="volume").params()
    assert main(["batch", "denoise", str(src), str(out), "--mode", "volume", "--encoder",
                 "my.safetensors"]) == 2
    assert "--encoder none" in capsys.readouterr().err


@pytest.mark.parametrize("args, text", [
    ([], "--scale S (in-plane), --slice-scale F"),
    (["--slice-scale", "2", "--encoder", "my.safetensors"], "--encoder none"),
    (["--slice-scale", "1"], "integer >= 2"),
])
def test_batch_superres_refusals(tmp_path, capsys, args, text):
    make_nifti(tmp_path / "in" / "scan.nii.gz", 0)
    assert main(["batch", "superres", str(tmp_path / "in"), str(tmp_path / "out"),
                 "--device", "cpu", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert text in err and "\n" not in err
    assert not (tmp_path / "out" / "scan.nii.gz").exists()


def test_slice_options_count_only_when_used():
    """Manifests written before the through-plane options existed still match."""
    assert "slice_scale" not in TaskOptions(task="superres", scale=2).params()
    assert "slice_scale" not in TaskOptions(task="fit", slice_scale=2).params()
    p = TaskOptions(task="superres", scale=None, slice_scale=3).params()
    assert (p["slice_scale"], p["scale"], p["slice_profile"]) == (3, 1, "box")
