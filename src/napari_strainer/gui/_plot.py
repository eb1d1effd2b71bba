"""A small live curve (loss on a log axis, optional PSNR on a second axis) for the widgets."""

from __future__ import annotations

import math

from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from qtpy.QtWidgets import QSizePolicy


class CurvePlot(FigureCanvasQTAgg):
    """Loss (left, log scale) and PSNR (right, dB) against the iteration, redrawn lazily."""

    def __init__(self, title: str = "", height: float = 2.4):
        fig = Figure(figsize=(3.2, height), dpi=80, layout="constrained")
        super().__init__(fig)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Preferred)
        self.setMinimumHeight(int(height * 60))
        self._title = title
        self.ax = fig.add_subplot(111)
        self.ax2 = self.ax.twinx()
        self.clear()

    def clear(self) -> None:
        self.steps: list[int] = []
        self.loss: list[float] = []
        self.psnr: list[float] = []
        self.psnr_steps: list[int] = []
        self._draw()

    def add(self, step: int, loss: float, psnr: float | None = None) -> None:
        if math.isfinite(loss) and loss > 0:
            self.steps.append(step)
            self.loss.append(loss)
        if psnr is not None and math.isfinite(psnr):
            self.psnr_steps.append(step)
            self.psnr.append(psnr)
        self._draw()

    def _draw(self) -> None:
        fg, grid = "#d0d0d0", "#555555"
        self.figure.set_facecolor("#262930")
        for ax in (self.ax, self.ax2):
            ax.clear()
            ax.set_facecolor("#262930")
            ax.tick_params(colors=fg, labelsize=8)
            for spine in ax.spines.values():
                spine.set_color(grid)
        self.ax.set_title(self._title, color=fg, fontsize=9)
        self.ax.set_xlabel("iteration", color=fg, fontsize=8)
        self.ax.set_ylabel("loss (MSE)", color="#4fc3f7", fontsize=8)
        if self.loss:
            self.ax.plot(self.steps, self.loss, color="#4fc3f7", lw=1.2)
            self.ax.set_yscale("log")
        self.ax.grid(True, color=grid, lw=0.4, alpha=0.6)
        if self.psnr:
            self.ax2.plot(self.psnr_steps, self.psnr, color="#ffb74d", lw=1.2)
            self.ax2.set_ylabel("PSNR (dB)", color="#ffb74d", fontsize=8)
            self.ax2.set_visible(True)
        else:
            self.ax2.set_visible(False)
        self.draw_idle()
