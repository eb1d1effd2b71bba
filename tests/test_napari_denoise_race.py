"""Denoising's default in the "Restore scan" dock, in a real (headless) napari viewer: the race
of classical denoisers (non-local means, total variation, BM4D when installed) judged by their
estimated error (SURE) and blended, under the noise model of the form (auto, Rician, Gaussian);
with a live preview after each denoiser, Stop, and a result that says what won."""

from __future__ import annotations

import re
import threading
import time

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from test_napari_plugin import (  # noqa: F401 - the autouse fixtures apply here too
    add_scan,
    dock,
    one_torch_thread,
    stop_jobs_at_teardown,
    wait_done,
)

from napari_strainer.gui._restore import DENOISE_MODE_LABELS, NOISE_LABELS
from napari_strainer.io import read_scan, sample_path
from napari_strainer.io.intensity import Intensity
from napari_strainer.restore import race, slices, volume
from napari_strainer.restore.noise import NOISE_KINDS

SAMPLE = "mr_anatomical"  # (25, 41, 33) T1, 2 mm voxels


def brain(z0: int = 8, n: int = 8):
    """``n`` slices of the sample T1 (8 x 41 x 33 by default), clipped to magnitude values."""
    scan = read_scan(sample_path(SAMPLE))
    return scan.derive(np.clip(scan.data[z0:z0 + n], 0, None).astype(np.float32))


def rician(clean: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    """The magnitude of ``clean`` plus complex Gaussian noise of ``sigma`` (magnitude MR)."""
    rng = np.random.default_rng(seed)
    return np.hypot(clean + rng.normal(0, sigma, clean.shape),
                    rng.normal(0, sigma, clean.shape)).astype(np.float32)


def rmse(a, b) -> float:
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - b) ** 2)))


def denoise_dock(viewer, layer):
    w = dock(viewer, "Restore scan")
    w.layer.value = layer
    w.task.value = "denoise"
    w.device.value = "cpu"
    return w


