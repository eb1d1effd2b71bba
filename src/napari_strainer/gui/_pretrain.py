"""The "Pretrain encoder" dock widget: learn a shared STRAINER encoder, a whole initialisation
meta-learned by Reptile, or an encoder meta-learned by Reptile, from a few scans."""

from __future__ import annotations

import time
from pathlib import Path

import napari
from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, LineEdit, Select, SpinBox

from ..core.fit import SCHEDULES
from ..core.siren import SirenConfig
from ..errors import BadArgumentError
from ..pretrain.train import (
    METHODS,
    PRETRAIN_LR,
    PRETRAIN_SCHEDULE,
    PRETRAIN_STEPS,
    REPTILE_LR,
    REPTILE_STEPS,
)
from ._common import JobWidget, collapsible, image_layers, parse_float
from ._jobs import notify
from ._layers import image_layer_scan

PAPER = SirenConfig()
DEFAULTS = {m: (REPTILE_STEPS, REPTILE_LR) if m.startswith("reptile") else
            (PRETRAIN_STEPS, PRETRAIN_LR) for m in METHODS}
"""Steps and learning rate each method starts with when chosen."""


class PretrainWidget(JobWidget):
    """Pick image layers (or a folder of scans), how many slices per scan, the method
    (STRAINER, Reptile or Reptile of the encoder), steps, the architecture (paper defaults)
    and a device; the encoder is written to ``output``.

    Stop ends the run at the next iteration and still writes a usable encoder (plus the
    training state, so "resume" can continue it).
    """

    def __init__(self, napari_viewer: napari.Viewer):
        viewer = napari_viewer
        self.source = ComboBox(label="train on", choices=["image layers", "folder of scans"],
                               value="image layers")
        self.layers = Select(label="layers", choices=lambda _w: image_layers(viewer),
                             tooltip="one or more image layers (ctrl/shift-click)")
        self.folder = FileEdit(label="folder", mode="d", visible=False,
                               tooltip="NIfTI files and DICOM series folders, recursively")
        self.max_slices = SpinBox(label="slices per scan", value=10, min=1, max=10000,
                                  tooltip="evenly spaced non-empty slices taken from each scan")
        self.size = SpinBox(label="resample to", value=0, min=0, max=4096,
                            tooltip="resample slices to N x N pixels (0: keep; needed when "
                                    "the scans differ in size)")
        self.method = ComboBox(label="method", choices=list(METHODS), value="strainer",
                               tooltip="strainer: a shared encoder, one head per slice; "
                                       "reptile: a whole network (head included) meta-learned "
                                       "by Reptile, the faster start for fitting; "
                                       "reptile-encoder: the shared encoder meta-learned by "
                                       "Reptile, a head solved per fit")
        self.steps = SpinBox(label="steps", value=PRETRAIN_STEPS, min=1, max=10_000_000,
                             tooltip="strainer: Adam steps (the paper: 5000 at a constant "
                                     "1e-4); reptile, reptile-encoder: outer steps")
        self.batch_coords = SpinBox(label="coords per step", value=0, min=0, max=100_000_000,
                                    tooltip="random pixel coordinates per step (0: all). "
                                            "Fewer use less memory.")
        self.output = FileEdit(label="save encoder to", mode="w", filter="*.safetensors",
                               value=str(Path.home() / "strainer_encoder.safetensors"))
        self.resume = CheckBox(label="resume", value=False,
                               tooltip="continue from the training state saved next to the "
                                       "output by an earlier (stopped) run")
        # architecture, paper defaults
        self.net_width = SpinBox(label="width", value=PAPER.width, min=4, max=4096)
        self.n_layers = SpinBox(label="sine layers", value=PAPER.layers, min=2, max=32)
        self.shared = SpinBox(label="shared (encoder)", value=PAPER.shared_layers, min=1,
                              max=31)
        self.omega_first = LineEdit(label="omega first", value=f"{PAPER.omega_first:g}")
        self.omega_hidden = LineEdit(label="omega hidden", value=f"{PAPER.omega_hidden:g}")
        self.lr = LineEdit(label="learning rate", value=f"{PRETRAIN_LR:g}",
                           tooltip="peak learning rate of the schedule")
        self.schedule = ComboBox(label="schedule", choices=list(SCHEDULES),
                                 value=PRETRAIN_SCHEDULE,
                                 tooltip="cosine: decays to 0 over the steps (reaches the "
                                         "paper's gain in fewer steps); constant: the paper's")
        self.seed = SpinBox(label="seed", value=0, min=0, max=2**31 - 1)
        self.arch = Container(widgets=[self.net_width, self.n_layers, self.shared,
                                       self.omega_first, self.omega_hidden, self.lr,
                                       self.schedule, self.seed])
        super().__init__(viewer, [self.source, self.layers, self.folder, self.max_slices,
                                  self.size, self.method, self.steps, self.batch_coords, self.output,
                                  self.resume], plot_title="pretraining loss")
        self.arch_fold = collapsible(
            f"Architecture (paper: width {PAPER.width}, {PAPER.layers} layers, "
            f"{PAPER.shared_layers} shared)", self.arch)
        self.native.layout().insertWidget(self.index(self.device), self.arch_fold)
        self.layers.native.setMaximumHeight(90)
        self.source.changed.connect(self._source_changed)
        self.method.changed.connect(self._method_changed)
        self._t0 = 0.0

    def _method_changed(self, value: str) -> None:
        steps, lr = DEFAULTS[value]
        self.steps.value, self.lr.value = steps, f"{lr:g}"

    def _source_changed(self, value: str) -> None:
        self.layers.visible = value == "image layers"
        self.folder.visible = value != "image layers"

    def config(self) -> SirenConfig:
        if not 1 <= self.shared.value < self.n_layers.value:
            raise BadArgumentError(f"shared layers must be between 1 and {self.n_layers.value - 1}"
                                   f" (sine layers - 1), got {self.shared.value}")
        return SirenConfig(width=self.net_width.value, layers=self.n_layers.value,
                           shared_layers=self.shared.value,
                           omega_first=parse_float(self.omega_first.value, "omega first"),
                           omega_hidden=parse_float(self.omega_hidden.value, "omega hidden"))

    # ------------------------------------------------------------------ job
    def prepare(self):
        from ..io import find_scans, read_scan
        from ..pretrain import cards, train

        config = self.config()
        lr = parse_float(self.lr.value, "learning rate")
        schedule = self.schedule.value
        output = Path(str(self.output.value)).expanduser()
        if not str(self.output.value).strip() or output.is_dir():
            raise BadArgumentError("choose a file to save the encoder to")
        if not output.name.endswith(".safetensors"):
            output = output.with_name(output.name + ".safetensors")
        if not output.parent.is_dir():
            raise BadArgumentError(f"{output.parent}: folder does not exist")
        max_slices, size = self.max_slices.value, self.size.value or None
        method = self.method.value
        steps, batch_coords = self.steps.value, self.batch_coords.value or None
        device, seed, resume = self.device.value, self.seed.value, self.resume.value
        if self.source.value == "image layers":
            chosen = list(self.layers.value)
            if not chosen:
                raise BadArgumentError("select at least one image layer to train on")
            scans = [image_layer_scan(layer) for layer in chosen]
            names = [layer.name for layer in chosen]
            folder = None
        else:
            folder = Path(str(self.folder.value)).expanduser()
            if not folder.is_dir():
                raise BadArgumentError(f"{folder}: not a folder")
            scans, names = None, None

        def work(report, cancel):
            nonlocal scans, names
            if scans is None:
                paths = find_scans(folder)
                if not paths:
                    raise BadArgumentError(f"{folder}: no scans found (NIfTI, DICOM)")
                report({"status": f"reading {len(paths)} scans..."})
                scans = [read_scan(p) for p in paths]
                names = [str(p) for p in paths]
            images = train.training_slices(scans, size=size, max_slices=max_slices)
            report({"status": f"training on {images.shape[0]} slices of "
                               f"{images.shape[1]}x{images.shape[2]}"})

            def callback(p):
                report({"step": p.step, "total": p.total, "loss": p.loss})

            encoder = train.pretrain(images, output, method=method, config=config,
                                     steps=steps, lr=lr,
                                     schedule=schedule,
                                     batch_coords=batch_coords, device=device, seed=seed,
                                     resume=resume, callback=callback, cancel=cancel,
                                     info={"sources": [Path(n).name for n in names],
                                           "modality": cards.scans_modality(scans)})
            return output, encoder

        self._t0 = time.monotonic()
        return work, steps, "Pretraining encoder"

    def on_report(self, item: dict) -> None:
        if "status" in item:
            self.set_status(item["status"])
            return
        self.plot.add(item["step"], item["loss"])
        if self.job is not None:
            self.job.progress(item["step"])
        rate = item["step"] / max(1e-6, time.monotonic() - self._t0)
        self.set_status(f"step {item['step']}/{item['total']}  loss {item['loss']:.3g}  "
                        f"({rate:.1f} steps/s)")

    def on_done(self, value) -> None:
        output, encoder = value
        done = encoder.info.get("steps")
        how = ("complete" if encoder.info.get("complete")
               else f"stopped at step {done}; tick 'resume' to continue")
        msg = f"Encoder saved to {output} ({how})"
        self.set_status(f"Encoder saved to {output.name} ({how})")
        self.status.tooltip = str(output)
        notify(msg)
        from ._restore import RestoreWidget

        for w in list(JobWidget._instances):
            if isinstance(w, RestoreWidget) and w.viewer is self.viewer:
                w.use_encoder_file(output)
