"""Fill in the card of the shipped MRI encoder from what is known of its training, measure its
gain over SIREN on held-out slices, and write it back (weights untouched).

`python benchmarks/shipped_card.py [--threads 1]`

The weights, and so their SHA-256 in the metadata and every benchmark made with them, stay as
they are; only the JSON card changes. The MONAI bundle's copy and its `model_metadata.json`
follow. Known facts (src/napari_strainer/encoders/README.md): 10 evenly spaced slices of
`sample_data/mr_brain.nii.gz` (brain EPI MR, 96 x 128), 2000 steps, committed 2026-11-29.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import torch

from napari_strainer.core.checkpoint import load_encoder, save_encoder, weights_sha256
from napari_strainer.io import read_scan
from napari_strainer.pretrain.cards import evaluation_split, measure_gain
from napari_strainer.pretrain.encoders import DEFAULT_ENCODER

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "monai_bundle" / "models"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    torch.set_num_threads(ap.parse_args().threads)
    enc = load_encoder(DEFAULT_ENCODER)
    sha = weights_sha256(enc)
    train, held = evaluation_split([read_scan(ROOT / "sample_data" / "mr_brain.nii.gz")],
                                   max_slices=10)
    assert train.shape[0] == enc.info["trained_on"]["images"] == 10
    enc.info["trained_on"]["modality"] = "MR"
    enc.info["created"] = "2026-11-29 00:51 UTC"  # the commit that added the file
    enc.info["notes"] = ("brain EPI (volume 0 of nibabel's example4d.nii.gz); card filled in "
                         "afterwards by benchmarks/shipped_card.py, weights unchanged")
    enc.info["evaluation"] = measure_gain(enc, held, device="cpu")
    print(json.dumps(enc.info["evaluation"], indent=1))
    save_encoder(enc, DEFAULT_ENCODER)
    assert weights_sha256(load_encoder(DEFAULT_ENCODER)) == sha
    shutil.copyfile(DEFAULT_ENCODER, BUNDLE / "model.safetensors")
    meta_path = BUNDLE / "model_metadata.json"
    meta = json.loads(meta_path.read_text())
    raw = DEFAULT_ENCODER.read_bytes()
    meta.update(sha256=hashlib.sha256(raw).hexdigest(), bytes=len(raw), info=enc.info,
                weights_sha256=sha)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
