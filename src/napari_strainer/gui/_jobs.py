"""Run a long job off the main thread with live progress, Stop, and errors as notifications.

The job (``pretrain.train.pretrain``, or ``restore.plan.run`` of a plan) reports through a
callback in the worker thread; :class:`Job` relays each report to the main thread with a queued
Qt signal, where the widget updates its curve, preview layer and the napari progress bar. The job runs in a napari
``FunctionWorker`` (not a generator worker, which silently swallows a ``RuntimeError`` such as
CUDA out-of-memory); errors are translated to :class:`JobError` with a one-line message and
shown as notifications.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable

from napari.qt.threading import create_worker
from napari.utils import progress as napari_progress
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QObject, Signal, Slot

from ..errors import StrainerError

log = logging.getLogger(__name__)


class JobError(Exception):
    """A job failed; the message is one line a user can act on."""


class _Relay(QObject):
    """Lives on the main thread; ``report.emit`` from the worker is queued to ``handler``."""

    report = Signal(object)

    def __init__(self, handler: Callable):
        super().__init__()
        self._handler = handler
        self.report.connect(self._deliver)

    @Slot(object)
    def _deliver(self, obj) -> None:
        self._handler(obj)


def describe_error(exc: BaseException) -> str:
    """One line for the user. CUDA out-of-memory suggests what to change."""
    text = " ".join(str(exc).split())
    oom = isinstance(exc, MemoryError) or "out of memory" in text.lower() or (
        type(exc).__name__ == "OutOfMemoryError")
    if oom:
        return ("Out of memory on the device. Use fewer coordinates per step (or fewer "
                "slices/images per batch, or a smaller network), or choose the CPU. "
                f"({text[:160]})")
    if isinstance(exc, StrainerError):
        return text
    return f"{type(exc).__name__}: {text[:300]}"


class Job:
    """One background run.

    Args:
        work: ``work(report, cancel)`` runs in a worker thread; ``report(obj)`` sends ``obj`` to
            ``on_report`` on the main thread; ``cancel`` is a :class:`threading.Event`.
        on_report, on_done, on_error, on_finally: main-thread handlers.
        total: size of the napari progress bar; ``description`` its label.
    """

    def __init__(self, work: Callable, *, on_report: Callable, on_done: Callable,
                 on_error: Callable[[str], None], on_finally: Callable[[], None],
                 total: int, description: str):
        self.cancel = threading.Event()
        self._relay = _Relay(on_report)
        self._pbar = napari_progress(total=max(1, int(total)), desc=description)
        self._on_error = on_error
        self._on_done = on_done
        self._on_finally = on_finally
        self.error: str | None = None
        self.running = True

        job = self

        class _Cancel:  # Stop button, or napari asking the worker to quit (closing)
            def is_set(self) -> bool:
                worker = getattr(job, "worker", None)
                return job.cancel.is_set() or bool(worker is not None
                                                   and worker.abort_requested)

        def run():
            try:
                return work(self._relay.report.emit, _Cancel())
            except Exception as exc:  # re-raised as one type with a clear line
                log.debug("job failed:\n%s", traceback.format_exc())
                raise JobError(describe_error(exc)) from exc

        # an explicit "errored" handler: otherwise the error is re-raised into the event loop
        self.worker = create_worker(run, _start_thread=False, _connect={
            "returned": self._returned, "errored": self._errored,
            "finished": self._finished})

    def start(self) -> None:
        self.worker.start()

    def stop(self) -> None:
        """Ask the job to stop at its next step (it keeps what it has)."""
        self.cancel.set()

    def progress(self, step: int) -> None:
        if self._pbar is None:
            return
        self._pbar.n = min(int(step), self._pbar.total)
        self._pbar.refresh()

    def _returned(self, value) -> None:
        try:
            self._on_done(value)
        except Exception as exc:  # noqa: BLE001 - a failure to show the result is shown too
            self._errored(JobError(describe_error(exc)))

    def _errored(self, exc: BaseException) -> None:
        self.error = str(exc)
        show_error(self.error)
        self._on_error(self.error)

    def _finished(self) -> None:
        self.running = False
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self._on_finally()


def notify(message: str) -> None:
    show_info(message)
