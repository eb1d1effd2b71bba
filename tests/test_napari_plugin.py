"""Headless napari tests (run under Xvfb: ``xvfb-run -a pytest tests/test_napari_*.py``).

They open the shipped samples through our readers, run tiny pretraining and restoration
through the dock widgets (to completion, and stopped mid-run), provoke errors, and save
results and read them back with the geometry intact.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

import torch
from npe2 import PluginManifest

from napari_strainer.core.checkpoint import load_encoder
from napari_strainer.core.siren import SirenConfig
from napari_strainer.gui._jobs import describe_error
from napari_strainer.gui._layers import KEY, geometry, scan_to_layer
from napari_strainer.io import read_scan, sample_path
from napari_strainer.io.scan import Scan, upsampled_affine
from napari_strainer.pretrain import train
from napari_strainer.restore import slices, volume

PLUGIN = "napari-strainer"
MANIFEST = Path(__file__).resolve().parents[1] / "src" / "napari_strainer" / "napari.yaml"
TINY = SirenConfig(width=16, layers=3, shared_layers=2)
TIMEOUT = 60_000  # ms


def small_scan(name: str = "mr_brain") -> Scan:
    """Two slices of an MR sample at half resolution, with the matching affine (and the
    sample's metadata, e.g. its DICOM template)."""
    scan = read_scan(sample_path(name))
    z0 = scan.shape[0] // 2
    affine = scan.affine.copy()
    affine[:3, 3] = (scan.affine @ np.array([z0, 0, 0, 1.0]))[:3]
    affine[:3, 1:3] *= 2
    affine[:3, 3] += (scan.affine[:3, 1] + scan.affine[:3, 2]) / 2  # centre of 2x2 blocks
    data = scan.data[z0:z0 + 2].astype(np.float32)
    data = data.reshape(2, data.shape[1] // 2, 2, data.shape[2] // 2, 2).mean(axis=(2, 4))
    return scan.derive(data, affine=affine)


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("enc") / "tiny.safetensors"
    images = train.training_slices([small_scan()], max_slices=2)
    train.pretrain(images, out, config=TINY, steps=10, device="cpu")
    return out


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The fits run in a worker thread next to Qt; one torch thread keeps 2-core CI smooth."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def stop_jobs_at_teardown(qtbot):
    """A test that fails mid-run must not leave a fit running into the next test."""
    yield
    from napari_strainer.gui._common import JobWidget

    for w in list(JobWidget._instances):
        if w.running:
            w.job.stop()
            qtbot.waitUntil(lambda w=w: not w.running, timeout=TIMEOUT)


def add_scan(viewer, scan: Scan, name: str = "small"):
    data, attrs, _ = scan_to_layer(scan, name)
    return viewer.add_image(data, **attrs)


def dock(viewer, name: str):
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    return widget


def restore_dock(viewer, encoder, scan: Scan | None = None):
    """The Restore dock on ``scan`` (default :func:`small_scan`) with ``encoder`` loaded."""
    w = dock(viewer, "Restore scan")
    w.layer.value = add_scan(viewer, scan or small_scan())
    w.use_encoder_file(encoder)
    return w


def wait_done(qtbot, widget, timeout=TIMEOUT):
    qtbot.waitUntil(lambda: widget.job is not None and not widget.running, timeout=timeout)


# ----------------------------------------------------------------------------- manifest
def test_manifest_commands_are_declared():
    mf = PluginManifest.from_file(MANIFEST)
    declared = {c.id for c in mf.contributions.commands}
    c = mf.contributions
    used = [r.command for r in c.readers] + [w.command for w in c.writers] + [
        s.command for s in c.sample_data] + [w.command for w in c.widgets]
    assert used and set(used) <= declared
    assert {w.display_name for w in c.widgets} == {"Pretrain encoder", "Restore scan",
                                                  "Fuse stacks"}
    for cmd in c.commands:  # every command resolves to an importable callable
        module, _, attr = cmd.python_name.partition(":")
        assert callable(getattr(__import__(module, fromlist=[attr]), attr))


def test_oom_message_suggests_fewer_coordinates_or_cpu():
    msg = describe_error(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert "fewer coordinates per step" in msg and "CPU" in msg


# ----------------------------------------------------------------------------- readers
@pytest.mark.parametrize("name", ["mr_brain", "ct", "mr_series", "mr_multiframe"])
def test_open_sample_files_with_geometry(make_napari_viewer, name):
    viewer = make_napari_viewer()
    path = sample_path(name)
    layers = viewer.open(path, plugin=PLUGIN)
    assert len(layers) == 1
    layer = layers[0]
    scan = read_scan(path)
    np.testing.assert_array_equal(layer.data, scan.data)
    scale, translate = geometry(scan.affine)
    np.testing.assert_allclose(layer.scale, scan.spacing)
    np.testing.assert_allclose(layer.scale, scale)
    np.testing.assert_allclose(layer.translate, translate)
    np.testing.assert_allclose(layer.metadata[KEY]["affine"], scan.affine)
    assert layer.metadata[KEY]["meta"]["format"] == scan.meta["format"]


def test_readers_decline_other_files(tmp_path):
    from napari_strainer.gui._reader import get_dicom_reader, get_nifti_reader

    (tmp_path / "notes.txt").write_text("hello")
    assert get_dicom_reader(str(tmp_path)) is None  # a folder without DICOM
    assert get_dicom_reader(str(tmp_path / "notes.txt")) is None
    assert get_nifti_reader(str(tmp_path / "notes.txt")) is None
    assert get_dicom_reader(str(sample_path("mr_series"))) is not None


def test_sample_data_menu_entries(make_napari_viewer):
    viewer = make_napari_viewer()
    for key in ("mr_brain", "ct", "mr_series"):
        viewer.open_sample(PLUGIN, key)
    assert [layer.name for layer in viewer.layers] == ["mr_brain", "ct", "mr_series"]
    assert viewer.layers["mr_brain"].data.ndim == 3


# ----------------------------------------------------------------------------- writer
@pytest.mark.parametrize("target", ["out.nii.gz", "series"])
def test_save_layer_and_read_back(make_napari_viewer, tmp_path, target):
    viewer = make_napari_viewer()
    (layer,) = viewer.open(sample_path("mr_series"), plugin=PLUGIN)
    out = tmp_path / target
    plugin = PLUGIN if "." in target else f"{PLUGIN}.write_dicom_series"
    written = viewer.layers.save(str(out), selected=False, plugin=plugin)
    assert written and Path(written[0]) == out
    back = read_scan(out)
    src = read_scan(sample_path("mr_series"))
    np.testing.assert_allclose(back.affine, src.affine, atol=1e-4)
    np.testing.assert_allclose(back.data, src.data, atol=1e-3 * np.ptp(src.data))
    (again,) = viewer.open(out, plugin=PLUGIN)
    np.testing.assert_allclose(again.scale, layer.scale, rtol=1e-5)
    np.testing.assert_allclose(again.translate, layer.translate, atol=1e-3)


# ----------------------------------------------------------------------------- widgets
def test_pretrain_widget_runs_to_completion(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    layer = add_scan(viewer, small_scan())
    w = dock(viewer, "Pretrain encoder")
    assert w.net_width.value == 256 and w.n_layers.value == 6 and w.shared.value == 5  # paper
    assert list(w.device.choices[:2]) == ["auto", "cpu"]
    w.layers.value = [layer]
    w.max_slices.value = 2
    w.steps.value = 30
    w.net_width.value, w.n_layers.value, w.shared.value = 16, 3, 2
    w.device.value = "cpu"
    out = tmp_path / "enc.safetensors"
    w.output.value = str(out)
    w.run_button.clicked.emit()  # what a click does
    wait_done(qtbot, w)
    assert w.job.error is None, w.job.error
    enc = load_encoder(out)
    assert enc.config.width == 16 and enc.info["complete"] and enc.info["steps"] == 30
    assert len(w.plot.loss) >= 3 and w.plot.steps[-1] == 30
    assert "Encoder saved" in w.status.value


def test_pretrain_widget_stop_keeps_usable_encoder(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    layer = add_scan(viewer, small_scan())
    w = dock(viewer, "Pretrain encoder")
    w.layers.value = [layer]
    w.steps.value = 1_000_000
    w.net_width.value, w.n_layers.value, w.shared.value = 16, 3, 2
    w.device.value = "cpu"
    out = tmp_path / "enc.safetensors"
    w.output.value = str(out)
    w.run()
    qtbot.waitUntil(lambda: len(w.plot.loss) >= 2, timeout=TIMEOUT)
    w.stop_button.clicked.emit()
    wait_done(qtbot, w, timeout=10_000)  # within one update interval, not the whole run
    enc = load_encoder(out)
    assert not enc.info["complete"] and 0 < enc.info["steps"] < 1_000_000
    assert out.with_name(out.name + ".state.safetensors").is_file()  # resumable
    assert "stopped" in w.status.value


def test_restore_superres_live_preview_and_ui_stays_responsive(
        make_napari_viewer, qtbot, tiny_encoder):
    from qtpy.QtCore import QTimer

    viewer = make_napari_viewer()
    scan = small_scan()
    w = restore_dock(viewer, tiny_encoder, scan)
    src = w.layer.value
    w.task.value = "superres"
    # benchmark default, limited to the tiny encoder's 2 shared layers
    assert w.freeze.value == slices.default_freeze("superres", TINY.shared_layers)
    assert w.freeze.max == TINY.shared_layers and "width 16" in w.encoder_info.value
    assert w.steps.value == slices.DEFAULT_STEPS["superres"]
    assert w.init.value == "auto" and not w.freeze.enabled  # auto races freeze depths itself
    w.init.value = "fixed"  # the paper's recipe with a chosen freeze
    assert w.freeze.enabled
    w.freeze.value = 1
    w.scale.value = 2
    w.steps.value = 40
    w.log_every.value = 5
    w.device.value = "cpu"
    ticks, previews = [], []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(1))
    timer.start(5)
    w.run_button.clicked.emit()
    preview = w.preview_layer
    assert preview is not None and preview in viewer.layers
    preview.events.data.connect(lambda e: previews.append(1))
    wait_done(qtbot, w)
    timer.stop()
    assert w.job.error is None, w.job.error
    assert len(ticks) >= 5, "event loop starved while fitting"
    assert previews, "the live preview never updated"
    assert preview not in viewer.layers  # replaced by the result
    out = w.result_layer
    assert out.name == "small superres x2 (STRAINER tiny)"
    assert out.data.shape == (2, scan.shape[1] * 2, scan.shape[2] * 2)
    np.testing.assert_allclose(out.scale, np.array(src.scale) / [1, 2, 2])
    # pixel centres aligned: the output covers exactly the input's extent
    lo_in = np.array(src.translate) - np.array(src.scale) / 2
    lo_out = np.array(out.translate) - np.array(out.scale) / 2
    np.testing.assert_allclose(lo_out[1:], lo_in[1:], atol=1e-6)
    assert "super-resolution x2" in out.metadata[KEY]["meta"]["description"]
    assert len(w.plot.loss) >= 5


def test_restore_denoise_with_reference_and_stop(make_napari_viewer, qtbot, tiny_encoder):
    viewer = make_napari_viewer()
    scan = small_scan()
    clean = add_scan(viewer, scan, "clean")
    rng = np.random.default_rng(0)
    noisy = scan.derive(scan.data + rng.normal(0, 0.05 * np.ptp(scan.data), scan.shape)
                        .astype(np.float32))
    src = add_scan(viewer, noisy, "noisy")
    w = dock(viewer, "Restore scan")
    w.layer.value = src
    w.reference.value = clean
    w.use_encoder_file(tiny_encoder)
    w.task.value = "denoise"
    w.denoise_mode.value = "slices"  # the encoder's 2D path
    w.init.value = "fixed"
    w.sigma.value = "none"  # run until stopped
    w.steps.value = 1_000_000
    w.log_every.value = 2
    w.device.value = "cpu"
    w.run()
    qtbot.waitUntil(lambda: len(w.plot.psnr) >= 3, timeout=TIMEOUT)
    w.stop()
    wait_done(qtbot, w, timeout=10_000)
    assert w.job.error is None, w.job.error
    out = w.result_layer
    assert out.name.startswith("noisy denoised (STRAINER tiny)") and "[stopped]" in out.name
    assert out.data.shape == scan.shape
    np.testing.assert_allclose(out.scale, src.scale)
    np.testing.assert_allclose(out.translate, src.translate)
    assert out.metadata["strainer_history"]["cancelled"]


def test_restore_bad_encoder_file_is_a_notification(make_napari_viewer, tmp_path):
    """The plan loads the encoder: a broken file is said in the plan text before Run, and Run
    gives one notification and starts nothing."""
    from napari.utils.notifications import notification_manager

    viewer = make_napari_viewer()
    src = add_scan(viewer, small_scan())
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"this is not a checkpoint")
    w = dock(viewer, "Restore scan")
    w.layer.value = src
    w.use_encoder_file(bad)
    w.steps.value = 5
    w.device.value = "cpu"
    assert w.plan is None and "broken.safetensors" in w.plan_text.value
    n = len(notification_manager.records)
    w.run()
    assert w.job is None  # no worker
    new = [r.message for r in notification_manager.records[n:]]
    assert any("broken.safetensors" in m for m in new), new
    assert w.result_layer is None and w.preview_layer is None
    assert [layer.name for layer in viewer.layers] == ["small"]
    assert w.run_button.enabled and not w.stop_button.enabled
    assert w.status.value.startswith("Error:") and "broken.safetensors" in w.status.value
    assert "\n" not in w.status.value


def test_bad_form_values_are_notifications(make_napari_viewer):
    from napari.utils.notifications import notification_manager

    viewer = make_napari_viewer()
    w = dock(viewer, "Restore scan")
    n = len(notification_manager.records)
    w.run()  # no layer
    assert not w.running and "open a scan" in w.status.value
    add_scan(viewer, small_scan())
    w.lr.value = "fast"
    w.run()
    assert "learning rate" in w.status.value
    assert len(notification_manager.records) >= n + 2


def test_restore_result_saves_with_geometry(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    src_scan = small_scan("mr_series")
    src = add_scan(viewer, src_scan, "mr_series")
    w = dock(viewer, "Restore scan")
    w.layer.value = src
    w.encoder.value = "none"
    w.task.value = "superres"
    w.steps.value = 3
    w.device.value = "cpu"
    w.run()
    wait_done(qtbot, w)
    assert w.job.error is None, w.job.error
    out = w.result_layer
    assert out.name == "mr_series superres x2 (SIREN)"
    for target, plugin in (("sr.nii.gz", PLUGIN), ("sr_series", f"{PLUGIN}.write_dicom_series")):
        path = tmp_path / target
        viewer.layers.selection = {out}
        viewer.layers.save(str(path), selected=True, plugin=plugin)
        back = read_scan(path)
        np.testing.assert_allclose(back.affine, upsampled_affine(src_scan.affine,
                                                                      (1, 2, 2)), atol=1e-4)
        assert back.shape == out.data.shape
        if target == "sr_series":
            assert back.meta["modality"] == src_scan.meta["modality"]
            assert "super-resolution" in (back.meta.get("series_description") or "")


def test_cuda_oom_in_worker_is_shown_not_swallowed(make_napari_viewer, qtbot, tmp_path,
                                                   monkeypatch):
    """A RuntimeError (CUDA out-of-memory) in the worker reaches the user with advice."""
    from napari.utils.notifications import notification_manager

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(train, "pretrain", oom)
    viewer = make_napari_viewer()
    layer = add_scan(viewer, small_scan())
    w = dock(viewer, "Pretrain encoder")
    w.layers.value = [layer]
    w.output.value = str(tmp_path / "enc.safetensors")
    n = len(notification_manager.records)
    w.run()
    wait_done(qtbot, w)
    new = [r.message for r in notification_manager.records[n:]]
    assert any("fewer coordinates per step" in m and "CPU" in m for m in new), new
    assert "Out of memory" in w.status.value


def test_restore_plan_with_eta_beside_run_then_auto_route(make_napari_viewer, qtbot,
                                                         tiny_encoder):
    viewer = make_napari_viewer()
    w = restore_dock(viewer, tiny_encoder)
    w.device.value = "cpu"
    w.steps.value = 30
    assert "steps: at most 30 Adam steps" in w.plan_text.value
    assert "ETA: press Plan" in w.plan_text.value  # timing is on request
    w.plan_button.clicked.emit()
    qtbot.waitUntil(lambda: "ETA: at most" in w.plan_text.value, timeout=TIMEOUT)
    assert w.plan_button.native.parent() is w.run_button.native.parent()  # beside Run
    assert w.job is None  # planning runs nothing
    w.run()
    wait_done(qtbot, w)
    assert w.job.error is None, w.job.error
    hist = w.result_layer.metadata["strainer_history"]
    assert hist["init"] == "auto" and hist["probes"]
    # the ETA timed by Plan holds for these inputs: the run keeps it
    assert hist["plan"]["path"] == "slices" and hist["plan"]["eta_seconds"] > 0
    assert f"route {hist['route']} chosen by held-out loss" in w.status.value
    enc = "SIREN" if hist["route"] == "siren" else "STRAINER tiny"
    assert w.result_layer.name == f"small fit ({enc})"
    assert w.result_layer.metadata[KEY]["source"] == str(sample_path("mr_brain"))


def test_restore_head_choice_reaches_the_history(make_napari_viewer, qtbot, tiny_encoder):
    viewer = make_napari_viewer()
    w = restore_dock(viewer, tiny_encoder)
    assert w.head.value == "solved" and w.head.enabled
    w.task.value = "superres"  # the head choice is for fitting only
    assert not w.head.enabled
    w.task.value = "fit"
    assert w.head.enabled
    w.init.value = "fixed"  # the encoder route, whatever a race would pick
    w.steps.value = 2
    w.device.value = "cpu"
    for head in ("random", "solved"):
        w.head.value = head
        w.run()
        wait_done(qtbot, w)
        assert w.job.error is None, w.job.error
        assert w.result_layer.metadata["strainer_history"]["head"] == head
    w.encoder.value = "none"
    assert not w.head.enabled


# ----------------------------------------------------------------------------- the plan
def test_restore_shows_the_plan_before_run(make_napari_viewer, qtbot, tiny_encoder):
    """The dock shows the planner's plan as the form changes, before anything runs: path,
    route, noise, steps, output, memory, ETA and the reasons; Plan times the ETA."""
    viewer = make_napari_viewer()
    w = restore_dock(viewer, tiny_encoder)
    w.device.value = "cpu"
    text = w.plan_text.value
    for line in ("plan: fit small (2 x 48 x 64", "path: slices (one 2D INR per slice)",
                 "route: auto: SIREN and encoder", "steps: at most 500 Adam steps",
                 "output: 2 x 48 x 64 voxels", "memory: about", "ETA: press Plan",
                 "why: "):
        assert line in text, (line, text)
    w.task.value = "superres"  # in-plane x2: the slice path, on the finer grid
    assert "output: 2 x 96 x 128 voxels" in w.plan_text.value
    assert "super-resolution x2: the first" in w.plan_text.value
    w.task.value = "denoise"  # auto: the race of classical denoisers, no training steps
    text = w.plan_text.value
    assert w.plan.path == "race" and "path: race (denoisers judged" in text
    assert "noise: rician (magnitude data" in text and "steps: at most" not in text
    assert "why: mode auto: the race of denoisers" in text
    note = [line for line in text.splitlines() if line.startswith("  note: ")]
    assert note and "race uses no encoder" in note[0] and "tiny.safetensors" in note[0]
    assert w.steps.value == w.plan.steps == 0 and not w.steps.enabled
    w.encoder.value = "none"  # the volume path takes no 2D encoder
    w.denoise_mode.value = "volume"  # one 3D INR over this small 3D layer
    text = w.plan_text.value
    assert w.plan.path == "volume" and "path: volume (one 3D INR" in text
    assert "noise: gaussian, sigma" in text and "why: --mode volume" in text
    assert w.steps.value == w.plan.steps == volume.DEFAULT_STEPS["denoise"]
    assert w.steps.enabled
    w.steps.value = 5
    assert "steps: at most 5 Adam steps" in w.plan_text.value
    w.plan_button.clicked.emit()
    qtbot.waitUntil(lambda: "ETA: about" in w.plan_text.value, timeout=TIMEOUT)
    assert "on cpu" in w.plan_text.value and "path: volume" in w.plan_text.value
    assert w.job is None and [layer.name for layer in viewer.layers] == ["small"]


def test_restore_invalid_input_is_one_line_and_runs_nothing(make_napari_viewer, qtbot):
    """A slice scale on a 2D layer, or an output above the size limit: the plan text says
    why before Run; Run gives the same line as a notification and starts no worker."""
    from napari.utils.notifications import notification_manager

    viewer = make_napari_viewer()
    flat = small_scan()
    flat = flat.derive(flat.data[:1])
    w = dock(viewer, "Restore scan")
    w.layer.value = add_scan(viewer, flat, "flat")
    w.encoder.value = "none"
    w.task.value = "superres"
    w.slice_scale.value = 2
    huge = add_scan(viewer, Scan(np.zeros((1, 3000, 3000), np.float32)), "huge")
    before = [layer.name for layer in viewer.layers]
    flat_text = "flat: a 2D image (48 x 64); through-plane super-resolution needs a 3D scan"
    cases = [(w.layer.value, flat_text), (huge, "--scale 8 would make a (1, 24000, 24000)")]
    for layer, text in cases:
        w.layer.value = layer
        if layer is huge:
            w.slice_scale.value = 0
            w.scale.value = 8
        assert w.plan is None and text in w.plan_text.value, w.plan_text.value
        n = len(notification_manager.records)
        w.run()
        assert w.job is None and not w.running  # no worker started
        assert w.status.value.startswith("Error:") and text in w.status.value, w.status.value
        assert "\n" not in w.status.value and "Traceback" not in w.status.value
        new = [r.message for r in notification_manager.records[n:]]
        assert len(new) == 1 and text in new[0], new
        assert [layer.name for layer in viewer.layers] == before
        assert w.preview_layer is None and w.result_layer is None and w.run_button.enabled
