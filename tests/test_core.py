"""Core: SIREN initialisation, grids, operators, batched fitting, keep-best, determinism."""

import math

import pytest
import torch

from napari_strainer.core import AreaDownsample, BatchedSiren, Identity, SirenConfig, fit, render
from napari_strainer.core.coords import axis, grid
from napari_strainer.core.problems import ImageProblem
from napari_strainer.errors import BadArgumentError

SMALL = SirenConfig(width=32, layers=4, shared_layers=3)


def image(n=16, phase=0.0):
    x = axis(n)
    return (torch.sin(3 * x + phase)[:, None] * torch.cos(2 * x)[None, :]).reshape(1, -1, 1)


def test_init_bounds_follow_siren():
    net = BatchedSiren(SirenConfig(), batch=2)
    w0 = net.weights[0]
    assert w0.abs().max() <= 1 / 2 and w0.abs().max() > 0.45  # U(-1/in, 1/in), in = 2
    bound = math.sqrt(6 / 256) / 30
    for w in net.weights[1:]:
        assert w.abs().max() <= bound
        # uniform distribution: std = bound / sqrt(3)
        assert abs(w.std().item() - bound / math.sqrt(3)) < 0.05 * bound
    assert [tuple(w.shape) for w in net.weights] == [(2, 2, 256)] + [(2, 256, 256)] * 4 + [
        (2, 256, 1)]


def test_config_validation():
    with pytest.raises(BadArgumentError, match="shared-layers"):
        SirenConfig(layers=4, shared_layers=4)
    with pytest.raises(BadArgumentError):
        SirenConfig(width=0)


def test_grid_is_pixel_centre_aligned():
    assert torch.allclose(axis(4), torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    g = grid((2, 3))
    assert g.shape == (6, 2) and torch.allclose(g[1], torch.tensor([-0.5, 0.0]))
    # area-averaging a refined grid's coordinates gives the coarse grid exactly
    fine = grid((8, 8)).reshape(1, 64, 2)
    coarse = AreaDownsample((4, 4), 2)(fine)
    assert torch.allclose(coarse[0], grid((4, 4)), atol=1e-6)


def test_shared_heads_equal_separate_nets():
    """N heads on a shared encoder == N networks that each copy the encoder."""
    heads = BatchedSiren(SMALL, batch=3, shared=3, seed=1)
    sep = BatchedSiren(SMALL, batch=3, shared=0, seed=2)
    sep.load_encoder(heads.encoder_weights())
    with torch.no_grad():
        sep.weights[3].copy_(heads.weights[3])
        sep.biases[3].copy_(heads.biases[3])
    c = grid((5, 5))
    assert torch.allclose(heads(c), sep(c), atol=1e-5)
    assert heads(c).shape == (3, 25, 1)


def test_batched_members_are_independent():
    """Fitting B slices together gives each slice what fitting it alone gives."""
    targets = torch.cat([image(phase=p) for p in (0.0, 1.0)])
    together = BatchedSiren(SMALL, batch=2, seed=0)
    together.kernel = "fused"  # float32: bfloat16 rounding depends on the pixel chunking
    fit(together, ImageProblem(targets, Identity((16, 16))), steps=30, lr=1e-3)
    alone = BatchedSiren(SMALL, batch=2, seed=0)
    with torch.no_grad():  # keep only member 1's initial weights, fitted alone
        one = BatchedSiren(SMALL, batch=1, seed=0)
        for p1, p2 in zip(one.parameters(), alone.parameters()):
            p1.copy_(p2[1:2])
    one.kernel = "fused"
    fit(one, ImageProblem(targets[1:2], Identity((16, 16))), steps=30, lr=1e-3)
    g = grid((16, 16))
    assert torch.allclose(together(g)[1], one(g)[0], atol=1e-4)


def test_fit_is_deterministic_and_converges():
    runs = []
    for _ in range(2):
        net = BatchedSiren(SMALL, batch=1, seed=3)
        res = fit(net, ImageProblem(image(), Identity((16, 16))), steps=60, lr=1e-3)
        runs.append((net(grid((16, 16))), res.history["loss"]))
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1][-1] < 0.05 * runs[0][1][0]


def test_keep_best_never_returns_a_worse_iterate():
    """With a huge learning rate the loss jumps around; the result is the best seen."""
    net = BatchedSiren(SMALL, batch=1, seed=0)
    res = fit(net, ImageProblem(image(), Identity((16, 16))), steps=40, lr=5e-2, log_every=1)
    final = ((net(grid((16, 16))) - image()) ** 2).mean().item()
    assert final == pytest.approx(min(res.history["loss"]), rel=1e-4)
    assert res.history["loss"][-1] > final  # the last iterate was worse: the guard mattered


def test_superres_operator_and_render():
    net = BatchedSiren(SMALL, batch=2, seed=0)
    op = AreaDownsample((8, 8), 2)
    target = torch.cat([image(8), image(8, 1.0)])
    res = fit(net, ImageProblem(target, op), steps=20, lr=1e-3)
    assert res.history["loss"][-1] < res.history["loss"][0]
    out = render(net, (16, 16))
    assert out.shape == (2, 16, 16, 1)
    with pytest.raises(BadArgumentError):
        AreaDownsample((8, 8), 0)


def test_render_chunked_equals_full():
    net = BatchedSiren(SMALL, batch=2, seed=0)
    full = net(grid((20, 20))).reshape(2, 20, 20, 1)
    assert torch.allclose(render(net, (20, 20), budget_bytes=1), full, atol=1e-6)


def test_minibatch_mode_and_cancel():
    class Cancel:
        calls = 0

        def is_set(self):
            self.calls += 1
            return self.calls > 5

    net = BatchedSiren(SMALL, batch=1, seed=0)
    res = fit(net, ImageProblem(image(), Identity((16, 16)), batch_coords=64), steps=100,
              cancel=Cancel(), lr=1e-3)
    assert res.cancelled and res.steps_done == 5


def test_freeze_keeps_layers_fixed():
    net = BatchedSiren(SMALL, batch=2, shared=2, seed=0)
    net.freeze(2)
    before = [w.detach().clone() for w in net.weights]
    fit(net, ImageProblem(torch.cat([image(), image()]), Identity((16, 16))), steps=5, lr=1e-3)
    assert torch.equal(before[0], net.weights[0]) and torch.equal(before[1], net.weights[1])
    assert not torch.equal(before[2], net.weights[2])
    with pytest.raises(BadArgumentError):
        net.freeze(3)
