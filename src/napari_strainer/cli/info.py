"""``strainer info`` and ``strainer convert``: describe a scan or an encoder; convert DICOM and
NIfTI keeping geometry."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import add_common, nonneg_int


def add_info_args(p: argparse.ArgumentParser) -> None:
    """The options of ``strainer info``."""
    p.add_argument("input", metavar="INPUT")
    p.add_argument("--series", help="series UID or number")
    p.add_argument("--volume", type=nonneg_int, default=None, help="volume of a 4D NIfTI")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_common(p)


def add_convert_args(p: argparse.ArgumentParser) -> None:
    """The options of ``strainer convert``."""
    p.add_argument("input", metavar="INPUT")
    p.add_argument("-o", "--output", required=True, metavar="OUTPUT")
    p.add_argument("--series", help="series UID or number")
    p.add_argument("--volume", type=nonneg_int, default=None, help="volume of a 4D NIfTI")
    p.add_argument("--overwrite", action="store_true")
    add_common(p)


def cmd_info(a) -> None:
    from ..io import describe

    if Path(a.input).suffix == ".safetensors":  # an encoder: its card
        from ..core.checkpoint import load_encoder
        from ..pretrain.cards import card, format_card

        c = card(load_encoder(a.input))
        print(json.dumps(c, indent=1) if a.json else f"encoder: {a.input}\n{format_card(c)}")
        return
    info = describe(a.input, series=a.series, volume=a.volume)
    if a.json:
        print(json.dumps(info, indent=1, default=str))
        return
    for k, v in info.items():
        if k == "series" and isinstance(v, list):
            print("series:")
            for s in v:
                print("  " + "  ".join(f"{kk}={vv}" for kk, vv in s.items()))
        elif k == "affine":
            print("affine (voxel -> RAS mm):")
            for row in v:
                print("  " + " ".join(f"{x:10.4f}" for x in row))
        else:
            print(f"{k}: {v}")


def cmd_convert(a) -> None:
    from ..io import convert
    from ..io.atomic import check_output

    check_output(a.output, overwrite=a.overwrite, protect=[a.input])
    written = convert(a.input, a.output, series=a.series, volume=a.volume,
                      overwrite=a.overwrite)
    if not a.quiet:
        print(f"wrote {written}")
