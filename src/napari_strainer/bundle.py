"""MONAI adapters for the bundle in ``monai_bundle/``: a reader for ``LoadImage(d)``, the
inference and training entry points the configs call, and a plain ``nn.Module`` view of one
STRAINER INR for ``verify_net_in_out`` and ``ckpt_export``.

The configs call these functions directly (the package is installed), so the bundle runs from
any working directory without ``PYTHONPATH``; ``monai_bundle/scripts`` only re-exports them.
Needs ``monai`` (``pip install napari-strainer[bundle]``).
"""

from __future__ import annotations

import ast
import inspect
import logging
import os
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .batch import BatchSummary, TaskOptions, datalist, list_scans, run_items
from .core.siren import SirenConfig
from .errors import BadArgumentError, BadInputError, StrainerError
from .io.scan import Scan

log = logging.getLogger(__name__)

try:
    from monai.data import ImageReader
except ImportError:  # pragma: no cover - the bundle needs monai; the rest of the package not
    ImageReader = object  # type: ignore[misc,assignment]


# ----------------------------------------------------------------------------- bundle root
def bundle_root() -> str:
    """The bundle folder (the parent of ``configs/``) of the config being run.

    Found from the running ``ConfigWorkflow`` (``python -m monai.bundle run``, also under
    torchrun), else from ``--config_file`` on the command line (``verify_net_in_out``,
    ``ckpt_export``), else ``monai_bundle`` next to the installed sources, else the working
    directory. Override with ``--bundle_root DIR``.
    """
    for frame in inspect.stack(0):
        owner = frame.frame.f_locals.get("self")
        # instance __dict__ only: MONAI workflows and parsers answer unknown attributes
        root = getattr(owner, "__dict__", {}).get("config_root_path")
        if root is not None:
            root = Path(root).resolve()
            return str(root.parent if root.name == "configs" else root)
    argv = sys.argv
    for i, arg in enumerate(argv):
        value = None
        if arg == "--config_file" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--config_file="):
            value = arg.split("=", 1)[1]
        if value:
            try:
                first = ast.literal_eval(value) if value.lstrip().startswith("[") else value
            except (ValueError, SyntaxError):
                first = value
            first = first[0] if isinstance(first, (list, tuple)) else first
            root = Path(first).resolve().parent
            return str(root.parent if root.name == "configs" else root)
    here = Path(__file__).resolve().parents[2] / "monai_bundle"
    return str(here if here.is_dir() else Path.cwd())


def bundle_encoder(root: str | os.PathLike) -> str:
    """The bundle's encoder ``models/model.safetensors``, or the package's shipped one
    (``"default"``) while the bundle has none."""
    path = Path(root) / "models" / "model.safetensors"
    return str(path) if path.is_file() else "default"


# ----------------------------------------------------------------------------- data path
_KEPT: dict[str, dict] = {}


def _keep(meta: dict, dtype: np.dtype) -> str:
    key = uuid.uuid4().hex
    if len(_KEPT) > 64:  # never grows without bound (entries are normally taken at once)
        _KEPT.pop(next(iter(_KEPT)))
    _KEPT[key] = {"meta": meta, "dtype": np.dtype(dtype)}
    return key


