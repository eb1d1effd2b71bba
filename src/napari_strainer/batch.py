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
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import BadArgumentError, BadInputError, StrainerError
from .io import write_scan
from .io.atomic import write_json
from .restore.plan import Options, make_plan, run
from .restore.volume import check_encoder

log = logging.getLogger(__name__)

STATE_DIR = ".strainer"
FORMATS = ("nifti", "dicom")
SPREADS = ("scans", "slabs")
_SUFFIXES = (".nii.gz", ".nii", ".dcm", ".dicom", ".ima", ".png", ".tif", ".tiff", ".jpg",
             ".jpeg")


@dataclass
class TaskOptions(Options):
    """What to do to every scan (the ``strainer batch`` / bundle parameters): the planner's
    :class:`~napari_strainer.restore.plan.Options` plus the output ``format`` (``nifti``:
    ``.nii.gz``; ``dicom``: a derived series folder). Options that do not apply to the task
    are reset to their defaults, so that a manifest only records what shapes the output."""

    format: str = "nifti"
    spread: str = "scans"
    """Under ``torchrun``: ``scans`` (each rank takes its share of the scans) or ``slabs``
    (every rank works on every scan, racing its share of the denoising race's slabs)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.spread not in SPREADS:
            raise BadArgumentError(f"--spread must be scans or slabs, got {self.spread!r}")
        if self.spread == "slabs" and (self.task, self.mode) != ("denoise", "auto"):
            raise BadArgumentError("--spread slabs spreads the slabs of the denoising race: "
                                   "task denoise with --mode auto only")
        if self.task == "fuse":
            raise BadArgumentError("fuse takes several stacks of one anatomy; batch restores "
                                   "scans one by one")
        if self.format not in FORMATS:
            raise BadArgumentError(f"--format must be nifti or dicom, got {self.format!r}")
        if self.task != "superres":
            self.scale, self.slice_scale = 1, None
        if self.slice_scale is None:
            self.slice_profile, self.slice_thickness = "box", None
            self.slice_axis, self.prior = None, "auto"
        if self.mode == "volume":
            check_encoder(self.encoder)
        if self.slice_scale is not None or self.mode == "volume":
            self.encoder = "none"  # a 3D SIREN from scratch
        if self.task != "denoise":
            self.sigma, self.mode, self.noise, self.coils = "none", "slices", "auto", 1

    def params(self) -> dict:
        """The options that change the output (a finished output is reused only if they match;
        ``device`` and ``log_every`` do not count; the through-plane options and ``mode`` only
        when used, so that manifests written before they existed still match)."""
        d = asdict(self)
        for k in ("device", "log_every", "spread"):  # spread: the same output either way
            d.pop(k)
        if self.slab_voxels is None:
            d.pop("slab_voxels")
        if self.coils == 1:
            d.pop("coils")
        for k in ("coarse_steps", "tv", "ls_steps", "spacing"):  # not batch options
            if d[k] is None:
                d.pop(k)
        if self.mode == "slices":
            d.pop("mode")
        if self.task != "denoise":
            d.pop("noise")
        if self.slice_scale is None:
            for k in ("slice_scale", "slice_profile", "slice_thickness", "slice_axis", "prior"):
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


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size (0 and 1 outside ``torch.distributed``)."""
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
    from .pretrain.encoders import get_encoder

    d_rank, d_world = rank_and_world()
    rank = d_rank if rank is None else rank
    world_size = d_world if world_size is None else world_size
    out_dir = Path(out_dir).expanduser()
    load = load or read_item
    resolve_device(options.device)
    if options.encoder.lower() != "self":  # fail early, once for every scan
        get_encoder(options.encoder)
    params = options.params()
    together = options.spread == "slabs" and world_size > 1  # every rank on every scan
    mine = list(items) if together else shard(list(items), rank, world_size)
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
            results.append(_one(item, options, params, out_dir, load, overwrite, run_id, rank,
                                bar, world_size if together else 1))
            bar.update(1)
    finally:
        bar.close()
    summary = BatchSummary(results, time.perf_counter() - t0, world_size)
    if world_size > 1 and d_world > 1 and not together:
        import torch.distributed as dist

        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, (summary.to_dict()["results"], summary.seconds))
        summary.results = [ScanResult(**r) for part, _ in gathered for r in part]
        summary.seconds = max(s for _, s in gathered)
    summary.results.sort(key=lambda r: r.name)
    if rank == 0:
        write_json(out_dir / STATE_DIR / "summary.json", summary.to_dict())
    return summary


def _one(item, options, params, out_dir, load, overwrite, run_id, rank, bar,
         world) -> ScanResult:
    """One scan; with ``world`` > 1 every rank works on it (``--spread slabs``) and rank 0
    writes the output and its manifest."""
    name, output = item["name"], Path(item["output"])
    mpath = manifest_path(item, out_dir)
    slabs = mpath.with_suffix(".slabs")  # the race's finished slabs, kept until done
    writer = world == 1 or rank == 0
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
        if writer:
            write_json(mpath, record)
            output.parent.mkdir(parents=True, exist_ok=True)
        scan = load(item)

        def progress(p) -> None:
            bar.set_postfix({"scan": Path(name).name[:24], "step": f"{p.step}/{p.total}",
                             "loss": f"{p.loss:.2e}"}, refresh=False)

        plan = make_plan(scan, options, eta=False)
        for note in plan.notes:
            log.warning("%s: %s", name, note)
        try:
            res = run(plan, callback=progress, workdir=slabs, rank=rank if world > 1 else 0,
                      world=world, key={"input": item["image"], "series": item.get("series"),
                                        "params": params})
        except Exception as e:
            if world == 1:
                raise
            # the other ranks wait for this one's slabs: stop them all, keep what is finished
            raise SystemExit(f"rank {rank}: {name}: {e}; every rank stops (finished slabs "
                             f"are kept in {slabs}: rerun to resume them)") from None
        if not writer:
            return ScanResult(name, str(output), "done", time.perf_counter() - t0, rank=rank)
        write_scan(res.scan, output, overwrite=replace, protect=[item["image"]])
        size, files = _size(output)
        seconds = time.perf_counter() - t0
        h = res.history
        record.update(status="done", finished=time.time(), seconds=seconds, output_bytes=size,
                      output_files=files, shape=list(res.scan.shape),
                      final_loss=h["loss"][-1] if h.get("loss") else None,
                      stop_reason=h.get("stop_reason"))
        write_json(mpath, record)
        shutil.rmtree(slabs, ignore_errors=True)
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
    if writer and (old is None or old.get("status") != "done" or overwrite):
        record.update(status="failed", error=error, finished=time.time())
        try:
            write_json(mpath, record)
        except OSError:
            pass
    return ScanResult(name, str(output), "failed", seconds, error, rank=rank)
