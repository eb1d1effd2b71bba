"""The `strainer` command end to end on real sample scans: outputs, history, clear errors."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np

from napari_strainer.cli import main


def test_pretrain_writes_encoder(tiny_encoder):
    from napari_strainer.core import load_encoder

    enc = load_encoder(tiny_encoder)
    assert enc.config.width == 16 and enc.info["trained_on"]["images"] == 3
    assert enc.info["trained_on"]["shape"] == [16, 16]


def test_fit_nifti_keeps_shape_geometry_and_units(tiny_encoder, samples, tmp_path):
    src = samples / "mr_anatomical.nii"
    out, hist = tmp_path / "fit.nii.gz", tmp_path / "h.json"
    assert main(["fit", str(src), "-o", str(out), "--encoder", str(tiny_encoder), "--steps",
                 "3", "--reference", str(src), "--history", str(hist), "--quiet"]) == 0
    a, b = nib.load(src), nib.load(out)
    assert a.shape == b.shape
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-5)
    h = json.loads(hist.read_text())
    assert set(h) >= {"iterations", "loss", "psnr", "seconds"}
    assert h["iterations"][-1] == 3 and len(h["psnr"]) == len(h["loss"])
    assert b.get_data_dtype() == a.get_data_dtype().newbyteorder("=")


def test_fit_siren_baseline_runs(samples, tmp_path):
    out = tmp_path / "siren.nii.gz"
    assert main(["fit", str(samples / "mr_anatomical.nii"), "-o", str(out), "--encoder",
                 "none", "--steps", "2", "--quiet"]) == 0
    assert out.exists()


def err(capsys, argv):
    code = main(argv)
    text = capsys.readouterr().err.strip()
    assert code == 2, text
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    return text


def test_bad_inputs_give_one_line(capsys, samples, tmp_path, tiny_encoder):
    src = str(samples / "mr_anatomical.nii")
    out = str(tmp_path / "o.nii.gz")
    assert "missing.nii" in err(capsys, ["fit", str(tmp_path / "missing.nii"), "-o", out])
    junk = tmp_path / "junk.nii"
    junk.write_bytes(b"not a nifti")
    assert "junk.nii" in err(capsys, ["fit", str(junk), "-o", out])
    bad_enc = tmp_path / "bad.safetensors"
    bad_enc.write_bytes(tiny_encoder.read_bytes()[:200])
    assert "bad.safetensors" in err(capsys, ["fit", src, "-o", out, "--encoder", str(bad_enc)])
    assert "overwrite an input" in err(capsys, ["fit", src, "-o", src])
    assert "--freeze" in err(capsys, ["fit", src, "-o", out, "--encoder", "none",
                                      "--freeze", "2"])
    assert "shape" in err(capsys, ["fit", src, "-o", out, "--reference",
                                   str(samples / "mr_brain.nii.gz"), "--steps", "1"])
    assert "--steps" in err(capsys, ["fit", src, "-o", out, "--steps", "-3"])
    assert "--scale" in err(capsys, ["superres", src, "-o", out, "--scale", "1.5"])
    assert "--sigma" in err(capsys, ["denoise", src, "-o", out, "--sigma", "-1"])
    assert "--shared-layers" in err(capsys, ["pretrain", src, "-o", str(tmp_path / "e"),
                                             "--shared-layers", "6"])
    assert "--schedule" in err(capsys, ["pretrain", src, "-o", str(tmp_path / "e"),
                                        "--schedule", "linear"])
    assert not (tmp_path / "o.nii.gz").exists()


def test_existing_output_refused_then_overwritten(samples, tmp_path, capsys):
    src = str(samples / "mr_anatomical.nii")
    out = tmp_path / "o.nii.gz"
    out.write_bytes(b"keep me")
    assert "output exists" in err(capsys, ["fit", src, "-o", str(out), "--steps", "1"])
    assert out.read_bytes() == b"keep me"
    assert main(["fit", src, "-o", str(out), "--steps", "1", "--overwrite", "--quiet"]) == 0
    assert nib.load(out).shape == nib.load(src).shape


def test_console_script_exit_codes(tmp_path):
    exe = [sys.executable, "-m", "napari_strainer.cli"]
    r = subprocess.run([*exe, "fit", str(tmp_path / "nope.nii"), "-o",
                        str(tmp_path / "x.nii")], capture_output=True, text=True, check=False)
    assert r.returncode == 2 and "nope.nii" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([*exe, "--version"], capture_output=True, text=True, check=False)
    assert r.returncode == 0 and "strainer" in r.stdout


def test_info_and_convert(samples, tmp_path, capsys):
    assert main(["info", str(samples / "mr_series"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["shape"] == [24, 96, 128] and info["modality"] == "MR"
    assert "PatientName" not in json.dumps(info) and "Sample^MR" not in json.dumps(info)
    out = tmp_path / "series.nii.gz"
    assert main(["convert", str(samples / "mr_series"), "-o", str(out)]) == 0
    capsys.readouterr()
    a = nib.load(samples / "mr_brain.nii.gz")
    b = nib.load(out)
    np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)
    assert "output exists" in err(capsys, ["convert", str(samples / "mr_series"), "-o",
                                            str(out)])


def test_render_1024_stays_under_2gb(tmp_path):
    """Chunked rendering of a 1024x1024 image from a width-256 INR: peak RSS < 2 GB."""
    code = (
        "import resource, torch\n"
        "torch.set_num_threads(2)\n"
        "from napari_strainer.core import BatchedSiren, SirenConfig, render\n"
        "out = render(BatchedSiren(SirenConfig(), batch=1), (1024, 1024))\n"
        "assert out.shape == (1, 1024, 1024, 1)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak_mib = int(r.stdout.strip()) / 1024
    assert peak_mib < 2048, peak_mib


def test_pretrain_on_a_folder_takes_every_scan_and_series(samples, tmp_path):
    """sample_data holds NIfTI files, single and multi-frame DICOM files and a series folder."""
    from napari_strainer.core import load_encoder

    out = tmp_path / "all.safetensors"
    assert main(["pretrain", str(samples), "-o", str(out), "--size", "8", "--steps", "1",
                 "--max-slices", "1", "--width", "8", "--layers", "3", "--shared-layers", "2",
                 "--quiet"]) == 0
    info = load_encoder(out).info["trained_on"]
    assert info["images"] == 7 and "mr_series" in info["files"]