class ScanReader(ImageReader):
    """A MONAI ``ImageReader`` over :func:`napari_strainer.io.read_scan`: NIfTI, DICOM files
    and series folders (enhanced multi-frame too), PNG/TIFF.

    The array is ``(slice, row, column)`` and the affine maps that index to RAS+ mm, so the
    ``MetaTensor`` geometry is the scan's. The reader's own metadata (DICOM template, NIfTI
    header) is kept aside under the key ``meta["strainer_meta_key"]`` (MONAI's metadata takes
    only plain values) so that :func:`to_scan` can hand the image back to the writers.

    Args:
        series: series UID or number for a folder that holds several series.

    Example:
        >>> from monai.transforms import LoadImaged
        >>> load = LoadImaged("image", reader=ScanReader(), image_only=True, dtype=None)
    """

    def __init__(self, series: str | int | None = None):
        self.series = series

    def verify_suffix(self, filename) -> bool:
        return True  # read_scan recognises its inputs by content, folders included

    def read(self, data, **kwargs):
        from .io import read_scan

        paths = [data] if isinstance(data, (str, os.PathLike)) else list(data)
        if len(paths) != 1:
            raise BadInputError(f"ScanReader reads one scan at a time, got {len(paths)} paths")
        return read_scan(paths[0], series=self.series)

    def get_data(self, img: Scan) -> tuple[np.ndarray, dict]:
        meta = {"affine": img.affine.copy(), "original_affine": img.affine.copy(),
                "spatial_shape": np.asarray(img.shape), "original_channel_dim": "no_channel",
                "space": "RAS", "strainer_meta_key": _keep(img.meta, img.data.dtype)}
        return img.data, meta


def to_scan(image) -> Scan:
    """A ``MetaTensor`` loaded with :class:`ScanReader` (channel first or not) as a Scan."""
    data = np.asarray(image.array if hasattr(image, "array") else image)
    if data.ndim == 4:
        if data.shape[0] != 1:
            raise BadInputError(f"expected one channel, got {data.shape[0]}")
        data = data[0]
    meta = getattr(image, "meta", {})
    affine = meta.get("affine", np.eye(4))
    affine = affine.numpy() if torch.is_tensor(affine) else np.asarray(affine)
    src = meta.get("filename_or_obj")
    kept = _KEPT.pop(str(meta.get("strainer_meta_key")), {})
    dtype = kept.get("dtype")
    if dtype is not None and data.dtype != dtype and np.can_cast(dtype, data.dtype) \
            and np.array_equal(data.astype(dtype), data):
        data = data.astype(dtype)  # torch has no uint16: MONAI widened it, losslessly
    return Scan(data, affine, dict(kept.get("meta", {})), Path(src) if src else None)


def load_item(item: dict) -> Scan:
    """Load a datalist entry through MONAI: ``LoadImaged`` with :class:`ScanReader` (native
    dtype) and ``EnsureChannelFirstd``; errors come back as the package's one-line errors."""
    from monai.transforms import EnsureChannelFirstd

    try:
        # the reader is passed at call time: no fall-back to MONAI's other readers
        data = _loader()({"image": item["image"]}, reader=ScanReader(item.get("series")))
        return to_scan(EnsureChannelFirstd("image", channel_dim="no_channel")(data)["image"])
    except Exception as e:  # MONAI wraps errors: unwrap ours
        cause: BaseException | None = e
        while cause is not None:
            if isinstance(cause, StrainerError):
                raise cause from None
            cause = cause.__cause__ or cause.__context__
        raise


_LOADER = None


def _loader():
    global _LOADER
    if _LOADER is None:
        from monai.transforms import LoadImaged

        _LOADER = LoadImaged("image", image_only=True, dtype=None)
    return _LOADER


# ----------------------------------------------------------------------------- entry points
def _flag(value) -> bool:
    """A command-line boolean: ``fire`` passes ``--x false`` as the string 'false'."""
    if isinstance(value, str):
        if value.strip().lower() in ("false", "0", "no", "off", ""):
            return False
        if value.strip().lower() in ("true", "1", "yes", "on"):
            return True
        raise BadArgumentError(f"expected true or false, got {value!r}")
    return bool(value)


