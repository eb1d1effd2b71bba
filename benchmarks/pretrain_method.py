"""``strainer pretrain --method strainer|reptile|reptile-encoder`` as a start for fitting, on
the paper's slices.

The 10 training slices of the sample brain EPI that ``io.intensity.pick_slices`` picks train
the three initialisations (64 x 64, ``paper_fit.slices``): STRAINER for ``--strainer-steps``
(2000 by default), Reptile of the whole network and Reptile of the encoder with the product's
defaults (the encoder's outer steps default to Reptile's), each timed. The 5 held-out slices
are then fitted from each and from SIREN's random initialisation
(``pretrain.cards.measure_gain``: every layer trained, Adam 1e-4, PSNR of the current
iterate): the encoder-only files (STRAINER, Reptile of the encoder) with the solved head and
warm-up (what fitting does) and with a random head, whole-network Reptile with its own head
and with the solved head and warm-up. Prints PSNR and the gain over SIREN at steps 10, 50 and
100 and the pretraining seconds, and writes ``results/pretrain_method.json``.

    python benchmarks/pretrain_method.py [--strainer-steps 2000] [--reptile-steps N]
                                         [--reptile-encoder-steps N] [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _common import save, table
from paper_fit import slices

from napari_strainer.pretrain.cards import measure_gain
from napari_strainer.pretrain.train import pretrain

STEPS = (10, 50, 100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--strainer-steps", type=int, default=2000)
    p.add_argument("--reptile-steps", type=int, default=None, help="default: the product's")
    p.add_argument("--reptile-encoder-steps", type=int, default=None,
                   help="default: --reptile-steps")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    imgs, train, held = slices(64)
    rows, seconds, siren = [], {}, None
    with tempfile.TemporaryDirectory() as tmp:
        encoder_steps = a.reptile_steps if a.reptile_encoder_steps is None \
            else a.reptile_encoder_steps
        for method, steps in (("strainer", a.strainer_steps), ("reptile", a.reptile_steps),
                              ("reptile-encoder", encoder_steps)):
            t = time.perf_counter()
            enc = pretrain(imgs[train], Path(tmp) / f"{method}.safetensors", method=method,
                           steps=steps, device="cpu")
            seconds[method] = time.perf_counter() - t
            print(f"{method}: {enc.info['steps']} steps in {seconds[method]:.1f} s", flush=True)
            ev = measure_gain(enc, imgs[held], steps=STEPS, device="cpu")
            siren = ev["psnr_siren"]
            own = "own head" if enc.whole else "random head"
            for head, key in ((own, "strainer"), ("solved head + warm-up", "strainer_solved")):
                psnr = ev[f"psnr_{key}"]
                rows.append({"start": f"{method}, {head}", "pretrain_s": seconds[method],
                             **{f"it{s}": v for s, v in zip(STEPS, psnr)},
                             **{f"gain{s}": round(v - b, 2)
                                for s, v, b in zip(STEPS, psnr, siren)}})
    rows.insert(0, {"start": "SIREN", **{f"it{s}": v for s, v in zip(STEPS, siren)}})
    ratios = {m: s / seconds["strainer"] for m, s in seconds.items()}
    cols = ["start", "pretrain_s"] + [f"it{s}" for s in STEPS] + [f"gain{s}" for s in STEPS]
    print(f"\n5 held-out slices, 64 x 64, PSNR (dB) and gain over SIREN\n{table(rows, cols)}\n"
          + "\n".join(f"{m}'s pretraining: {r:.2f}x STRAINER's {a.strainer_steps} steps"
                      for m, r in ratios.items() if m != "strainer"))
    path = save("pretrain_method", {"args": vars(a), "train": train, "held_out": held,
                                    "seconds": seconds, "ratio": ratios["reptile"],
                                    "ratios": ratios, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
