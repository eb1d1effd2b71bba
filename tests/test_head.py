"""Closed-form head (core.head.solve_head): recovery, independence, channels, operators, and
the gain at step 0 with the shipped encoder on a real slice."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_strainer.core import AreaDownsample, BatchedSiren, Identity, SirenConfig, load_encoder
from napari_strainer.core.coords import grid
from napari_strainer.core.head import _features, solve_head
from napari_strainer.errors import BadArgumentError

SMALL = SirenConfig(width=32, layers=4, shared_layers=3)


def linear_target(net, shape, seed=0, channels=1):
    """A target that is exactly ``F w + b`` for the net's own features; returns it, w, b."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        f = _features(net, grid(shape))
    f = f.expand(net.batch, -1, -1) if f.dim() == 2 else f
    w = torch.randn(net.batch, net.config.width, channels, generator=g)
    b = torch.randn(net.batch, channels, generator=g)
    return f @ w + b[:, None], w, b


@pytest.mark.parametrize("shared", [0, 2, 3])  # fresh sine layers between encoder and head
def test_exact_recovery_of_a_linear_target(shared):
    net = BatchedSiren(SMALL, batch=2, shared=shared, seed=1)
    y, w, b = linear_target(net, (12, 12))
    solve_head(net, y, Identity((12, 12)), ridge=0.0)
    assert torch.allclose(net.weights[-1], w, atol=1e-3)
    assert torch.allclose(net.biases[-1], b, atol=1e-3)
    with torch.no_grad():
        assert (net(grid((12, 12))) - y).abs().max() < 1e-4


def test_members_are_solved_independently():
    net = BatchedSiren(SMALL, batch=3, shared=0, seed=2)
    torch.manual_seed(0)
    y = torch.rand(3, 100, 1)
    solve_head(net, y, Identity((10, 10)), ridge=1e-4)
    for m in range(3):  # the same member alone, as a batch of one
        one = BatchedSiren(SMALL, batch=1, shared=0, seed=9)
        with torch.no_grad():
            for p1, p in zip(one.parameters(), net.parameters()):
                p1.copy_(p[m:m + 1])
        solve_head(one, y[m:m + 1], Identity((10, 10)), ridge=1e-4)
        assert torch.allclose(one.weights[-1][0], net.weights[-1][m], atol=1e-4)
        assert torch.allclose(one.biases[-1][0], net.biases[-1][m], atol=1e-5)
    # other members' data must not change a member's head
    again = BatchedSiren(SMALL, batch=3, shared=0, seed=2)
    y_other = y.clone()
    y_other[1:] = 5.0
    solve_head(again, y_other, Identity((10, 10)), ridge=1e-4)
    assert torch.allclose(again.weights[-1][0], net.weights[-1][0], atol=1e-5)
    assert not torch.allclose(again.weights[-1][1], net.weights[-1][1], atol=1e-3)


@pytest.mark.parametrize("channels", [1, 3])
def test_channels_shapes_and_recovery(channels):
    cfg = SirenConfig(out_features=channels, width=32, layers=4, shared_layers=3)
    net = BatchedSiren(cfg, batch=2, shared=3, seed=3)
    y, _, _ = linear_target(net, (9, 9), channels=channels)
    solve_head(net, y, Identity((9, 9)), ridge=1e-10)
    assert net.weights[-1].shape == (2, 32, channels) and net.biases[-1].shape == (2, channels)
    with torch.no_grad():
        assert (net(grid((9, 9))) - y).abs().max() < 1e-3
    with pytest.raises(BadArgumentError, match="channels"):
        solve_head(net, y[..., :1] if channels == 3 else y.expand(-1, -1, 2), Identity((9, 9)))


def test_holdout_pixels_are_not_fitted():
    net = BatchedSiren(SMALL, batch=2, shared=0, seed=4)
    y, w, _ = linear_target(net, (12, 12))
    mask = torch.zeros(1, 144, dtype=torch.bool)
    mask[0, ::3] = True
    corrupted = y.clone()
    corrupted[:, mask[0]] += 10.0  # garbage on held-out pixels only
    solve_head(net, corrupted, Identity((12, 12)), ridge=0.0, holdout=mask)
    assert torch.allclose(net.weights[-1], w, atol=1e-3)


def test_through_area_downsampling_and_unsupported_operator():
    net = BatchedSiren(SMALL, batch=2, shared=1, seed=5)
    op = AreaDownsample((8, 8), 2)
    fine, _, _ = linear_target(net, (16, 16))
    y = op(fine)
    solve_head(net, y, op, ridge=1e-10)
    with torch.no_grad():
        assert (op(net(grid((16, 16)))) - y).abs().max() < 1e-3

    class Blur:  # an operator solve_head has no cheap linear action for
        shape = render_shape = (8, 8)

        def __call__(self, pred):
            return pred

    with pytest.raises(BadArgumentError, match="Blur"):
        solve_head(net, y, Blur())
    with pytest.raises(BadArgumentError, match="pixels"):
        solve_head(net, y, Identity((9, 9)))


def test_solved_head_beats_random_head_with_shipped_encoder(samples):
    """On a brain slice the encoder never saw, the solved head's loss at step 0 is far below
    the random head's (measured: PSNR 6 -> 19 dB at 64 x 64, benchmarks/README.md)."""
    from pathlib import Path

    import napari_strainer
    from napari_strainer.io import read_scan
    from napari_strainer.io.intensity import Intensity

    enc = load_encoder(Path(napari_strainer.__file__).parent / "encoders"
                       / "mri_default.safetensors")
    brain = read_scan(samples / "mr_brain.nii.gz")
    norm = torch.from_numpy(Intensity.of(brain.data).forward(brain.data))
    img = F.interpolate(norm[[11]][:, None], size=(32, 32), mode="bilinear", antialias=True)
    y = img.reshape(1, -1, 1)  # slice 11: held out of the encoder's training
    net = BatchedSiren(enc.config, batch=1, shared=enc.config.shared_layers, seed=0)
    net.load_encoder(enc.weights)
    coords = grid((32, 32))
    with torch.no_grad():
        random_mse = (net(coords) - y).pow(2).mean().item()
        solve_head(net, y, Identity((32, 32)))
        solved_mse = (net(coords) - y).pow(2).mean().item()
    assert solved_mse < 0.1 * random_mse
    assert solved_mse < 0.01  # better than 20 dB on the [0, 1] range


def test_exported_from_core():
    from napari_strainer import core

    assert core.solve_head is solve_head and "solve_head" in core.__all__


def test_restore_solved_head_fits_better_at_step_zero(samples):
    """restore(head="solved") starts an encoder fit far closer to the slice than the paper's
    random head (steps=0: the start itself is the output); super-resolution keeps it random."""
    from napari_strainer.io import read_scan
    from napari_strainer.restore.slices import restore

    scan = read_scan(samples / "mr_brain.nii.gz")
    one = scan.derive(scan.data[11:12])
    err = {}
    for head in ("solved", "random"):
        r = restore(one, task="fit", init="fixed", steps=0, head=head, device="cpu")
        err[head] = float(np.mean((r.scan.data.astype(float) - one.data) ** 2))
        assert r.history["head"] == head
    assert err["solved"] < 0.05 * err["random"], err
    sr = restore(one, task="superres", scale=2, init="fixed", steps=0, device="cpu")
    assert sr.history["head"] == "random"

