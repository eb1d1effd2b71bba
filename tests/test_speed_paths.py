"""The fast paths of the fitting loop agree with the eager one (kernels, bf16, memory check)."""

import pytest
import torch

from napari_strainer.core import BatchedSiren, Identity, SirenConfig, fit
from napari_strainer.core.fit import activation_bytes, check_memory
from napari_strainer.errors import BadArgumentError, StrainerError


def _grads(kernel, shared, freeze):
    net = BatchedSiren(SirenConfig(width=32), batch=3, shared=shared, seed=1)
    net.kernel = kernel
    net.freeze(freeze)
    c = torch.linspace(-1, 1, 120).reshape(60, 2)
    out = net(c)
    out.pow(2).sum().backward()
    return out.detach(), [p.grad for p in net.parameters() if p.requires_grad]


@pytest.mark.parametrize(("shared", "freeze"), [(0, 0), (5, 0), (3, 2)])
def test_fused_kernel_matches_autograd(shared, freeze):
    ref_out, ref_g = _grads("eager", shared, freeze)
    for kernel, tol in (("fused", 1e-5), ("bf16", 3e-2)):
        out, g = _grads(kernel, shared, freeze)
        assert torch.equal(out, ref_out)  # the forward is float32 in every kernel
        for a, b in zip(g, ref_g):
            assert (a - b).abs().max() <= tol * b.abs().max()


def _image(n=24):
    y, x = torch.meshgrid(torch.linspace(-1, 1, n), torch.linspace(-1, 1, n), indexing="ij")
    img = 0.5 + 0.3 * torch.sin(5 * x) * torch.cos(3 * y) + 0.2 * (x * x + y * y < 0.4)
    return img.reshape(1, -1, 1)


@pytest.mark.parametrize(("kernel", "tol"), [("fused", 0.05), ("bf16", 0.1)])
def test_standard_fit_psnr_matches_eager(kernel, tol):
    target = _image()
    psnr = {}
    for k in ("eager", kernel):
        net = BatchedSiren(SirenConfig(width=64, layers=4, shared_layers=3), batch=1, seed=0)
        net.kernel = k
        res = fit(net, target, steps=150, operator=Identity((24, 24)), lr=1e-3,
                  reference=target, log_every=150)
        psnr[k] = res.history["psnr"][-1]
    assert psnr["eager"] > 25
    assert psnr[kernel] > psnr["eager"] - tol


def test_unknown_kernel_is_a_clear_error():
    net = BatchedSiren(SirenConfig(width=8), batch=1)
    net.kernel = "fp8"
    with pytest.raises(BadArgumentError, match="kernel"):
        net(torch.zeros(3, 2))


def test_slice_too_big_for_memory_is_refused_before_allocating():
    net = BatchedSiren(SirenConfig(), batch=1)
    assert activation_bytes(net.config, net.batch, 512 * 512) < 4 << 30  # a 512x512 slice: ~3 GiB
    with pytest.raises(StrainerError, match="batch_coords"):
        check_memory(net, 10**9, torch.device("cpu"))  # 1e9 pixels: terabytes
    with pytest.raises(BadArgumentError):  # fit checks before its first step
        fit(net, torch.zeros(1, 1, 1).expand(1, 50_000**2, 1), steps=1,
            operator=Identity((50_000, 50_000)))


def test_compile_falls_back_to_eager(monkeypatch):
    def broken(fn):
        def call(*a):
            raise RuntimeError("no compiler here")
        return call
    monkeypatch.setattr(torch, "compile", broken)
    net = BatchedSiren(SirenConfig(width=16, layers=3, shared_layers=2), batch=1)
    net.compile = True
    res = fit(net, _image(8), steps=3, operator=Identity((8, 8)))
    assert res.steps_done == 3 and net.compile is False
