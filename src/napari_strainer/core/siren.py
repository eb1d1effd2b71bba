"""SIREN layers with a leading batch dimension: N heads on one encoder, or B independent INRs.

A network is a list of ``layers`` linear maps; all but the last are followed by
``sin(omega * .)``. Each layer's weight is either *shared* (shape ``[in, out]``, one copy for
the whole batch: the STRAINER encoder during pretraining, or frozen layers at test time) or
*batched* (shape ``[batch, in, out]``: one copy per head / per slice). Shared layers are
evaluated once for all members, batched layers as one ``bmm``: no Python loop over heads.

Training forwards and backwards (``BatchedSiren.kernel``), all the same maths:

* ``"eager"``: ``addmm``/``baddbmm`` then ``torch.sin``, differentiated by autograd (the
  reference the others are tested against).
* ``"fused"``: the whole network as one autograd function (:class:`SirenFunction`), run pixel
  chunk by pixel chunk so that activations stay in cache, saved buffers reused between steps;
  float32 throughout.
* ``"bf16"``: ``"fused"`` with the *backward* matmuls (weight and input gradients) and the
  saved activations in bfloat16; the forward pass stays float32. PSNR at the end of a
  standard fit within 0.1 dB of float32 (``benchmarks/speed.py``, ``tests/test_speed_paths.py``).
* ``"auto"`` (default): ``"bf16"`` on a CPU with native bfloat16 matmuls (AVX-512 BF16 or AMX,
  where they run 3-4x faster than float32), ``"fused"`` otherwise (GPUs: float32 with TF32).
  The environment variable ``STRAINER_KERNEL`` overrides the default for a whole process,
  e.g. ``STRAINER_KERNEL=fused`` for float32 everywhere.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import weakref
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import BadArgumentError


@dataclass(frozen=True)
class SirenConfig:
    """Architecture of a SIREN / STRAINER network (defaults: the paper's).

    Args:
        in_features: coordinate dimension (2 for slices, 3 for volumes).
        out_features: output channels per head.
        width: hidden width.
        layers: number of linear maps; the first ``layers - 1`` are sine layers, the last is the
            linear head.
        shared_layers: how many of the first sine layers form the shared encoder.
        omega_first: omega_0 of the first sine layer.
        omega_hidden: omega of the other sine layers.
    """

    in_features: int = 2
    out_features: int = 1
    width: int = 256
    layers: int = 6
    shared_layers: int = 5
    omega_first: float = 30.0
    omega_hidden: float = 30.0

    def __post_init__(self) -> None:
        if self.layers < 2:
            raise BadArgumentError(f"--layers must be at least 2, got {self.layers}")
        if not 1 <= self.shared_layers <= self.layers - 1:
            raise BadArgumentError(
                f"--shared-layers must be between 1 and {self.layers - 1} (the sine layers), "
                f"got {self.shared_layers}")
        for name in ("in_features", "out_features", "width"):
            if getattr(self, name) < 1:
                raise BadArgumentError(f"{name} must be positive, got {getattr(self, name)}")
        if self.omega_first <= 0 or self.omega_hidden <= 0:
            raise BadArgumentError("--omega must be positive")

    def dims(self) -> list[tuple[int, int]]:
        """(in, out) of every layer."""
        sizes = [self.in_features] + [self.width] * (self.layers - 1) + [self.out_features]
        return list(itertools.pairwise(sizes))

    def omega(self, layer: int) -> float:
        """The factor applied before the sine of ``layer`` (1 for the linear head)."""
        if layer == self.layers - 1:
            return 1.0
        return self.omega_first if layer == 0 else self.omega_hidden

    def to_dict(self) -> dict:
        return asdict(self)


def init_layer(config: SirenConfig, layer: int, batch: int | None,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """SIREN initialisation of one layer: first U(-1/in, 1/in), others U(+-sqrt(6/in)/omega).

    Biases follow ``nn.Linear``: U(-1/sqrt(in), 1/sqrt(in)).
    """
    fan_in, fan_out = config.dims()[layer]
    bound = 1.0 / fan_in if layer == 0 else math.sqrt(6.0 / fan_in) / config.omega_hidden
    lead = () if batch is None else (batch,)
    w = torch.empty(*lead, fan_in, fan_out).uniform_(-bound, bound, generator=generator)
    b_bound = 1.0 / math.sqrt(fan_in)
    b = torch.empty(*lead, fan_out).uniform_(-b_bound, b_bound, generator=generator)
    return w, b


KERNELS = ("auto", "eager", "fused", "bf16")


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AVX-512 BF16 or AMX-BF16)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:  # not Linux: no cheap way to tell, stay in float32
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """The kernel ``"auto"`` stands for on ``device`` (``STRAINER_KERNEL`` overrides it)."""
    if kernel not in KERNELS:
        raise BadArgumentError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel != "auto":
        return kernel
    env = os.environ.get("STRAINER_KERNEL", "auto")
    if env not in KERNELS:
        raise BadArgumentError(f"environment variable STRAINER_KERNEL={env!r} must be one of "
                               f"{', '.join(KERNELS)}")
    if env != "auto":
        return env
    return "bf16" if device.type == "cpu" and cpu_has_bf16() else "fused"


def _layer_forward(h, w, b, omega: float) -> torch.Tensor:
    """``omega * (h @ w + b)`` for the three layouts; returns ``[P, out]`` or ``[B, P, out]``.

    A batched layer on shared features (``h`` ``[P, in]``, ``w`` ``[B, in, out]``) is one GEMM
    against the members' weights side by side; its result is a transposed view."""
    if w.dim() == 2:  # shared: one GEMM for every member
        z = torch.addmm(b, h.reshape(-1, h.shape[-1]), w, beta=omega, alpha=omega)
        return z.reshape(*h.shape[:-1], w.shape[1])
    if h.dim() == 2:
        n, fi, fo = w.shape
        z = torch.addmm(b.reshape(-1), h, w.permute(1, 0, 2).reshape(fi, n * fo),
                        beta=omega, alpha=omega)
        return z.view(-1, n, fo).transpose(0, 1)
    return torch.baddbmm(b[:, None, :], h, w, beta=omega, alpha=omega)


CHUNK_ELEMENTS = 1 << 18
"""Activations of one layer per pixel chunk on CPU (1 MiB in float32). A chunk stays in the
L2 cache from its matmul through the sine and the saved copies; whole-image temporaries cost
a trip to RAM (and fresh pages) per elementwise pass. GPUs run the whole image at once."""


class _Lease:
    """Marks a :class:`SavedBuffers` as in use by one forward until its backward (or until the
    graph holding it is freed)."""


class SavedBuffers:
    """Saved-activation buffers reused from one training step to the next.

    Fresh multi-MiB tensors every step cost page faults on CPU; reusing them is safe because a step's backward is done before the next forward. A second
    forward while the buffers are held (graph still alive, no backward yet) gets fresh ones.
    """

    def __init__(self):
        self.buffers: dict = {}
        self.lease = None

    def acquire(self) -> _Lease | None:
        """A lease if the buffers are free (else None: use fresh memory)."""
        if self.lease is not None and self.lease() is not None:
            return None
        lease = _Lease()
        self.lease = weakref.ref(lease)
        return lease

    def release(self) -> None:
        self.lease = None

    def take(self, lease, key, shape, dtype, device) -> torch.Tensor:
        t = self.buffers.get(key)
        if lease is None or t is None or t.shape != shape or t.dtype != dtype \
                or t.device != device:
            t = torch.empty(shape, dtype=dtype, device=device)
            if lease is not None:
                self.buffers[key] = t
        return t

    def clear(self) -> None:
        self.buffers.clear()
        self.lease = None


class SirenFunction(torch.autograd.Function):
    """The whole network as one autograd node: float32 forward, hand-written backward.

    ``params`` are ``w0, b0, w1, b1, ...``: shared ``[in, out]`` layers first, then batched
    ``[B, in, out]`` ones (the head is always batched); ``coords`` ``[P, d]`` gets no gradient;
    returns ``[B, P, out]``. Per sine layer the backward does one elementwise pass
    (``grad * cos(z)``) and folds ``omega`` into the small weight matrix. Both passes run
    pixel chunk by pixel chunk through all layers (:data:`CHUNK_ELEMENTS`), accumulating
    weight gradients in float32; the gradient between layers never leaves the function, so
    with ``bf16`` it stays in bfloat16 (no casts back to float32 between layers).

    Saved, from the first layer that trains on: each layer's input and ``cos(z)``, in float32
    or, with ``bf16``, in bfloat16 (half the memory) for bfloat16 backward matmuls.
    """

    @staticmethod
    def forward(ctx, coords, omegas: tuple, bf16: bool, pool: SavedBuffers, *params):
        n = len(omegas)
        grad_w = [ctx.needs_input_grad[4 + 2 * i] for i in range(n)]
        grad_b = [ctx.needs_input_grad[5 + 2 * i] for i in range(n)]
        first = [a or b for a, b in zip(grad_w, grad_b)].index(True)
        fan = next(i for i in range(n) if params[2 * i].dim() == 3)  # first batched layer
        members, pixels = params[2 * fan].shape[0], coords.shape[0]
        low = torch.bfloat16 if bf16 else coords.dtype
        dev = coords.device
        lease = pool.acquire()

        def lead(i):
            return (pixels,) if i <= fan else (members, pixels)

        h_saved, c_saved = [None] * n, [None] * n
        for i in range(first, n):
            fi, fo = params[2 * i].shape[-2:]
            if grad_w[i]:
                h_saved[i] = pool.take(lease, ("h", i), (*lead(i), fi), low, dev)
            if i < n - 1:
                out_lead = (pixels,) if i < fan else (members, pixels)
                c_saved[i] = pool.take(lease, ("c", i), (*out_lead, fo), low, dev)
        out = torch.empty(members, pixels, params[-2].shape[-1], dtype=coords.dtype, device=dev)
        per_pixel = max(w.shape[-1] * (w.shape[0] if w.dim() == 3 else 1) for w in params[0::2])
        step = pixels if dev.type != "cpu" else max(16, CHUNK_ELEMENTS // per_pixel)
        for s in range(0, pixels, step):
            e = min(s + step, pixels)
            h = coords[s:e]
            for i in range(n):
                if h_saved[i] is not None:  # [P, in] up to the fan-out layer, then [B, P, in]
                    h_saved[i][..., s:e, :].copy_(h)
                z = _layer_forward(h, params[2 * i], params[2 * i + 1], omegas[i])
                if i == n - 1:
                    out[:, s:e] = z
                    break
                h = torch.sin(z)
                if c_saved[i] is not None:
                    torch.cos(z, out=c_saved[i][..., s:e, :])
        ctx.save_for_backward(*h_saved, *c_saved, *params[0::2])
        ctx.omegas, ctx.first, ctx.fan, ctx.low, ctx.step = omegas, first, fan, low, step
        ctx.pool, ctx.lease = pool, lease
        return out

    @staticmethod
    def backward(ctx, grad):
        omegas, first, fan, low, step = ctx.omegas, ctx.first, ctx.fan, ctx.low, ctx.step
        n = len(omegas)
        saved = ctx.saved_tensors
        h_saved, c_saved, weights = saved[:n], saved[n:2 * n], saved[2 * n:]
        members, pixels, _ = grad.shape
        f32 = torch.float32
        # Weight/bias gradient accumulators and omega * weight (in the backward's precision,
        # laid out for the input gradient). The fan-out layer sees its members side by side,
        # as one [rows, B * out] gradient: its accumulators are [in, B * out] and [B * out].
        gw, gb, ws = [None] * n, [None] * n, [None] * n
        for i in range(first, n):
            w = weights[i].detach()
            wl = (w * omegas[i]).to(low).transpose(-1, -2)
            if i == fan:
                w, wl = w.permute(1, 0, 2).flatten(1), wl.flatten(0, 1)
            gw[i] = torch.zeros(w.shape, dtype=f32, device=w.device)
            gb[i] = torch.zeros(w.shape[:-2] + w.shape[-1:], dtype=f32, device=w.device)
            ws[i] = wl if i > first else None
        for s in range(0, pixels, step):
            e = min(s + step, pixels)
            g = grad[:, s:e].to(low)
            for i in reversed(range(first, n)):
                if i != n - 1:
                    g = g.mul_(c_saved[i][..., s:e, :])
                if i == fan:
                    g = g.transpose(0, 1).reshape(e - s, -1)
                if h_saved[i] is not None:
                    gw[i].add_(h_saved[i][..., s:e, :].mT @ g)
                gb[i].add_(g.sum(-2))
                g = g @ ws[i] if i > first else None
        if ctx.lease is not None:
            ctx.pool.release()
        grads = [None] * (2 * n)
        for i in range(first, n):
            w_grad, b_grad = gw[i].mul_(omegas[i]), gb[i].mul_(omegas[i])
            if i == fan:
                fo = weights[i].shape[-1]
                w_grad = w_grad.view(-1, members, fo).transpose(0, 1).contiguous()
                b_grad = b_grad.view(members, fo)
            if ctx.needs_input_grad[4 + 2 * i]:
                grads[2 * i] = w_grad
            if ctx.needs_input_grad[5 + 2 * i]:
                grads[2 * i + 1] = b_grad
        return (None, None, None, None, *grads)


class BatchedSiren(nn.Module):
    """``batch`` SIRENs sharing their first ``shared`` layers, evaluated together.

    Args:
        config: the architecture.
        batch: number of members (heads in pretraining, slices at test time).
        shared: layers ``< shared`` hold one weight for all members.
        seed: seed of the SIREN initialisation.

    Example:
        >>> net = BatchedSiren(SirenConfig(width=32), batch=3, shared=5)
        >>> net(torch.zeros(10, 2)).shape
        torch.Size([3, 10, 1])
    """

    def __init__(self, config: SirenConfig, batch: int, shared: int = 0, seed: int = 0):
        super().__init__()
        if not 0 <= shared <= config.layers - 1:
            raise BadArgumentError(f"shared must be in [0, {config.layers - 1}], got {shared}")
        self.config, self.batch, self.shared = config, batch, shared
        self.kernel = "auto"
        """One of :data:`KERNELS`; see the module docstring."""
        self.buffers = SavedBuffers()
        """Saved activations reused between training steps (see :class:`SavedBuffers`)."""

        g = torch.Generator().manual_seed(seed)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for i in range(config.layers):
            w, b = init_layer(config, i, None if i < shared else batch, g)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(b))

    def load_encoder(self, weights: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy pretrained unbatched layers (an encoder, or a whole network) into the first
        ``len(weights)`` layers, every member alike."""
        with torch.no_grad():
            for i, (w, b) in enumerate(weights):
                self.weights[i].copy_(w.expand_as(self.weights[i]))
                self.biases[i].copy_(b.expand_as(self.biases[i]))

    def freeze(self, k: int) -> None:
        """Stop gradients to the first ``k`` layers (they must be shared)."""
        if k > self.shared:
            raise BadArgumentError(f"cannot freeze {k} layers of a net with {self.shared} shared")
        for i in range(self.config.layers):
            self.weights[i].requires_grad_(i >= k)
            self.biases[i].requires_grad_(i >= k)

    def encoder_weights(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The shared layers, detached."""
        return [(self.weights[i].detach(), self.biases[i].detach()) for i in range(self.shared)]

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        """Evaluate at ``coords`` of shape ``[P, d]``; returns ``[batch, P, out]``."""
        kernel = resolve_kernel(self.kernel, coords.device)
        params = [p for pair in zip(self.weights, self.biases) for p in pair]
        layers = self.config.layers
        if kernel != "eager" and torch.is_grad_enabled() and not coords.requires_grad \
                and any(p.requires_grad for p in params):
            omegas = tuple(self.config.omega(i) for i in range(layers))
            return SirenFunction.apply(coords, omegas, kernel == "bf16", self.buffers,
                                       *params)
        h = coords
        for i in range(layers):
            z = _layer_forward(h, self.weights[i], self.biases[i], self.config.omega(i))
            h = z if i == layers - 1 else torch.sin(z)
        return h
