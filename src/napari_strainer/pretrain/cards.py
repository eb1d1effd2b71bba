"""Encoder cards: what an encoder was trained on, what it gains over SIREN, whether it suits a
scan.

An encoder's card is its ``info`` metadata (see :class:`~napari_strainer.core.Encoder`):
pretraining method (STRAINER encoder, Reptile whole network or Reptile encoder), modality,
intensity normalisation, slice size, number of training images, steps, final loss,
source file names (names only, never patient fields), creation date, package version and,
when measured (``strainer pretrain --evaluate``), its gain over SIREN on held-out slices.
:func:`card` reads it into a flat dictionary with ``"unknown"`` for whatever an older file
does not record; ``strainer info ENCODER.safetensors`` prints it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..core.checkpoint import Encoder, weights_sha256
from ..core.device import resolve_device
from ..core.fit import fit, warmup_lr
from ..core.head import WARMUP_STEPS, solve_head
from ..core.operators import Identity
from ..core.problems import ImageProblem
from ..core.siren import BatchedSiren
from ..errors import BadArgumentError, BadInputError
from ..io.intensity import Intensity, busy_slices, pick_slices
from ..io.scan import Scan
from .train import training_slices

UNKNOWN = "unknown"
# The image-producing defined terms of DICOM Modality (0008,0060), PS3.3 section C.7.3.1.1.1.
MODALITIES = {
    "BDUS": "bone densitometry (ultrasound)", "BI": "biomagnetic imaging",
    "BMD": "bone densitometry (X-ray)", "CR": "computed radiography",
    "CT": "computed tomography", "DG": "diaphanography", "DX": "digital radiography",
    "ES": "endoscopy", "GM": "general microscopy", "IO": "intra-oral radiography",
    "IVOCT": "intravascular optical coherence tomography", "IVUS": "intravascular ultrasound",
    "MG": "mammography", "MR": "magnetic resonance", "NM": "nuclear medicine",
    "OCT": "optical coherence tomography", "OP": "ophthalmic photography",
    "OPT": "ophthalmic tomography", "OT": "other", "PA": "photoacoustic",
    "PT": "positron emission tomography", "PX": "panoramic X-ray", "RF": "radio fluoroscopy",
    "RG": "radiographic imaging", "RTIMAGE": "radiotherapy image", "SM": "slide microscopy",
    "TG": "thermography", "US": "ultrasound", "XA": "X-ray angiography",
    "XC": "external-camera photography",
}
EVAL_STEPS = (10, 50, 100)
EVAL_SLICES = 3


class ModalityWarning(UserWarning):
    """A scan is restored with an encoder trained on another modality."""


def check_modality(text: str) -> str:
    """``text`` as a DICOM modality code (upper case), or :class:`BadArgumentError`."""
    code = str(text).strip().upper()
    if code not in MODALITIES:
        raise BadArgumentError(f"--modality: unknown DICOM modality {text!r}; use one of "
                               f"{', '.join(sorted(MODALITIES))}")
    return code


def scans_modality(scans: Iterable[Scan]) -> str:
    """The modality a set of training scans stands for: their DICOM modality (``"CT+MR"`` for
    a mixture), or ``"unknown"`` when none says (NIfTI and plain images read as ``OT``)."""
    codes = sorted({s.modality.upper() for s in scans} - {"", "OT", UNKNOWN.upper()})
    return "+".join(codes) if codes else UNKNOWN


def encoder_modalities(encoder: Encoder) -> set[str]:
    """The modality codes an encoder was trained on (empty when unknown or ``OT``)."""
    text = str((encoder.info.get("trained_on") or {}).get("modality") or "")
    return {m for m in text.upper().split("+") if m in MODALITIES and m != "OT"}


def modality_warning(encoder: Encoder | None, scan: Scan) -> str | None:
    """One line when ``scan``'s modality differs from the one ``encoder`` was trained on;
    ``None`` when they agree, when either is unknown, or for the SIREN baseline."""
    enc = encoder_modalities(encoder) if encoder is not None else set()
    mod = scan.modality.upper()
    if not enc or mod in ("", "OT", UNKNOWN.upper()) or mod in enc:
        return None
    name = scan.source.name if scan.source is not None else "the scan"
    return (f"{name} is {mod} but the encoder was trained on {'+'.join(sorted(enc))}; "
            f"use --encoder none (SIREN) or an encoder pretrained on {mod} "
            f"(strainer pretrain --modality {mod})")


def warn_modality(encoder: Encoder | None, scan: Scan) -> str | None:
    """Issue :func:`modality_warning` as a :class:`ModalityWarning` (the CLI prints it as one
    line, napari as a notification); returns the message."""
    message = modality_warning(encoder, scan)
    if message is not None:
        warnings.warn(message, ModalityWarning, stacklevel=3)
    return message


def _normalization_text(norm: Any) -> str:
    if not isinstance(norm, dict):
        return UNKNOWN
    text = str(norm.get("method", UNKNOWN))
    if norm.get("method") == "robust_percentile":
        text = (f"per-scan percentiles p{norm.get('low_percentile')}-p"
                f"{norm.get('high_percentile')} -> [0, 1]")
    elif norm.get("method") == "fixed_window":
        lo, hi = norm.get("window", [0.0, 0.0])
        text = f"fixed window {lo:g} to {hi:g} {norm.get('units', '')} -> [0, 1]"
    if isinstance(norm.get("CT"), dict):  # the rule since CT got its Hounsfield window
        text += f"; CT: {_normalization_text(norm['CT'])}"
    return text


def card(encoder: Encoder) -> dict[str, Any]:
    """The encoder's card as plain JSON: every field present, ``"unknown"`` where the file
    does not record it (encoders saved before cards existed)."""
    info = encoder.info
    trained = info.get("trained_on") if isinstance(info.get("trained_on"), dict) else {}
    files = trained.get("files") or trained.get("sources")
    c = encoder.config
    evaluation = info.get("evaluation")
    return {
        "method": info.get("method", "strainer"),  # files before Reptile are all STRAINER
        "modality": trained.get("modality") or UNKNOWN,
        "normalization": _normalization_text(info.get("normalization")),
        "slice_size": trained.get("shape") or UNKNOWN,
        "images": trained.get("images") or UNKNOWN,
        "files": [Path(str(f)).name for f in files] if files else UNKNOWN,
        "steps": info.get("steps", UNKNOWN),
        "complete": info.get("complete", UNKNOWN),
        "final_loss": info.get("final_loss") if info.get("final_loss") is not None else UNKNOWN,
        "lr": info.get("lr", UNKNOWN),
        "seed": info.get("seed", UNKNOWN),
        "created": info.get("created", UNKNOWN),
        "package_version": info.get("package_version", UNKNOWN),
        "architecture": c.to_dict(),
        "weights_sha256": weights_sha256(encoder),
        "evaluation": evaluation if isinstance(evaluation, dict) else UNKNOWN,
        "notes": info.get("notes", ""),
    }


METHOD_TEXT = {"strainer": "strainer (a shared encoder; a fit's head starts afresh)",
               "reptile": "reptile (a whole network meta-learned by Reptile, head included)",
               "reptile-encoder": "reptile-encoder (a shared encoder meta-learned by Reptile; "
                                  "a fit's head starts afresh)"}


def _gain_text(ev: Any, method: str = "strainer") -> str:
    if not isinstance(ev, dict) or not ev.get("gain_db"):
        return "not measured (strainer pretrain --evaluate)"
    steps = ", ".join(f"{g:+.1f} dB at step {s}" for s, g in zip(ev["steps"], ev["gain_db"]))
    size = "x".join(str(v) for v in ev.get("shape", []))
    text = f"{steps} ({ev.get('held_out')} held-out slices{', ' + size if size else ''})"
    own, solved = (("its own head", "a solved head") if method == "reptile" else
                   ("random head (the paper's)", "the solved head (the default for fitting)"))
    if ev.get("gain_db_solved"):  # cards from before the solved head have the random one only
        text = (f"{text}, {own}; with {solved}: " + ", ".join(
            f"{g:+.1f} dB at step {s}" for s, g in zip(ev["steps"], ev["gain_db_solved"])))
    return text


def format_card(c: dict[str, Any]) -> str:
    """A :func:`card` as readable lines (``strainer info ENCODER``)."""
    a = c["architecture"]
    size = ("x".join(str(v) for v in c["slice_size"]) if isinstance(c["slice_size"], list)
            else UNKNOWN)
    files = ", ".join(c["files"]) if isinstance(c["files"], list) else UNKNOWN
    loss = f"{c['final_loss']:.3g}" if isinstance(c["final_loss"], float) else c["final_loss"]
    state = "" if c["complete"] in (True, UNKNOWN) else " (stopped early)"
    whole = c["method"] == "reptile"
    lines = [
        f"method: {METHOD_TEXT.get(c['method'], c['method'])}",
        f"modality: {c['modality']}",
        f"trained on: {c['images']} slices of {size} from {files}",
        f"intensity normalisation: {c['normalization']}",
        (f"training: {c['steps']} steps{state}, final loss {loss}, lr {c['lr']}, "
         f"seed {c['seed']}"),
        (f"architecture: {a['layers']} layers of width {a['width']}, "
         + ("all stored (head included)" if whole else
            f"the first {a['shared_layers']} shared (the encoder)")
         + f", omega {a['omega_first']:g}"),
        f"gain over SIREN: {_gain_text(c['evaluation'], c['method'])}",
        f"created: {c['created']} by napari-strainer {c['package_version']}",
        f"weights sha256: {c['weights_sha256']}",
    ]
    if c.get("notes"):
        lines.append(f"notes: {c['notes']}")
    return "\n".join(lines)


def summary(encoder: Encoder) -> str:
    """The card in one short line (napari's Restore dock)."""
    c = card(encoder)
    size = ("x".join(str(v) for v in c["slice_size"]) if isinstance(c["slice_size"], list)
            else "? x ?")
    ev = c["evaluation"]
    gain = (f", {ev['gain_db'][-1]:+.1f} dB over SIREN at step {ev['steps'][-1]}"
            if isinstance(ev, dict) and ev.get("gain_db") else "")
    return (f"{c['modality']} encoder: {c['images']} slices of {size}, {c['steps']} steps "
            f"({c['method']})"
            f"{'' if c['complete'] in (True, UNKNOWN) else ' (stopped early)'}{gain}")


# ----------------------------------------------------------------------------- evaluation
def _resized(img: np.ndarray, size: int | None) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(img, np.float32))[None, None]
    if size is not None and tuple(t.shape[-2:]) != (size, size):
        t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False)
    return t[0, 0]


