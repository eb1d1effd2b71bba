"""The "Restore scan" dock widget: fit, super-resolve or denoise an image layer with an INR
initialised from a STRAINER encoder, with a live preview and loss/PSNR curve; and the volume
paths of the CLI (``strainer superres --slice-scale F``, ``strainer denoise --mode volume``):
one 3D SIREN for the whole scan (:mod:`napari_strainer.volume`)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import napari
import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, Label, LineEdit, PushButton, SpinBox
from napari.qt.threading import create_worker
from napari.utils.notifications import show_warning

from ..core.operators import PROFILES
from ..errors import BadArgumentError
from ..io.intensity import Intensity
from ..io.scan import upsampled_affine
from ..pretrain import cards, encoders
from ..restore import slices, volume
from ..restore.base import MAX_OUTPUT_VOXELS
from ._common import JobWidget, collapsible, image_layers, parse_float
from ._jobs import notify
from ._layers import KEY, geometry, image_layer_scan

TASK_LABELS = [("fit (represent the scan)", "fit"), ("super-resolve", "superres"),
               ("denoise", "denoise")]
INIT_LABELS = [("auto (self-validated)", "auto"), ("fixed (paper recipe)", "fixed")]
HEAD_LABELS = [("solved (ridge regression)", "solved"), ("random (paper)", "random")]
ESTIMATE_TIPS = {
    "fit": "an upper bound: with initialisation auto, slices whose loss has plateaued stop "
           "earlier",
    "superres": "super-resolution trains every step after the route race",
    "denoise": "an upper bound: slices that reach the noise level stop earlier",
}
DENOISE_MODE_LABELS = [("auto (volume for 3D scans up to 1.2 M voxels)", "auto"),
                       ("slices (2D INR per slice)", "slices"),
                       ("volume (3D INR, neighbouring slices)", "volume")]
ENCODER_LABELS = [("shipped default (MRI)", "default"), ("file...", "file"),
                  ("none (SIREN baseline)", "none"),
                  ("self (pretrain on this scan first)", "self")]


class RestoreWidget(JobWidget):
    """Restore an image layer slice by slice (see :func:`napari_strainer.slices.restore`).

    While it runs, a ``[live preview]`` layer shows the current best fit every few
    iterations (normalised intensities) and the curve shows the loss, and the PSNR against
    the reference layer when one is chosen. Stop keeps the best result so far. The result
    is a new layer on the output grid (super-resolution: finer, aligned to the input) with
    the source geometry and metadata, ready to be saved with File > Save Selected Layers.

    The volume paths of the CLI: super-resolve with a slice scale >= 2
    (:func:`napari_strainer.volume.superres_volume`: through-plane, and in-plane by "scale",
    which may then be 1) and denoise mode volume on a 3D layer
    (:func:`napari_strainer.volume.denoise_volume`) fit one 3D SIREN from scratch to the
    whole scan (no encoder: choosing a file is refused); the preview then shows the whole
    output volume on the output grid, and the steps default is the volume default.
    """

    def __init__(self, napari_viewer: napari.Viewer):
        viewer = napari_viewer
        self.layer = ComboBox(label="scan", choices=lambda _w: image_layers(viewer))
        self.encoder = ComboBox(label="encoder", choices=ENCODER_LABELS,
                                value="default" if encoders.DEFAULT_ENCODER.is_file() else "none")
        self.encoder_file = FileEdit(label="encoder file", mode="r", filter="*.safetensors",
                                     visible=False)
        self.task = ComboBox(label="task", choices=TASK_LABELS, value="fit")
        self.scale = SpinBox(label="scale", value=2, min=1, max=8, visible=False,
                             tooltip="output pixels per input pixel along rows and columns "
                                     "(1: none; needs a slice scale)")
        self.slice_scale = SpinBox(label="slice scale", value=0, min=0, max=8, visible=False,
                                   tooltip="through-plane factor: output slices per input slice "
                                           "(0: off; 2-8: one 3D SIREN fitted through the "
                                           "slice profile, then a data-consistency step, as "
                                           "'strainer superres --slice-scale')")
        self.slice_profile = ComboBox(label="slice profile", choices=PROFILES, value="box",
                                      visible=False,
                                      tooltip="each slice's sensitivity along its normal: box "
                                              "of the slice thickness, or gaussian with FWHM = "
                                              "thickness (thickness: DICOM SliceThickness, "
                                              "else the spacing)")
        self.denoise_mode = ComboBox(label="denoise mode", choices=DENOISE_MODE_LABELS,
                                     value=volume.DENOISE_MODE, visible=False,
                                     tooltip="slices: one 2D INR per slice (from the encoder); "
                                             "volume: one 3D SIREN for the whole scan with a "
                                             "3D total-variation term, as 'strainer denoise "
                                             "--mode volume' (a 2D layer takes the slice "
                                             "path); auto: volume for 3D scans of at most 1.2 "
                                             "million voxels, else slices")
        self.sigma = LineEdit(label="noise sigma", value="auto", visible=False,
                              tooltip="'auto' (estimated per slice), 'none' (run all steps) "
                                      "or the noise standard deviation in the scan's units")
        self.steps = SpinBox(label="steps", value=slices.DEFAULT_STEPS["fit"], min=0,
                             max=10_000_000)
        self.reference = ComboBox(label="PSNR reference",
                                  choices=lambda _w: [("(none)", None), *image_layers(viewer)],
                                  tooltip="a clean layer on the output grid: the curve then "
                                          "shows PSNR against it")
        self.init = ComboBox(label="initialisation", choices=INIT_LABELS, value="auto",
                             tooltip="auto: hold out some pixels, race SIREN and the encoder "
                                     "(fit and denoise: also a warm start from the "
                                     "neighbouring slice) and keep the best; then fit stops "
                                     "slices whose loss has plateaued, denoise stops at the "
                                     "noise level and super-resolution trains every step. "
                                     "fixed: the encoder with the frozen layers below, all "
                                     "steps (the paper)")
        self.head = ComboBox(label="head", choices=HEAD_LABELS, value="solved",
                             tooltip="how the last layer starts, for fitting with an encoder: "
                                     "solved = a ridge-regression head on the encoder features "
                                     "before the first step; random = the paper's")
        self.freeze = SpinBox(label="frozen layers", value=slices.DEFAULT_FREEZE["fit"], min=0,
                              max=31, tooltip="encoder layers kept fixed (benchmark defaults "
                                              "per task)")
        self.lr = LineEdit(label="learning rate", value="1e-4")
        self.log_every = SpinBox(label="preview every", value=10, min=1, max=100000,
                                 tooltip="iterations between curve points and preview updates")
        self.batch = SpinBox(label="slices per batch", value=0, min=0, max=100000,
                             tooltip="slices fitted together (0: as many as fit in a quarter "
                                     "of free memory)")
        self.seed = SpinBox(label="seed", value=0, min=0, max=2**31 - 1)
        self.advanced = Container(widgets=[self.init, self.head, self.freeze, self.lr,
                                           self.log_every, self.batch, self.seed])
        super().__init__(viewer, [self.layer, self.encoder, self.encoder_file, self.task,
                                  self.scale, self.slice_scale, self.slice_profile,
                                  self.denoise_mode, self.sigma, self.steps, self.reference],
                         plot_title="loss / PSNR")
        self.advanced_fold = collapsible("Advanced", self.advanced)
        self.native.layout().insertWidget(self.index(self.device), self.advanced_fold)
        self.encoder_info = Label(value="")
        self.encoder_info.native.setWordWrap(True)
        self.insert(self.index(self.encoder_file) + 1, self.encoder_info)
        self._steps_for = ("fit", None)  # the (task, volume path) the steps default is for
        self._slice_scale_was = 0
        self.task.changed.connect(self._task_changed)
        self.slice_scale.changed.connect(self._slice_scale_changed)
        self.denoise_mode.changed.connect(self._form_changed)
        self.layer.changed.connect(self._form_changed)
        self.encoder.changed.connect(self._encoder_changed)
        self.encoder_file.changed.connect(self._encoder_changed)
        self.init.changed.connect(self._encoder_changed)
        self._encoder_changed()
        # time to result, beside Run: a short timed probe in the background, on request
        self.estimate_button = PushButton(text="Estimate time", tooltip="time a 3-step probe "
                                          "of these options and show an upper bound")
        self.estimate = Label(value="", tooltip=ESTIMATE_TIPS[self.task.value])
        self.buttons.extend([self.estimate_button, self.estimate])
        self.estimate_button.changed.connect(self.update_estimate)
        self._estimate_gen = 0
        self._estimate_workers: set = set()
        self.preview_layer = None
        self.result_layer = None
        self._preview_data: np.ndarray | None = None
        self._t0 = 0.0

    # ------------------------------------------------------------------ form logic
    def volume_path(self) -> str | None:
        """``"superres"`` / ``"denoise"`` when the form asks for a volume path (a slice scale,
        denoise mode volume), else None. A 2D layer still denoises slice by slice."""
        task = self.task.value
        if task == "superres" and self.slice_scale.value >= 2:
            return "superres"
        if task == "denoise":
            layer = self.layer.value
            shape = (2, 1, 1) if layer is None else (  # no layer yet: as for a volume
                tuple(layer.data.shape[-3:]) if layer.data.ndim >= 3 else (1, 1, 1))
            if volume.denoise_mode(shape, self.denoise_mode.value) == "volume":
                return "denoise"
        return None

    def _task_changed(self, task: str) -> None:
        self.scale.visible = self.slice_scale.visible = task == "superres"
        self.sigma.visible = self.denoise_mode.visible = task == "denoise"
        self.estimate.tooltip = ESTIMATE_TIPS[task]
        self._form_changed()

    def _slice_scale_changed(self, value: int) -> None:
        """Skip the meaningless 1 (0 is off, 2..8 on); turning it on makes the in-plane scale
        1 by default (as the CLI's), turning it off makes an in-plane 1 a 2 again."""
        if value == 1:  # stepping up from 0 or down from 2; re-enters with the new value
            self.slice_scale.value = 2 if self._slice_scale_was < 1 else 0
            return
        was, self._slice_scale_was = self._slice_scale_was, value
        if was < 2 <= value and self.scale.value == 2:
            self.scale.value = 1
        elif value < 2 <= was and self.scale.value == 1:
            self.scale.value = 2
        self._form_changed()

    def _form_changed(self, *_) -> None:
        """Show the options of the chosen path; the steps default follows the path (the
        volume paths have their own, :data:`napari_strainer.volume.DEFAULT_STEPS`)."""
        task, path = self.task.value, self.volume_path()
        self.slice_profile.visible = path == "superres"
        if (task, path) != self._steps_for:
            self._steps_for = (task, path)
            self.steps.value = (volume.DEFAULT_STEPS[path] if path is not None
                                else slices.DEFAULT_STEPS[task])
        # initialisation, head, freezing and slice batches are for the slice path only
        self.init.enabled = self.batch.enabled = path is None
        self._encoder_changed()

    def _encoder_changed(self, *_) -> None:
        """Show what the chosen encoder is; limit the freeze depth to its shared layers."""
        choice = self.encoder.value
        self.encoder_file.visible = choice == "file"
        self.freeze.enabled = (choice != "none" and self.init.value == "fixed"
                               and self.volume_path() is None)
        self._shared_layers = None
        text, tooltip = "", ""
        if choice == "none":
            text = "SIREN baseline: random initialisation, nothing frozen"
        elif choice == "self":
            text = (f"an encoder pretrained for {encoders.SELF_STEPS} steps on up to 10 of this "
                    f"scan's own slices, then used as any encoder")
        else:
            path = encoders.DEFAULT_ENCODER if choice == "default" else Path(
                str(self.encoder_file.value))
            enc = _peek_encoder(path)
            if isinstance(enc, str):
                text = enc
            else:
                c = enc.config
                self._shared_layers = c.shared_layers
                text = (f"{cards.summary(enc)}; {c.shared_layers} shared of {c.layers} sine "
                        f"layers, width {c.width}")
                tooltip = cards.format_card(cards.card(enc))
        if self.volume_path() is not None:
            text = ("not used: the volume path fits a 3D SIREN from scratch (no pretrained 3D "
                    "encoder exists); choose 'none' or the shipped default")
        self.encoder_info.value = text
        self.encoder_info.tooltip = tooltip
        self._set_default_freeze()
        self._update_head()

    def _update_head(self) -> None:
        """The head choice matters only when fitting from an encoder."""
        self.head.enabled = (self.encoder.value != "none" and self.task.value == "fit"
                             and self.volume_path() is None)

    def _set_default_freeze(self) -> None:
        if self.encoder.value == "none":
            self.freeze.value = 0
            return
        limit = self._shared_layers if self._shared_layers is not None else 31
        self.freeze.max = limit
        self.freeze.value = slices.default_freeze(self.task.value, limit)

    def update_estimate(self) -> None:
        """Time a short probe of the current options in the background and show the bound
        beside Run (blank when the options are incomplete or a job is running)."""
        self._estimate_gen += 1
        gen, layer = self._estimate_gen, self.layer.value
        encoder = self.encoder.value
        if encoder == "file":
            encoder = str(self.encoder_file.value).strip()
        if self.running or layer is None or not encoder or Path(encoder).is_dir():
            self.estimate.value = ""
            return
        if self.volume_path() is not None:
            self.estimate.value = "(no estimate for the volume path)"
            return
        device = self.device.value

        options = {"task": self.task.value, "encoder": encoder, "init": self.init.value,
                       "steps": self.steps.value, "scale": self.scale.value, "device": device,
                       "batch_size": self.batch.value or None}
        scan = image_layer_scan(layer)

        def probe() -> float | None:
            try:
                return slices.estimate_seconds(scan, **options)
            except Exception:  # noqa: BLE001 - a bad option is reported when Run is pressed
                return None

        def show(seconds: float | None) -> None:
            if gen == self._estimate_gen:
                self.estimate.value = "" if seconds is None else (
                    f"~ {slices.describe_estimate(seconds, device)}")

        worker = create_worker(probe, _start_thread=False)
        worker.returned.connect(show)
        self._estimate_workers.add(worker)  # referenced until finished
        worker.finished.connect(lambda: self._estimate_workers.discard(worker))
        worker.start()

    def _warn_modality(self, encoder: str, scan) -> None:
        """Show restore's modality warning (:func:`napari_strainer.cards.modality_warning`) as
        a notification: napari's ``FunctionWorker`` does not relay warnings from its thread."""
        if encoder == "none":
            return
        enc = _peek_encoder(encoders.DEFAULT_ENCODER if encoder == "default" else Path(encoder))
        message = None if isinstance(enc, str) else cards.modality_warning(enc, scan)
        if message is not None:
            show_warning(message)

    def use_encoder_file(self, path) -> None:
        """Select an encoder file (the Pretrain widget calls this when it has saved one)."""
        self.encoder_file.value = str(path)
        self.encoder.value = "file"

    # ------------------------------------------------------------------ job
    def prepare(self):
        from ..restore.noise import make_stop_rule

        layer = self.layer.value
        if layer is None:
            raise BadArgumentError("open a scan first (File > Open, or File > Open Sample > "
                                   "napari-strainer)")
        scan = image_layer_scan(layer)
        task = self.task.value
        z, h, w = scan.shape
        path = self.volume_path()
        if path == "denoise" and z < 2:
            path = None  # one slice: the slice path, as the CLI does
        if path == "superres" and z < 2:
            raise BadArgumentError(f"layer {layer.name!r} is 2D ({h} x {w}); a slice scale "
                                   "needs a 3D scan")
        scale = self.scale.value if task == "superres" else 1
        slice_scale = self.slice_scale.value if path == "superres" else 1
        if task == "superres" and path is None and scale < 2:
            raise BadArgumentError("choose scale >= 2 or a slice scale")
        profile = self.slice_profile.value
        if path == "superres":
            volume.check_slice_options(slice_scale, profile)
        ref_layer = self.reference.value
        reference = image_layer_scan(ref_layer) if ref_layer is not None else None
        encoder = self.encoder.value
        if encoder == "file":
            encoder = str(self.encoder_file.value).strip()
            if path is None and (not encoder or Path(encoder).is_dir()):
                raise BadArgumentError("choose an encoder file (*.safetensors)")
        if path == "denoise" and self.denoise_mode.value == "auto":
            if volume.is_2d_encoder(encoder):
                show_warning("denoise mode auto denoises this 3D scan as one volume, which "
                             "uses no encoder; mode slices uses the chosen encoder")
        elif path is not None:
            try:
                volume.check_encoder(encoder or "file")
            except BadArgumentError:
                what = "a slice scale" if path == "superres" else "denoise mode volume"
                raise BadArgumentError(f"encoder: {what} fits a 3D SIREN from scratch (no "
                                       "pretrained 3D encoder exists); choose encoder 'none' "
                                       "(or the shipped default, which it does not use)"
                                       ) from None
        init, head = self.init.value, self.head.value
        freeze = None if init == "auto" else 0 if encoder == "none" else self.freeze.value
        lr = parse_float(self.lr.value, "learning rate")
        stop, sigma = None, "auto"
        if task == "denoise":
            text = self.sigma.value.strip().lower()
            sigma = text if text in ("auto", "none") else parse_float(text, "noise sigma")
            stop = make_stop_rule(sigma)
        steps, device, seed = self.steps.value, self.device.value, self.seed.value
        log_every, batch_size = self.log_every.value, self.batch.value
        out_shape = (z * slice_scale, h * scale, w * scale)
        if reference is not None and reference.shape != out_shape:
            raise BadArgumentError(f"PSNR reference {ref_layer.name!r} has shape "
                                   f"{reference.shape}; the output will be {out_shape}")
        if int(np.prod(out_shape)) > MAX_OUTPUT_VOXELS:
            raise BadArgumentError(f"the output would be {out_shape} voxels "
                                   f"({np.prod(out_shape) * 4 / 2**30:.1f} GiB); the limit is "
                                   f"{MAX_OUTPUT_VOXELS * 4 / 2**30:.0f} GiB")

        # the live preview layer, on the output grid, in normalised intensities (those of the
        # path: the volume paths normalise by the scan's percentiles, CT included)
        if path is None:
            norm = Intensity.for_scan(scan).forward(np.nan_to_num(scan.data))
        else:
            inten = Intensity.of(scan.data)
            norm = inten.forward(np.nan_to_num(scan.data, nan=inten.low))
        if slice_scale > 1:
            norm = norm.repeat(slice_scale, axis=0)
        if scale > 1:
            norm = norm.repeat(scale, axis=1).repeat(scale, axis=2)
        self._preview_data = norm
        out_affine = upsampled_affine(scan.affine, (slice_scale, scale, scale))
        p_scale, p_translate = geometry(out_affine)
        self._remove_preview()
        self.preview_layer = self.viewer.add_image(
            norm, name=f"{layer.name} [live preview]", scale=p_scale, translate=p_translate,
            contrast_limits=(0.0, 1.0), metadata={"strainer_preview": True})
        self.viewer.layers.selection.active = layer
        self._source_layer = layer
        self.result_layer = None
        self._run_info = (task, scale, encoder, path, slice_scale)
        gui_free = threading.Event()
        gui_free.set()
        self._gui_free = gui_free

        def work(report, cancel):
            state = {"key": None, "segment": -1}

            def callback(p):
                key = (p.slices, p.phase)
                new = key != state["key"]
                if new:  # a new curve segment per batch of slices and per probe
                    state["key"] = key
                    state["segment"] += 1
                first, stop = p.slices or (0, z)
                item = {"step": p.step, "total": p.total, "loss": p.loss, "psnr": p.psnr,
                        "segment": state["segment"], "phase": p.phase,
                        "slices": (first + 1, stop, z)}
                # render only when the GUI has shown the previous preview (no backlog)
                if gui_free.is_set() or new:
                    gui_free.clear()
                    item["preview"] = (first, p.preview()[..., 0].float().cpu().numpy())
                report(item)

            return slices.restore(scan, task=task, encoder=encoder, init=init, head=head,
                                 steps=steps,
                                 lr=lr, scale=scale, freeze=freeze, stop=stop,
                                 reference=reference, device=device, seed=seed,
                                 log_every=log_every, batch_size=batch_size or None,
                                 callback=callback, cancel=cancel)

        def work_volume(report, cancel):
            """The volume path: one 3D SIREN; every preview is the whole output volume."""
            zo = out_shape[0]
            state = {"phase": None, "segment": -1}

            def callback(p):
                phase = ("INR" if p.step < steps else "least squares") if (
                    path == "superres") else ""
                new = phase != state["phase"]
                if new:  # superres: the INR, then the data-consistency step
                    state["phase"] = phase
                    state["segment"] += 1
                item = {"step": p.step, "total": p.total, "loss": p.loss, "psnr": p.psnr,
                        "segment": state["segment"], "phase": phase, "slices": (1, zo, zo)}
                if gui_free.is_set() or new:
                    gui_free.clear()
                    item["preview"] = (0, p.preview()[..., 0].float().cpu().numpy())
                report(item)

            common = {"steps": steps, "lr": lr, "reference": reference, "device": device,
                      "seed": seed, "log_every": log_every, "callback": callback,
                      "cancel": cancel}
            if path == "superres":
                return volume.superres_volume(scan, slice_scale=slice_scale, scale=scale,
                                              profile=profile, **common)
            return volume.denoise_volume(scan, sigma=sigma, **common)

        self._t0 = time.monotonic()
        what = {v: k for k, v in TASK_LABELS}[task].split(" (")[0]
        if path is not None:
            total = steps + (volume.GRID_STEPS if path == "superres" else 0)
            return work_volume, total, f"{what} (3D): {layer.name}"
        self._warn_modality(encoder, scan)
        total = steps * max(1, -(-z // (batch_size or z)))
        return work, total, f"{what}: {layer.name}"

    def on_report(self, item: dict) -> None:
        first, last, z = item["slices"]
        where = "" if (first, last) == (1, z) else (
            f"slice {first} of {z}" if first == last else f"slices {first}-{last} of {z}")
        where = " ".join(filter(None, [item["phase"], where]))
        self.plot.add(item["step"], item["loss"], item.get("psnr"), segment=item["segment"],
                      subtitle=where)
        if self.job is not None:
            self.job.progress(item["step"])
            if self.job._pbar is not None and self.job._pbar.total != item["total"]:
                self.job._pbar.total = item["total"]
        if "preview" in item and self.preview_layer is not None:
            start, img = item["preview"]
            self._preview_data[start:start + img.shape[0]] = img
            self.preview_layer.data = self._preview_data
            self.preview_layer.refresh()
            self._gui_free.set()
        psnr = f"  PSNR {item['psnr']:.2f} dB" if item.get("psnr") is not None else ""
        self.set_status(f"step {item['step']}/{item['total']}  loss {item['loss']:.3g}{psnr}"
                        f"  ({time.monotonic() - self._t0:.0f} s){'  ' + where if where else ''}")

    def on_done(self, restoration) -> None:
        task, scale, encoder, path, slice_scale = self._run_info
        hist = restoration.history
        if path is not None:
            enc = "3D SIREN"
        else:
            enc = "SIREN" if hist.get("encoder") == "none" else (
                "STRAINER" if encoder == "default" else f"STRAINER {Path(encoder).stem}")
        what = {"fit": "fit", "superres": f"superres x{scale}", "denoise": "denoised"}[task]
        if path == "superres":
            what += f" slices x{slice_scale}"
        name = f"{self._source_layer.name} {what} ({enc})"
        if hist.get("cancelled"):
            name += " [stopped]"
        self._remove_preview()
        self.result_layer = self.add_result(restoration.scan, name, hist, self._source_layer)
        final = hist.get("psnr_final")
        if final is None and hist.get("psnr"):
            final = hist["psnr"][-1]
        last = f"; final PSNR {final:.2f} dB" if final is not None else ""
        msg = (f"{'Stopped' if hist.get('cancelled') else 'Done'}: {name}"
               f" ({time.monotonic() - self._t0:.0f} s{last})")
        if hist.get("probes"):
            msg += (f"; route {hist['route']} chosen by held-out loss "
                    f"(probes {hist['probe_seconds']:.0f} s)")
        if hist.get("stop_reason") and hist["stop_reason"] != "ran all steps":
            msg += f"; stopped by: {hist['stop_reason']}"
        self.set_status(msg)
        notify(msg)

    def on_error(self, message: str) -> None:
        super().on_error(message)
        self._remove_preview()

    def on_finished(self) -> None:
        self._remove_preview()

    def _remove_preview(self) -> None:
        if self.preview_layer is not None and self.preview_layer in self.viewer.layers:
            self.viewer.layers.remove(self.preview_layer)
        self.preview_layer = None


_PEEKED: dict = {}


def _peek_encoder(path: Path):
    """The encoder at ``path`` (cached by modification time), or a one-line problem."""
    from ..core.checkpoint import load_encoder
    from ..errors import StrainerError

    if not str(path).strip() or not path.is_file():
        return "no encoder file chosen" if not str(path).strip() or path.is_dir() else (
            f"{path}: no such file")
    key = (str(path), path.stat().st_mtime_ns)
    if key not in _PEEKED:
        try:
            _PEEKED[key] = load_encoder(path)
        except StrainerError as e:
            return str(e)
    return _PEEKED[key]


__all__ = ["KEY", "RestoreWidget"]
