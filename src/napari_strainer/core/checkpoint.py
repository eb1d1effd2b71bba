"""Encoder checkpoints and resumable training state, as safetensors + JSON metadata.

No pickle anywhere: tensors go through safetensors, everything else through JSON in the
safetensors header. A SHA-256 of the tensor bytes in the metadata detects tampering.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import BadArgumentError, CheckpointError
from .siren import SirenConfig

ENCODER_FORMAT = "napari-strainer-encoder"
STATE_FORMAT = "napari-strainer-training-state"
FORMAT_VERSION = 1


@dataclass
class Encoder:
    """A pretrained initialisation: the first layers of a SIREN and what they were trained on.

    A STRAINER encoder (or one meta-learned by Reptile, ``"reptile-encoder"``) holds the
    shared sine layers (the head starts afresh at test time); a Reptile initialisation
    (``info["method"] == "reptile"``) holds the whole network, head included, and every layer
    of a fit starts from it.

    Args:
        config: the full architecture.
        weights: ``config.shared_layers`` pairs ``(weight [in, out], bias [out])``, or
            ``config.layers`` pairs for a whole network.
        info: provenance, the encoder's card: ``method``, ``normalization``, ``trained_on``
            (``images``, ``shape``, ``files``, ``modality``), ``steps``, ``final_loss``,
            ``created``, ``package_version``, ``evaluation`` (see
            :mod:`napari_strainer.pretrain.cards`).
    """

    config: SirenConfig
    weights: list[tuple[torch.Tensor, torch.Tensor]]
    info: dict = field(default_factory=dict)

    @property
    def whole(self) -> bool:
        """Whether the weights are the whole network (head included), not the encoder only."""
        return len(self.weights) == self.config.layers


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _atomic_save(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().clone() for k, v in tensors.items()}, tmp, meta)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; an encoder is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read(path: Path, kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such {kind} file")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or "
                              f"corrupt: {str(e).splitlines()[0][:120]})") from None
    try:
        meta = {k: json.loads(v) for k, v in raw.items()}
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: metadata is not valid JSON") from None
    return tensors, meta


def _check_header(path: Path, meta: dict, tensors: dict, fmt: str) -> None:
    if meta.get("format") != fmt:
        raise CheckpointError(f"{path}: not a {fmt} file (format={meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported format version {meta.get('format_version')}"
                              f" (this version reads {FORMAT_VERSION})")
    if meta.get("sha256") != _digest(tensors):
        raise CheckpointError(f"{path}: weights do not match their checksum "
                              "(file modified or corrupted)")


def _config(path: Path, meta: dict) -> SirenConfig:
    try:
        return SirenConfig(**meta["config"])
    except (KeyError, TypeError, ValueError, BadArgumentError) as e:  # missing/wrong/invalid
        raise CheckpointError(f"{path}: invalid architecture in metadata ({e})") from None


def _tensors(encoder: Encoder) -> dict[str, torch.Tensor]:
    tensors = {}
    for i, (w, b) in enumerate(encoder.weights):
        tensors[f"encoder.{i}.weight"] = w
        tensors[f"encoder.{i}.bias"] = b
    return tensors


def weights_sha256(encoder: Encoder) -> str:
    """The SHA-256 of an encoder's weights (names and bytes), as stored in its file. It covers
    the weights only, so editing the card (``info``) keeps it."""
    return _digest(_tensors(encoder))


def save_encoder(encoder: Encoder, path: str | Path) -> Path:
    """Write ``encoder`` atomically to ``path`` (safetensors).

    ``encoder.info`` gets ``created`` (UTC date and time) and ``package_version`` when it
    has none, so that every saved encoder says when and by which version it was made.
    """
    from .. import __version__

    path = Path(path)
    encoder.info.setdefault("created", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    encoder.info.setdefault("package_version", __version__)
    tensors = _tensors(encoder)
    meta = {"format": ENCODER_FORMAT, "format_version": FORMAT_VERSION,
            "config": encoder.config.to_dict(), "info": encoder.info,
            "package_version": __version__, "sha256": _digest(tensors)}
    _atomic_save(tensors, {k: json.dumps(v) for k, v in meta.items()}, path)
    return path


def load_encoder(path: str | Path) -> Encoder:
    """Read and validate an encoder; any problem raises :class:`CheckpointError` (one line)."""
    path = Path(path)
    tensors, meta = _read(path, "encoder")
    _check_header(path, meta, tensors, ENCODER_FORMAT)
    config = _config(path, meta)
    stored = config.layers if f"encoder.{config.layers - 1}.weight" in tensors \
        else config.shared_layers  # a whole network (Reptile) or the shared encoder
    weights = []
    for i, (fi, fo) in enumerate(config.dims()[:stored]):
        try:
            w, b = tensors.pop(f"encoder.{i}.weight"), tensors.pop(f"encoder.{i}.bias")
        except KeyError:
            raise CheckpointError(f"{path}: layer {i} of the encoder is missing") from None
        if tuple(w.shape) != (fi, fo) or tuple(b.shape) != (fo,):
            raise CheckpointError(f"{path}: layer {i} has shape {tuple(w.shape)}, the "
                                  f"architecture in its metadata needs {(fi, fo)}")
        if not (torch.isfinite(w).all() and torch.isfinite(b).all()):
            raise CheckpointError(f"{path}: layer {i} holds NaN or infinite weights")
        weights.append((w.float(), b.float()))
    if tensors:
        raise CheckpointError(f"{path}: unexpected tensors {sorted(tensors)[:3]}")
    info = meta.get("info") if isinstance(meta.get("info"), dict) else {}
    if isinstance(meta.get("package_version"), str):  # files older than the card
        info.setdefault("package_version", meta["package_version"])
    return Encoder(config, weights, info)


def save_state(path: str | Path, net: torch.nn.Module,
               optimizer: torch.optim.Optimizer | None, step: int, run: dict) -> Path:
    """Save everything needed to resume training exactly: weights, Adam state (None: a run
    without a persistent optimiser, e.g. Reptile's outer loop), step, and ``run`` (the
    arguments that must match on resume)."""
    path = Path(path)
    tensors = {f"net.{k}": v for k, v in net.state_dict().items()}
    opt = {"state": {}, "param_groups": []} if optimizer is None else optimizer.state_dict()
    for pid, st in opt["state"].items():
        for k, v in st.items():
            tensors[f"adam.{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    meta = {"format": STATE_FORMAT, "format_version": FORMAT_VERSION, "step": step, "run": run,
            "param_groups": opt["param_groups"], "sha256": _digest(tensors)}
    _atomic_save(tensors, {k: json.dumps(v) for k, v in meta.items()}, path)
    return path


def load_state(path: str | Path, net: torch.nn.Module,
               optimizer: torch.optim.Optimizer | None, run: dict) -> int:
    """Restore a :func:`save_state` file into ``net`` and ``optimizer``; returns the step."""
    path = Path(path)
    tensors, meta = _read(path, "training state")
    _check_header(path, meta, tensors, STATE_FORMAT)
    if meta.get("run") != json.loads(json.dumps(run)):
        diff = sorted(k for k in set(run) | set(meta.get("run", {}))
                      if meta.get("run", {}).get(k) != json.loads(json.dumps(run)).get(k))
        raise CheckpointError(f"{path}: was saved for a different run (differs in: "
                              f"{', '.join(diff)}); delete it or repeat the original arguments")
    net_sd = {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}
    try:
        net.load_state_dict(net_sd)
    except RuntimeError:
        raise CheckpointError(f"{path}: weights do not fit this network") from None
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("adam."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    if optimizer is not None:
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return int(meta["step"])
