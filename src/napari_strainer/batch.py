"""Folders of scans: the job behind ``strainer batch`` and the MONAI bundle.

One scan at a time, each independent of the others:

* **datalist**: :func:`datalist` lists the scans of a folder (NIfTI files, images, DICOM series
  folders, multi-frame and loose single DICOM files; a folder holding several series gives one
  entry per series) with the output each one gets: the same relative path and stem under the
  output folder, as ``.nii.gz`` or a DICOM series folder.
* **resumable**: a small JSON manifest per output (``OUT/.strainer/<output>.json``) is written
  atomically *before* the work (``status: running``) and again *after* the output was written
  atomically (``status: done``, with the output's size). A scan whose manifest says done, with
  the same parameters and an output of the recorded size, is skipped; a killed run therefore
  resumes where it stopped and never takes a half-written output for a finished one.
* **per-scan errors**: a scan that fails is reported, recorded (``status: failed``) and
  skipped; the run continues and the summary lists the failures (the front ends then exit
  non-zero). Inputs are never written to.
* **sharding**: with ``world_size`` processes (``torchrun``), rank ``r`` takes entries
  ``r, r + world_size, ...`` of the sorted datalist (what ``monai.data.partition_dataset`` with
  ``even_divisible=False`` does), so every scan is processed exactly once whatever the count.
  Results are gathered on every rank for the summary when ``torch.distributed`` is initialised.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import BadArgumentError, BadInputError, StrainerError

log = logging.getLogger(__name__)

STATE_DIR = ".strainer"
FORMATS = ("nifti", "dicom")
_SUFFIXES = (".nii.gz", ".nii", ".dcm", ".dicom", ".ima", ".png", ".tif", ".tiff", ".jpg",
             ".jpeg")


@dataclass
class TaskOptions:
    """What to do to every scan (the ``strainer batch`` / bundle parameters).

    Args:
        task: ``fit``, ``superres`` or ``denoise``.
        encoder: encoder file, ``"default"`` (shipped MRI encoder), ``"none"`` (SIREN) or
            ``"self"`` (pretrained on each scan's own slices first).
        init: ``auto`` (self-validated route, convergence stop) or ``fixed`` (the paper's).
        holdout: share of observed pixels held out by ``init="auto"``.
        head: ``solved`` (an encoder's head solved on the slice, fitting) or ``random``.
        steps: Adam steps per batch of slices (None: the task's default).
        lr: learning rate.
        scale: in-plane factor (``superres`` only; None: 1 with ``slice_scale``, else an
            error).
        slice_scale: through-plane factor (``superres`` only): integer >= 2 sends every scan
            through :func:`napari_strainer.volume.superres_volume` (a 3D SIREN through the
            slice profile, no encoder: ``encoder`` must be ``default`` or ``none``, and
            ``init``, ``head``, ``holdout``, ``freeze``, ``batch_size`` do not apply); a 2D
            scan then fails on its own.
        slice_profile: ``box`` or ``gaussian`` (with ``slice_scale``).
        slice_thickness: slice thickness in mm (with ``slice_scale``; None: DICOM
            SliceThickness, else the spacing).
        freeze: encoder layers kept fixed (None: the task's default).
        sigma: noise level for ``denoise``: ``"auto"``, ``"none"`` or a number.
        mode: ``denoise`` only: ``slices`` (one 2D INR per slice), ``volume`` (every 3D
            scan through :func:`napari_strainer.volume.denoise_volume`, a 3D SIREN that uses
            no encoder, with the restrictions of ``slice_scale``; 2D scans take the slice
            path) or ``auto`` (per scan, :func:`napari_strainer.volume.denoise_mode`).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        seed: random seed.
        log_every: steps between progress reports.
        batch_size: slices fitted at once (None: from free memory).
        format: ``nifti`` (``.nii.gz``) or ``dicom`` (derived series folder).
    """

    task: str = "fit"
    encoder: str = "default"
    init: str = "auto"
    holdout: float = 0.1
    head: str = "solved"
    steps: int | None = None
    lr: float = 1e-4
    scale: int | None = 1
    slice_scale: int | None = None
    slice_profile: str = "box"
    slice_thickness: float | None = None
    freeze: int | None = None
    sigma: str | float = "auto"
    mode: str = "auto"
    device: str = "auto"
    seed: int = 0
    log_every: int = 10
    batch_size: int | None = None
    format: str = "nifti"

    def __post_init__(self) -> None:
        from .restore.slices import TASKS

        if self.task not in TASKS:
            raise BadArgumentError(f"unknown task {self.task!r}; choose one of "
                                   f"{', '.join(TASKS)}")
        if self.format not in FORMATS:
            raise BadArgumentError(f"--format must be nifti or dicom, got {self.format!r}")
        if self.task != "superres":
            self.scale, self.slice_scale = 1, None
        if self.slice_scale is None:
            self.slice_profile, self.slice_thickness = "box", None
        else:
            from .restore.volume import check_encoder, check_slice_options

            self.slice_scale = check_slice_options(self.slice_scale, self.slice_profile,
                                                   self.slice_thickness)
            check_encoder(self.encoder)
            self.encoder = "none"  # a 3D SIREN from scratch
        if self.scale is None:
            if self.slice_scale is None:
                raise BadArgumentError("superres needs --scale S (in-plane), --slice-scale F "
                                       "(through-plane), or both")
            self.scale = 1
        if self.task != "denoise":
            self.sigma, self.mode = "none", "slices"
        if self.mode not in ("auto", "slices", "volume"):
            raise BadArgumentError(f"--mode must be auto, slices or volume, got {self.mode!r}")
        if self.mode == "volume":
            from .restore.volume import check_encoder

            check_encoder(self.encoder)
            self.encoder = "none"  # a 3D SIREN from scratch (2D scans: SIREN per slice)
        if isinstance(self.sigma, str) and self.sigma not in ("auto", "none"):
            try:
                self.sigma = float(self.sigma)
            except ValueError:
                raise BadArgumentError(f"--sigma must be auto, none or a number, got "
                                       f"{self.sigma!r}") from None
        self.encoder = str(self.encoder)

    def params(self) -> dict:
        """The options that change the output (a finished output is reused only if they match;
        ``device`` and ``log_every`` do not count; the through-plane options and ``mode`` only
        when used, so that manifests written before they existed still match)."""
        d = asdict(self)
        for k in ("device", "log_every"):
            d.pop(k)
        if self.mode == "slices":
            d.pop("mode")
        if self.slice_scale is None:
            for k in ("slice_scale", "slice_profile", "slice_thickness"):
                d.pop(k)
        return d


# ----------------------------------------------------------------------------- datalist
def _stem(name: str) -> tuple[str, str]:
    low = name.lower()
    for s in _SUFFIXES:
        if low.endswith(s) and len(name) > len(s):
            return name[: -len(s)], s.lstrip(".").replace(".", "")
    return name, ""


def _entries(in_dir: Path, out_dir: Path | None) -> list[tuple[Path, str | None, str]]:
    """(path, series, relative name without suffix) for every scan under ``in_dir``."""
    from .io import find_scans
    from .io.dicom import scan_folder

    out: list[tuple[Path, str | None, str]] = []
    out_res = out_dir.resolve() if out_dir is not None else None
    for p in find_scans(in_dir):
        if out_res is not None and (p.resolve() == out_res or out_res in p.resolve().parents):
            continue  # our own outputs inside the input folder
        rel = p.relative_to(in_dir).as_posix() if p != in_dir else in_dir.resolve().name
        if not p.is_dir():
            out.append((p, None, rel))
            continue
        # A DICOM folder: its series whose files lie directly in it and are not multi-frame
        # (sub-folders and multi-frame files are entries of their own).
        entries, _ = scan_folder(p)
        own = [e for e in entries if not e.multiframe and all(f.parent == p for f in e.files)]
        for e in own:
            if len(e.files) == 1 and (p == in_dir or len(entries) > 1):
                f = e.files[0]  # a loose single DICOM file: read it as a file
                out.append((f, None, f.relative_to(in_dir).as_posix()))
            elif len(entries) == 1:  # a series folder
                out.append((p, None, rel))
            else:
                out.append((p, e.uid, f"{rel}_series{e.number}"))
    return out


def list_scans(in_dir: str | os.PathLike) -> list[dict]:
    """``{"image", "series", "name"}`` for every scan under ``in_dir`` (no outputs)."""
    in_dir = Path(in_dir).expanduser()
    if not in_dir.is_dir():
        raise BadInputError(f"{in_dir}: not a folder")
    return [{"image": str(p), "series": s, "name": n} for p, s, n in _entries(in_dir, None)]


def datalist(in_dir: str | os.PathLike, out_dir: str | os.PathLike,
             format: str = "nifti") -> list[dict]:
    """The scans of ``in_dir`` with their outputs under ``out_dir``, sorted.

    Each entry is ``{"image": input path, "series": UID or None, "output": output path,
    "name": a short relative name}``, usable as a MONAI datalist.

    Raises:
        BadInputError: ``in_dir`` is not a folder or holds no scan.
    """
    if format not in FORMATS:
        raise BadArgumentError(f"--format must be nifti or dicom, got {format!r}")
    in_dir, out_dir = Path(in_dir).expanduser(), Path(out_dir).expanduser()
    if not in_dir.is_dir():
        raise BadInputError(f"{in_dir}: not a folder")
    found = _entries(in_dir, out_dir)
    if not found:
        raise BadInputError(f"{in_dir}: no scans found (NIfTI, DICOM, PNG/TIFF)")

    def target(rel: str, tag: str | None) -> str:
        parent, _, name = rel.rpartition("/")
        stem, ext = _stem(name)
        if tag is not None and ext:
            stem = f"{stem}_{ext}"
        if format == "nifti":
            stem += ".nii.gz"
        else:
            stem = stem.replace(".", "_")
        return f"{parent}/{stem}" if parent else stem

    names = [target(rel, None) for _, _, rel in found]
    dupes = {n for n in names if names.count(n) > 1}
    names = [target(rel, "ext") if n in dupes else n for n, (_, _, rel) in zip(names, found)]
    seen: dict[str, int] = {}
    items = []
    for n, (p, series, rel) in zip(names, found):
        k = seen.get(n, 0)
        seen[n] = k + 1
        if k:  # still the same name: number it
            n = n.replace(".nii.gz", f"_{k}.nii.gz") if format == "nifti" else f"{n}_{k}"
        items.append({"image": str(p), "series": series, "output": str(out_dir / n),
                      "name": rel})
    return sorted(items, key=lambda d: (d["name"], d["series"] or ""))


def shard(items: Sequence, rank: int = 0, world_size: int = 1) -> list:
    """Entries ``rank, rank + world_size, ...``: disjoint, and together all of ``items``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise BadArgumentError(f"rank {rank} is not in a world of {world_size} processes")
    return list(items[rank::world_size])


# ----------------------------------------------------------------------------- manifests
def manifest_path(item: dict, out_dir: str | os.PathLike) -> Path:
    """Where the JSON manifest of ``item``'s output lives (hidden, under the output folder)."""
    out_dir = Path(out_dir)
    rel = Path(item["output"]).relative_to(out_dir)
    return out_dir / STATE_DIR / f"{rel.as_posix()}.json"


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _size(path: Path) -> tuple[int, int]:
    """(bytes, files) of an output file or folder; (-1, 0) when missing."""
    if path.is_file():
        return path.stat().st_size, 1
    if path.is_dir():
        files = [f for f in path.rglob("*") if f.is_file()]
        return sum(f.stat().st_size for f in files), len(files)
    return -1, 0


def is_complete(item: dict, manifest: dict | None, params: dict) -> bool:
    """The output exists, its manifest says done for the same parameters, sizes agree."""
    if not manifest or manifest.get("status") != "done":
        return False
    if manifest.get("params") != json.loads(json.dumps(params)):
        return False
    size, files = _size(Path(item["output"]))
    return [size, files] == [manifest.get("output_bytes"), manifest.get("output_files")]


# ----------------------------------------------------------------------------- running
@dataclass
class ScanResult:
    """The outcome for one entry: ``done``, ``skipped`` or ``failed``."""

    name: str
    output: str
    status: str
    seconds: float = 0.0
    error: str | None = None
    rank: int = 0


@dataclass
class BatchSummary:
    """All results (every rank's when distributed), with wall time and process count."""

    results: list[ScanResult] = field(default_factory=list)
    seconds: float = 0.0
    world_size: int = 1

    @property
    def failed(self) -> list[ScanResult]:
        return [r for r in self.results if r.status == "failed"]

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def scans_per_minute(self) -> float:
        done = self.count("done")
        return 60.0 * done / self.seconds if self.seconds > 0 else 0.0

    def text(self) -> str:
        lines = [(f"{len(self.results)} scans: {self.count('done')} processed, "
                 f"{self.count('skipped')} skipped (already done), {self.count('failed')} "
                 f"failed; {self.seconds:.1f} s with {self.world_size} process"
                 f"{'es' if self.world_size > 1 else ''} ({self.scans_per_minute:.2f} "
                 "scans/min)")]
        for r in self.failed:
            lines.append(f"  FAILED {r.name}: {r.error}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"results": [asdict(r) for r in self.results], "seconds": self.seconds,
                "world_size": self.world_size, "scans_per_minute": self.scans_per_minute,
                "failed": [r.name for r in self.failed]}


def read_item(item: dict):
    """Default loader: :func:`napari_strainer.io.read_scan` of the entry."""
    from .io import read_scan

    return read_scan(item["image"], series=item.get("series"))


def _dist() -> tuple[int, int]:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def run_items(items: Sequence[dict], options: TaskOptions, out_dir: str | os.PathLike, *,
              load: Callable[[dict], object] | None = None, overwrite: bool = False,
              quiet: bool = False, rank: int | None = None, world_size: int | None = None,
              ) -> BatchSummary:
    """Process this rank's share of ``items`` (see :func:`datalist`); returns the summary of
    all ranks (gathered when ``torch.distributed`` is initialised).

    Args:
        items: the datalist (every rank passes the same list).
        options: the task and its parameters.
        out_dir: the output folder (manifests go to ``out_dir/.strainer``).
        load: ``item -> Scan`` (default :func:`read_item`; the bundle loads through MONAI).
        overwrite: redo finished outputs and replace outputs this batch did not write.
        quiet: no progress bar.
        rank, world_size: default from ``torch.distributed`` (or 0 and 1).

    Raises:
        StrainerError: a problem common to every scan (bad encoder, bad parameter).
    """
    from tqdm import tqdm

    from .core.device import resolve_device
    from .io import write_scan
    from .pretrain.encoders import get_encoder
    from .restore.noise import make_stop_rule
    from .restore.slices import restore

    d_rank, d_world = _dist()
    rank = d_rank if rank is None else rank
    world_size = d_world if world_size is None else world_size
    out_dir = Path(out_dir).expanduser()
    load = load or read_item
    resolve_device(options.device)
    # once, and fail early for every scan ("self" is pretrained per scan by restore)
    encoder = "self" if options.encoder.lower() == "self" else get_encoder(options.encoder)
    params = options.params()
    mine = shard(list(items), rank, world_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    results: list[ScanResult] = []
    t0 = time.perf_counter()
    bar = tqdm(total=len(mine), unit="scan", disable=quiet, position=rank if world_size > 1
               else None, desc=f"{options.task}" + (f" [rank {rank}/{world_size}]"
                                                    if world_size > 1 else ""),
               dynamic_ncols=True, mininterval=0.5)
    try:
        for item in mine:
            results.append(_one(item, options, params, out_dir, load, encoder, overwrite,
                                run_id, rank, bar, restore, write_scan, make_stop_rule))
            bar.update(1)
    finally:
        bar.close()
    summary = BatchSummary(results, time.perf_counter() - t0, world_size)
    if world_size > 1 and d_world > 1:
        import torch.distributed as dist

        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, (summary.to_dict()["results"], summary.seconds))
        summary.results = [ScanResult(**r) for part, _ in gathered for r in part]
        summary.seconds = max(s for _, s in gathered)
    summary.results.sort(key=lambda r: r.name)
    if rank == 0:
        _write_json(out_dir / STATE_DIR / "summary.json", summary.to_dict())
    return summary


def _one(item, options, params, out_dir, load, encoder, overwrite, run_id, rank, bar, restore,
         write_scan, make_stop_rule) -> ScanResult:
    name, output = item["name"], Path(item["output"])
    mpath = manifest_path(item, out_dir)
    old = read_manifest(mpath)
    if not overwrite and is_complete(item, old, params):
        log.info("%s: already done, skipped", name)
        return ScanResult(name, str(output), "skipped", rank=rank)
    # An output this batch started (killed between the write and the manifest) is redone; any
    # other existing output is replaced only with --overwrite.
    replace = overwrite or (old is not None and old.get("output") == str(output))
    t0 = time.perf_counter()
    record = {"status": "running", "input": item["image"], "series": item.get("series"),
              "output": str(output), "params": params, "run_id": run_id, "rank": rank,
              "pid": os.getpid(), "started": time.time()}
    try:
        if output.exists() and not replace:
            from .errors import OutputExistsError

            raise OutputExistsError(f"{output}: exists and was not written by this batch "
                                    "(pass --overwrite to replace it)")
        _write_json(mpath, record)
        output.parent.mkdir(parents=True, exist_ok=True)
        from .restore.volume import denoise_mode, denoise_volume, superres_volume

        scan = load(item)
        stop = make_stop_rule(options.sigma) if options.task == "denoise" else None

        def progress(p) -> None:
            bar.set_postfix({"scan": Path(name).name[:24], "step": f"{p.step}/{p.total}",
                             "loss": f"{p.loss:.2e}"}, refresh=False)

        if options.slice_scale is not None:
            res = superres_volume(scan, slice_scale=options.slice_scale, scale=options.scale,
                                  profile=options.slice_profile,
                                  thickness=options.slice_thickness, steps=options.steps,
                                  lr=options.lr, device=options.device, seed=options.seed,
                                  log_every=options.log_every, callback=progress)
        elif options.task == "denoise" and denoise_mode(scan.shape, options.mode) == "volume":
            res = denoise_volume(scan, sigma=options.sigma, steps=options.steps,
                                 lr=options.lr, device=options.device, seed=options.seed,
                                 log_every=options.log_every, callback=progress)
        else:
            res = restore(scan, task=options.task, encoder=encoder, steps=options.steps,
                          init=options.init, holdout=options.holdout, head=options.head,
                          lr=options.lr,
                          scale=options.scale, freeze=options.freeze, stop=stop,
                          device=options.device, seed=options.seed,
                          log_every=options.log_every, batch_size=options.batch_size,
                          callback=progress)
        write_scan(res.scan, output, overwrite=replace, protect=[item["image"]])
        size, files = _size(output)
        seconds = time.perf_counter() - t0
        h = res.history
        record.update(status="done", finished=time.time(), seconds=seconds, output_bytes=size,
                      output_files=files, shape=list(res.scan.shape),
                      final_loss=h["loss"][-1] if h.get("loss") else None,
                      stop_reason=h.get("stop_reason"))
        _write_json(mpath, record)
        log.info("%s -> %s (%.1f s)", name, output, seconds)
        return ScanResult(name, str(output), "done", seconds, rank=rank)
    except StrainerError as e:
        error = str(e)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # one scan's unforeseen failure must not stop the others
        error = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        log.debug("traceback of %s", name, exc_info=True)
    seconds = time.perf_counter() - t0
    log.error("%s: failed: %s", name, error)
    if old is None or old.get("status") != "done" or overwrite:
        record.update(status="failed", error=error, finished=time.time())
        try:
            _write_json(mpath, record)
        except OSError:
            pass
    return ScanResult(name, str(output), "failed", seconds, error, rank=rank)


def run_batch(a) -> list[str]:
    """``strainer batch``: process ``a.in_dir`` into ``a.out_dir``; returns the failed names.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) it joins the process group and takes its share.
    """
    from .pretrain.distributed import finish_distributed, init_distributed

    options = TaskOptions(task=a.task, encoder=a.encoder, init=a.init, holdout=a.holdout,
                          head=a.head, steps=a.steps, lr=a.lr,
                          scale=getattr(a, "scale", 1),
                          slice_scale=getattr(a, "slice_scale", None),
                          slice_profile=getattr(a, "slice_profile", "box"),
                          slice_thickness=getattr(a, "slice_thickness", None), freeze=a.freeze,
                          sigma=getattr(a, "sigma", "none"),
                          mode=getattr(a, "mode", "slices"), device=a.device, seed=a.seed,
                          log_every=a.log_every, batch_size=a.batch_size, format=a.format)
    started = init_distributed()
    try:
        from .pretrain.distributed import local_device

        options.device = local_device(options.device)
        items = datalist(a.in_dir, a.out_dir, a.format)
        if a.series is not None:
            for it in items:
                if Path(it["image"]).is_dir() and it["series"] is None:
                    it["series"] = a.series
        summary = run_items(items, options, a.out_dir, overwrite=a.overwrite, quiet=a.quiet)
        rank = _dist()[0]
    finally:
        if started:
            finish_distributed()
    if not a.quiet and rank == 0:
        print(summary.text())
    elif summary.failed and rank == 0:
        for r in summary.failed:
            log.error("FAILED %s: %s", r.name, r.error)
    return [r.name for r in summary.failed]
