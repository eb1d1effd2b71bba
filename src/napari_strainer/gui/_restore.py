"""The "Restore scan" dock widget: fit, super-resolve or denoise an image layer, with the plan
(:mod:`napari_strainer.restore.plan`: slice by slice from a STRAINER encoder, one 3D INR over
the whole scan, or, to denoise, a race of classical denoisers blended on their estimated
error) shown before Run, a live preview and a loss/PSNR curve."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import napari
import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, Label, LineEdit, SpinBox

from ..core.operators import PROFILES
from ..errors import BadArgumentError
from ..io.intensity import Intensity
from ..pretrain import cards, encoders
from ..restore import race, slices
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
from ._layers import geometry, image_layer_scan

SLICE_AXIS_LABELS = [("auto", None), ("0", 0), ("1", 1), ("2", 2)]
TASK_LABELS = [("fit (represent the scan)", "fit"), ("super-resolve", "superres"),
               ("denoise", "denoise")]
INIT_LABELS = [("auto (self-validated)", "auto"), ("fixed (paper recipe)", "fixed")]
HEAD_LABELS = [("solved (ridge regression)", "solved"), ("random (paper)", "random")]
DENOISE_MODE_LABELS = [(("auto (race of NLM, TV, BM4D if installed, Wiener stage; blended by "
                          "estimated error)"), "auto"),
                       ("slices (2D INR per slice)", "slices"),
                       ("volume (3D INR, neighbouring slices)", "volume")]
NOISE_LABELS = [("auto (Rician for MR, Gaussian for CT)", "auto"),
                ("rician (magnitude MR)", "rician"), ("gaussian", "gaussian")]
ENCODER_LABELS = [("shipped default (MRI)", "default"), ("file...", "file"),
                  ("none (SIREN baseline)", "none"),
                  ("self (pretrain on this scan first)", "self")]


class RestoreWidget(PlannedWidget):
    """Restore an image layer as the planner decides (:func:`napari_strainer.restore.plan.
    make_plan`): slice by slice (one 2D INR per slice, from the encoder), or, with a slice
    scale >= 2 or denoise mode volume, one 3D SIREN over the whole scan; denoise mode auto
    races classical denoisers (non-local means, total variation, BM4D when installed) under
    the chosen noise model and blends them by their estimated error (SURE). The plan (path,
    route, noise, steps, memory, reasons; the ETA with the Plan button) is shown above Run and
    follows every change of the form.

    While it runs, a ``[live preview]`` layer on the output grid shows the current best fit
    every few iterations (the race: after each denoiser; normalised intensities) and the
    curve shows the loss, and the PSNR against the reference layer when one is chosen. Stop
    keeps the best result so far (the race: blends the denoisers finished so far). The
    result is a new layer on the output grid (super-resolution: finer, aligned to the input)
    with the source geometry and metadata, ready to be saved with File > Save Selected Layers.
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
        self.slice_axis = ComboBox(label="slice axis", choices=SLICE_AXIS_LABELS,
                                   value=None, visible=False,
                                   tooltip="the axis the slice scale refines, in the viewer's "
                                           "axis order (auto: the DICOM slice normal, else "
                                           "the one coarse axis), as '--slice-axis'")
        self.denoise_mode = ComboBox(label="denoise mode", choices=DENOISE_MODE_LABELS,
                                     value="auto", visible=False,
                                     tooltip="auto: non-local means, total variation and BM4D "
                                             "(when installed) each denoise the scan; their "
                                             "errors are estimated without a clean image "
                                             "(SURE) and the blend with the lowest estimated "
                                             "error is kept, as 'strainer denoise'. slices: "
                                             "one 2D INR per slice (from the encoder). volume: "
                                             "one 3D SIREN for the whole scan with a 3D "
                                             "total-variation term, as 'strainer denoise "
                                             "--mode volume' (a 2D layer takes the slice path)")
        self.noise = ComboBox(label="noise model", choices=NOISE_LABELS, value="auto",
                              visible=False,
                              tooltip="the noise the race assumes (denoise mode auto): rician "
                                      "for magnitude MR (the noise lifts dark areas; the blend "
                                      "is mapped back), gaussian for CT and data with "
                                      "negative values; auto chooses from the modality and "
                                      "the values")
        self.coils = SpinBox(label="receive coils", value=1, min=1, max=128, visible=False,
                             tooltip="magnitude MR combined as the root sum of squares of "
                                     "this many coils: non-central chi noise (1: Rician); "
                                     "sigma is each coil's, as 'strainer denoise --coils'")
        self.sigma = LineEdit(label="noise sigma", value="auto", visible=False,
                              tooltip="'auto' (estimated: per slice, over the volume, or, for "
                                      "the race, from the signal), 'none' (INR paths: run all "
                                      "steps; the race: as auto) or the noise standard "
                                      "deviation in the scan's units")
        self.steps = SpinBox(label="steps", value=slices.DEFAULT_STEPS["fit"], min=0,
                             max=10_000_000, tooltip="Adam steps at most (per batch of "
                                                     "slices); set to the path's default "
                                                     "when the path changes")
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
                                  self.slice_axis, self.denoise_mode, self.noise, self.coils,
                                  self.sigma, self.steps,
                                  self.reference],
                         plot_title="loss / PSNR")
        self.advanced_fold = collapsible("Advanced", self.advanced)
        self.native.layout().insertWidget(self.index(self.device), self.advanced_fold)
        self.encoder_info = Label(value="")
        self.encoder_info.native.setWordWrap(True)
        self.insert(self.index(self.encoder_file) + 1, self.encoder_info)
        self._path = "slices"  # of the last plan (kept while the inputs cannot be planned)
        self._steps_for = ("fit", "slices", False)  # (task, path, prior) of the steps default
        self._slice_scale_was = 0
        self._encoder_summary = ("", "")
        self._shared_layers: int | None = None
        self.preview_layer = None
        self.result_layer = None
        self._preview_data: np.ndarray | None = None
        self._t0 = 0.0
        self.task.changed.connect(self._task_changed)
        self.slice_scale.changed.connect(self._slice_scale_changed)
        self.encoder.changed.connect(self._encoder_changed)
        self.encoder_file.changed.connect(self._encoder_changed)
        for widget in (self.layer, self.scale, self.slice_profile, self.slice_axis,
                       self.denoise_mode,
                       self.noise, self.coils, self.sigma, self.steps, self.reference,
                       self.init, self.head,
                       self.freeze, self.lr, self.batch, self.device):
            widget.changed.connect(self.refresh_plan)
        self._encoder_changed()

    # ------------------------------------------------------------------ form logic
    def _task_changed(self, task: str) -> None:
        self._set_default_freeze()
        self.refresh_plan()

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
        self.refresh_plan()

    def _encoder_changed(self, *_) -> None:
        """Describe the chosen encoder (its card); limit the freeze depth to its layers."""
        choice = self.encoder.value
        self.encoder_file.visible = choice == "file"
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
        self._encoder_summary = (text, tooltip)
        self._set_default_freeze()
        self.refresh_plan()

    def _set_default_freeze(self) -> None:
        if self.encoder.value == "none":
            self.freeze.value = 0
            return
        limit = self._shared_layers if self._shared_layers is not None else 31
        self.freeze.max = limit
        self.freeze.value = slices.default_freeze(self.task.value, limit)

    def on_plan(self, plan: Plan | None) -> None:
        """Show the options of the planned path; the steps value follows the path's default
        when the task or the path changes."""
        if plan is not None:
            self._path = plan.path
            prior = plan.prior_steps > 0
            if (plan.task, plan.path, prior) != self._steps_for:
                self._steps_for = (plan.task, plan.path, prior)
                self.steps.value = default_steps(plan.task, plan.path, prior)
        task, encoder = self.task.value, self.encoder.value
        self.scale.visible = self.slice_scale.visible = task == "superres"
        self.slice_profile.visible = self.slice_axis.visible = \
            task == "superres" and self.slice_scale.value >= 2
        self.sigma.visible = self.denoise_mode.visible = task == "denoise"
        self.noise.visible = task == "denoise"
        on_slices, on_race = self._path == "slices", self._path == "race"
        # the noise model is the race's (the INR paths stop on a Gaussian noise level)
        self.noise.enabled = task == "denoise" and self.denoise_mode.value == "auto"
        self.coils.visible = task == "denoise" and self.noise.value != "gaussian"
        self.coils.enabled = self.noise.enabled
        # initialisation, head, freezing and slice batches are for the slice path only; the
        # race takes no training steps
        self.init.enabled = self.batch.enabled = on_slices
        self.freeze.enabled = encoder != "none" and self.init.value == "fixed" and on_slices
        self.head.enabled = encoder != "none" and task == "fit" and on_slices
        self.steps.enabled = self.lr.enabled = self.log_every.enabled = not on_race
        text, tooltip = self._encoder_summary
        if on_race:  # classical denoisers, no INR
            text = ("not used: the race of classical denoisers (NLM, TV, BM4D) uses no "
                    "encoder; denoise mode slices uses it" if encoder != "none" else
                    "the race of classical denoisers (NLM, TV, BM4D): no INR")
            tooltip = ""
        elif not on_slices:  # the volume path has no encoder
            text = ("a 3D SIREN from scratch: the volume path (no pretrained 3D encoder exists)"
                    if encoder == "none" else
                    "not used: the volume path fits a 3D SIREN from scratch (no pretrained 3D "
                    "encoder exists); choose 'none' or the shipped default")
            tooltip = ""
        self.encoder_info.value = text
        self.encoder_info.tooltip = tooltip

    def use_encoder_file(self, path) -> None:
        """Select an encoder file (the Pretrain widget calls this when it has saved one)."""
        self.encoder_file.value = str(path)
        self.encoder.value = "file"

    def gather(self):
        layer = self.layer.value
        if layer is None:
            raise BadArgumentError("open a scan first (File > Open, or File > Open Sample > "
                                   "napari-strainer)")
        task, encoder = self.task.value, self.encoder.value
        if encoder == "file":
            encoder = str(self.encoder_file.value).strip()
            if not encoder or Path(encoder).is_dir():
                raise BadArgumentError("choose an encoder file (*.safetensors)")
        superres, denoise = task == "superres", task == "denoise"
        fixed = self.init.value == "fixed"
        options = Options(
            task=task, encoder=encoder, init=self.init.value, head=self.head.value,
            steps=self.steps.value, lr=parse_float(self.lr.value, "learning rate"),
            # in-plane 1 without a slice scale: no super-resolution asked (the planner says so)
            scale=(self.scale.value if self.scale.value >= 2 else None) if superres else 1,
            slice_scale=self.slice_scale.value if superres and self.slice_scale.value >= 2
            else None, slice_profile=self.slice_profile.value,
            slice_axis=self.slice_axis.value,
            freeze=self.freeze.value if fixed and self.encoder.value != "none" else None,
            sigma=self.sigma.value.strip() if denoise else "auto",
            noise=self.noise.value if denoise else "auto",
            coils=self.coils.value if denoise and self.noise.value != "gaussian" else 1,
            mode=self.denoise_mode.value if denoise else "auto", device=self.device.value,
            seed=self.seed.value, log_every=self.log_every.value,
            batch_size=self.batch.value or None)
        ref = self.reference.value
        return [layer_scan(layer)], options, image_layer_scan(ref) if ref is not None else None

    # ------------------------------------------------------------------ job
    def start(self, plan: Plan):
        layer = self.layer.value
        scan = plan.scans[0]
        z, zo = scan.shape[0], plan.output_shape[0]
        # the live preview, on the output grid, in the normalised intensities of the fit
        inten = Intensity.for_scan(scan)
        norm = inten.forward(np.nan_to_num(scan.data, nan=inten.low))
        for axis, (n_out, n_in) in enumerate(zip(plan.output_shape, scan.shape)):
            if n_out != n_in:
                norm = norm.repeat(n_out // n_in, axis=axis)
        self._preview_data = norm
        p_scale, p_translate = geometry(plan.output_affine)
        self._remove_preview()
        self.preview_layer = self.viewer.add_image(
            norm, name=f"{layer.name} [live preview]", scale=p_scale, translate=p_translate,
            contrast_limits=(0.0, 1.0), metadata={"strainer_preview": True})
        self.viewer.layers.selection.active = layer
        self._source_layer = layer
        self._source = image_layer_scan(layer).source
        self.result_layer = None
        self._running_plan = plan
        gui_free = threading.Event()
        gui_free.set()
        self._gui_free = gui_free
        on_slices, on_race = plan.path == "slices", plan.path == "race"
        stages = plan.path == "volume" and plan.task == "superres"  # INR, then least squares
        state = {"key": None, "segment": -1}

        def on_progress(p, report):
            """Runs in the worker: a new curve segment per batch of slices, probe and stage;
            the slice path previews the batch, the volume path and the race (after each
            denoiser, named by the phase) the whole output volume."""
            if on_slices:
                key, phase = (p.slices, p.phase), p.phase
                (first, stop), n = p.slices or (0, z), z
            elif on_race:
                key, phase, (first, stop), n = "race", p.phase, (0, zo), zo
            else:
                phase = p.phase or (("INR" if p.step < plan.prior_steps + plan.steps else
                                     "least squares") if stages else "")
                key, (first, stop), n = phase, (0, zo), zo
            new = key != state["key"]
            if new:
                state["key"] = key
                state["segment"] += 1
            item = {"step": p.step, "total": p.total, "loss": p.loss, "psnr": p.psnr,
                    "segment": state["segment"], "phase": phase, "slices": (first + 1, stop, n),
                    "race": on_race}
            # render only when the GUI has shown the previous preview (no backlog)
            if gui_free.is_set() or new:
                img = p.preview()  # empty while the in-plane prior trains
                if img.numel():
                    gui_free.clear()
                    item["preview"] = (first, img[..., 0].float().cpu().numpy())
            report(item)

        o = plan.options
        if on_race:  # two runs per denoiser (the second for its error estimate)
            total = _race_runs(scan)
        elif on_slices:
            total = plan.steps * max(1, -(-z // (o.batch_size or z)))
        else:
            total = plan.prior_steps + plan.steps + (plan.ls_steps if stages else 0)
        self._t0 = time.monotonic()
        what = {v: k for k, v in TASK_LABELS}[plan.task].split(" (")[0]
        how = " (race)" if on_race else "" if on_slices else " (3D)"
        return on_progress, total, f"{what}{how}: {layer.name}"

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
        seconds = time.monotonic() - self._t0
        if item.get("race"):  # two runs per denoiser
            self.set_status(f"{item['phase']}: {item['step'] // 2} of {item['total'] // 2} "
                            f"denoisers done  ({seconds:.0f} s, {memory_in_use()})")
            return
        psnr = f"  PSNR {item['psnr']:.2f} dB" if item.get("psnr") is not None else ""
        self.set_status(f"step {item['step']}/{item['total']}  loss {item['loss']:.3g}{psnr}"
                        f"  ({seconds:.0f} s, {memory_in_use()}){'  ' + where if where else ''}")

    def on_done(self, restoration) -> None:
        plan = self._running_plan
        o, hist = plan.options, restoration.history
        raced = hist.get("race")
        if raced is not None:  # Stop: the denoisers finished so far were blended
            hist["cancelled"] = len(raced["seconds"]) < len(raced["candidates"])
        if plan.path == "race":
            enc = "race"
        elif plan.path == "volume":
            enc = "3D SIREN"
        else:
            enc = "SIREN" if hist.get("encoder") == "none" else (
                "STRAINER" if o.encoder == "default" else f"STRAINER {Path(o.encoder).stem}")
        what = {"fit": "fit", "superres": f"superres x{o.scale}", "denoise": "denoised"}[
            plan.task]
        if plan.path == "volume" and plan.task == "superres":
            what += f" slices x{o.slice_scale}"
        name = f"{self._source_layer.name} {what} ({enc})"
        if hist.get("cancelled"):
            name += " [stopped]"
        self._remove_preview()
        scan = dataclasses.replace(restoration.scan, source=self._source)
        self.result_layer = self.add_result(scan, name, hist, self._source_layer)
        final = hist.get("psnr_final")
        if final is None and hist.get("psnr"):
            final = hist["psnr"][-1]
        last = f"; final PSNR {final:.2f} dB" if final is not None else ""
        msg = (f"{'Stopped' if hist.get('cancelled') else 'Done'}: {name}"
               f" ({time.monotonic() - self._t0:.0f} s{last})")
        if hist.get("probes"):
            msg += (f"; route {hist['route']} chosen by held-out loss "
                    f"(probes {hist['probe_seconds']:.0f} s)")
        if raced is not None:
            msg += "; " + _race_summary(hist)
        elif hist.get("stop_reason") and hist["stop_reason"] != "ran all steps":
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


def _race_summary(hist: dict) -> str:
    """``"blend 0.60 NLM 1s p2 + 0.40 TV 0.5s; noise rician, sigma 12.3; estimated PSNR
    34.1 dB"`` (the PSNR from the estimated error; when that cannot be trusted, its warning)."""
    raced, noise = hist["race"], hist["noise"]
    sigma = noise["sigma"]
    sigma = f"{sigma:.3g}" if abs(sigma) < 1000 else f"{sigma:.0f}"  # 1212, not 1.21e+03
    text = f"{raced['winner']}; noise {noise['model']}, sigma {sigma}"
    if raced.get("psnr_estimate") is not None:
        return text + f"; estimated PSNR {raced['psnr_estimate']:.1f} dB"
    return text + f"; no estimated PSNR: {raced.get('warning') or 'not estimated'}"


def _race_runs(scan) -> int:
    """The progress reports of the race on ``scan``: two per denoiser."""
    data = scan.data[0] if scan.shape[0] == 1 else scan.data
    return 2 * len(race.candidates(data.shape))



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


__all__ = ["RestoreWidget"]
