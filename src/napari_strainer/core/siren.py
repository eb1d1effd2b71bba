"""SIREN layers with a leading batch dimension: N heads on one encoder, or B independent INRs.

A network is a list of ``layers`` linear maps; all but the last are followed by
``sin(omega * .)``. Each layer's weight is either *shared* (shape ``[in, out]``, one copy for
the whole batch: the STRAINER encoder during pretraining, or frozen layers at test time) or
*batched* (shape ``[batch, in, out]``: one copy per head / per slice). Shared layers are
evaluated once for all members, batched layers as one ``bmm``: no Python loop over heads.
"""

from __future__ import annotations

import itertools
import math
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
        g = torch.Generator().manual_seed(seed)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for i in range(config.layers):
            w, b = init_layer(config, i, None if i < shared else batch, g)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(b))

    def load_encoder(self, weights: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy pretrained (shared, unbatched) encoder layers into the first layers."""
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
        h = coords
        last = self.config.layers - 1
        for i in range(self.config.layers):
            w, b, omega = self.weights[i], self.biases[i], self.config.omega(i)
            if w.dim() == 2:  # shared: one GEMM for every member
                flat = h.reshape(-1, h.shape[-1])
                z = torch.addmm(b, flat, w, beta=omega, alpha=omega)
                z = z.reshape(*h.shape[:-1], w.shape[1])
            elif h.dim() == 2:  # first batched layer on shared features: still one GEMM
                n, fi, fo = w.shape
                z = (h @ w.permute(1, 0, 2).reshape(fi, n * fo)).reshape(-1, n, fo)
                z = (z.transpose(0, 1) + b[:, None, :]) * omega
            else:
                z = torch.baddbmm(b[:, None, :], h, w, beta=omega, alpha=omega)
            h = z if i == last else torch.sin(z)
        if h.dim() == 2:  # every layer shared (degenerate): one member
            h = h.unsqueeze(0).expand(self.batch, *h.shape)
        return h
