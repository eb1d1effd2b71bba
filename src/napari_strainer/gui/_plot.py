"""A small live curve (loss on a log axis, optional PSNR on a second axis) for the widgets."""

from __future__ import annotations

import math

from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from qtpy.QtWidgets import QSizePolicy


class CurvePlot(FigureCanvasQTAgg):
    """Loss (left, log scale) and PSNR (right, dB) against the iteration, redrawn lazily.

    A run made of several fits (batches of slices) is drawn as one segment per fit, the
    current one bright and the finished ones faded, all against the fit's own iteration.
    """

    def __init__(self, title: str = "", height: float = 2.2):
        fig = Figure(figsize=(3.2, height), dpi=80, layout="constrained")
        super().__init__(fig)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Preferred)
        self.setMinimumHeight(int(height * 70))
        self._title = title
        self.ax = fig.add_subplot(111)
        self.ax2 = self.ax.twinx()
        self.clear()

    def clear(self) -> None:
        self.steps: list[int] = []
        self.loss: list[float] = []
        self.psnr: list[float] = []
        self.psnr_steps: list[int] = []
        self.segment: list[int] = []  # segment index of each loss point
        self.psnr_segment: list[int] = []
        self.subtitle = ""
        self._draw()

    def add(self, step: int, loss: float, psnr: float | None = None, segment: int = 0,
            subtitle: str = "") -> None:
        """Append a point; ``segment`` numbers the fit it belongs to (batches of slices)."""
        if math.isfinite(loss) and loss > 0:
            self.steps.append(step)
            self.loss.append(loss)
            self.segment.append(segment)
        if psnr is not None and math.isfinite(psnr):
            self.psnr_steps.append(step)
            self.psnr.append(psnr)
            self.psnr_segment.append(segment)
        self.subtitle = subtitle
        self._draw()

    @staticmethod
    def _segments(xs, ys, seg):
        out: dict[int, tuple[list, list]] = {}
        for x, y, k in zip(xs, ys, seg):
            out.setdefault(k, ([], []))[0].append(x)
            out[k][1].append(y)
        return out

    def _draw(self) -> None:
        fg, grid = "#d0d0d0", "#555555"
        self.figure.set_facecolor("#262930")
        for ax in (self.ax, self.ax2):
            ax.clear()
            ax.set_facecolor("#262930")
            ax.tick_params(colors=fg, labelsize=8)
            for spine in ax.spines.values():
                spine.set_color(grid)
        title = self._title + (f" ({self.subtitle})" if self.subtitle else "")
        self.ax.set_title(title, color=fg, fontsize=9)
        self.ax.set_xlabel("iteration", color=fg, fontsize=8)
        self.ax.set_ylabel("loss (MSE)", color="#4fc3f7", fontsize=8)
        last = self.segment[-1] if self.segment else 0
        if self.loss:
            for k, (x, y) in self._segments(self.steps, self.loss, self.segment).items():
                self.ax.plot(x, y, color="#4fc3f7", lw=1.2 if k == last else 0.8,
                             alpha=1.0 if k == last else 0.35)
            self.ax.set_yscale("log")
        self.ax.grid(True, color=grid, lw=0.4, alpha=0.6)
        if self.psnr:
            for k, (x, y) in self._segments(self.psnr_steps, self.psnr,
                                            self.psnr_segment).items():
                self.ax2.plot(x, y, color="#ffb74d", lw=1.2 if k == last else 0.8,
                              alpha=1.0 if k == last else 0.35)
            self.ax2.set_ylabel("PSNR (dB)", color="#ffb74d", fontsize=8)
            self.ax2.set_visible(True)
        else:
            self.ax2.set_visible(False)
        self.draw_idle()
