"""Where encoders come from: the shipped one, a file, or a short pretraining on the scan."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..core.checkpoint import Encoder, load_encoder
from ..core.fit import Progress
from ..errors import BadArgumentError, CheckpointError
from ..io.intensity import Intensity, pick_slices
from ..io.scan import Scan
from .train import pretrain

DEFAULT_ENCODER = Path(__file__).parent.parent / "encoders" / "mri_default.safetensors"
SELF_STEPS = 300  # --encoder self: pretraining steps on the scan's own slices
SELF_MIN_SLICES = 3


def get_encoder(encoder: str | Path | Encoder | None) -> Encoder | None:
    """``"default"`` is the shipped MRI encoder, ``"none"``/None the SIREN baseline
    (``"self"`` is resolved by :func:`restore`, see :func:`self_encoder`)."""
    if encoder is None or isinstance(encoder, Encoder):
        return encoder
    if str(encoder).lower() == "none":
        return None
    if str(encoder).lower() == "default":
        if not DEFAULT_ENCODER.is_file():
            raise CheckpointError(f"{DEFAULT_ENCODER}: the shipped encoder is missing from "
                                  "this installation")
        return load_encoder(DEFAULT_ENCODER)
    return load_encoder(encoder)


def self_encoder(scan: Scan, *, steps: int = SELF_STEPS, device: str = "auto", seed: int = 0,
                 callback: Callable[[Progress], None] | None = None, cancel=None) -> Encoder:
    """``--encoder self``: a STRAINER encoder pretrained for ``steps`` on up to 10 evenly
    spaced non-empty slices of ``scan`` itself (in-domain by construction; the paper's
    architecture). Needs :data:`SELF_MIN_SLICES` non-empty slices."""
    norm = Intensity.for_scan(scan).forward(np.nan_to_num(scan.data))  # as restore will
    picked = pick_slices(norm, 10)
    if len(picked) < SELF_MIN_SLICES:
        raise BadArgumentError(
            f"{scan.source or 'the scan'}: --encoder self pretrains on the scan's own slices "
            f"and needs at least {SELF_MIN_SLICES} non-empty ones; it has {len(picked)}")
    with tempfile.TemporaryDirectory() as tmp:
        return pretrain(torch.from_numpy(norm[picked]), Path(tmp) / "self.safetensors",
                        steps=steps, device=device, seed=seed, callback=callback,
                        cancel=cancel, info={"files": ["the restored scan itself"],
                                             "modality": scan.modality})