def run_inference(dataset_dir: str, output_dir: str, *, task: str = "fit",
                  encoder: str = "default", init: str = "auto", holdout: float = 0.1,
                  head: str = "solved", steps: int | None = None, lr: float = 1e-4,
                  scale: int | None = None, slice_scale: int | None = None,
                  slice_profile: str = "box", slice_thickness: float | None = None,
                  slice_axis: int | None = None, prior: str = "auto",
                  freeze: int | None = None, sigma="auto", noise: str = "auto", coils: int = 1,
                  mode: str = "auto", slab_voxels: int | None = None, spread: str = "scans",
                  device: str = "auto",
                  seed: int = 0, log_every: int = 10, batch_size: int | None = None,
                  format: str = "nifti", series=None, overwrite: bool = False,
                  quiet: bool = False, items: Sequence[dict] | None = None,
                  fail_on_error: bool = True) -> BatchSummary:
    """Apply ``task`` to every scan of ``dataset_dir`` (this rank's share under torchrun),
    writing ``output_dir``; see :mod:`napari_strainer.batch` for skipping and manifests and
    :class:`~napari_strainer.batch.TaskOptions` for the parameters.

    ``scale`` (in-plane) defaults to 2, or to 1 with ``slice_scale`` (through-plane
    super-resolution of 3D scans, a 3D SIREN that uses no encoder: the bundle's own
    ``models/model.safetensors`` is then left aside; any other encoder file is refused).
    ``slice_axis`` and ``prior`` are ``strainer superres``'s ``--slice-axis`` and ``--prior``.
    ``mode="volume"`` (``denoise``) is the same for volume denoising of 3D scans; ``"auto"``
    (the default) denoises by the race of denoisers (:mod:`napari_strainer.restore.race`),
    ``"slices"`` with the encoder, slice by slice. ``noise``: ``auto``, ``rician`` or
    ``gaussian``; ``coils``: non-central chi noise of that many coils (1: Rician).
    ``spread="slabs"`` (denoising race, under torchrun): every rank works on
    every scan, racing its share of the slabs (``slab_voxels``, default 12 million, sets
    their size); a rerun resumes finished slabs.

    Exits (``SystemExit``, status 1) naming the failed scans at the end when
    ``fail_on_error``, so ``python -m monai.bundle run`` (and torchrun) exit non-zero, after
    every other scan was processed.
    """
    from .pretrain.distributed import local_device

    overwrite, quiet = _flag(overwrite), _flag(quiet)
    if scale is None:
        scale = 1 if slice_scale is not None else 2
    volume = slice_scale is not None or (task == "denoise" and mode == "volume")
    if volume and _same_file(encoder, bundle_encoder(bundle_root())):
        encoder = "none"
    options = TaskOptions(task=task, encoder=str(encoder), init=init, holdout=float(holdout),
                          head=str(head), steps=steps, lr=lr, scale=scale,
                          slice_scale=slice_scale, slice_profile=str(slice_profile),
                          slice_thickness=slice_thickness,
                          slice_axis=None if slice_axis is None else int(slice_axis),
                          prior=str(prior), freeze=freeze, sigma=sigma,
                          noise=str(noise), coils=int(coils), mode=str(mode),
                          slab_voxels=slab_voxels,
                          spread=str(spread), device=local_device(str(device)), seed=seed,
                          log_every=log_every, batch_size=batch_size, format=format)
    if items is None:
        items = datalist(dataset_dir, output_dir, format)
    if series is not None:
        items = [dict(it, series=it["series"] or (series if Path(it["image"]).is_dir() else None))
                 for it in items]
    summary = run_items(items, options, output_dir, load=load_item, overwrite=overwrite,
                        quiet=quiet)
    from .pretrain.distributed import world

    if world()[0] == 0:
        for line in summary.text().splitlines():
            log.info(line)
    if summary.failed and fail_on_error:
        raise SystemExit(f"{len(summary.failed)} of {len(summary.results)} scans failed: "
                           + "; ".join(f"{r.name}: {r.error}" for r in summary.failed))
    return summary


def _same_file(a, b) -> bool:
    try:
        return Path(str(a)).resolve() == Path(str(b)).resolve()
    except (OSError, RuntimeError):
        return False


