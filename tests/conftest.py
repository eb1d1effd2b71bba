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
