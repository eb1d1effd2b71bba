"""The "Fuse stacks" dock widget: fuse thick-slice stacks of one anatomy, in any orientations,
into one isotropic volume (:func:`napari_strainer.volume.fuse`)."""

from __future__ import annotations

import time

import napari
from magicgui.widgets import ComboBox, Container, Label, LineEdit, Select, SpinBox

from ..core.operators import PROFILES
from ..errors import BadArgumentError, StrainerError
from ..io.scan import Scan
from ..restore import volume
from ._common import JobWidget, collapsible, image_layers, parse_float
from ._jobs import notify
from ._layers import image_layer_scan


class FuseWidget(JobWidget):
    """Fuse two or more image layers showing stacks of one anatomy (axial, coronal, sagittal
    or oblique; each placed by its scan geometry) into one volume.

    The output grid has the orientation and field of view of the stack chosen under
    "output grid of", isotropic at "spacing" mm (auto: the finest in-plane spacing of the
    stacks). Fusion fits one 3D SIREN to all stacks through each stack's acquisition model (its
    slice profile along its own normal, "INR steps"), then makes its rendering agree with the
    data by least squares ("least-squares steps"; with 0 INR steps, the classical least-squares
    reconstruction alone). Stop keeps the reconstruction so far. The result is a new layer aligned
    with the "output grid of" stack, ready to be saved with File > Save Selected Layers.
    """

    def __init__(self, napari_viewer: napari.Viewer):
        viewer = napari_viewer
        self.layers = Select(label="stacks", choices=lambda _w: image_layers(viewer),
                             tooltip="two or more 3D image layers of one anatomy "
                                     "(ctrl/shift-click)")
        self.grid_of = ComboBox(label="output grid of",
                                choices=lambda _w: [(layer.name, layer)
                                                    for layer in self.layers.value],
                                tooltip="the stack whose orientation and field of view the "
                                        "output takes")
        self.spacing = LineEdit(label="spacing (mm)", value="auto",
                                tooltip="isotropic output voxel size in mm; auto: the finest "
                                        "in-plane spacing of the chosen stacks")
        self.profile = ComboBox(label="slice profile", choices=PROFILES, value="box",
                                tooltip="each slice's sensitivity along its normal: box of the "
                                        "slice thickness, or gaussian with FWHM = thickness "
                                        "(thickness: DICOM SliceThickness, else the spacing)")
        self.steps = SpinBox(label="INR steps", value=volume.DEFAULT_STEPS["fuse"], min=0,
                             max=10_000_000, tooltip="Adam steps of the 3D SIREN fitted to all "
                                                     "stacks (0: classical least squares "
                                                     "alone; see benchmarks/volume.py)")
        self.ls_steps = SpinBox(label="least-squares steps", value=volume.GRID_STEPS, min=0,
                                max=1_000_000, tooltip="conjugate-gradient steps on the output "
                                                       "grid: the data-consistency step after "
                                                       "the INR (the reconstruction itself "
                                                       "when INR steps are 0)")
        self.lr = LineEdit(label="learning rate", value=f"{volume.LR:g}",
                           tooltip="Adam learning rate of the INR steps")
        self.seed = SpinBox(label="seed", value=0, min=0, max=2**31 - 1)
        self.advanced = Container(widgets=[self.lr, self.seed])
        self.grid_info = Label(value="")
        self.grid_info.native.setWordWrap(True)
        super().__init__(viewer, [self.layers, self.grid_of, self.spacing, self.grid_info,
                                  self.profile, self.steps, self.ls_steps],
                         plot_title="fusion loss")
        self.advanced_fold = collapsible("Advanced", self.advanced)
        self.native.layout().insertWidget(self.index(self.device), self.advanced_fold)
        self.layers.native.setMaximumHeight(90)
        self.layers.changed.connect(self._selection_changed)
        self.grid_of.changed.connect(self._describe_grid)
        self.spacing.changed.connect(self._describe_grid)
        self.result_layer = None
        self._t0 = 0.0
        self._selection_changed()

    # ------------------------------------------------------------------ form logic
    def _selection_changed(self, *_) -> None:
        self.grid_of.reset_choices()
        self._describe_grid()

    def _describe_grid(self, *_) -> None:
        """Show the output grid the current choices give, or what is wrong with them."""
        try:
            layers, scans = self.chosen()
            spacing = self.output_spacing(scans)
        except StrainerError as e:
            self.grid_info.value = str(e)
            return
        shape = volume.output_grid(scans[0], spacing).shape
        self.grid_info.value = (f"output: {' x '.join(map(str, shape))} voxels of "
                                f"{spacing:g} mm, oriented like {layers[0].name!r}")

    def chosen(self) -> tuple[list, list[Scan]]:
        """The selected layers and their scans, the "output grid of" layer first.

        Raises:
            BadArgumentError: fewer than two layers, or a 2D layer.
        """
        layers = list(self.layers.value)
        if len(layers) < 2:
            raise BadArgumentError("select at least two image layers (stacks of one anatomy) "
                                   "to fuse")
        first = self.grid_of.value
        if first in layers:
            layers.remove(first)
            layers.insert(0, first)
        scans = []
        for layer in layers:
            scan = image_layer_scan(layer)
            if scan.shape[0] < 2:
                raise BadArgumentError(f"layer {layer.name!r} is 2D ({scan.shape[1]} x "
                                       f"{scan.shape[2]}); fusion needs 3D stacks")
            scans.append(scan)
        return layers, scans

    def output_spacing(self, scans: list[Scan]) -> float:
        """The spacing field in mm; ``auto``: the finest in-plane spacing of ``scans``."""
        text = str(self.spacing.value).strip().lower()
        if text in ("", "auto"):
            return min(min(s.spacing[1:]) for s in scans)
        return parse_float(text, "spacing")

    # ------------------------------------------------------------------ job
    def prepare(self):
        layers, scans = self.chosen()
        spacing = self.output_spacing(scans)
        lr = parse_float(self.lr.value, "learning rate")
        steps, ls_steps, profile = self.steps.value, self.ls_steps.value, self.profile.value
        device, seed = self.device.value, self.seed.value

        def work(report, cancel):
            def callback(p):
                report({"step": p.step, "total": p.total, "loss": p.loss,
                        "stage": "INR" if p.step < steps else "least squares"})

            res = volume.fuse(scans, spacing=spacing, profile=profile, steps=steps,
                              ls_steps=ls_steps, lr=lr, device=device, seed=seed,
                              callback=callback, cancel=cancel)
            return res

        self._names = [layer.name for layer in layers]
        self._source_layer = layers[0]
        self.result_layer = None
        self._t0 = time.monotonic()
        return work, ls_steps + steps, f"fusing {len(scans)} stacks"

    def on_report(self, item: dict) -> None:
        stage = item["stage"]
        self.plot.add(item["step"], item["loss"], segment=int(stage != "INR"), subtitle=stage)
        if self.job is not None:
            self.job.progress(item["step"])
        self.set_status(f"{stage}: step {item['step']}/{item['total']}  loss "
                        f"{item['loss']:.3g}  ({time.monotonic() - self._t0:.0f} s)")

    def on_done(self, restoration) -> None:
        hist = restoration.history
        name = f"{self._names[0]} fused ({len(self._names)} stacks)"
        if hist.get("cancelled"):
            name += " [stopped]"
        self.result_layer = self.add_result(restoration.scan, name, hist, self._source_layer)
        shape = " x ".join(map(str, restoration.scan.shape))
        msg = (f"{'Stopped' if hist.get('cancelled') else 'Done'}: {name}, {shape} voxels of "
               f"{hist['spacing_mm']:g} mm ({time.monotonic() - self._t0:.0f} s)")
        self.set_status(msg)
        notify(msg)


__all__ = ["FuseWidget"]
