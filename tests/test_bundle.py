"""The MONAI bundle: real ``python -m monai.bundle`` and two-process ``torchrun`` (gloo, CPU)
subprocesses, run from a working directory outside the repository without PYTHONPATH."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("monai")
pytest.importorskip("fire")

from _helpers import make_nifti

from napari_strainer.batch import read_manifest
from napari_strainer.bundle import StrainerNet, export_checkpoint, load_item
from napari_strainer.core.checkpoint import load_encoder
from napari_strainer.core.coords import grid
from napari_strainer.core.siren import BatchedSiren, SirenConfig
from napari_strainer.errors import BadArgumentError, StrainerError
from napari_strainer.io import read_scan, upsampled_affine
from napari_strainer.pretrain.train import pretrain

BUNDLE = Path(__file__).resolve().parents[1] / "monai_bundle"
CONFIGS = BUNDLE / "configs"
TINY = ["--width", "16", "--layers", "4", "--shared_layers", "3"]


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**e, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def monai(cwd: Path, *args: str, torchrun: int = 0, check: bool = True, **environ: str):
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={torchrun}", "-m", "monai.bundle", *args]
    else:
        cmd = [sys.executable, "-m", "monai.bundle", *args]
    res = subprocess.run(cmd, check=False, cwd=cwd, env={**env(), **environ},
                         capture_output=True, text=True,
                         timeout=300)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n"
                             f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def configs(*names: str) -> str:
    files = [str(CONFIGS / n) for n in names]
    return files[0] if len(files) == 1 else repr(files)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("enc") / "tiny.safetensors"
    pretrain(torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)), out,
             config=SirenConfig(width=16, layers=4, shared_layers=3), steps=3, device="cpu")
    return out


@pytest.fixture
def data(tmp_path) -> Path:
    src = tmp_path / "data"
    for i in range(5):  # odd: not divisible by two processes
        make_nifti(src / f"scan{i}.nii.gz", i)
    return src


def test_metadata_verifies_against_local_schema(tmp_path):
    monai(tmp_path, "verify_metadata", "--meta_file", str(CONFIGS / "metadata.json"),
          "--filepath", str(BUNDLE / "docs" / "meta_schema_20240725.json"))


def test_network_in_out_and_torchscript_export(tmp_path, encoder):
    monai(tmp_path, "verify_net_in_out", "network_def", "--meta_file",
          str(CONFIGS / "metadata.json"), "--config_file", configs("inference.json"),
          "--device", "cpu", "--any", "8")
    ckpt = export_checkpoint(encoder, tmp_path / "model.pt")
    monai(tmp_path, "ckpt_export", "network_def", "--filepath", str(tmp_path / "model.ts"),
          "--ckpt_file", str(ckpt), "--meta_file", str(CONFIGS / "metadata.json"),
          "--config_file", configs("train.json"), *TINY)
    from monai.data import load_net_with_metadata

    net, meta, _ = load_net_with_metadata(str(tmp_path / "model.ts"),
                                          more_extra_files=("train.json",))
    assert meta["version"] == json.loads((CONFIGS / "metadata.json").read_text())["version"]
    coords = grid((8, 8))
    image = coords.T.reshape(1, 2, 8, 8)
    enc = load_encoder(encoder)
    siren = BatchedSiren(enc.config, batch=1, shared=enc.config.shared_layers, seed=0)
    siren.load_encoder(enc.weights)
    expected = siren(coords)[0, :, 0].reshape(8, 8)
    torch.testing.assert_close(net(image)[0, 0], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(StrainerNet.from_siren(siren)(image)[0, 0], expected)


def test_network_def_is_a_member_of_the_package_siren(encoder):
    """StrainerNet holds one BatchedSiren (no SIREN maths of its own): any member of a fitted
    net, shared or batched layers, gives the same image, eagerly and as TorchScript."""
    config = SirenConfig(width=16, layers=4, shared_layers=3)
    fitted = BatchedSiren(config, batch=3, shared=1, seed=2)  # fewer shared than the config
    image = torch.rand(2, 2, 5, 6, generator=torch.Generator().manual_seed(1)) * 2 - 1
    coords = image.permute(0, 2, 3, 1).reshape(-1, 2)
    with torch.no_grad():
        expected = fitted(coords)
    for member in range(3):
        net = StrainerNet.from_siren(fitted, member)
        assert isinstance(net.siren, BatchedSiren) and net.siren.batch == 1
        with torch.no_grad():
            got = net(image)
        torch.testing.assert_close(got, expected[member].reshape(2, 5, 6, 1).permute(0, 3, 1, 2))
    with torch.no_grad():
        scripted = torch.jit.script(net)  # what ckpt_export does
        torch.testing.assert_close(scripted(image), got)
        assert scripted(torch.zeros(1, 2, 3, 9)).shape == (1, 1, 3, 9)  # any pixel count
    assert isinstance(net.siren, BatchedSiren)  # scripting left the module as it was
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes == {
        "siren.weights.0": (2, 16), "siren.weights.1": (16, 16), "siren.weights.2": (16, 16),
        "siren.weights.3": (1, 16, 1), "siren.biases.0": (16,), "siren.biases.1": (16,),
        "siren.biases.2": (16,), "siren.biases.3": (1, 1)}
    with pytest.raises(BadArgumentError, match="member"):
        StrainerNet.from_siren(fitted, 3)
    with pytest.raises(StrainerError, match="architecture"):
        StrainerNet(width=8, layers=4, shared_layers=3).load_encoder(encoder)
    loaded = StrainerNet(width=16, layers=4, shared_layers=3).load_encoder(encoder)
    for i, (w, b) in enumerate(load_encoder(encoder).weights):
        torch.testing.assert_close(loaded.siren.weights[i], w)
        torch.testing.assert_close(loaded.siren.biases[i], b)


def test_bundle_root_found_from_any_directory(tmp_path, monkeypatch):
    from monai.bundle import ConfigWorkflow

    monkeypatch.chdir(tmp_path)
    wf = ConfigWorkflow(config_file=str(CONFIGS / "inference.json"), workflow_type=None,
                        logging_file=False)
    wf.initialize()
    assert Path(wf.parser.get_parsed_content("bundle_root")) == BUNDLE.resolve()


def test_monai_loader_keeps_geometry_and_dtype(data):
    it = {"image": str(data / "scan0.nii.gz"), "series": None}
    a, b = load_item(it), read_scan(it["image"])
    assert a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data)
    np.testing.assert_allclose(a.affine, b.affine)


def test_inference_superres_resume_and_bad_scan(tmp_path, data, encoder):
    (data / "broken.nii.gz").write_bytes(b"\x1f\x8b nope")
    out = tmp_path / "out"
    args = ["run", "--config_file", configs("inference.json"), "--dataset_dir", str(data),
            "--output_dir", str(out), "--task", "superres", "--scale", "2", "--steps", "3",
            "--encoder", str(encoder), "--device", "cpu"]
    res = monai(tmp_path, *args, check=False)
    assert res.returncode != 0
    text = res.stdout + res.stderr
    assert "6 scans: 5 processed, 0 skipped" in text and "FAILED broken.nii.gz" in text
    for i in range(5):
        src, got = read_scan(data / f"scan{i}.nii.gz"), read_scan(out / f"scan{i}.nii.gz")
        assert got.shape == (2, 32, 32)
        np.testing.assert_allclose(got.affine, upsampled_affine(src.affine, (1, 2, 2)),
                                   atol=1e-5)
    (data / "broken.nii.gz").unlink()
    again = monai(tmp_path, *args)
    assert "5 scans: 0 processed, 5 skipped" in again.stdout + again.stderr


def test_inference_slice_scale_through_plane(tmp_path):
    """``--slice_scale``: 3D scans take the volume path (the bundle's 2D encoder is left
    aside), a 2D scan fails on its own, the manifests hold the new parameters."""
    data, out = tmp_path / "data", tmp_path / "out"
    make_nifti(data / "scan.nii.gz", 0)
    make_nifti(data / "flat.nii.gz", 1, shape=(1, 16, 16))
    res = monai(tmp_path, "run", "--config_file", configs("inference.json"), "--dataset_dir",
                str(data), "--output_dir", str(out), "--task", "superres", "--slice_scale",
                "2", "--slice_profile", "gaussian", "--steps", "2", "--device", "cpu",
                check=False)
    assert res.returncode != 0
    text = res.stdout + res.stderr
    assert "2 scans: 1 processed, 0 skipped" in text and "FAILED flat.nii.gz" in text
    assert "a 2D image (16 x 16)" in text
    src, got = read_scan(data / "scan.nii.gz"), read_scan(out / "scan.nii.gz")
    assert got.shape == (4, 16, 16)  # in-plane scale 1 by default with slice_scale
    np.testing.assert_allclose(got.affine, upsampled_affine(src.affine, (2, 1, 1)), atol=1e-5)
    params = read_manifest(out / ".strainer" / "scan.nii.gz.json")["params"]
    assert params["slice_scale"] == 2 and params["slice_profile"] == "gaussian"
    assert params["scale"] == 1 and params["encoder"] == "none"


def test_inference_denoise_volume_mode(tmp_path):
    """``--mode volume``: a 3D scan is denoised by one 3D INR (the bundle's 2D encoder is
    left aside); the manifest holds the mode."""
    data, out = tmp_path / "data", tmp_path / "out"
    make_nifti(data / "scan.nii.gz", 0)
    monai(tmp_path, "run", "--config_file", configs("inference.json"), "--dataset_dir",
          str(data), "--output_dir", str(out), "--task", "denoise", "--mode", "volume",
          "--steps", "2", "--device", "cpu")
    src, got = read_scan(data / "scan.nii.gz"), read_scan(out / "scan.nii.gz")
    assert got.shape == src.shape
    np.testing.assert_allclose(got.affine, src.affine, atol=1e-5)
    m = read_manifest(out / ".strainer" / "scan.nii.gz.json")
    assert m["params"]["mode"] == "volume" and m["params"]["encoder"] == "none"
    assert m["shape"] == list(src.shape)


def test_torchrun_inference_processes_each_scan_once(tmp_path, data, encoder):
    out = tmp_path / "out"
    monai(tmp_path, "run", "--config_file",
          configs("inference.json", "multi_gpu_inference.json"), "--dataset_dir", str(data),
          "--output_dir", str(out), "--task", "denoise", "--steps", "3", "--encoder",
          str(encoder), torchrun=2)
    summary = json.loads((out / ".strainer" / "summary.json").read_text())
    assert summary["world_size"] == 2 and not summary["failed"]
    assert sorted(r["name"] for r in summary["results"]) == [f"scan{i}.nii.gz"
                                                              for i in range(5)]
    ranks = [read_manifest(out / ".strainer" / f"scan{i}.nii.gz.json")["rank"]
             for i in range(5)]
    assert ranks == [0, 1, 0, 1, 0]
    assert all(read_scan(out / f"scan{i}.nii.gz").shape == (2, 16, 16) for i in range(5))


def test_torchrun_training_matches_single_process(tmp_path, data):
    # float32 kernels: this checks the sharding of heads and the gradient all-reduce, which
    # bfloat16 gradients would blur (each rank rounds its partial sum)
    fp32 = {"STRAINER_KERNEL": "fused"}
    common = ["--dataset_dir", str(data), "--steps", "5", "--size", "16", "--max_slices", "2",
              "--lr", "0.001", "--device", "cpu", *TINY]
    one, two = tmp_path / "one" / "enc.safetensors", tmp_path / "two" / "enc.safetensors"
    monai(tmp_path, "run", "--config_file", configs("train.json"), "--encoder", str(one),
          *common, **fp32)
    monai(tmp_path, "run", "--config_file", configs("train.json", "multi_gpu_train.json"),
          "--encoder", str(two), *common, torchrun=2, **fp32)
    a, b = load_encoder(one), load_encoder(two)
    assert a.info["trained_on"]["images"] == 10 and b.info["processes"] == 2
    for (wa, ba), (wb, bb) in zip(a.weights, b.weights):
        torch.testing.assert_close(wa, wb, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ba, bb, atol=1e-5, rtol=1e-4)
    assert abs(a.info["final_loss"] - b.info["final_loss"]) < 1e-5


def test_bundle_model_is_the_shipped_encoder():
    meta = json.loads((BUNDLE / "models" / "model_metadata.json").read_text())
    model = BUNDLE / "models" / meta["file"]
    import hashlib

    assert hashlib.sha256(model.read_bytes()).hexdigest() == meta["sha256"]
    enc = load_encoder(model)
    assert enc.config.to_dict() == meta["architecture"]
    from napari_strainer.pretrain.encoders import DEFAULT_ENCODER

    if DEFAULT_ENCODER.is_file():  # the bundle's copy must follow the package's encoder
        assert DEFAULT_ENCODER.read_bytes() == model.read_bytes()
    net = StrainerNet(**meta["architecture"]).load_encoder(model)
    assert net(grid((4, 4)).T.reshape(1, 2, 4, 4)).shape == (1, 1, 4, 4)


def test_bundle_training_defaults_follow_the_package():
    """train.json leaves steps and lr to the method's defaults and repeats the schedule."""
    from napari_strainer.pretrain.train import METHODS, PRETRAIN_SCHEDULE

    cfg = json.loads((CONFIGS / "train.json").read_text())
    assert cfg["method"] in METHODS and cfg["steps"] is None and cfg["lr"] is None
    assert cfg["schedule"] == PRETRAIN_SCHEDULE
