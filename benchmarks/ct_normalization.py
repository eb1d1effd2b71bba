"""Do CT encoders transfer better with a fixed Hounsfield-unit window than with per-scan
percentiles?

`python benchmarks/ct_normalization.py [--size 64] [--width 128] [--pretrain-steps 300]`

The CT slices are the distinct real CTs at hand: `sample_data/ct_small.dcm`,
`ct_enhanced.dcm` (2 frames), `ct_j2k.dcm`, and pydicom's / pydicom-data's `bad_sequence.dcm`,
`explicit_VR-UN.dcm`, `J2K_pixelrep_mismatch.dcm` (7 non-empty slices of 6 scans; lossy or
uncompressed copies of the same images are left out). For each normalisation and fold, an
encoder is pretrained on 4 of them and fitted, with SIREN side by side (same seed, every layer
trained, :func:`napari_strainer.pretrain.cards.measure_gain`), on the other 3; the two folds hold out
different slices. Reported: the gain over SIREN (dB, same normalisation) and the RMSE in HU of
both, at fitting steps 10/50/100.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from _common import save, table

from napari_strainer.core.siren import SirenConfig
from napari_strainer.io import read_scan
from napari_strainer.io.intensity import Intensity, busy_slices
from napari_strainer.pretrain.cards import EVAL_STEPS, measure_gain
from napari_strainer.pretrain.train import pretrain

ROOT = Path(__file__).resolve().parents[1]


def ct_files() -> list[Path]:
    import data_store
    import pydicom

    tests = Path(pydicom.__file__).parent / "data" / "test_files"
    store = Path(data_store.__file__).parent / "data"
    return [ROOT / "sample_data" / n for n in ("ct_small.dcm", "ct_enhanced.dcm", "ct_j2k.dcm")] \
        + [store / "bad_sequence.dcm", store / "explicit_VR-UN.dcm",
           tests / "J2K_pixelrep_mismatch.dcm"]


def slices(norm: str, size: int) -> tuple[torch.Tensor, list[float]]:
    """Every non-empty CT slice, normalised by ``norm``, resampled to ``size``; and the HU per
    normalised unit of each (to express errors in HU)."""
    from napari_strainer.pretrain.cards import _resized

    out, hu_per_unit = [], []
    for f in ct_files():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scan = read_scan(f)
        data = np.nan_to_num(scan.data.astype(np.float32))
        pct = Intensity.of(data)
        lo, hi = (pct.low, pct.high) if norm == "percentile" else WINDOWS[norm]
        for z in busy_slices(pct.forward(data)):
            out.append(_resized((data[z] - lo) / (hi - lo), size))
            hu_per_unit.append(hi - lo)
    return torch.stack(out), hu_per_unit


WINDOWS = {"hu_-1000_1000": (-1000.0, 1000.0), "hu_-1024_3071": (-1024.0, 3071.0)}
FOLDS = ([2, 3, 4], [0, 5, 6])  # held-out slice indices


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    config = SirenConfig(width=a.width)
    rows = []
    for norm in ("percentile", *WINDOWS):
        imgs, hu = slices(norm, a.size)
        for fold, held in enumerate(FOLDS):
            train = [i for i in range(len(imgs)) if i not in held]
            with tempfile.TemporaryDirectory() as tmp:
                enc = pretrain(imgs[train], Path(tmp) / "ct.safetensors", config=config,
                               steps=a.pretrain_steps, device="cpu")
            ev = measure_gain(enc, imgs[held], device="cpu")
            # mean PSNR on [0, 1] -> mean RMSE in HU (per-slice HU scale, geometric mean)
            log_hu = float(np.mean([np.log10(hu[i]) for i in held]))
            row = {"norm": norm, "fold": fold, "final_loss": enc.info["final_loss"]}
            for s, gs, ps, pn in zip(EVAL_STEPS, ev["gain_db"], ev["psnr_strainer"],
                                     ev["psnr_siren"]):
                row[f"gain@{s}"] = gs
                row[f"rmse_hu_strainer@{s}"] = round(10 ** (log_hu - ps / 20), 1)
                row[f"rmse_hu_siren@{s}"] = round(10 ** (log_hu - pn / 20), 1)
            rows.append(row)
            print(table([row], list(row)), flush=True)
    cols = ["norm", "fold", *[f"gain@{s}" for s in EVAL_STEPS],
            *[f"rmse_hu_strainer@{s}" for s in EVAL_STEPS],
            *[f"rmse_hu_siren@{s}" for s in EVAL_STEPS]]
    print(table(rows, cols))
    save("ct_normalization", {"args": vars(a), "files": [f.name for f in ct_files()],
                              "rows": rows})


if __name__ == "__main__":
    main()