def run_training(dataset_dir: str, output: str, *, method: str = "strainer",
                 steps: int | None = None,
                 lr: float | None = None, schedule: str | None = None,
                 size: int | None = 128, max_slices: int = 10, width: int = 256,
                 layers: int = 6, shared_layers: int = 5, omega: float = 30.0,
                 batch_coords: int | None = None, device: str = "auto", seed: int = 0,
                 resume: bool = False, checkpoint_every: int = 100, quiet: bool = False):
    """Pretrain an encoder on the scans of ``dataset_dir`` (loaded through MONAI), heads
    sharded over the ranks under torchrun; rank 0 writes ``output``. Scans that cannot be
    read are reported and left out. ``method``: ``strainer`` (a shared encoder), ``reptile``
    (a whole network meta-learned by Reptile, one process) or ``reptile-encoder`` (the shared
    encoder meta-learned by Reptile, one process); ``steps`` and ``lr`` default to
    the method's (:func:`~napari_strainer.pretrain.train.pretrain`)."""
    from tqdm import tqdm

    from .pretrain.distributed import pretrain_distributed, world

    resume, quiet = _flag(resume), _flag(quiet)
    from .pretrain.train import METHODS, PRETRAIN_STEPS, REPTILE_STEPS, training_slices

    if method not in METHODS:
        raise BadArgumentError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if steps is None:  # lr, schedule: pretrain's defaults
        steps = REPTILE_STEPS if method.startswith("reptile") else PRETRAIN_STEPS

    rank, _ = world()
    items = list_scans(dataset_dir)
    scans, bad = [], []
    for it in items:
        try:
            scans.append(load_item(it))
        except StrainerError as e:
            bad.append(f"{it['name']}: {e}")
            log.error("%s: skipped: %s", it["name"], e)
    if not scans:
        raise BadInputError(f"{dataset_dir}: no readable scan to train on")
    images = training_slices(scans, size=size, max_slices=max_slices)
    config = SirenConfig(width=width, layers=layers, shared_layers=shared_layers,
                         omega_first=omega, omega_hidden=omega)
    bar = tqdm(total=steps, unit="step", desc="pretrain", disable=quiet or rank != 0,
               mininterval=0.5)

    def progress(p) -> None:
        bar.n = p.step
        bar.set_postfix(loss=f"{p.loss:.2e}", refresh=False)
        bar.refresh()

    Path(output).parent.mkdir(parents=True, exist_ok=True)
    try:
        enc = pretrain_distributed(images, output, method=method, config=config, steps=steps,
                                   lr=lr,
                                   schedule=schedule,
                                   batch_coords=batch_coords, device=device, seed=seed,
                                   resume=resume, checkpoint_every=checkpoint_every,
                                   callback=progress,
                                   info={"files": [it["name"] for it in items], "skipped": bad})
    finally:
        bar.close()
    if rank == 0:
        log.info("wrote %s: %d slices of %s from %d scans, %d steps, final loss %.4g",
                 output, images.shape[0], tuple(images.shape[1:]), len(scans),
                 enc.info["steps"], enc.info["final_loss"])
    return enc


