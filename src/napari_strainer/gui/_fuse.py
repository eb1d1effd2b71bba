"""The "Fuse stacks" dock widget: fuse thick-slice stacks of one anatomy, in any orientations,
into one isotropic volume (the planner's fuse path, :mod:`napari_strainer.restore.plan`)."""

from __future__ import annotations

import dataclasses
import time

import napari
from magicgui.widgets import ComboBox, Container, LineEdit, Select, SpinBox

from ..core.operators import PROFILES
from ..restore import volume
from ..restore.plan import Options, Plan, default_steps
from ._common import (
    PlannedWidget,
    collapsible,
    image_layers,
    layer_scan,
    memory_in_use,
    parse_float,
)
from ._jobs import notify
from ._layers import image_layer_scan


class FuseWidget(PlannedWidget):
    """Fuse two or more image layers showing stacks of one anatomy (axial, coronal, sagittal
    or oblique; each placed by its scan geometry) into one volume.

    The output grid has the orientation and field of view of the stack chosen under
    "output grid of", isotropic at "spacing" mm (auto: the finest in-plane spacing of the
    stacks). Fusion fits one 3D SIREN to all stacks through each stack's acquisition model (its
    slice profile along its own normal, "INR steps"), then makes its rendering agree with the
    data by least squares ("least-squares steps"; with 0 INR steps, the classical least-squares
    reconstruction alone). The plan (output grid, route, memory; the ETA with the Plan button)
    is shown above Run. Stop keeps the reconstruction so far. The result is a new layer aligned
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
        self.prior = ComboBox(label="start", choices=volume.PRIORS, value="auto",
                              tooltip="auto: each stack refined by a CNN learned from its own "
                                      "in-plane planes where it has enough of them (planes: "
                                      "insist), else the 3D SIREN; none: never")
        self.steps = SpinBox(label="INR steps", value=volume.DEFAULT_STEPS["fuse"], min=0,
                             max=10_000_000, tooltip="Adam steps of the 3D SIREN fitted to all "
                                                     "stacks (0 with start none: classical "
                                                     "least squares alone; see "
                                                     "benchmarks/volume.py)")
        self.ls_steps = SpinBox(label="least-squares steps", value=volume.GRID_STEPS, min=0,
                                max=1_000_000, tooltip="conjugate-gradient steps on the output "
                                                       "grid: the data-consistency step after "
                                                       "the INR (the reconstruction itself "
                                                       "when INR steps are 0)")
        self.lr = LineEdit(label="learning rate", value=f"{volume.LR:g}",
                           tooltip="Adam learning rate of the INR steps")
        self.seed = SpinBox(label="seed", value=0, min=0, max=2**31 - 1)
        self.advanced = Container(widgets=[self.lr, self.seed])
        super().__init__(viewer, [self.layers, self.grid_of, self.spacing, self.profile,
                                  self.prior, self.steps, self.ls_steps],
                         plot_title="fusion loss")
        self.advanced_fold = collapsible("Advanced", self.advanced)
        self.native.layout().insertWidget(self.index(self.device), self.advanced_fold)
        self.layers.native.setMaximumHeight(90)
        self.result_layer = None
        self._t0 = 0.0
        self._steps_prior = False  # whether the steps value is the learned prior's default
        self.layers.changed.connect(self._selection_changed)
        for widget in (self.grid_of, self.spacing, self.profile, self.prior, self.steps,
                       self.ls_steps, self.lr, self.device):
            widget.changed.connect(self.refresh_plan)
        self._selection_changed()

    # ------------------------------------------------------------------ form logic
    def _selection_changed(self, *_) -> None:
        self.grid_of.reset_choices()
        self.refresh_plan()

    def on_plan(self, plan: Plan | None) -> None:
        """The steps value follows the default of the planned start (prior or INR)."""
        if plan is not None and (plan.prior_steps > 0) != self._steps_prior:
            self._steps_prior = plan.prior_steps > 0
            self.steps.value = default_steps("fuse", "fuse", self._steps_prior)

    def stacks(self) -> list:
        """The selected layers, the "output grid of" layer first."""
        layers = list(self.layers.value)
        first = self.grid_of.value
        if first in layers:
            layers.remove(first)
            layers.insert(0, first)
        return layers

    def gather(self):
        text = str(self.spacing.value).strip().lower()
        options = Options(task="fuse", encoder="none",
                          spacing=None if text in ("", "auto") else parse_float(text, "spacing"),
                          slice_profile=self.profile.value, prior=self.prior.value,
                          steps=self.steps.value,
                          ls_steps=self.ls_steps.value,
                          lr=parse_float(self.lr.value, "learning rate"),
                          device=self.device.value, seed=self.seed.value)
        return [layer_scan(layer) for layer in self.stacks()], options, None

    # ------------------------------------------------------------------ job
    def start(self, plan: Plan):
        layers = self.stacks()
        self._names = [layer.name for layer in layers]
        self._source_layer = layers[0]
        self._source = image_layer_scan(layers[0]).source
        self.result_layer = None
        self._segments: dict[str, int] = {}  # a loss-curve segment per stage
        self._t0 = time.monotonic()

        def on_progress(p, report):
            stage = p.phase or ("INR" if p.step < plan.prior_steps + plan.steps else
                                "least squares")
            report({"step": p.step, "total": p.total, "loss": p.loss, "stage": stage})

        total = plan.prior_steps + plan.steps + plan.ls_steps
        return on_progress, total, f"fusing {len(layers)} stacks"

    def on_report(self, item: dict) -> None:
        stage = item["stage"]
        self.plot.add(item["step"], item["loss"], segment=self._segments.setdefault(
            stage, len(self._segments)), subtitle=stage)
        if self.job is not None:
            self.job.progress(item["step"])
        self.set_status(f"{stage}: step {item['step']}/{item['total']}  loss "
                        f"{item['loss']:.3g}  ({time.monotonic() - self._t0:.0f} s, "
                        f"{memory_in_use()})")

    def on_done(self, restoration) -> None:
        hist = restoration.history
        name = f"{self._names[0]} fused ({len(self._names)} stacks)"
        if hist.get("cancelled"):
            name += " [stopped]"
        scan = dataclasses.replace(restoration.scan, source=self._source)
        self.result_layer = self.add_result(scan, name, hist, self._source_layer)
        shape = " x ".join(map(str, scan.shape))
        msg = (f"{'Stopped' if hist.get('cancelled') else 'Done'}: {name}, {shape} voxels of "
               f"{hist['spacing_mm']:g} mm ({time.monotonic() - self._t0:.0f} s)")
        self.set_status(msg)
        notify(msg)


__all__ = ["FuseWidget"]
