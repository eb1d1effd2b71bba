"""The "Fuse stacks" dock in a real (headless) napari viewer: three orthogonal thick-slice
stacks of a real T1 crop, written as NIfTI and opened through our reader, are fused into one
volume on the chosen stack's grid; bad selections are one clear message each."""

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
from napari_strainer.io import read_scan, write_scan
from napari_strainer.io.scan import Scan, upsampled_affine

F = 4  # slice thickness in voxels of the truth


@pytest.fixture(scope="module")
def stacks(tmp_path_factory):
    """A 16 x 24 x 24 crop of the sample T1 (2 mm voxels) and three NIfTI stacks of it, each
    averaged F voxels thick along its own slice axis: axial, coronal and sagittal thick."""
    from conftest import SAMPLES

    folder = tmp_path_factory.mktemp("stacks")
    scan = read_scan(SAMPLES / "mr_anatomical.nii")
    truth = Scan(scan.data[4:20, 8:32, 4:28].astype(np.float32), scan.affine.copy())
    truth.affine[:3, 3] = (scan.affine @ [4, 8, 4, 1])[:3]
    paths, upsampled = [], []
    for axis in range(3):
        thick = np.moveaxis(truth.data, axis, 0)
        thick = thick.reshape(thick.shape[0] // F, F, *thick.shape[1:]).mean(1)
        aff = truth.affine.copy()
        aff[:3, 3] += aff[:3, axis] * (F - 1) / 2  # centre of F thin slices
        aff[:3, axis] *= F
        aff[:, :3] = aff[:, [axis] + [i for i in range(3) if i != axis]]
        paths.append(folder / f"stack{axis}.nii.gz")
        write_scan(Scan(thick, aff, {"format": "nifti"}), paths[-1])
        upsampled.append(np.moveaxis(np.repeat(thick, F, 0), 0, axis))  # on the truth's grid
    return truth, paths, upsampled


def open_stacks(viewer, paths):
    return [viewer.open(p, plugin=PLUGIN)[0] for p in paths]


def rms(a, b) -> float:
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - b) ** 2)))


def test_fuse_three_orthogonal_stacks(make_napari_viewer, qtbot, stacks):
    truth, paths, upsampled = stacks
    viewer = make_napari_viewer()
    layers = open_stacks(viewer, paths)
    w = dock(viewer, "Fuse stacks")
    assert w.spacing.value == "auto" and w.steps.value == 500  # the CLI's defaults
    assert w.ls_steps.value == 100
    w.layers.value = layers
    w.grid_of.value = layers[1]  # the coronal-thick stack's orientation
    assert "output: 24 x 16 x 24 voxels of 2 x 2 x 2 mm" in w.plan_text.value
    w.grid_of.value = layers[0]
    assert "output: 16 x 24 x 24 voxels of 2 x 2 x 2 mm" in w.plan_text.value
    assert "path: fuse" in w.plan_text.value and "plan: fuse 3 stacks (stack0" in w.plan_text.value
    # small stacks: no learned prior, the steps stay the INR's; insisting on it is refused
    assert w.prior.value == "auto" and "learned prior needs at least" in w.plan_text.value
    assert w.steps.value == 500
    w.prior.value = "planes"
    assert "learned prior needs at least" in w.plan_text.value and w.plan is None
    w.prior.value = "auto"
    w.steps.value = 2  # a few INR steps, then the data-consistency step
    w.ls_steps.value = 50
    w.device.value = "cpu"
    w.run_button.clicked.emit()
    wait_done(qtbot, w)
    assert w.job.error is None, w.job.error
    out = w.result_layer
    assert out.name == "stack0 fused (3 stacks)"
    assert out.data.shape == truth.shape
    # the first stack's orientation, isotropic 2 mm voxels centred on the truth's voxels
    affine = out.metadata[KEY]["affine"]
    np.testing.assert_allclose(affine, truth.affine, atol=1e-4)
    np.testing.assert_allclose(affine, upsampled_affine(read_scan(paths[0]).affine,
                                                        (F, 1, 1)), atol=1e-4)
    scale, translate = geometry(affine)
    np.testing.assert_allclose(out.scale, scale)
    np.testing.assert_allclose(out.translate, translate)
    np.testing.assert_allclose(out.scale, (2, 2, 2))
    # the fused volume is closer to the truth than any one stack repeated to its grid
    err = rms(out.data, truth.data)
    assert err < 0.8 * min(rms(u, truth.data) for u in upsampled), err
    hist = out.metadata["strainer_history"]
    assert hist["stacks"] == 3 and hist["ls_steps"] == 50 and hist["steps_done"] == 2
    assert not hist["cancelled"] and w.plot.steps and "Done" in w.status.value


