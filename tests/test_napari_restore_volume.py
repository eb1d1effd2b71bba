"""The volume paths of the "Restore scan" dock in a real (headless) napari viewer: through-plane
super-resolution (slice scale) and volume denoising (denoise mode volume; auto is the race of
classical denoisers, ``test_napari_denoise_race.py``) fit one 3D SIREN to the whole sample T1
(25 x 41 x 33, opened through our reader), with a live preview of the whole output grid, Stop,
and a result placed in world coordinates; wrong choices are one clear message each."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from test_napari_plugin import (  # noqa: F401 - the autouse fixtures apply here too
    PLUGIN,
    TIMEOUT,
    add_scan,
    dock,
    one_torch_thread,
    stop_jobs_at_teardown,
    wait_done,
)

from napari_strainer.gui._layers import KEY, geometry
from napari_strainer.io import read_scan, sample_path
from napari_strainer.io.scan import upsampled_affine
from napari_strainer.restore import slices, volume

SAMPLE = "mr_anatomical"  # (25, 41, 33), 2 mm voxels


def open_sample(viewer):
    (layer,) = viewer.open(sample_path(SAMPLE), plugin=PLUGIN)
    return layer


def volume_dock(viewer, layer, task: str):
    w = dock(viewer, "Restore scan")
    w.layer.value = layer
    w.encoder.value = "none"
    w.task.value = task
    w.device.value = "cpu"
    return w


def world(layer, index) -> np.ndarray:
    return np.asarray(layer.data_to_world(np.asarray(index, float)), float)


def _refused(viewer, qtbot, w, text: str) -> None:
    """Run: one message holding ``text`` in the status and a notification, nothing added."""
    from napari.utils.notifications import notification_manager

    before = [layer.name for layer in viewer.layers]
    n = len(notification_manager.records)
    w.job = None
    w.run()
    assert w.job is None  # refused before any worker starts
    assert w.status.value.startswith("Error:") and text in w.status.value, w.status.value
    assert text in w.plan_text.value  # and said before Run, where the plan goes
    assert "\n" not in w.status.value and "Traceback" not in w.status.value
    new = [r.message for r in notification_manager.records[n:]]
    assert any(text in m for m in new), new
    assert [layer.name for layer in viewer.layers] == before
    assert w.result_layer is None and w.preview_layer is None
    assert w.run_button.enabled and not w.running


def test_through_plane_superres_volume(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    src = open_sample(viewer)
    scan = read_scan(sample_path(SAMPLE))
    w = volume_dock(viewer, src, "superres")
    # off by default: the in-plane slice path with its own steps
    assert w.slice_scale.value == 0 and w.scale.value == 2
    assert w.slice_profile.native.isHidden() and not w.slice_scale.native.isHidden()
    assert w.steps.value == slices.DEFAULT_STEPS["superres"]
    w.slice_scale.value = 1  # not a factor: stepping up from off gives 2
    assert w.slice_scale.value == 2
    assert w.scale.value == 1  # in-plane default 1 with a slice scale, as the CLI's
    assert not w.slice_profile.native.isHidden() and w.slice_profile.value == "box"
    assert not w.slice_axis.native.isHidden() and w.slice_axis.value is None
    assert "slice axis: axis 0, the stored slice axis" in w.plan_text.value
    w.slice_axis.value = 2  # the viewer's last axis: the columns are refined instead
    assert "output: 25 x 41 x 66 voxels" in w.plan_text.value, w.plan_text.value
    w.slice_axis.value = None
    assert w.steps.value == volume.DEFAULT_STEPS["superres"]
    assert not w.init.enabled and not w.head.enabled and not w.batch.enabled
    assert "3D SIREN" in w.encoder_info.value
    w.slice_scale.value = 1  # stepping down from 2: off again, in-plane 2 again
    assert w.slice_scale.value == 0 and w.scale.value == 2
    assert w.steps.value == slices.DEFAULT_STEPS["superres"]
    assert w.slice_profile.native.isHidden() and w.init.enabled
    w.slice_scale.value = 2
    w.scale.value = 1
    w.steps.value = 3
    w.log_every.value = 1
    previews = []
    w.run_button.clicked.emit()
    preview = w.preview_layer
    assert preview is not None and preview in viewer.layers
    # the preview is the whole output grid, placed like the result
    assert preview.data.shape == (50, 41, 33)
    p_scale, p_translate = geometry(upsampled_affine(scan.affine, (2, 1, 1)))
    np.testing.assert_allclose(preview.scale, p_scale)
    np.testing.assert_allclose(preview.translate, p_translate)
    preview.events.data.connect(lambda e: previews.append(preview.data.shape))
    assert w.job._pbar.total == 3 + volume.GRID_STEPS
    wait_done(qtbot, w)
    assert w.job.error is None, w.job.error
    assert previews and set(previews) == {(50, 41, 33)}, previews
    assert preview not in viewer.layers  # replaced by the result
    out = w.result_layer
    assert out.name == f"{src.name} superres x1 slices x2 (3D SIREN)"
    assert out.data.shape == (2 * 25, 41, 33)
    hist = out.metadata["strainer_history"]
    assert hist["task"] == "superres_volume" and hist["slice_scale"] == 2
    assert hist["scale"] == 1 and hist["steps_done"] == 3 and not hist["cancelled"]
    assert hist["profile"] == "box" and hist["ls_steps"] == volume.GRID_STEPS
    # geometry: the refined grid, centres aligned with the input's
    affine = upsampled_affine(scan.affine, (2, 1, 1))
    np.testing.assert_allclose(out.metadata[KEY]["affine"], affine, atol=1e-6)
    scale, translate = geometry(affine)
    np.testing.assert_allclose(out.scale, scale)
    np.testing.assert_allclose(out.translate, translate)
    np.testing.assert_allclose(out.scale, np.array(src.scale) / [2, 1, 1])
    for i in (0, 7, 24):  # each pair of output slices lies over its input slice, in the world
        mid = (world(out, (2 * i, 5, 9)) + world(out, (2 * i + 1, 5, 9))) / 2
        np.testing.assert_allclose(mid, world(src, (i, 5, 9)), atol=1e-6)
    # data consistency (box profile of one input spacing): each pair averages to its slice
    data = np.asarray(out.data, np.float64)
    pairs = data.reshape(25, 2, 41, 33).mean(1)
    err = np.sqrt(np.mean((pairs - scan.data) ** 2))
    assert err < 2e-3 * np.ptp(scan.data), err
    assert len(w.plot.loss) >= 4 and set(w.plot.segment) == {0, 1}  # INR, least squares
    assert w.status.value.startswith("Done")
    assert "through-plane super-resolution x2" in out.metadata[KEY]["meta"]["description"]


def test_denoise_volume_with_reference_and_refusals(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    scan = read_scan(sample_path(SAMPLE))
    clean = open_sample(viewer)
    rng = np.random.default_rng(0)
    noisy = scan.derive((scan.data + rng.normal(0, 0.05 * np.ptp(scan.data), scan.shape))
                        .astype(np.float32))
    src = add_scan(viewer, noisy, "noisy")
    w = volume_dock(viewer, src, "denoise")
    # auto (the default) is the race of classical denoisers: no training steps
    assert w.denoise_mode.value == "auto"
    assert w.plan.path == "race" and w.steps.value == 0 and not w.steps.enabled
    # volume: one 3D INR over the whole scan, with its steps
    w.denoise_mode.value = "volume"
    assert w.plan.path == "volume" and "path: volume" in w.plan_text.value
    assert w.steps.value == volume.DEFAULT_STEPS["denoise"] and w.steps.enabled
    w.denoise_mode.value = "slices"
    assert w.steps.value == slices.DEFAULT_STEPS["denoise"]
    w.denoise_mode.value = "volume"
    assert w.steps.value == volume.DEFAULT_STEPS["denoise"]
    # an encoder file: the volume path uses none; one message, nothing run
    enc = tmp_path / "enc.safetensors"
    enc.write_bytes(b"not opened: refused before")
    w.use_encoder_file(enc)
    _refused(viewer, qtbot, w, "3D SIREN from scratch")
    w.encoder.value = "self"
    _refused(viewer, qtbot, w, "3D SIREN from scratch")
    w.encoder.value = "none"
    w.reference.value = clean
    w.sigma.value = "none"  # all steps
    w.steps.value = 3
    w.log_every.value = 1
    w.job = None
    w.run()
    assert w.preview_layer is not None and w.preview_layer.data.shape == scan.shape
    wait_done(qtbot, w)
    assert w.job.error is None, w.job.error
    out = w.result_layer
    assert out.name == "noisy denoised (3D SIREN)"
    assert out.data.shape == scan.shape == src.data.shape
    np.testing.assert_allclose(out.scale, src.scale)
    np.testing.assert_allclose(out.translate, src.translate)
    hist = out.metadata["strainer_history"]
    assert hist["task"] == "denoise_volume" and hist["steps_done"] == 3
    assert hist["stop_reason"].startswith("ran all steps") and not hist["cancelled"]
    assert hist["psnr"] and hist["psnr"][-1] is not None
    assert w.plot.psnr and w.plot.psnr[-1] == pytest.approx(hist["psnr"][-1])
    assert "final PSNR" in w.status.value and "3D SIREN" in w.status.value
    assert "volume denoising" in out.metadata[KEY]["meta"]["description"]


def test_volume_form_refusals_and_2d_layer(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    src = open_sample(viewer)
    w = volume_dock(viewer, src, "superres")
    w.scale.value = 1  # neither in-plane nor through-plane
    _refused(viewer, qtbot, w, "superres needs --scale")
    flat_scan = read_scan(sample_path(SAMPLE))
    flat_scan = flat_scan.derive(flat_scan.data[12:13].astype(np.float32))
    flat = add_scan(viewer, flat_scan, "flat")
    w.layer.value = flat
    w.slice_scale.value = 2
    _refused(viewer, qtbot, w, "flat: a 2D image (41 x 33)")
    # denoise mode volume on one slice takes the slice path, as the CLI does (auto: the race,
    # in 2D)
    w.task.value = "denoise"
    w.denoise_mode.value = "auto"
    assert w.plan.path == "race"
    w.denoise_mode.value = "volume"
    assert w.plan.path == "slices"
    w.sigma.value = "none"
    w.steps.value = 2
    w.job = None
    w.run()
    wait_done(qtbot, w)
    assert w.job.error is None, w.job.error
    hist = w.result_layer.metadata["strainer_history"]
    assert hist["task"] == "denoise" and w.result_layer.data.shape == (1, 41, 33)
    assert w.result_layer.name == "flat denoised (SIREN)"


def test_volume_stop_keeps_the_result_so_far(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    src = open_sample(viewer)
    w = volume_dock(viewer, src, "superres")
    w.slice_scale.value = 3
    w.scale.value = 1
    w.slice_profile.value = "gaussian"
    w.steps.value = 1_000_000
    w.log_every.value = 1
    w.run()
    assert w.job._pbar.total == 1_000_000 + volume.GRID_STEPS
    assert w.preview_layer.data.shape == (75, 41, 33)
    qtbot.waitUntil(lambda: len(w.plot.loss) >= 2, timeout=TIMEOUT)
    w.stop_button.clicked.emit()
    wait_done(qtbot, w, timeout=10_000)
    assert w.job.error is None, w.job.error
    out = w.result_layer
    assert out.name == f"{src.name} superres x1 slices x3 (3D SIREN) [stopped]"
    assert out.data.shape == (75, 41, 33)
    hist = out.metadata["strainer_history"]
    assert hist["cancelled"] and hist["task"] == "superres_volume"
    assert hist["profile"] == "gaussian" and hist["steps_done"] < 1_000_000
    assert w.preview_layer is None and w.status.value.startswith("Stopped")
