"""``strainer demo``: the main job on the shipped sample data."""

from __future__ import annotations

import argparse

from .common import add_common, positive_int


def add_demo_args(p: argparse.ArgumentParser) -> None:
    """The options of ``strainer demo``."""
    p.add_argument("-o", "--output", default="strainer-demo", metavar="OUTDIR")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="steps of every INR run (default: 200 per 2D run, the volume task's "
                        "default for the through-plane run)")
    p.add_argument("--pretrain-steps", type=positive_int, default=None)
    add_common(p)


def cmd_demo(a) -> None:
    from ..demo import run_demo

    run_demo(a.output, steps=a.steps, pretrain_steps=a.pretrain_steps, device=a.device,
             seed=a.seed, quiet=a.quiet)
