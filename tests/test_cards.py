"""Encoder cards: recorded by `strainer pretrain`, printed by `strainer info`, "unknown" for
older files, the modality warning in the CLI and in napari, the shipped encoder's card."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from napari_strainer.cli import main
from napari_strainer.core import load_encoder
from napari_strainer.errors import BadArgumentError
from napari_strainer.io import read_scan
from napari_strainer.pretrain.cards import (
    card,
    check_modality,
    evaluation_split,
    format_card,
    modality_warning,
)
from napari_strainer.pretrain.encoders import DEFAULT_ENCODER

TINY = ["--size", "16", "--steps", "3", "--width", "16", "--layers", "3", "--shared-layers",
        "2", "--quiet"]
SHIPPED_WEIGHTS_SHA = "c000642a1279c463979f5f6bd96b62a85579872ee6ec05bb54fd410b5db53ea9"


@pytest.fixture(scope="module")
def mr_encoder(tmp_path_factory) -> Path:
    """A tiny encoder pretrained on the MR DICOM series, with --evaluate."""
    out = tmp_path_factory.mktemp("cards") / "mr.safetensors"
    samples = Path(__file__).resolve().parents[1] / "sample_data"
    assert main(["pretrain", str(samples / "mr_series"), "-o", str(out), "--max-slices", "4",
                 "--evaluate", *TINY]) == 0
    return out


def test_pretrain_records_the_card(mr_encoder):
    c = card(load_encoder(mr_encoder))
    assert c["modality"] == "MR"  # from the DICOM files
    assert c["images"] == 4 and c["slice_size"] == [16, 16] and c["files"] == ["mr_series"]
    assert c["steps"] == 3 and c["final_loss"] > 0 and c["package_version"] != "unknown"
    assert c["created"].startswith("20") and "percentiles" in c["normalization"]
    assert "CT: fixed window -1024 to 3071 HU" in c["normalization"]
    ev = c["evaluation"]
    assert ev["held_out"] == 3 and ev["steps"] == [10, 50, 100] and ev["shape"] == [16, 16]
    assert ev["gain_db"] == [round(a - b, 2) for a, b in zip(ev["psnr_strainer"],
                                                             ev["psnr_siren"])]
    assert ev["gain_db_solved"] == [round(a - b, 2) for a, b in zip(
        ev["psnr_strainer_solved"], ev["psnr_siren"])]
    assert ev["psnr_strainer_solved"] != ev["psnr_strainer"]  # the head was solved
    assert "Sample^MR" not in json.dumps(c)  # the series' fictional patient name


def test_info_prints_the_card(mr_encoder, capsys):
    assert main(["info", str(mr_encoder)]) == 0
    text = capsys.readouterr().out
    assert "modality: MR" in text and "trained on: 4 slices of 16x16 from mr_series" in text
    assert "dB at step 100 (3 held-out slices" in text
    assert main(["info", str(mr_encoder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["evaluation"]["held_out"] == 3


def test_info_refuses_a_bad_encoder_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not an encoder")
    for path in (bad, tmp_path / "missing.safetensors"):
        assert main(["info", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and path.name in err, err


def _strip_card(src: Path, dst: Path) -> None:
    """Rewrite ``src`` as an encoder from before cards: no card fields, no package version."""
    raw = src.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    meta = header["__metadata__"]
    meta["info"] = json.dumps({"steps": 3})
    meta.pop("package_version")
    new = json.dumps(header).encode()
    dst.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def test_encoder_without_card_loads_with_unknown_fields(mr_encoder, tmp_path, capsys, samples):
    old = tmp_path / "old.safetensors"
    _strip_card(mr_encoder, old)
    enc = load_encoder(old)
    c = card(enc)
    for key in ("modality", "images", "slice_size", "files", "created", "package_version",
                "final_loss", "normalization", "evaluation"):
        assert c[key] == "unknown", key
    assert c["steps"] == 3 and c["weights_sha256"] == card(load_encoder(mr_encoder))[
        "weights_sha256"]
    assert main(["info", str(old)]) == 0
    assert "modality: unknown" in capsys.readouterr().out
    assert modality_warning(enc, read_scan(samples / "ct_small.dcm")) is None  # cannot tell
    out = tmp_path / "fit.nii.gz"
    assert main(["fit", str(samples / "ct_small.dcm"), "-o", str(out), "--encoder", str(old),
                 "--steps", "1", "--quiet"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_modality_option(samples, tmp_path, capsys):
    out = tmp_path / "ct.safetensors"
    assert main(["pretrain", str(samples / "mr_anatomical.nii"), "-o", str(out), "--modality",
                 "ct", *TINY]) == 0  # NIfTI says nothing; the option decides (case-insensitive)
    assert card(load_encoder(out))["modality"] == "CT"
    bad = tmp_path / "bad.safetensors"
    assert main(["pretrain", str(samples / "mr_anatomical.nii"), "-o", str(bad), "--modality",
                 "MRI", *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'MRI'" in err and "MR, NM" in err, err
    assert not bad.exists()
    with pytest.raises(BadArgumentError):
        check_modality("")


def test_modality_warning_is_one_cli_line(mr_encoder, samples, tmp_path):
    exe = [sys.executable, "-m", "napari_strainer.cli", "fit", str(samples / "ct_small.dcm"),
           "--steps", "1", "--quiet"]
    r = subprocess.run([*exe, "-o", str(tmp_path / "a.nii.gz"), "--encoder", str(mr_encoder)],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stderr.splitlines() if "warning" in x]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("strainer: warning: ct_small.dcm is CT but the encoder was "
                               "trained on MR") and "--encoder none" in lines[0]
    r = subprocess.run([*exe, "-o", str(tmp_path / "b.nii.gz"), "--encoder", "none"],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    enc = load_encoder(mr_encoder)
    assert modality_warning(enc, read_scan(samples / "mr_series")) is None
    assert modality_warning(enc, read_scan(samples / "mr_anatomical.nii")) is None  # OT


def test_evaluation_split_holds_out_whole_single_slice_scans(samples):
    scans = [read_scan(samples / n) for n in ("ct_small.dcm", "ct_enhanced.dcm", "ct_j2k.dcm")]
    train, held = evaluation_split(scans, size=8)
    assert train.shape == (1, 8, 8) and held.shape == (3, 8, 8)
    every = torch.cat([train, held])
    assert len({tuple(t.flatten().tolist()) for t in every}) == 4  # no slice used twice


def test_ct_uses_the_hounsfield_window(samples):
    from napari_strainer.io.intensity import HU_WINDOW, Intensity

    ct = Intensity.for_scan(read_scan(samples / "ct_small.dcm"))
    assert (ct.low, ct.high) == HU_WINDOW and ct.to_dict()["units"] == "HU"
    mr = read_scan(samples / "mr_series")
    assert Intensity.for_scan(mr) == Intensity.of(mr.data)
    text = card(load_encoder(DEFAULT_ENCODER))["normalization"]
    assert text.startswith("per-scan percentiles")  # trained before the CT window existed


def test_shipped_encoder_card():
    enc = load_encoder(DEFAULT_ENCODER)
    c = card(enc)
    assert c["weights_sha256"] == SHIPPED_WEIGHTS_SHA  # the benchmarked weights, unchanged
    assert c["modality"] == "MR" and c["images"] == 10 and c["steps"] == 2000
    assert c["files"] == ["mr_brain.nii.gz"] and abs(c["final_loss"] - 2.8e-5) < 1e-6
    assert c["created"] != "unknown" and "modality: MR" in format_card(c)


def test_restore_dock_shows_card_and_modality_notification(make_napari_viewer, qtbot,
                                                           mr_encoder, samples):
    pytest.importorskip("napari")
    from napari.utils.notifications import NotificationSeverity, notification_manager

    from napari_strainer.gui._layers import scan_to_layer

    viewer = make_napari_viewer()
    data, attrs, _ = scan_to_layer(read_scan(samples / "ct_small.dcm"), "ct")
    layer = viewer.add_image(data, **attrs)
    _, w = viewer.window.add_plugin_dock_widget("napari-strainer", "Restore scan")
    w.use_encoder_file(mr_encoder)
    assert w.encoder_info.value.startswith("MR encoder: 4 slices of 16x16, 3 steps")
    assert "dB over SIREN at step 100" in w.encoder_info.value
    assert "modality: MR" in w.encoder_info.tooltip
    w.layer.value = layer
    w.steps.value = 1
    w.device.value = "cpu"
    n = len(notification_manager.records)
    w.run()
    qtbot.waitUntil(lambda: w.job is not None and not w.running, timeout=60_000)
    assert w.job.error is None, w.job.error
    warned = [r for r in notification_manager.records[n:]
              if r.severity == NotificationSeverity.WARNING]
    assert len(warned) == 1 and "is CT but the encoder was trained on MR" in warned[0].message
