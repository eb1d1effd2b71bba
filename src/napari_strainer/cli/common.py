"""What every ``strainer`` verb shares: the parser class, argument types, the common flags and
the progress bar."""

from __future__ import annotations

import argparse
import sys

PROG = "strainer"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def number(kind: type, ok, expected: str):
    """An argparse ``type``: ``kind(text)`` accepted when ``ok(value)``, otherwise one line
    ``expected <expected>, got '<text>'``."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            v = None
        if v is None or not ok(v):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return v
    return parse


positive_int = number(int, lambda v: v >= 1, "a positive integer")
nonneg_int = number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = number(float, lambda v: v > 0, "a positive number")
fraction = number(float, lambda v: 0 < v <= 0.5, "a fraction in (0, 0.5]")
mm = number(float, lambda v: v > 0, "a positive length in mm")
weight = number(float, lambda v: v >= 0, "a weight >= 0")


def add_common(p: argparse.ArgumentParser) -> None:
    """``--device``, ``--seed``, ``--quiet``: every verb takes them."""
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0, help="random seed (CPU results reproducible)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summaries")


class Bar:
    """A tqdm progress callback (silent when not a TTY or --quiet)."""

    def __init__(self, desc: str, quiet: bool):
        from tqdm import tqdm

        self.tqdm = tqdm(desc=desc, unit="step", disable=quiet or not sys.stderr.isatty(),
                         dynamic_ncols=True)

    def __call__(self, p) -> None:
        self.tqdm.total = p.total
        self.tqdm.n = p.step
        post = {"loss": f"{p.loss:.2e}"}
        if p.psnr is not None:
            post["psnr"] = f"{p.psnr:.2f}"
        self.tqdm.set_postfix(post, refresh=True)

    def close(self) -> None:
        self.tqdm.close()
