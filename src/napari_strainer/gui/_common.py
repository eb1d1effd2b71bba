"""Pieces shared by the dock widgets: device list, layer choices, the run/stop/status/curve
block and the background-job lifecycle, and (:class:`PlannedWidget`) the docks that run a
restoration plan (:mod:`napari_strainer.restore.plan`)."""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import napari
from magicgui.widgets import ComboBox, Container, Label, PushButton
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_warning
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QSizePolicy
from superqt import QCollapsible

from ..errors import BadArgumentError
from ..io.scan import Scan
from ..restore.plan import Options, Plan, make_plan, run
from ._jobs import Job, describe_error
from ._layers import image_layer_scan, scan_to_layer
from ._plot import CurvePlot


def device_choices() -> list[tuple[str, str]]:
    """``auto``, ``cpu`` and every CUDA device with its free memory, as (label, value)."""
    import torch

    choices = []
    cuda = torch.cuda.is_available()
    choices.append(("auto (" + ("cuda:0" if cuda else "cpu") + ")", "auto"))
    choices.append(("cpu", "cpu"))
    if cuda:
        for i in range(torch.cuda.device_count()):
            name = torch.cuda.get_device_name(i)
            try:
                free, total = torch.cuda.mem_get_info(i)
                label = f"cuda:{i} {name} ({free / 2**30:.1f} of {total / 2**30:.1f} GiB free)"
            except RuntimeError:
                label = f"cuda:{i} {name}"
            choices.append((label, f"cuda:{i}"))
    return choices


def memory_in_use() -> str:
    """``"memory 1.23 GB"``: this process's resident memory (napari included), and the GPU's
    allocated memory when CUDA is in use."""
    import psutil
    import torch

    text = f"memory {psutil.Process().memory_info().rss / 2**30:.2f} GB"
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        text += f", GPU {torch.cuda.memory_allocated() / 2**30:.2f} GB"
    return text


def image_layers(viewer: napari.Viewer) -> list[tuple[str, object]]:
    return [(layer.name, layer) for layer in viewer.layers
            if isinstance(layer, napari.layers.Image) and not layer.rgb
            and not layer.metadata.get("strainer_preview")]


def layer_scan(layer) -> Scan:
    """The scan ``layer`` shows, named after the layer (its ``source``): the plan and the
    planner's messages then name the layer the user sees, not the file it came from. A
    result gets the file back (``dataclasses.replace(scan, source=...)``)."""
    return dataclasses.replace(image_layer_scan(layer), source=Path(layer.name))


