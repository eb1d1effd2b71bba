"""Screenshots of the napari plugin after real (small) runs, for the README.

Run from the repository root under an X server (a virtual one is fine)::

    xvfb-run -a -s "-screen 0 1920x1080x24" python docs/screenshots.py

It opens MR samples through the plugin's readers, pretrains an encoder on two of them with
the "Pretrain encoder" widget, then uses the "Restore scan" widget on a third (a few slices of
the brain EPI, unseen in pretraining): it super-resolves a half-resolution copy against the
original and denoises a noisy copy, and saves
``viewer.screenshot(canvas_only=False)`` after each run as ``docs/*.png``. The runs are
small (``--width``, ``--steps``) so that the script takes a few minutes on a laptop CPU;
``--device`` picks the device.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

import napari
import numpy as np
from qtpy.QtWidgets import QApplication

from napari_strainer.gui._layers import scan_to_layer
from napari_strainer.io import read_scan, sample_path

DOCS = Path(__file__).resolve().parent
PLUGIN = "napari-strainer"


def wait(pred, timeout: float = 1800.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            sys.exit("timed out")
        QApplication.processEvents()
        time.sleep(0.02)


def settle(seconds: float = 0.5) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        QApplication.processEvents()
        time.sleep(0.02)


def shot(viewer, name: str) -> None:
    settle()
    path = DOCS / name
    viewer.screenshot(str(path), canvas_only=False, flash=False)
    print("wrote", path)


def half_resolution(scan):
    """The scan area-downsampled 2x in-plane, with the matching (centre-aligned) affine."""
    z, h, w = scan.shape
    data = scan.data[:, : h // 2 * 2, : w // 2 * 2].astype(np.float32)
    data = data.reshape(z, h // 2, 2, w // 2, 2).mean(axis=(2, 4))
    affine = scan.affine.copy()
    affine[:3, 1:3] *= 2
    affine[:3, 3] += (scan.affine[:3, 1] + scan.affine[:3, 2]) / 2
    return scan.derive(data, affine=affine)


def run_widget(widget) -> None:
    widget.run()
    wait(lambda: not widget.running)
    if widget.job.error:
        sys.exit(f"run failed: {widget.job.error}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--width", type=int, default=64, help="network width (paper: 256)")
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=150, help="super-resolution steps")
    ap.add_argument("--denoise-steps", type=int, default=300, help="denoising steps (max)")
    ap.add_argument("--slices", type=int, default=6, help="slices of the scan to restore")
    ap.add_argument("--out", type=Path, default=None, help="encoder path (default: temp)")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="strainer-shots-"))
    encoder = args.out or tmp / "encoder.safetensors"

    viewer = napari.Viewer(title="napari-strainer")
    viewer.window._qt_window.resize(1600, 1000)
    (anat,) = viewer.open(sample_path("mr_anatomical"), plugin=PLUGIN)
    (multi,) = viewer.open(sample_path("mr_multiframe"), plugin=PLUGIN)

    # 1. Pretrain an encoder on two MR scans (of different sizes: resampled to 64 x 64)
    _, pre = viewer.window.add_plugin_dock_widget(PLUGIN, "Pretrain encoder")
    pre.layers.value = [anat, multi]
    pre.max_slices.value = 8
    pre.size.value = 64
    pre.steps.value = args.pretrain_steps
    pre.net_width.value = args.width
    pre.device.value = args.device
    pre.output.value = str(encoder)
    pre.arch_fold.expand(animate=False)
    run_widget(pre)
    multi.visible = False
    viewer.dims.set_current_step(0, anat.data.shape[0] // 2)
    viewer.reset_view()
    shot(viewer, "pretrain.png")
    viewer.window.remove_dock_widget(pre.native.parent())
    viewer.layers.clear()  # scans in other frames would widen the slice axis

    # 2. Super-resolve a half-resolution copy of the scan; the original is the PSNR reference
    full = read_scan(sample_path("mr_brain"))
    z0 = max(0, full.shape[0] // 2 - args.slices // 2)
    scan = full.derive(full.data[z0:z0 + args.slices], affine=full.affine @ _shift(z0))
    mr = viewer.add_image(**_kw(scan_to_layer(scan, "mr_brain")))
    low = viewer.add_image(**_kw(scan_to_layer(half_resolution(scan), "mr_brain half-res")))
    _, rest = viewer.window.add_plugin_dock_widget(PLUGIN, "Restore scan")
    rest.layer.value = low
    rest.use_encoder_file(encoder)  # the Pretrain widget also does this when it finishes
    rest.task.value = "superres"  # (sets the task's default steps and freeze depth)
    rest.scale.value = 2
    rest.steps.value = args.steps
    rest.reference.value = mr
    rest.device.value = args.device
    rest.advanced_fold.expand(animate=False)
    rest.run()
    viewer.reset_view()
    viewer.dims.set_point(0, mr.translate[0])  # the first batch of slices is fitted first
    wait(lambda: len(rest.plot.steps) >= 6 or not rest.running)
    if rest.running:
        viewer.grid.enabled = False
        shot(viewer, "restore_live.png")
    wait(lambda: not rest.running)
    if rest.job.error:
        sys.exit(f"run failed: {rest.job.error}")
    sr = rest.result_layer
    for layer in viewer.layers:
        layer.visible = layer in (low, sr, mr)
    viewer.layers.move(viewer.layers.index(mr), len(viewer.layers) - 1)
    viewer.grid.enabled = True
    viewer.grid.shape = (1, 3)
    middle = mr.translate[0] + mr.scale[0] * (args.slices // 2)
    viewer.dims.set_point(0, middle)
    viewer.reset_view()
    shot(viewer, "restore_superres.png")

    # 3. Denoise a noisy copy (Gaussian noise, 5% of the range), sigma estimated
    rng = np.random.default_rng(0)
    noisy_scan = scan.derive((scan.data + rng.normal(0, 0.05 * np.ptp(scan.data), scan.shape))
                             .astype(np.float32))
    noisy = viewer.add_image(**_kw(scan_to_layer(noisy_scan, "mr_brain noisy")))
    noisy.contrast_limits = mr.contrast_limits
    rest.layer.value = noisy
    rest.task.value = "denoise"
    rest.steps.value = args.denoise_steps
    rest.sigma.value = "auto"
    rest.reference.value = mr
    run_widget(rest)
    dn = rest.result_layer
    for layer in viewer.layers:
        layer.visible = layer in (noisy, dn, mr)
    viewer.layers.move(viewer.layers.index(mr), len(viewer.layers) - 1)
    viewer.reset_view()
    shot(viewer, "restore_denoise.png")
    viewer.close()


def _shift(z0: int) -> np.ndarray:
    out = np.eye(4)
    out[0, 3] = z0
    return out


def _kw(layer_tuple) -> dict:
    data, attrs, _ = layer_tuple
    return {"data": data, **attrs}


if __name__ == "__main__":
    main()