def test_race_is_the_default_denoise(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    scan = brain()
    clean_layer = add_scan(viewer, scan, "clean")
    noisy_scan = scan.derive(rician(scan.data, 0.08 * np.ptp(scan.data)))
    src = add_scan(viewer, noisy_scan, "noisy")
    w = denoise_dock(viewer, src)
    assert [v for _, v in NOISE_LABELS] == list(NOISE_KINDS)
    assert DENOISE_MODE_LABELS[0][0].startswith("auto (race of NLM, TV, BM4D")
    # the form: mode auto is the race, which takes no training steps and no encoder
    assert w.denoise_mode.value == "auto" and w.noise.value == "auto"
    assert not w.noise.native.isHidden() and w.noise.enabled
    w.task.value = "fit"  # the noise model is denoising's
    assert w.noise.native.isHidden() and w.steps.enabled
    w.task.value = "denoise"
    assert w.plan.path == "race" and "path: race" in w.plan_text.value
    assert "noise: rician (magnitude data" in w.plan_text.value
    # the coil count: non-central chi noise (hidden for Gaussian noise)
    assert not w.coils.native.isHidden() and w.coils.value == 1
    w.coils.value = 4
    assert "noise: non-central chi of 4 coils" in w.plan_text.value
    assert w.plan.noise_model.coils == 4
    w.noise.value = "gaussian"
    assert w.coils.native.isHidden() and w.plan.noise_model.coils == 1
    w.noise.value, w.coils.value = "auto", 1
    assert "steps: at most" not in w.plan_text.value
    assert w.steps.value == 0 and not w.steps.enabled
    for field in (w.init, w.head, w.freeze, w.batch, w.lr):
        assert not field.enabled, field.label
    assert "race of classical denoisers" in w.encoder_info.value
    # the INR modes still plan the INR paths, with their steps; the noise model is the race's
    w.denoise_mode.value = "volume"
    assert w.plan.path == "volume" and w.steps.value == volume.DEFAULT_STEPS["denoise"]
    assert w.steps.enabled and not w.noise.enabled
    w.denoise_mode.value = "slices"
    assert w.plan.path == "slices" and w.steps.value == slices.DEFAULT_STEPS["denoise"]
    assert w.steps.enabled and w.init.enabled
    w.denoise_mode.value = "auto"
    assert w.plan.path == "race" and w.steps.value == 0 and not w.steps.enabled
    # run it, with the clean layer as the PSNR reference
    w.reference.value = clean_layer
    statuses, previews = [], []
    show = w.set_status
    w.set_status = lambda text: (statuses.append(text), show(text))  # every status, in order
    w.run_button.clicked.emit()
    preview = w.preview_layer
    assert preview is not None and preview.data.shape == scan.shape
    preview.events.data.connect(lambda e: previews.append(np.array(preview.data)))
    total = w.job._pbar.total
    wait_done(qtbot, w, timeout=180_000)
    assert w.job.error is None, w.job.error
    hist = w.result_layer.metadata["strainer_history"]
    names = hist["race"]["candidates"]
    n = len(names)
    assert total == 2 * n  # two runs per denoiser
    # the status named each denoiser as it finished
    running = [s for s in statuses if "denoisers done" in s]
    assert running and running[-1].startswith(f"{names[-1]}: {n} of {n}"), running
    assert any(s.startswith("NLM 1s p1: 1 of ") for s in running), running
    assert all(re.search(r", memory \d+\.\d\d GB\)", s) for s in running), running
    # the preview showed the denoisers' results, in the preview's intensities
    inten = Intensity.for_scan(noisy_scan)
    assert previews and all(p.shape == scan.shape for p in previews)
    noisy_err = rmse(inten.forward(noisy_scan.data), inten.forward(scan.data))
    for p in previews:
        assert rmse(p, inten.forward(scan.data)) < noisy_err
    assert preview not in viewer.layers  # replaced by the result
    out = w.result_layer
    assert out.name == "noisy denoised (race)"
    assert out.data.shape == scan.shape
    np.testing.assert_allclose(out.scale, src.scale)
    np.testing.assert_allclose(out.translate, src.translate)
    hist = out.metadata["strainer_history"]
    assert hist["path"] == "race" and hist["plan"]["path"] == "race" and not hist["cancelled"]
    assert hist["noise"]["model"] == "rician"
    raced = hist["race"]
    assert len(raced["seconds"]) == n and raced["psnr_estimate"] is not None
    assert rmse(out.data, scan.data) < 0.8 * rmse(noisy_scan.data, scan.data)
    msg = w.status.value
    assert msg.startswith("Done: noisy denoised (race) (") and "\n" not in msg
    assert f"; {raced['winner']}; " in msg
    assert f"noise rician, sigma {hist['noise']['sigma']:.0f}; " in msg  # not 1.21e+03
    assert f"estimated PSNR {raced['psnr_estimate']:.1f} dB" in msg
    assert "final PSNR" in msg and hist["psnr"][-1] > 20


def test_race_noise_model_choice(make_napari_viewer, qtbot, monkeypatch):
    """A layer with negative values: auto takes Gaussian noise; Rician is refused with one
    line before anything runs; Gaussian denoises it."""
    from napari.utils.notifications import notification_manager

    monkeypatch.setattr(race, "BM4D_MAX_VOXELS", 0)  # faster: NLM and TV only
    viewer = make_napari_viewer()
    scan = brain()
    clean = scan.data - np.median(scan.data)  # half negative, as a phase or a CT image in HU
    rng = np.random.default_rng(1)
    noisy = scan.derive((clean + rng.normal(0, 0.06 * np.ptp(clean), clean.shape))
                        .astype(np.float32))
    src = add_scan(viewer, noisy, "shifted")
    w = denoise_dock(viewer, src)
    assert w.plan.path == "race"
    assert "noise: gaussian (the scan has negative values" in w.plan_text.value
    w.noise.value = "rician"  # re-plans: refused, said where the plan goes
    assert w.plan is None and "--noise rician needs magnitude data" in w.plan_text.value
    before = [layer.name for layer in viewer.layers]
    n = len(notification_manager.records)
    w.run()
    assert w.job is None and not w.running  # no worker started
    assert w.status.value.startswith("Error:") and "needs magnitude data" in w.status.value
    assert "\n" not in w.status.value and "Traceback" not in w.status.value
    new = [r.message for r in notification_manager.records[n:]]
    assert any("needs magnitude data" in m for m in new), new
    assert [layer.name for layer in viewer.layers] == before
    w.noise.value = "gaussian"
    assert w.plan is not None and "noise: gaussian (--noise gaussian)" in w.plan_text.value
    assert "BM4D" not in w.plan.route
    w.run()
    wait_done(qtbot, w, timeout=120_000)
    assert w.job.error is None, w.job.error
    out = w.result_layer
    hist = out.metadata["strainer_history"]
    assert out.name == "shifted denoised (race)" and hist["path"] == "race"
    assert hist["noise"]["model"] == "gaussian" and w.plan.options.noise == "gaussian"
    assert np.mean(out.data < 0) > 0.3  # Gaussian: no magnitude mapping
    assert rmse(out.data, clean) < 0.9 * rmse(noisy.data, clean)
    assert "noise gaussian, sigma" in w.status.value
    assert "estimated PSNR" in w.status.value


def test_race_stop_blends_the_denoisers_so_far(make_napari_viewer, qtbot):
    """Stop at once: the race finishes its first denoiser and returns that (marked stopped)."""
    viewer = make_napari_viewer()
    scan = brain()
    src = add_scan(viewer, scan.derive(rician(scan.data, 0.08 * np.ptp(scan.data))), "noisy")
    w = denoise_dock(viewer, src)
    w.run()
    w.stop()  # before the worker has started its first denoiser
    wait_done(qtbot, w, timeout=120_000)
    assert w.job.error is None, w.job.error
    out = w.result_layer
    assert out.name == "noisy denoised (race) [stopped]"
    hist = out.metadata["strainer_history"]
    first = hist["race"]["candidates"][0]
    assert hist["cancelled"] and list(hist["race"]["seconds"]) == [first]
    assert hist["race"]["winner"].split(";")[0] == first  # (Rician: "; background ...")
    assert w.status.value.startswith("Stopped: noisy denoised (race) [stopped]")
    assert f"; {hist['race']['winner']}; noise rician" in w.status.value
    assert w.preview_layer is None and w.run_button.enabled


def test_race_stop_returns_at_once_while_a_denoiser_runs(make_napari_viewer, qtbot,
                                                         monkeypatch):
    """Stop while a long denoiser runs: the dock returns within seconds with the denoisers
    finished so far, not after the running one (which may take minutes on a whole scan)."""
    release = threading.Event()
    started = threading.Event()
    real = race.candidates

    def with_a_slow_one(shape):
        first = real(shape)[0]

        def slow(x, s):
            started.set()
            release.wait(120)
            return x

        return [first, race.Candidate("slow", slow)]

    monkeypatch.setattr(race, "candidates", with_a_slow_one)
    viewer = make_napari_viewer()
    scan = brain()
    src = add_scan(viewer, scan.derive(rician(scan.data, 0.08 * np.ptp(scan.data))), "noisy")
    w = denoise_dock(viewer, src)
    try:
        w.run()
        qtbot.waitUntil(started.is_set, timeout=120_000)
        t0 = time.monotonic()
        w.stop()
        wait_done(qtbot, w, timeout=20_000)
        waited = time.monotonic() - t0
    finally:
        release.set()
    assert waited < 5, waited  # the slow denoiser would have held it for 120 s
    assert w.job.error is None, w.job.error
    hist = w.result_layer.metadata["strainer_history"]
    assert hist["cancelled"] and list(hist["race"]["seconds"]) == [hist["race"]["candidates"][0]]
    assert w.status.value.startswith("Stopped: noisy denoised (race) [stopped]")
