"""The fast paths of the fitting loop agree with the eager one (kernels, bf16, memory check)."""

import pytest
import torch

from napari_strainer.core import BatchedSiren, Identity, SirenConfig, fit, siren
from napari_strainer.core.fit import activation_bytes, check_memory
from napari_strainer.core.problems import ImageProblem
from napari_strainer.errors import BadArgumentError, StrainerError


def _grads(kernel, shared, freeze):
    net = BatchedSiren(SirenConfig(width=32), batch=3, shared=shared, seed=1)
    net.kernel = kernel
    net.freeze(freeze)
    c = torch.rand(97, 2, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = net(c)
    out.pow(2).sum().backward()
    return out.detach(), [p.grad for p in net.parameters() if p.requires_grad]


@pytest.mark.parametrize("chunk", [1 << 18, 200])  # one pixel chunk, or 32 rows at a time
@pytest.mark.parametrize(("shared", "freeze"), [(0, 0), (5, 0), (3, 2), (3, 3), (5, 5)])
def test_fused_kernels_match_autograd(shared, freeze, chunk, monkeypatch):
    monkeypatch.setattr(siren, "CHUNK_ELEMENTS", chunk)
    ref_out, ref_g = _grads("eager", shared, freeze)
    for kernel, tol in (("fused", 1e-5), ("bf16", 3e-2)):
        out, g = _grads(kernel, shared, freeze)
        torch.testing.assert_close(out, ref_out)  # the forward is float32 in every kernel
        assert len(g) == len(ref_g)
        for a, b in zip(g, ref_g):
            assert (a - b).abs().max() <= tol * b.abs().max()


def test_saved_buffers_are_reused_and_never_shared_by_two_graphs():
    net = BatchedSiren(SirenConfig(width=16, layers=3, shared_layers=2), batch=2)
    net.kernel = "fused"
    c = torch.rand(50, 2) * 2 - 1
    net(c).sum().backward()
    held = {k: t.data_ptr() for k, t in net.buffers.buffers.items()}
    assert held
    net(c).sum().backward()  # the next step reuses them
    assert {k: t.data_ptr() for k, t in net.buffers.buffers.items()} == held
    # two graphs alive at once: the second must not overwrite the first one's activations
    net.zero_grad()
    first, second = net(c), net(c * 0.5)
    second.sum().backward()
    first.sum().backward()
    both = [p.grad.clone() for p in net.parameters()]
    ref = BatchedSiren(SirenConfig(width=16, layers=3, shared_layers=2), batch=2)
    ref.kernel = "eager"
    (ref(c).sum() + ref(c * 0.5).sum()).backward()
    for a, b in zip(both, ref.parameters()):
        torch.testing.assert_close(a, b.grad)


def test_auto_kernel_follows_the_cpu_and_the_environment(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("STRAINER_KERNEL", raising=False)
    expected = "bf16" if siren.cpu_has_bf16() else "fused"
    assert siren.resolve_kernel("auto", cpu) == expected
    assert siren.resolve_kernel("auto", cuda) == "fused"
    assert siren.resolve_kernel("eager", cpu) == "eager"
    monkeypatch.setenv("STRAINER_KERNEL", "fused")
    assert siren.resolve_kernel("auto", cpu) == "fused"
    monkeypatch.setenv("STRAINER_KERNEL", "auto")
    assert siren.resolve_kernel("auto", cpu) == expected
    monkeypatch.setenv("STRAINER_KERNEL", "fp8")
    with pytest.raises(BadArgumentError, match="STRAINER_KERNEL"):
        siren.resolve_kernel("auto", cpu)


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
        res = fit(net, ImageProblem(target, Identity((24, 24)), reference=target), steps=150,
                  lr=1e-3, log_every=150)
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
        fit(net,
            ImageProblem(torch.zeros(1, 1, 1).expand(1, 50_000**2, 1), Identity((50_000, 50_000))),
            steps=1)
