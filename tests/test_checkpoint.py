"""Encoder checkpoints: round trip, clear refusal of bad files, exact resume."""

import json
import struct
import subprocess
import sys
import time

import pytest
import torch

from napari_strainer.core import Encoder, SirenConfig, load_encoder, save_encoder
from napari_strainer.errors import BadArgumentError, CheckpointError
from napari_strainer.pretrain.train import pretrain

SMALL = SirenConfig(width=16, layers=4, shared_layers=3)


def images(n=3, size=12):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, size, size, generator=g)


@pytest.fixture
def encoder_file(tmp_path):
    return tmp_path / "enc.safetensors", pretrain(images(), tmp_path / "enc.safetensors",
                                                  config=SMALL, steps=5, device="cpu")


def test_round_trip(encoder_file):
    path, enc = encoder_file
    back = load_encoder(path)
    assert back.config == SMALL
    for (w1, b1), (w2, b2) in zip(enc.weights, back.weights):
        assert torch.equal(w1, w2) and torch.equal(b1, b2)
    assert back.info["trained_on"]["images"] == 3 and back.info["steps"] == 5
    assert back.info["complete"] and back.info["final_loss"] > 0


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such encoder file"):
        load_encoder(tmp_path / "nope.safetensors")


def test_truncated_file(encoder_file, tmp_path):
    path, _ = encoder_file
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_encoder(bad)


def test_not_safetensors(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"PK\x03\x04 this is a zip, maybe a pickle")
    with pytest.raises(CheckpointError):
        load_encoder(bad)


def _rewrite_header(src, dst, edit):
    raw = src.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    dst.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def test_tampered_weights(encoder_file, tmp_path):
    path, _ = encoder_file
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    bad = tmp_path / "tampered.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum"):
        load_encoder(bad)


def test_mismatched_architecture(encoder_file, tmp_path):
    path, _ = encoder_file

    def widen(h):
        cfg = json.loads(h["__metadata__"]["config"])
        cfg["width"] = 32
        h["__metadata__"]["config"] = json.dumps(cfg)

    bad = tmp_path / "mismatch.safetensors"
    _rewrite_header(path, bad, widen)
    with pytest.raises(CheckpointError, match="layer 0 has shape"):
        load_encoder(bad)


def test_wrong_format_and_version(encoder_file, tmp_path):
    path, _ = encoder_file
    bad = tmp_path / "v9.safetensors"
    _rewrite_header(path, bad, lambda h: h["__metadata__"].update(format_version="9"))
    with pytest.raises(CheckpointError, match="unsupported format version"):
        load_encoder(bad)
    other = tmp_path / "other.safetensors"
    _rewrite_header(path, other, lambda h: h.pop("__metadata__"))
    with pytest.raises(CheckpointError, match="not a napari-strainer-encoder"):
        load_encoder(other)


def test_save_is_atomic_and_loadable(tmp_path):
    enc = Encoder(SMALL, [(torch.zeros(2, 16), torch.zeros(16))] +
                  [(torch.zeros(16, 16), torch.zeros(16))] * 2)
    p = save_encoder(enc, tmp_path / "z.safetensors")
    assert [f.name for f in tmp_path.iterdir()] == ["z.safetensors"]
    assert load_encoder(p).config == SMALL


def test_resume_matches_uninterrupted(tmp_path):
    """Cancel halfway (a usable encoder + state are kept), resume, compare with one run."""
    full = pretrain(images(), tmp_path / "full.safetensors", config=SMALL, steps=20,
                    device="cpu", batch_coords=50, seed=3)

    class StopAt:
        def __init__(self):
            self.n = 0

        def is_set(self):
            self.n += 1
            return self.n > 10

    part_path = tmp_path / "part.safetensors"
    half = pretrain(images(), part_path, config=SMALL, steps=20, device="cpu",
                    batch_coords=50, seed=3, cancel=StopAt(), checkpoint_every=4)
    assert not half.info["complete"] and half.info["steps"] == 10
    assert load_encoder(part_path).info["steps"] == 10  # usable checkpoint
    state = tmp_path / "part.safetensors.state.safetensors"
    assert state.exists()
    resumed = pretrain(images(), part_path, config=SMALL, steps=20, device="cpu",
                       batch_coords=50, seed=3, resume=True)
    assert resumed.info["complete"] and not state.exists()
    for (w1, b1), (w2, b2) in zip(full.weights, resumed.weights):
        torch.testing.assert_close(w1, w2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b1, b2, rtol=1e-5, atol=1e-6)


