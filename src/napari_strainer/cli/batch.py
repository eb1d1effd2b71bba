"""``strainer batch TASK IN_DIR OUT_DIR``: every scan of a folder (resumable; under torchrun
each rank takes its share); see :mod:`napari_strainer.batch`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .restore import add_restore_args, options_from_args

log = logging.getLogger("napari_strainer.batch")


def add_batch_args(p: argparse.ArgumentParser, task: str) -> None:
    """The options of ``strainer batch TASK``."""
    p.add_argument("in_dir", metavar="IN_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--format", choices=("nifti", "dicom"), default="nifti")
    if task == "denoise":
        p.add_argument("--spread", choices=("scans", "slabs"), default="scans",
                       help="under torchrun: scans (default: each rank takes its share of the "
                            "scans) or slabs (all ranks denoise each scan together, each "
                            "racing its share of the slabs; a rerun resumes finished slabs)")
    add_restore_args(p, task, batch=True)


def cmd_batch(a) -> None:
    """``strainer batch``: process ``a.in_dir`` into ``a.out_dir``; exit status 1 when a scan
    failed.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) it joins the process group and takes its share.
    """
    from ..batch import TaskOptions, datalist, rank_and_world, run_items
    from ..pretrain.distributed import finish_distributed, init_distributed, local_device

    options = options_from_args(a, TaskOptions, format=a.format,
                                spread=getattr(a, "spread", "scans"))
    started = init_distributed()
    try:
        options.device = local_device(options.device)
        items = datalist(a.in_dir, a.out_dir, a.format)
        if a.series is not None:
            for it in items:
                if Path(it["image"]).is_dir() and it["series"] is None:
                    it["series"] = a.series
        summary = run_items(items, options, a.out_dir, overwrite=a.overwrite, quiet=a.quiet)
        rank = rank_and_world()[0]
    finally:
        if started:
            finish_distributed()
    if not a.quiet and rank == 0:
        print(summary.text())
    elif summary.failed and rank == 0:
        for r in summary.failed:
            log.error("FAILED %s: %s", r.name, r.error)
    if summary.failed:
        raise SystemExit(1)
