"""Thin adapters of the bundle: everything lives in the installed package.

The configs call :mod:`napari_strainer.bundle` directly (so the bundle runs from any working
directory without ``PYTHONPATH``); these names are re-exported for scripts that expect the
model-zoo layout (``from scripts import ...`` with the bundle root on ``sys.path``).
"""

from napari_strainer.batch import datalist, list_scans, run_items, shard
from napari_strainer.bundle import (
    ScanReader,
    StrainerNet,
    bundle_root,
    export_checkpoint,
    load_item,
    run_inference,
    run_training,
    to_scan,
)
from napari_strainer.pretrain.distributed import pretrain_distributed

__all__ = [
    "ScanReader", "StrainerNet", "bundle_root", "datalist", "export_checkpoint", "list_scans",
    "load_item", "pretrain_distributed", "run_inference", "run_items", "run_training", "shard",
    "to_scan",
]
