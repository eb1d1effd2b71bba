"""Pieces shared by the two dock widgets: device list, layer choices, the run/stop/status/curve
block and the background-job lifecycle."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import ClassVar

import napari
from magicgui.widgets import ComboBox, Container, Label, LineEdit, PushButton
from superqt import QCollapsible

from ..errors import BadArgumentError
from ._jobs import Job
from ._layers import scan_to_layer
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


def image_layers(viewer: napari.Viewer) -> list[tuple[str, object]]:
    return [(layer.name, layer) for layer in viewer.layers
            if isinstance(layer, napari.layers.Image) and not layer.rgb
            and not layer.metadata.get("strainer_preview")]


def parse_float(text: str, what: str, *, positive: bool = True) -> float:
    try:
        value = float(str(text).strip())
    except ValueError:
        raise BadArgumentError(f"{what}: {text!r} is not a number") from None
    if not math.isfinite(value) or (positive and value <= 0):
        raise BadArgumentError(f"{what} must be a positive number, got {text!r}")
    return value


def collapsible(title: str, inner: Container) -> QCollapsible:
    fold = QCollapsible(title)
    inner.native.layout().setContentsMargins(0, 0, 0, 0)
    fold.addWidget(inner.native)
    return fold


class JobWidget(Container):
    """Base of the dock widgets: a form, then Run / Stop, a status line and a live curve."""

    title = ""
    _instances: ClassVar[weakref.WeakSet] = weakref.WeakSet()

    def __init__(self, viewer: napari.Viewer, form: list, *, plot_title: str):
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
        self.status = Label(value="")
        self.status.native.setWordWrap(True)
        self.extend(form)
        self.append(self.device)
        buttons = Container(layout="horizontal", widgets=[self.run_button, self.stop_button],
                            labels=False)
        buttons.margins = (0, 0, 0, 0)
        self.buttons = buttons
        self.append(buttons)
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
            from napari.utils.notifications import show_error

            from ._jobs import describe_error

            msg = describe_error(exc)
            self.set_status(f"Error: {msg}")
            show_error(msg)
            return
        self.plot.clear()
        self.job = Job(work, on_report=self.on_report, on_done=self.on_done,
                       on_error=self.on_error, on_finally=self._job_finished, total=total,
                       description=description)
        self.run_button.enabled = False
        self.stop_button.enabled = True
        self.set_status("Starting...")
        self.job.start()

    def stop(self) -> None:
        if self.running:
            self.job.stop()
            self.stop_button.enabled = False
            self.set_status("Stopping after the current iteration...")

    def _job_finished(self) -> None:
        self.run_button.enabled = True
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


__all__ = ["JobWidget", "LineEdit", "collapsible", "device_choices", "image_layers",
           "parse_float"]
