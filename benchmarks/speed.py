"""Speed and memory of the fitting loop: our batched loop, before and after each optimisation,
vs a straightforward reference, in the same run.

The reference is written the paper's way: ``nn.Linear`` layers, ``sin(omega * x)`` as separate
ops, one model per image (heads / slices in a Python loop). All variants run the paper network
(6 layers, width 256) with Adam. Variants of our loop (``BatchedSiren.kernel``):

* ``before``: autograd through ``addmm``/``baddbmm`` + ``torch.sin``, ``foreach`` Adam;
* ``whole``: the network as one autograd function
  (:class:`~napari_strainer.core.siren.SirenFunction`), float32, fused Adam, every pixel at
  once (one chunk: the GPU layout);
* ``fused``: ``whole`` run in L2-sized pixel chunks with saved buffers reused between steps;
* ``bf16``: ``fused`` with bfloat16 backward matmuls and saved activations (the default,
  ``"auto"``, on CPUs with native bfloat16).

Timings interleave the variants repetition by repetition (the machine is shared) and report
medians; ratios are medians of per-repetition ratios; the fp32 matmul peak (2048^3) is timed
in the same repetitions. Peak RSS is measured in a child process per case. A standard fit
(sample brain MRI slice, 64x64, 500 steps) checks that ``fused`` matches ``before``
(|dPSNR| < 0.05 dB) and ``bf16`` loses < 0.1 dB.

On CUDA every matmul (the per-case peak too) runs in TF32, as ``fit`` does there: the
``fp32`` columns then mean TF32.

    python benchmarks/speed.py [--quick] [--device cpu|cuda] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F
from _common import save, table
from torch import nn

from napari_strainer.core import BatchedSiren, Identity, SirenConfig, fit, siren
from napari_strainer.core.coords import grid
from napari_strainer.core.problems import ImageProblem, render
from napari_strainer.io.intensity import Intensity
from napari_strainer.restore.slices import CPU_BATCH_PIXELS

CFG = SirenConfig()
VARIANTS = ["before", "whole", "fused", "bf16"]


class RefSiren(nn.Module):
    """The straightforward SIREN: nn.Linear + sin, one network per image."""

    def __init__(self, cfg: SirenConfig, n_heads: int = 1):
        super().__init__()
        dims = cfg.dims()
        self.body = nn.ModuleList(nn.Linear(i, o) for i, o in dims[: cfg.shared_layers])
        self.heads = nn.ModuleList(
            nn.ModuleList(nn.Linear(i, o) for i, o in dims[cfg.shared_layers:])
            for _ in range(n_heads))
        self.cfg = cfg

    def forward(self, x):
        for i, layer in enumerate(self.body):
            x = torch.sin(self.cfg.omega(i) * layer(x))
        outs = []
        for head in self.heads:  # the paper's decoders: a Python loop
            h = x
            for j, layer in enumerate(head):
                k = self.cfg.shared_layers + j
                h = layer(h) if k == self.cfg.layers - 1 else torch.sin(self.cfg.omega(k) * layer(h))
            outs.append(h)
        return torch.stack(outs)


def matmul_flops(device, n=2048, reps=10, dtype=torch.float32) -> float:
    if device.type == "cuda":
        n = 8192  # 2048^3 is launch-bound on a GPU
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(2):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_flops(cfg: SirenConfig, pixels: int, members: int, shared: int) -> float:
    """Matmul FLOPs of forward + backward (weights and inputs) of one step."""
    return sum(6 * pixels * fi * fo * (1 if i < shared else members)
               for i, (fi, fo) in enumerate(cfg.dims()))


def make_net(variant, members, shared, device):
    net = BatchedSiren(CFG, batch=members, shared=shared).to(device)
    net.kernel = {"before": "eager", "bf16": "bf16"}.get(variant, "fused")
    return net


def our_stepper(variant, shape, members, shared, device):
    net = make_net(variant, members, shared, device)
    target = torch.rand(members, shape[0] * shape[1], 1, device=device)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-4, foreach=True) if variant == "before" else None
    kw = {"operator": Identity(shape), "keep_best": shared == 0, "log_every": 10**9}
    chunk = 1 << 62 if variant == "whole" else siren.CHUNK_ELEMENTS

    def run(k):
        default, siren.CHUNK_ELEMENTS = siren.CHUNK_ELEMENTS, chunk
        try:
            fit(net, ImageProblem(target), steps=k, optimizer=opt, **kw)
        finally:
            siren.CHUNK_ELEMENTS = default
    return run


def ref_stepper(shape, members, pretrain, device):
    coords = grid(shape, device)
    target = torch.rand(members, coords.shape[0], 1, device=device)
    models = [RefSiren(CFG, members).to(device)] if pretrain else \
        [RefSiren(CFG).to(device) for _ in range(members)]
    opts = [torch.optim.Adam(m.parameters(), lr=1e-4) for m in models]

    def run(k):
        for _ in range(k):
            for i, (m, o) in enumerate(zip(models, opts)):
                o.zero_grad()
                out = m(coords)
                tgt = target if pretrain else target[i:i + 1]
                ((out - tgt) ** 2).mean(dim=(1, 2)).sum().backward()
                o.step()
    return run


def time_case(shape, members, pretrain, iters, reps, device, variants):
    """Median seconds per step of each variant and the reference, interleaved."""
    shared = CFG.shared_layers if pretrain else 0
    runs = {v: our_stepper(v, shape, members, shared, device) for v in variants}
    runs["ref"] = ref_stepper(shape, members, pretrain, device)
    a, b = (torch.randn(2048, 2048, device=device) for _ in range(2))
    runs["matmul"] = lambda k: [a @ b for _ in range(k)]  # fp32 peak, in the same reps
    for run in runs.values():  # warm-up
        run(2)
    times = {v: [] for v in runs}
    for _ in range(reps):
        for v, run in runs.items():
            sync(device)
            t = time.perf_counter()
            run(iters)
            sync(device)
            times[v].append((time.perf_counter() - t) / iters)
    peak = statistics.median(2 * 2048**3 / t for t in times.pop("matmul"))
    return times, peak


def psnr_check(steps: int, size: int, device, variants) -> dict:
    """A standard fit of one real slice with each variant: final PSNR (dB)."""
    from napari_strainer.io import read_scan, sample_path

    brain = read_scan(sample_path("mr_brain"))
    norm = Intensity.of(brain.data).forward(brain.data)
    t = torch.from_numpy(norm[norm.shape[0] // 2])[None, None]
    img = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True)[0, 0]
    target = img.reshape(1, -1, 1).to(device)
    out = {}
    for v in variants:
        net = make_net(v, 1, 0, device)
        res = fit(net, ImageProblem(target, Identity((size, size)), reference=target), steps=steps,
                  log_every=steps, seed=0)
        out[v] = res.history["psnr"][-1]
    return out


# ---- memory cases, each in a child process (clean peak RSS) ----

def child(case: str, device) -> dict:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    info = {}
    if case.startswith("fit"):  # fit 256x256 <variant or ref>
        _, size, variant = case.split()
        n = int(size.split("x")[0])
        if variant == "ref":
            ref_stepper((n, n), 1, False, device)(2)
        else:
            our_stepper(variant, (n, n), 1, 0, device)(2)
    elif case == "render 1024x1024":
        net = make_net("fused", 1, 0, device)
        render(net, (1024, 1024))
    elif case == "restore 512x512x300":
        from napari_strainer.io import Scan
        from napari_strainer.restore.slices import restore

        data = np.random.default_rng(0).integers(0, 4000, (300, 512, 512), dtype=np.int16)
        cancel = threading.Event()

        def cb(p):  # the first auto-sized batch runs 2 steps, then cancel: rest resampled
            if p.step >= 2:
                cancel.set()
        r = restore(Scan(data), task="fit", encoder=None, steps=3, device=device.type,
                    log_every=1, callback=cb, cancel=cancel)
        info["slices_per_batch"] = len(r.history["best_step"])
    info["seconds"] = time.perf_counter() - t0
    info["peak_rss_mib"] = peak_rss_mib()
    if device.type == "cuda":
        info["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return info


def peak_rss_mib() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: the latter survives ``exec`` and so
    reports the parent's peak in a freshly started child."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(case: str, device) -> dict:
    cmd = [sys.executable, __file__, "--device", device.type, "--child", case]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="fewer iterations, no 256x256")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--psnr-steps", type=int, default=500)
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    device = torch.device(a.device)
    if a.child:
        print(json.dumps(child(a.child, device)))
        return
    torch.set_num_threads(a.threads)
    peak = matmul_flops(device)  # standalone; each case also times it between its steps
    peak_bf16 = matmul_flops(device, dtype=torch.bfloat16)
    peak_tf32 = None
    if device.type == "cuda":  # fit() multiplies in TF32 on CUDA: so does everything below
        torch.backends.cuda.matmul.allow_tf32 = True
        peak_tf32 = matmul_flops(device)
    iters = 2 if a.quick else 3
    cases = [("fit 128x128", (128, 128), 1, False, 1),
             ("fit 256x256", (256, 256), 1, False, 1),
             ("pretrain 10 heads 64x64", (64, 64), 10, True, 10),
             # restore's CPU batching: 64 slices in batches of CPU_BATCH_PIXELS // 4096 = 4;
             # one batch is timed, the per-iteration time is for all 64 slices
             ("fit 64 slices 64x64", (64, 64), CPU_BATCH_PIXELS // 4096, False, 64)]
    if a.quick:
        cases = [c for c in cases if c[1] != (256, 256)]
    rows = []
    for name, shape, members, pretrain, total in cases:
        times, case_peak = time_case(shape, members, pretrain, iters, a.reps, device, VARIANTS)
        scale = total / members
        shared = CFG.shared_layers if pretrain else 0
        flops = step_flops(CFG, shape[0] * shape[1], members, shared)
        row = {"case": name, "ref_s_per_it": statistics.median(times["ref"]) * scale,
               "fp32_matmul_gflops": case_peak / 1e9,
               "ref_pct_fp32_peak": 100 * flops / statistics.median(times["ref"]) / case_peak}
        for v in VARIANTS:
            s = statistics.median(times[v])
            row[f"{v}_s_per_it"] = s * scale
            row[f"{v}_over_ref"] = statistics.median(
                x / r for x, r in zip(times[v], times["ref"]))
            row[f"{v}_pct_fp32_peak"] = 100 * flops / s / case_peak
        rows.append(row)
        print(f"{name}: " + ", ".join(f"{k} {row[k]:.3f}" for k in row
                                     if k.endswith("s_per_it")), flush=True)
    psnr = psnr_check(a.psnr_steps, 64, device, ["before", "fused", "bf16"])
    psnr_delta = {"fused_minus_before_db": psnr["fused"] - psnr["before"],
                  "bf16_minus_before_db": psnr["bf16"] - psnr["before"]}
    print(f"PSNR after {a.psnr_steps} steps (64x64 MRI slice): {psnr} {psnr_delta}", flush=True)
    mem_cases = ["fit 256x256 ref", "fit 256x256 before", "fit 256x256 whole",
                 "fit 256x256 fused", "fit 256x256 bf16", "render 1024x1024",
                 "restore 512x512x300"]
    mem = []
    for c in mem_cases:
        info = run_child(c, device)
        mem.append({"case": c, **info})
        print(f"{c}: peak RSS {info['peak_rss_mib']:.0f} MiB", flush=True)
    cols = ["case", "ref_s_per_it"] + [f"{v}_s_per_it" for v in VARIANTS] + \
        [f"{v}_over_ref" for v in VARIANTS] + \
        ["ref_pct_fp32_peak"] + [f"{v}_pct_fp32_peak" for v in VARIANTS] + ["fp32_matmul_gflops"]
    tf32 = f", tf32 {peak_tf32 / 1e9:.1f}" if peak_tf32 else ""
    print(f"\nmatmul peak: fp32 {peak / 1e9:.1f}, bf16 {peak_bf16 / 1e9:.1f}{tf32} GFLOP/s on"
          f" {device}, {a.threads} thread(s)")
    print(table(rows, cols))
    print()
    print(table(mem, ["case", "peak_rss_mib", "peak_gpu_mib", "seconds", "slices_per_batch"]))
    path = save(f"speed_{device.type}", {
        "matmul_gflops": peak / 1e9, "matmul_bf16_gflops": peak_bf16 / 1e9,
        "matmul_tf32_gflops": peak_tf32 and peak_tf32 / 1e9,
        "threads": a.threads, "reps": a.reps, "iters_per_rep": iters, "rows": rows,
        "psnr_db": psnr, "psnr_delta": psnr_delta, "psnr_steps": a.psnr_steps,
        "memory": mem})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