# ----------------------------------------------------------------------------- network
class StrainerNet(nn.Module):
    """One STRAINER INR (shared encoder layers + a head) in image layout, for
    ``verify_net_in_out`` and TorchScript export: a thin adapter over
    :class:`~napari_strainer.core.siren.BatchedSiren` (one member), which does all the maths.

    Input: a coordinate image ``[B, in_features, H, W]`` (e.g. the ``[-1, 1]`` pixel-centre
    grid (row, column) of :func:`napari_strainer.core.coords.grid`); output: intensities
    ``[B, out_features, H, W]``. The ``B * H * W`` pixels go through :attr:`siren` as one
    coordinate list. An encoder loads with :meth:`load_encoder`; :meth:`from_siren` takes one
    member of a fitted ``BatchedSiren``.

    State dict: ``siren.weights.{i}`` and ``siren.biases.{i}`` for the ``layers`` layers,
    as in ``BatchedSiren``: weights ``[in, out]`` for the first ``shared_layers`` (the
    encoder), ``[1, in, out]`` (one member) for the rest, head included.

    Example:
        >>> net = StrainerNet(width=16, layers=4, shared_layers=3)
        >>> net(torch.zeros(1, 2, 8, 8)).shape
        torch.Size([1, 1, 8, 8])
    """

    def __init__(self, in_features: int = 2, out_features: int = 1, width: int = 256,
                 layers: int = 6, shared_layers: int = 5, omega_first: float = 30.0,
                 omega_hidden: float = 30.0):
        super().__init__()
        from .core.siren import BatchedSiren

        self.config = SirenConfig(in_features, out_features, width, layers, shared_layers,
                                  omega_first, omega_hidden)
        self.siren = BatchedSiren(self.config, batch=1, shared=self.config.shared_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        out = self.siren(x.permute(0, 2, 3, 1).reshape(b * h * w, c))  # [1, B*H*W, out]
        return out.reshape(b, h, w, -1).permute(0, 3, 1, 2)

    def __prepare_scriptable__(self) -> StrainerNet:
        """What ``torch.jit.script`` (``ckpt_export``) compiles: this module with
        :attr:`siren` replaced by a trace of ``BatchedSiren``'s eager forward (its Python
        kernel choice and autograd function do not script). The trace reads every size at
        run time, so it holds for any number of pixels; it shares this module's parameters.
        """
        import copy

        clone = copy.copy(self)
        clone._modules = dict(self._modules)  # the copy's own child list; self is untouched
        p = self.siren.weights[0]
        example = torch.zeros(3, self.config.in_features, dtype=p.dtype, device=p.device)
        with torch.no_grad():  # no grad: BatchedSiren takes its eager path
            clone._modules["siren"] = torch.jit.trace(self.siren, example)
        return clone

    def load_encoder(self, encoder) -> StrainerNet:
        """Copy an :class:`~napari_strainer.core.checkpoint.Encoder` (or a path to one) into
        the first layers; the architecture must agree (else :class:`StrainerError`)."""
        from .core.checkpoint import load_encoder

        enc = load_encoder(encoder) if isinstance(encoder, (str, os.PathLike)) else encoder
        if enc.config != self.config:
            raise StrainerError(f"encoder architecture {enc.config.to_dict()} differs from "
                                f"the network's {self.config.to_dict()}")
        self.siren.load_encoder(enc.weights)
        return self

    @classmethod
    def from_siren(cls, net, member: int = 0) -> StrainerNet:
        """Member ``member`` of a ``BatchedSiren`` (shared or batched layers)."""
        if not 0 <= member < net.batch:
            raise BadArgumentError(f"member must be in [0, {net.batch - 1}], got {member}")
        out = cls(**net.config.to_dict())
        with torch.no_grad():
            for i, (w, b) in enumerate(zip(net.weights, net.biases)):
                if w.dim() == 3:  # batched layer: the member's copy
                    w, b = w[member], b[member]
                out.siren.weights[i].copy_(w)  # [in, out] fills a shared or one-member layer
                out.siren.biases[i].copy_(b)
        return out


def export_checkpoint(encoder: str | os.PathLike, path: str | os.PathLike, *,
                      seed: int = 0) -> Path:
    """Write a ``torch.save`` state dict of :class:`StrainerNet` with ``encoder`` loaded and a
    SIREN-initialised head (a Reptile file's own head): the ``--ckpt_file`` of
    ``monai.bundle ckpt_export``."""
    from .core.checkpoint import load_encoder
    from .core.siren import BatchedSiren

    enc = load_encoder(encoder)
    siren = BatchedSiren(enc.config, batch=1, shared=enc.config.shared_layers, seed=seed)
    siren.load_encoder(enc.weights)
    path = Path(path)
    torch.save(StrainerNet.from_siren(siren).state_dict(), path)
    return path
