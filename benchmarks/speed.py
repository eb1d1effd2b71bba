"""Speed of one fitting step: our batched loop vs a straightforward reference, same run.

The reference is written the paper's way: ``nn.Linear`` layers, ``sin(omega * x)`` as separate
ops, one model per image (heads / slices in a Python loop). Both run the same configuration
(paper network: 6 layers, width 256) with Adam; we report seconds per iteration, the ratio,
achieved FLOP/s of a step against the machine's measured fp32 matmul FLOP/s, and peak RSS.

    python benchmarks/speed.py [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from _common import save, table
from torch import nn

from napari_strainer.core import BatchedSiren, Identity, SirenConfig, fit
from napari_strainer.core.coords import grid

CFG = SirenConfig()


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


def matmul_flops(device, n=2048, reps=10) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
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
    total = 0.0
    for i, (fi, fo) in enumerate(cfg.dims()):
        copies = 1 if i < shared else members
        total += 6 * pixels * fi * fo * copies
    return total


def time_ours(cfg, shape, members, shared, iters, device):
    net = BatchedSiren(cfg, batch=members, shared=shared).to(device)
    target = torch.rand(members, shape[0] * shape[1], 1, device=device)
    kw = {"operator": Identity(shape), "keep_best": shared == 0, "log_every": 10**9}
    fit(net, target, steps=2, **kw)  # warm-up
    sync(device)
    t = time.perf_counter()
    fit(net, target, steps=iters, **kw)
    sync(device)
    return (time.perf_counter() - t) / (iters + 1)


def time_ref(cfg, shape, members, pretrain, iters, device):
    coords = grid(shape, device)
    target = torch.rand(members, coords.shape[0], 1, device=device)
    models = [RefSiren(cfg, members).to(device)] if pretrain else \
        [RefSiren(cfg).to(device) for _ in range(members)]
    opts = [torch.optim.Adam(m.parameters(), lr=1e-4) for m in models]

    def step():
        for k, (m, o) in enumerate(zip(models, opts)):
            o.zero_grad()
            out = m(coords)
            tgt = target if pretrain else target[k:k + 1]
            ((out - tgt) ** 2).mean(dim=(1, 2)).sum().backward()
            o.step()

    for _ in range(2):
        step()
    sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        step()
    sync(device)
    return (time.perf_counter() - t) / iters


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="fewer iterations, no 256x256")
    a = p.parse_args()
    device = torch.device(a.device)
    peak = matmul_flops(device)
    iters = 5 if a.quick else 10
    cases = [("fit 128x128", (128, 128), 1, False), ("fit 256x256", (256, 256), 1, False),
             ("pretrain 10 heads 64x64", (64, 64), 10, True),
             ("fit 64 slices 64x64", (64, 64), 64, False)]
    if a.quick:
        cases = [c for c in cases if c[1] != (256, 256)]
    rows = []
    for name, shape, members, pretrain in cases:
        shared = CFG.shared_layers if pretrain else 0
        ours = time_ours(CFG, shape, members, shared, iters, device)
        ref = time_ref(CFG, shape, members, pretrain, max(2, iters // 2), device)
        flops = step_flops(CFG, shape[0] * shape[1], members, shared)
        rows.append({"case": name, "ours_s_per_it": ours, "ref_s_per_it": ref,
                     "ratio_ours_over_ref": ours / ref, "ours_gflops": flops / ours / 1e9,
                     "pct_of_matmul_peak": 100 * flops / ours / peak})
        print(f"{name}: ours {ours:.3f} s/it, reference {ref:.3f} s/it", flush=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cols = ["case", "ours_s_per_it", "ref_s_per_it", "ratio_ours_over_ref", "ours_gflops",
            "pct_of_matmul_peak"]
    print(f"\nfp32 matmul peak: {peak / 1e9:.1f} GFLOP/s on {device}; peak RSS {rss:.0f} MiB")
    print(table(rows, cols))
    path = save(f"speed_{device.type}", {"matmul_gflops": peak / 1e9, "peak_rss_mib": rss,
                                         "rows": rows})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