def evaluation_split(scans: Sequence[Scan], *, size: int | None = None, max_slices: int = 10,
                     count: int = EVAL_SLICES) -> tuple[torch.Tensor, torch.Tensor]:
    """Training slices as :func:`~napari_strainer.pretrain.train.training_slices` picks them, and
    ``count`` held-out slices for :func:`measure_gain`.

    Held-out slices are non-empty slices that were not picked for training, evenly spaced;
    when the scans have fewer than ``count`` of them (single-slice CTs, say), evenly spaced
    training slices are held out instead, keeping at least one to train on.

    Returns ``(train [N, H, W], held_out [M, H, W])`` float32.
    """


    train = list(training_slices(scans, size=size, max_slices=max_slices))
    spare = []
    for scan in scans:
        norm = Intensity.for_scan(scan).forward(np.nan_to_num(scan.data))
        picked = set(pick_slices(norm, max_slices))
        spare += [_resized(norm[z], size) for z in busy_slices(norm) if z not in picked]
    if len(train) + len(spare) < 2:
        raise BadInputError("--evaluate needs at least two non-empty slices (one to train on, "
                            "one to hold out)")
    if {tuple(t.shape) for t in spare} - {tuple(train[0].shape)}:
        raise BadArgumentError("held-out slices differ in size from the training slices; "
                               "pass --size N")
    held = [spare[int(i)] for i in np.unique(np.linspace(0, len(spare) - 1,
                                                         min(count, len(spare))).round())
            ] if spare else []
    missing = min(count - len(held), len(train) - 1)
    if missing > 0:
        n = len(train)  # `missing` distinct, evenly spaced indices (n >= missing + 1)
        take = {k * n // missing + n // missing // 2 for k in range(missing)}
        held += [train[i] for i in sorted(take)]
        train = [t for i, t in enumerate(train) if i not in take]
    return torch.stack(train), torch.stack(held)


def measure_gain(encoder: Encoder, images: torch.Tensor, *, steps: Sequence[int] = EVAL_STEPS,
                 lr: float = 1e-4, seed: int = 0, device: str = "auto") -> dict[str, Any]:
    """PSNR of fits of ``images`` ``[M, H, W]`` (normalised, held out from training) started
    from ``encoder`` and from SIREN's random initialisation, same seed, same head
    initialisation, every layer trained (the paper's protocol), at each of ``steps``; and
    from ``encoder`` with the head solved on its features (:func:`~.core.head.solve_head`,
    what fitting from a STRAINER encoder does by default). From a whole network (Reptile)
    the first fit starts with its own head, not a random one.

    Returns the card's ``evaluation``: ``held_out, shape, steps, psnr_strainer, psnr_siren,
    gain_db, psnr_strainer_solved, gain_db_solved`` (PSNR of the current iterate on the
    [0, 1] range, mean over the slices).
    """


    dev = resolve_device(device)
    m, h, w = images.shape
    target = images.reshape(m, h * w, 1).to(dev)
    last = max(steps)
    curves = {}
    for name, init in (("strainer", encoder), ("strainer_solved", encoder), ("siren", None)):
        torch.manual_seed(seed)
        net = BatchedSiren(encoder.config, batch=m, seed=seed).to(dev)
        if init is not None:
            net.load_encoder([(a.to(dev), b.to(dev)) for a, b in init.weights])
        lr_at = None
        if name == "strainer_solved":  # as fitting does: solved head, then a warm-up
            solve_head(net, target, Identity((h, w)))
            lr_at = warmup_lr(lr, WARMUP_STEPS)
        hist = fit(net, ImageProblem(target, Identity((h, w)), reference=target), steps=last, lr=lr,
                   keep_best=False, log_every=1, seed=seed, lr_at=lr_at).history
        at = dict(zip(hist["iterations"], hist["psnr"]))
        curves[name] = [round(float(at[s]), 2) for s in steps]
    return {"held_out": m, "shape": [h, w], "steps": list(steps),
            "psnr_strainer": curves["strainer"], "psnr_siren": curves["siren"],
            "gain_db": [round(a - b, 2) for a, b in zip(curves["strainer"], curves["siren"])],
            "psnr_strainer_solved": curves["strainer_solved"],
            "gain_db_solved": [round(a - b, 2) for a, b in zip(curves["strainer_solved"],
                                                                curves["siren"])],
            "protocol": "fit from the encoder vs SIREN init, same seed, all layers trained, "
                        f"Adam lr {lr:g}, PSNR of the current iterate on [0, 1]"}
