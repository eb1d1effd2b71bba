"""The ``strainer`` command: pretrain, fit, superres, denoise, fuse, batch, info, convert, demo.

Each verb's module gathers its options and calls the library (restorations go through
:mod:`napari_strainer.restore.plan`). Every user error ends with one line on stderr and exit
code 2; nothing is half written.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from .. import __version__
from ..errors import StrainerError
from .batch import add_batch_args, cmd_batch
from .common import PROG, Parser
from .demo import add_demo_args, cmd_demo
from .info import add_convert_args, add_info_args, cmd_convert, cmd_info
from .pretrain import add_pretrain_args, cmd_pretrain
from .restore import add_fuse_args, add_restore_args, cmd_restore

COMMANDS = {"pretrain": cmd_pretrain, "fit": cmd_restore, "superres": cmd_restore,
            "denoise": cmd_restore, "fuse": cmd_restore, "batch": cmd_batch, "info": cmd_info,
            "convert": cmd_convert, "demo": cmd_demo}


def build_parser() -> argparse.ArgumentParser:
    """The ``strainer`` argument parser (every verb, with its options)."""
    parser = Parser(prog=PROG, description="STRAINER implicit neural representations for "
                    "medical scans.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, parser_class=Parser)
    add_pretrain_args(sub.add_parser("pretrain", help="pretrain an encoder (STRAINER) or a "
                                 "meta-learned initialisation (Reptile) on scans"))
    for task, text in (("fit", "fit an INR to a scan"),
                       ("superres", "super-resolve a scan in-plane or through-plane"),
                       ("denoise", "denoise a scan")):
        add_restore_args(sub.add_parser(task, help=text), task)
    add_fuse_args(sub.add_parser("fuse", help="fuse thick-slice stacks (any orientation) into "
                                 "one isotropic volume"))
    p = sub.add_parser("batch", help="process every scan of a folder (resumable)")
    bsub = p.add_subparsers(dest="task", required=True, parser_class=Parser)
    for task in ("fit", "superres", "denoise"):
        add_batch_args(bsub.add_parser(task, help=f"{task} every scan of IN_DIR"), task)
    add_info_args(sub.add_parser("info", help="describe a scan, a folder of series, or an "
                                 "encoder (.safetensors: its card)"))
    add_convert_args(sub.add_parser("convert", help="convert DICOM <-> NIfTI keeping geometry"))
    add_demo_args(sub.add_parser("demo", help="the main job on the shipped sample data"))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``strainer`` console script."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error (already printed)
        return int(e.code or 0)
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        format=f"{PROG}: %(message)s")
    # Reader warnings (assumed geometry, replaced NaNs, ...) as one line each, no source line.
    warnings.showwarning = lambda message, *_a, **_k: print(f"{PROG}: warning: {message}",
                                                            file=sys.stderr)
    try:
        COMMANDS[args.verb](args)
    except StrainerError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0