def parse_float(text: str, what: str) -> float:
    """A positive number typed in a text field (``what`` names the field)."""
    try:
        value = float(str(text).strip())
    except ValueError:
        raise BadArgumentError(f"{what}: {text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise BadArgumentError(f"{what} must be a positive number, got {text!r}")
    return value


def collapsible(title: str, inner: Container) -> QCollapsible:
    fold = QCollapsible(title)
    inner.native.layout().setContentsMargins(0, 0, 0, 0)
    fold.addWidget(inner.native)
    return fold


class JobWidget(Container):
    """Base of the dock widgets: a form, then Run / Stop, a status line and a live curve.

    ``above_buttons`` go between the device and the buttons; ``buttons`` before Run (disabled
    while a job runs, like Run)."""

    _instances: ClassVar[weakref.WeakSet] = weakref.WeakSet()

    def __init__(self, viewer: napari.Viewer, form: list, *, plot_title: str,
                 above_buttons: tuple = (), buttons: tuple = ()):
        super().__init__(labels=True)
        self.viewer = viewer
        self.job: Job | None = None
        self.device = ComboBox(label="device", choices=device_choices(),
                               tooltip="auto: the first CUDA device when there is one, else "
                                       "the CPU")
        self.run_button = PushButton(text="Run")
        self.stop_button = PushButton(text="Stop", enabled=False,
                                      tooltip="Stop at the next iteration and keep the result "
                                              "so far")
        self._idle_buttons = [*buttons, self.run_button]
        self.status = Label(value="")
        self.status.native.setWordWrap(True)
        self.extend(form)
        self.append(self.device)
        self.extend(above_buttons)
        row = Container(layout="horizontal", widgets=[*buttons, self.run_button,
                                                      self.stop_button], labels=False)
        row.margins = (0, 0, 0, 0)
        self.buttons = row
        self.append(row)
        self.append(self.status)
        self.plot = CurvePlot(plot_title)
        self.native.layout().addWidget(self.plot)
        self.run_button.changed.connect(self.run)
        self.stop_button.changed.connect(self.stop)
        for ev in (viewer.layers.events.inserted, viewer.layers.events.removed):
            ev.connect(self._layers_changed)
        JobWidget._instances.add(self)

    # ------------------------------------------------------------------ layers
    def _layers_changed(self, event=None) -> None:
        self.reset_choices()

    # ------------------------------------------------------------------ job lifecycle
    @property
    def running(self) -> bool:
        return self.job is not None and self.job.running

    def run(self) -> None:
        """Start the job (no-op while one is running). Errors go to a notification."""
        if self.running:
            return
        try:
            work, total, description = self.prepare()
        except Exception as exc:  # noqa: BLE001 - shown to the user, not raised into Qt
            msg = describe_error(exc)
            self.set_status(f"Error: {msg}")
            show_error(msg)
            return
        self.plot.clear()
        self.job = Job(work, on_report=self.on_report, on_done=self.on_done,
                       on_error=self.on_error, on_finally=self._job_finished, total=total,
                       description=description)
        for button in self._idle_buttons:
            button.enabled = False
        self.stop_button.enabled = True
        self.set_status("Starting...")
        self.job.start()

    def stop(self) -> None:
        if self.running:
            self.job.stop()
            self.stop_button.enabled = False
            self.set_status("Stopping after the current iteration...")

    def _job_finished(self) -> None:
        for button in self._idle_buttons:
            button.enabled = True
        self.stop_button.enabled = False
        self.on_finished()

    def add_result(self, scan, name: str, history: dict, like=None):
        """Add ``scan`` as a new image layer ``name`` carrying ``history`` in its metadata,
        displayed like the layer ``like`` (its contrast limits and colormap) while it is still
        in the viewer; returns the layer."""
        data, attrs, _ = scan_to_layer(scan, name, metadata={"strainer_history": history})
        if like is not None and like in self.viewer.layers:
            attrs["contrast_limits"] = tuple(like.contrast_limits)
            attrs["colormap"] = like.colormap.name
        return self.viewer.add_image(data, **attrs)

    def set_status(self, text: str) -> None:
        self.status.value = text

    # ------------------------------------------------------------------ for subclasses
    def prepare(self) -> tuple[Callable, int, str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def on_report(self, item) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def on_done(self, value) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def on_error(self, message: str) -> None:
        self.set_status(f"Error: {message}")

    def on_finished(self) -> None:
        pass


ETA_HINT = "ETA: press Plan to time a few steps"


class PlannedWidget(JobWidget):
    """A dock that restores through the planner: it gathers the scans and the
    :class:`~napari_strainer.restore.plan.Options` from its form (:meth:`gather`), shows
    :func:`~napari_strainer.restore.plan.make_plan`'s plan (``plan_text``) whenever an input
    changes, and Run carries that plan out with :func:`~napari_strainer.restore.plan.run`.

    The plan shown as inputs change has no ETA (timing takes a few training steps: about a
    second on a GPU, more on a CPU); the Plan button times it in the background and shows
    the ETA, which Run then keeps while the inputs are unchanged. Planning errors are shown
    in the plan text and, at Run, as a notification without starting anything.
    """

    def __init__(self, viewer: napari.Viewer, form: list, *, plot_title: str):
        self.plan: Plan | None = None
        """The plan of the current inputs (None while they cannot be planned)."""
        self.plan_button = PushButton(text="Plan", tooltip="check these choices and time a "
                                      "few steps: the plan with its ETA")
        self.plan_text = Label(label="plan", value="")
        self.plan_text.native.setWordWrap(True)
        self.plan_text.native.setTextFormat(Qt.PlainText)
        self.plan_text.native.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.plan_text.native.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Preferred)
        super().__init__(viewer, form, plot_title=plot_title, above_buttons=(self.plan_text,),
                         buttons=(self.plan_button,))
        self.plan_button.changed.connect(self.time_plan)
        self._generation = 0  # of the inputs: a timing of older inputs is dropped
        self._timed: tuple | None = None  # (inputs key, ETA seconds) of the last timing
        self._eta_workers: set = set()

    # ------------------------------------------------------------------ for subclasses
    def gather(self) -> tuple[list[Scan], Options, Scan | None]:  # pragma: no cover
        """The scans, options and PSNR reference of the form (BadArgumentError: one line)."""
        raise NotImplementedError

    def on_plan(self, plan: Plan | None) -> None:
        """Called after each re-plan (None: the inputs cannot be planned now)."""

    def start(self, plan: Plan) -> tuple[Callable, int, str]:  # pragma: no cover - abstract
        """Prepare the view for running ``plan``; returns ``(on_progress, total,
        description)``: ``on_progress(progress, report)`` runs in the worker thread."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the plan
    def make_plan(self, *, eta: bool = False) -> Plan:
        scans, options, reference = self.gather()
        return make_plan(scans, options, reference=reference, eta=eta)

    def refresh_plan(self, *_) -> None:
        """Re-plan the current inputs (without ETA) and show the plan or what is wrong."""
        self._generation += 1
        try:
            self.plan = self.make_plan()
        except Exception as exc:  # noqa: BLE001 - shown in the dock, not raised into Qt
            self.plan = None
            self.plan_text.value = f"cannot run: {describe_error(exc)}"
        else:
            self.plan_text.value = _describe(self.plan)
        self.on_plan(self.plan)

    def time_plan(self) -> None:
        """The Plan button: re-plan with the ETA (timed steps) in the background."""
        if self.running:
            return
        self.refresh_plan()
        if self.plan is None:
            return
        generation, inputs = self._generation, (self.plan.scans, self.plan.options,
                                                self.plan.reference)
        self.plan_text.value = _describe(self.plan).replace(ETA_HINT,
                                                            "ETA: timing a few steps...")

        def probe():
            scans, options, reference = inputs
            try:
                return make_plan(scans, options, reference=reference, eta=True)
            except Exception as exc:  # noqa: BLE001 - shown in the dock
                return describe_error(exc)

        def show(result) -> None:
            if generation != self._generation:
                return  # the inputs changed meanwhile: their plan is shown
            if isinstance(result, str):
                self.plan_text.value = f"cannot run: {result}"
                return
            self._timed = (_inputs_key(result), result.eta_seconds)
            self.plan = result
            self.plan_text.value = _describe(result)

        worker = create_worker(probe, _start_thread=False)
        worker.returned.connect(show)
        self._eta_workers.add(worker)  # referenced until finished
        worker.finished.connect(lambda: self._eta_workers.discard(worker))
        worker.start()

    # ------------------------------------------------------------------ job
    def prepare(self):
        plan = self.make_plan()
        if self._timed is not None and self._timed[0] == _inputs_key(plan):
            plan.eta_seconds = self._timed[1]  # timed by the Plan button for these inputs
        self.plan = plan
        self.plan_text.value = _describe(plan)
        for note in plan.notes:  # napari's worker does not relay warnings from its thread
            show_warning(note)
        on_progress, total, description = self.start(plan)

        def work(report, cancel):
            return run(plan, callback=lambda p: on_progress(p, report), cancel=cancel)

        return work, total, description


def _describe(plan: Plan) -> str:
    text = plan.describe()
    return text if plan.eta_seconds is not None else text.replace("ETA: not estimated",
                                                                  ETA_HINT)


def _inputs_key(plan: Plan) -> tuple[str, str]:
    """What an ETA holds for: the options and the plan they give (ETA aside)."""
    untimed = dataclasses.replace(plan, eta_seconds=None)
    return repr(dataclasses.asdict(plan.options)), untimed.describe()


__all__ = ["JobWidget", "PlannedWidget", "collapsible", "device_choices", "image_layers",
           "layer_scan", "parse_float"]
