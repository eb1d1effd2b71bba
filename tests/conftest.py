"""Shared test setup: small thread counts (CI has 2 cores), paths to real sample scans."""

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_data"


@pytest.fixture
def samples() -> Path:
    return SAMPLES


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    """A tiny encoder (width 16, 4 layers) pretrained for 5 steps on the sample brain MRI."""
    from napari_strainer.cli import main

    out = tmp_path_factory.mktemp("enc") / "tiny.safetensors"
    assert main(["pretrain", str(SAMPLES / "mr_brain.nii.gz"), "-o", str(out), "--size", "16",
                 "--steps", "5", "--max-slices", "3", "--quiet", "--width", "16", "--layers",
                 "4", "--shared-layers", "3"]) == 0
    return out