def test_cosine_schedule_decays_to_zero_and_is_recorded(tmp_path):
    """The default schedule ends near 0 (each update at ``cosine_lr``); constant keeps lr."""
    from napari_strainer.core.fit import cosine_lr, lr_schedule

    at = cosine_lr(1e-3, 10)
    assert at(0) == pytest.approx(1e-3) and at(5) == pytest.approx(5e-4) and at(10) == 0
    assert lr_schedule("constant", 1e-3, 10) is None
    with pytest.raises(BadArgumentError, match="--schedule"):
        lr_schedule("linear", 1e-3, 10)
    cos = pretrain(images(), tmp_path / "c.safetensors", config=SMALL, steps=10, lr=1e-3,
                   device="cpu")
    const = pretrain(images(), tmp_path / "k.safetensors", config=SMALL, steps=10, lr=1e-3,
                     schedule="constant", device="cpu")
    assert cos.info["schedule"] == "cosine" and const.info["schedule"] == "constant"
    assert load_encoder(tmp_path / "c.safetensors").info["schedule"] == "cosine"
    moved = [(a - b).abs().max().item() for (a, _), (b, _) in zip(cos.weights, const.weights)]
    assert max(moved) > 0  # the schedule changed the updates


def test_resume_refuses_other_run(tmp_path):
    class Now:
        def is_set(self):
            return True

    p = tmp_path / "e.safetensors"
    pretrain(images(), p, config=SMALL, steps=10, device="cpu", cancel=Now())
    with pytest.raises(CheckpointError, match="different run .*lr"):
        pretrain(images(), p, config=SMALL, steps=10, device="cpu", lr=1e-3, resume=True)


def test_kill_and_resume_process(tmp_path):
    """A real process killed mid-run resumes from its periodic state to the same encoder."""
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, torch\n"
        "from napari_strainer.core import SirenConfig\n"
        "from napari_strainer.pretrain.train import pretrain\n"
        "torch.set_num_threads(1)\n"
        "imgs = torch.rand(3, 12, 12, generator=torch.Generator().manual_seed(0))\n"
        "pretrain(imgs, sys.argv[1], config=SirenConfig(width=16, layers=4, shared_layers=3),"
        " steps=int(sys.argv[2]), device='cpu', checkpoint_every=20, resume=True)\n")
    ref = tmp_path / "ref.safetensors"
    subprocess.run([sys.executable, str(script), str(ref), "400"], check=True)
    out = tmp_path / "killed.safetensors"
    state = tmp_path / "killed.safetensors.state.safetensors"
    proc = subprocess.Popen([sys.executable, str(script), str(out), "400"])
    deadline = time.time() + 60
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    if out.exists():
        pytest.skip("the run finished before it could be killed")
    assert state.exists()
    subprocess.run([sys.executable, str(script), str(out), "400"], check=True)
    for (w1, b1), (w2, b2) in zip(load_encoder(ref).weights, load_encoder(out).weights):
        torch.testing.assert_close(w1, w2, rtol=1e-5, atol=1e-6)


def test_warmup_ramps_to_the_learning_rate():
    """After a solved head the first updates are smaller (core.head.WARMUP_STEPS)."""
    from napari_strainer.core.fit import warmup_lr

    at = warmup_lr(1e-4, 10)
    assert at(0) == pytest.approx(1e-5) and at(4) == pytest.approx(5e-5)
    assert at(9) == pytest.approx(1e-4) and at(500) == pytest.approx(1e-4)
