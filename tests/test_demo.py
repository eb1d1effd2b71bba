"""`strainer demo`, the README's main command, end to end with a tiny budget; the classical
baselines it reports."""

import importlib.util
import json
import math

import numpy as np
import torch
import torch.nn.functional as F

from napari_strainer.cli import main
from napari_strainer.io import read_scan, sample_path
from napari_strainer.restore.classical import bicubic, interpolate_slices, tv_denoise


def test_demo_writes_outputs_table_and_plots(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--steps", "2", "--pretrain-steps", "1",
                 "--device", "cpu"]) == 0
    rows = json.loads((out / "demo.json").read_text())
    inr = ("default", "STRAINER", "SIREN")
    assert [(r["task"], r["method"]) for r in rows] == [
        *(("fit", m) for m in inr), *(("superres", m) for m in (*inr, "bicubic")),
        *(("denoise", m) for m in (*inr, "TV", "NLM", "BM4D")),
        *(("thru-plane", m) for m in ("default", "linear", "cubic"))]
    assert all(r["route"] for r in rows)
    assert all(r["steps"] <= 2 for r in rows if r["method"] in inr and r["route"] != "race")
    race = next(r for r in rows if (r["task"], r["method"]) == ("denoise", "default"))
    assert race["route"] == "race" and race["params"]["noise"] == "gaussian"
    # the default denoising is at least as good as every classical row of the table
    classical = [r["psnr_final_db"] for r in rows if r["task"] == "denoise"
                 and r["method"] in ("TV", "NLM")]
    assert race["psnr_final_db"] >= max(classical)
    bm4d_missing = importlib.util.find_spec("bm4d") is None
    for r in rows:
        if r["method"] == "BM4D" and bm4d_missing:
            assert r["route"] == "not installed" and r["psnr_final_db"] is None
        else:
            assert math.isfinite(r["psnr_final_db"]), r
    for task in ("fit", "superres", "denoise", "thru-plane"):
        assert any(r["best"] for r in rows if r["task"] == task), task
    tv = next(r for r in rows if r["method"] == "TV")["params"]
    assert tv["tuned_on_slice"] != 12 and tv["weight"] > 0
    for name in ("psnr_curves.png", "panel.png", "thru_plane.png", "encoder_brief.safetensors",
                 "superres_default.nii.gz", "denoise_siren.nii.gz", "superres_bicubic.nii.gz",
                 "denoise_tv.nii.gz"):
        assert (out / name).stat().st_size > 0, name
    printed = capsys.readouterr().out
    assert "route" in printed and "superres" in printed and "thru-plane" in printed
    assert "<- best" in printed

    # the through-plane case: 12 thick slices, each centred between its two fine slices; the
    # output is the sample's grid (24 slices, spacing halved, centres aligned)
    brain = read_scan(sample_path("mr_brain"))
    thick = read_scan(out / "thru_plane_input.nii.gz")
    restored = read_scan(out / "thru_plane_default.nii.gz")
    assert thick.shape == (12, 96, 128) and restored.shape == brain.shape == (24, 96, 128)
    for k in range(12):
        fine = [brain.affine @ [z, 0, 0, 1] for z in (2 * k, 2 * k + 1)]
        np.testing.assert_allclose(thick.affine @ [k, 0, 0, 1], np.mean(fine, 0), atol=1e-4)
    np.testing.assert_allclose(restored.affine, brain.affine, atol=1e-4)
    assert math.isclose(restored.spacing[0], thick.spacing[0] / 2, rel_tol=1e-5)


def _psnr(x, ref):
    return 10 * np.log10(np.ptp(ref) ** 2 / np.mean((x - ref) ** 2))


def test_tv_denoise_removes_noise_and_weight_zero_is_identity():
    clean = np.zeros((48, 64), np.float32)
    clean[10:30, 8:40] = 1.0
    clean[20:44, 30:60] = 0.5
    noisy = clean + np.random.default_rng(0).normal(0, 0.1, clean.shape).astype(np.float32)
    assert _psnr(tv_denoise(noisy, 0.1), clean) > _psnr(noisy, clean) + 6
    np.testing.assert_array_equal(tv_denoise(noisy, 0.0), noisy)


def test_interpolations_keep_centres_aligned():
    """A linear ramp, box-averaged, comes back exactly along the slices (away from the edges)
    when the output centres sit where the product puts them; in-plane, torch's bicubic kernel
    (a = -0.75) does not reproduce a ramp, but area-averaging its output gives the input back."""
    ramp = np.arange(32, dtype=np.float32)
    vol = np.broadcast_to(ramp[:, None, None], (32, 3, 4))
    thick = vol.reshape(16, 2, 3, 4).mean(1)
    np.testing.assert_allclose(interpolate_slices(thick, 2, 1)[1:-1], vol[1:-1], atol=1e-5)
    # the cubic spline's prefilter feels the extended edges a few slices in
    np.testing.assert_allclose(interpolate_slices(thick, 2, 3)[12:-12], vol[12:-12], atol=1e-3)
    img = ramp[:, None] + 2 * ramp[None, :]
    low = F.avg_pool2d(torch.from_numpy(img)[None, None], 2)[0, 0].numpy()
    back = F.avg_pool2d(torch.from_numpy(bicubic(low, 2))[None, None], 2)[0, 0].numpy()
    np.testing.assert_allclose(back[2:-2, 2:-2], low[2:-2, 2:-2], atol=1e-4)
