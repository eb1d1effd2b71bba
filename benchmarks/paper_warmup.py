"""Does a learning-rate warm-up after a solved head remove the early dips below SIREN?

The main table's protocol (``paper.py``'s test sets, its STRAINER-10 encoder from
``paper/encoders/`` written by ``paper.py --part main``), PSNR at each of the first 30 steps:
SIREN, the solved head with a warm-up of 0 / 10 / 25 steps, the random head with 0 / 10.
Prints a line per start and test set and writes ``paper/warmup.json``.

    python benchmarks/paper_warmup.py [--steps 50]
"""

from __future__ import annotations

import argparse
import json

import torch
from paper import OUT, SIZE, test_sets

from napari_strainer.core import BatchedSiren, Identity, fit, solve_head
from napari_strainer.core.fit import warmup_lr
from napari_strainer.core.problems import ImageProblem
from napari_strainer.pretrain.encoders import get_encoder

STARTS = (("solved", 0), ("solved", 10), ("solved", 25), ("random", 0), ("random", 10))
SHOWN = (0, 1, 3, 5, 10, 20, 30, 50)


def curve(enc, target: torch.Tensor, head: str | None, warm: int, steps: int) -> dict:
    """Mean PSNR over the images at each logged step (``head`` None: SIREN)."""
    n, h, w = target.shape
    y = target.reshape(n, -1, 1)
    op = Identity((h, w))
    net = BatchedSiren(enc.config, batch=n, seed=1)
    if head is not None:
        with torch.no_grad():
            net.load_encoder(enc.weights)
        if head == "solved":
            solve_head(net, y, op)
    logged = set(range(31)) | set(range(0, steps + 1, 10))
    out = {}

    def log(p) -> None:
        if p.step in logged:
            mse = (p.preview().reshape(n, -1) - y.reshape(n, -1)).pow(2).mean(1)
            out[p.step] = float((10 * torch.log10(1 / mse.clamp_min(1e-20))).mean())

    fit(net, ImageProblem(y, op), steps=steps, keep_best=False, log_every=1, callback=log, seed=0,
        lr_at=warmup_lr(1e-4, warm) if warm else None)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50)
    a = p.parse_args()
    torch.set_num_threads(1)
    enc = get_encoder(OUT / "encoders" / "STRAINER-10.safetensors")
    _, _, sets = test_sets(SIZE)
    result = {}
    for name, target in sets.items():
        rows = {"SIREN": curve(enc, target, None, 0, a.steps)}
        for head, warm in STARTS:
            rows[f"{head} warm{warm}"] = curve(enc, target, head, warm, a.steps)
        print(f"\n{name}: PSNR at steps {', '.join(map(str, SHOWN))}; smallest gain over SIREN")
        for k, c in rows.items():
            gain = min(c[s] - rows["SIREN"][s] for s in c if s > 0)
            print(f"{k:14s} " + " ".join(f"{c[s]:6.2f}" for s in SHOWN if s in c)
                  + f" | {gain:+.2f}", flush=True)
        result[name] = rows
    (OUT / "warmup.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
