"""End-to-end runs on a GPU (or, with ``--small``, a CPU smoke test of the same script).

Every case runs the ``strainer`` CLI in a child process on synthetic scans with known ground
truth made from the sample brain MRI (upsampled, so the truth is smooth), and records wall time
(process start included), peak GPU memory, peak RSS and PSNR against the truth:

* ``pretrain SxS``: the default pretraining recipe on the sample brain (10 slices) at S = 64
  (the shipped encoder's), 128 and 256, with ``--evaluate`` (its own timing in the card);
* ``fit 256x256x150``: ``strainer fit`` with all defaults (issue 12: a 256 x 256 x 150 scan end
  to end);
* ``superres x2, 40 x 256x256``: ``strainer superres --scale 2`` with all defaults against the
  paper-style loop (``--encoder none --init fixed --steps 100``) (issue 14);
* through-plane ``--slice-scale 5`` to 256 x 256 x 150, ``fuse`` of three thick stacks to
  256 x 256 x 150 and volume ``denoise`` at sigma 0.1 (issue 11);
* ``superres --slice-scale 5`` to a 512 x 512 x 300 output with 20 steps: peak memory.

    python benchmarks/gpu.py [--device cuda] [--small] [--out DIR] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import RESULTS, machine, save, table
from speed import peak_rss_mib
from volume import acquire, coarse_affine, thick_matrix

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data" / "mr_brain.nii.gz"


def child(argv: list[str], truth: str | None, output: str | None) -> dict:
    """Run the CLI in this process; time, memory and PSNR of its output."""
    from napari_strainer.cli import main
    from napari_strainer.io import read_scan

    t = time.perf_counter()
    rc = main(argv)
    info = {"rc": rc, "seconds": time.perf_counter() - t, "peak_rss_mib": peak_rss_mib()}
    if torch.cuda.is_available():
        info["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if rc == 0 and truth and output:
        ref = np.load(truth)
        out = read_scan(output).data.astype(np.float64)
        info["out_shape"] = list(out.shape)
        if out.shape == ref.shape:
            mse = float(np.mean((out - ref) ** 2))
            info["psnr_db"] = 10 * np.log10(float(np.ptp(ref)) ** 2 / max(mse, 1e-20))
    return info


def run_case(name: str, argv: list[str], timeout: float, truth=None, output=None,
             env: dict | None = None) -> dict:
    spec = json.dumps({"argv": argv, "truth": truth, "output": output})
    t = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, __file__, "--child", spec], check=False,
                           capture_output=True,
                           text=True, timeout=timeout, cwd=Path(__file__).parent,
                           env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {"case": name, "rc": "timeout", "seconds": time.perf_counter() - t}
    lines = p.stdout.strip().splitlines()
    if p.returncode or not lines:
        return {"case": name, "rc": p.returncode, "error": p.stderr.strip()[-600:]}
    info = json.loads(lines[-1])
    # the CLI's closing lines, without progress bars
    both = "\n".join(lines[:-1]) + "\n" + p.stderr
    text = [s for s in both.replace("\r", "\n").splitlines() if s.strip() and "|" not in s]
    return {"case": name, **info, "summary": " / ".join(text[-3:])}


def save_nifti(vol: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """(slice, row, column) float volume -> int16 NIfTI with a (slice, row, column) affine."""
    from napari_strainer.io import Scan, write_scan

    write_scan(Scan(np.round(vol * 1000).astype(np.int16), affine), path)


def box(vol: np.ndarray, axis: int, f: int) -> np.ndarray:
    """Thick slices of ``f`` voxels along ``axis`` (box profile)."""
    return acquire(vol, axis, thick_matrix("box", f, vol.shape[axis]))


def make_data(d: Path, n: int, slices: int, series: int) -> dict:
    """Truth volumes (values in [0, 1], saved x1000 as int16) and the inputs built from them."""
    from napari_strainer.io import read_scan

    brain = read_scan(SAMPLE).data.astype(np.float32)
    lo, hi = np.percentile(brain, [0.5, 99.5])
    brain = np.clip((brain - lo) / (hi - lo), 0, 1)

    def resize(shape):
        t = torch.from_numpy(brain)[None, None]
        return F.interpolate(t, size=shape, mode="trilinear", align_corners=False)[0, 0].numpy()

    eye = np.eye(4)
    truth = np.round(resize((slices, n, n)) * 1000) / 1000
    files = {}

    def put(name, vol, aff=eye, ref=None):
        save_nifti(vol, aff, d / f"{name}.nii.gz")
        files[name] = str(d / f"{name}.nii.gz")
        if ref is not None:
            np.save(d / f"{name}_truth.npy", ref * 1000)
            files[f"{name}_truth"] = str(d / f"{name}_truth.npy")

    put("volume", truth, ref=truth)
    hr = np.round(resize((series, 2 * n, 2 * n)) * 1000) / 1000
    put("series", box(box(hr, 1, 2), 2, 2), ref=hr)
    put("thick", box(truth, 0, 5), coarse_affine(eye, 0, 5), ref=truth)
    put("stack_z", box(truth, 0, 5), coarse_affine(eye, 0, 5))
    put("stack_y", box(truth, 1, 4), coarse_affine(eye, 1, 4))
    put("stack_x", box(truth, 2, 4), coarse_affine(eye, 2, 4))
    noisy = truth + np.random.default_rng(0).normal(0, 0.1, truth.shape)
    put("noisy", noisy, ref=truth)
    big = resize((2 * slices // 5, 2 * n, 2 * n))
    put("big_thick", big, coarse_affine(eye, 0, 5))
    return files


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="CPU smoke test: 1/8 sizes, few steps")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--only", nargs="*", help="run only cases whose name starts with these")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for all cases: later cases get what is left, or are skipped")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        spec = json.loads(a.child)
        print(json.dumps(child(spec["argv"], spec["truth"], spec["output"])), flush=True)
        return
    n, slices, series = (32, 20, 5) if a.small else (256, 150, 40)
    quick = ["--steps", "3"] if a.small else []
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="strainer_gpu_"))
    f = make_data(d, n, slices, series)
    dev = ["--device", a.device]
    sizes = (16, 32) if a.small else (64, 128, 256)

    def pretrain(s):
        enc = str(d / f"enc{s}.safetensors")
        return (f"pretrain {s}x{s}", ["pretrain", str(SAMPLE), "-o", enc, "--size", str(s),
                                      "--evaluate", *quick, *dev], 120, None, None)
    o = lambda k: str(d / f"out_{k}.nii.gz")
    cases = [  # most wanted first: a --budget cuts the tail
        pretrain(sizes[0]),
        (f"fit {n}x{n}x{slices} defaults", ["fit", f["volume"], "-o", o("fit"), *quick, *dev],
         300, f["volume_truth"], o("fit")),
        (f"superres x2 {series}x{n}x{n} defaults",
         ["superres", f["series"], "-o", o("sr"), "--scale", "2", *quick, *dev], 200,
         f["series_truth"], o("sr")),
        (f"superres x2 {series}x{n}x{n} paper loop 100 it",
         ["superres", f["series"], "-o", o("sr100"), "--scale", "2", "--encoder", "none",
          "--init", "fixed", "--steps", "3" if a.small else "100", *dev], 200,
         f["series_truth"], o("sr100")),
        (f"superres x2 {series}x{n}x{n} paper loop 100 it, eager kernel",
         ["superres", f["series"], "-o", o("sr100e"), "--scale", "2", "--encoder", "none",
          "--init", "fixed", "--steps", "3" if a.small else "100", *dev], 200,
         f["series_truth"], o("sr100e"), {"STRAINER_KERNEL": "eager"}),
        (f"through-plane x5 -> {n}x{n}x{slices}",
         ["superres", f["thick"], "-o", o("tp"), "--slice-scale", "5", *quick, *dev], 120,
         f["thick_truth"], o("tp")),
        (f"fuse 3 stacks -> {n}x{n}x{slices}",
         ["fuse", f["stack_z"], f["stack_y"], f["stack_x"], "-o", o("fuse"), "--spacing", "1",
          *quick, *dev], 120, f["thick_truth"], o("fuse")),
        (f"denoise volume {n}x{n}x{slices}", ["denoise", f["noisy"], "-o", o("dn"), *quick, *dev],
         120, f["noisy_truth"], o("dn")),
        (f"through-plane x5 -> {2 * n}x{2 * n}x{2 * slices} (20 steps, memory)",
         ["superres", f["big_thick"], "-o", o("big"), "--slice-scale", "5", "--steps",
          "3" if a.small else "20", *dev], 180, None, o("big")),
        *(pretrain(s) for s in sizes[1:]),
    ]
    if a.only:
        cases = [c for c in cases if any(c[0].startswith(x) for x in a.only)]
    rows = []
    end = time.perf_counter() + (a.budget or float("inf"))
    for name, argv, timeout, truth, output, *env in cases:
        left = end - time.perf_counter()
        if left < 10:
            rows.append({"case": name, "rc": "skipped (budget)"})
            continue
        row = run_case(name, argv, min(timeout * (2 if a.small else 1), left), truth, output,
                       *env)
        rows.append(row)
        print(json.dumps(row), flush=True)
        payload = {"machine": machine(), "device": a.device, "rows": rows}
        (out / "gpu_e2e.json").write_text(json.dumps(payload, indent=1))
    cols = ["case", "rc", "seconds", "psnr_db", "peak_gpu_mib", "peak_rss_mib"]
    print(table(rows, cols))
    for r in rows:
        if r.get("summary"):
            print(f"{r['case']}: {r['summary']}")
    if out == RESULTS:
        save("gpu_e2e", {"device": a.device, "rows": rows})


if __name__ == "__main__":
    main()