def test_fuse_stop_keeps_the_reconstruction_so_far(make_napari_viewer, qtbot, stacks):
    _, paths, _ = stacks
    viewer = make_napari_viewer()
    layers = open_stacks(viewer, paths[:2])
    w = dock(viewer, "Fuse stacks")
    w.layers.value = layers
    w.steps.value = 1_000_000
    w.ls_steps.value = 5
    w.device.value = "cpu"
    w.run()
    assert w.job._pbar.total == 1_000_005
    qtbot.waitUntil(lambda: len(w.plot.loss) >= 2, timeout=TIMEOUT)
    w.stop_button.clicked.emit()
    wait_done(qtbot, w, timeout=10_000)
    assert w.job.error is None, w.job.error
    out = w.result_layer
    assert out.name == "stack0 fused (2 stacks) [stopped]" and out.data.shape == (16, 24, 24)
    assert out.metadata["strainer_history"]["cancelled"]
    assert w.status.value.startswith("Stopped")


def _refused(viewer, qtbot, w, text: str) -> None:
    """Run: one message holding ``text`` in the status and a notification, nothing added."""
    from napari.utils.notifications import notification_manager

    before = [layer.name for layer in viewer.layers]
    n = len(notification_manager.records)
    w.run()
    assert w.job is None  # refused before any worker starts
    assert w.status.value.startswith("Error:") and text in w.status.value, w.status.value
    assert text in w.plan_text.value  # and said before Run, where the plan goes
    assert "\n" not in w.status.value and "Traceback" not in w.status.value
    new = [r.message for r in notification_manager.records[n:]]
    assert any(text in m for m in new), new
    assert [layer.name for layer in viewer.layers] == before
    assert w.run_button.enabled and not w.running
    w.job = None


def test_fuse_bad_selections_are_one_message(make_napari_viewer, qtbot, stacks, samples):
    _, paths, _ = stacks
    viewer = make_napari_viewer()
    layers = open_stacks(viewer, paths[:2])
    w = dock(viewer, "Fuse stacks")
    w.device.value = "cpu"
    w.ls_steps.value = 5
    _refused(viewer, qtbot, w, "at least two stacks")
    w.layers.value = layers[:1]
    _refused(viewer, qtbot, w, "at least two stacks, got 1")
    flat = viewer.add_image(np.zeros((24, 24), np.float32), name="flat")
    w.layers.value = [layers[0], flat]
    _refused(viewer, qtbot, w, "flat: a 2D image (24 x 24)")
    w.layers.value = layers
    w.spacing.value = "thin"
    _refused(viewer, qtbot, w, "spacing")
    w.spacing.value = "auto"
    far = read_scan(paths[1])
    far.affine[:3, 3] += 1000
    w.layers.value = [layers[0], add_scan(viewer, far, "far")]
    _refused(viewer, qtbot, w, "does not overlap")
    # DICOM series of two frames of reference
    a = read_scan(samples / "mr_series")
    b = read_scan(samples / "mr_series")
    b.meta["dicom_template"] = tpl = b.meta["dicom_template"].copy()
    tpl.FrameOfReferenceUID = "1.2.3.4.5"
    w.layers.value = [add_scan(viewer, a, "a"), add_scan(viewer, b, "b")]
    _refused(viewer, qtbot, w, "different frames of reference")
