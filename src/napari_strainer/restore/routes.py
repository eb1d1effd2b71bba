"""Initialisation routes of a restoration and their self-validated choice.

A *route* says how the INRs of a batch of slices start: SIREN's random initialisation, the
encoder with its first ``freeze`` layers fixed, or a *warm start* from the fitted INR of the
neighbouring slice. No encoder suits every scan (the shipped MRI encoder costs up to 7 dB on
T1 or CT), so ``restore(init="auto")`` lets the scan decide: a random part of the *observed*
pixels is held out of the training loss, the candidate routes each run a few steps on the
first batch of slices, and the lowest held-out loss wins (the winner goes on; for
super-resolution it starts again on every pixel, its probes having run on the observed grid).
The warm start races against that winner on the next batch (fitting and denoising; for
super-resolution a warm start wins the short race and then ends several dB lower).
Everything here works on tensors; :func:`napari_strainer.restore.slices.restore` drives it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..core.checkpoint import Encoder
from ..core.fit import FitResult
from ..core.siren import BatchedSiren, SirenConfig

PROBE_STEPS = {"fit": 25, "denoise": 25, "superres": 50}
"""Steps each route runs in a race, per task (benchmarks/defaults.py). Super-resolution's
probes run on the coarse grid (a quarter of a step's cost or less) and its winner starts
again, so they run longer: on 6 MNI T1 slices (x2, x4) with an encoder pretrained on other
slices of that T1, SIREN led after 50 steps on every slice, as it ended; on the closest slice
its lead over the encoder at freeze 3 was 3% of the held-out loss after 25 steps and 20%
after 50 (benchmarks/README.md#pretrain_restore)."""


@dataclass(frozen=True)
class Route:
    """How a batch of INRs starts.

    Args:
        name: ``siren``, ``encoder`` (freeze 0), ``encoder-freezeK`` or ``warm``.
        encoder: the encoder to load, or None.
        freeze: first layers kept fixed (they are shared across the batch).
        warm: start from the parent slice's fitted weights (``parent`` of :meth:`build`).
    """

    name: str
    encoder: Encoder | None = None
    freeze: int = 0
    warm: bool = False

    def build(self, config: SirenConfig, batch: int, seed: int, device: torch.device,
              parent: list[torch.Tensor] | None = None) -> BatchedSiren:
        """A net of ``batch`` members initialised by this route (``parent``: one member's
        weights and biases, from :func:`member_params`, for a warm start)."""
        net = BatchedSiren(config, batch=batch, shared=self.freeze, seed=seed).to(device)
        if self.encoder is not None:
            net.load_encoder([(w.to(device), b.to(device)) for w, b in self.encoder.weights])
        if self.warm:
            if parent is None:
                raise ValueError("a warm start needs the parent slice's weights")
            with torch.no_grad():
                for p, v in zip(net.parameters(), parent):
                    p.copy_(v.expand_as(p))
        net.freeze(self.freeze)
        return net


def candidates(encoder: Encoder | None, freeze: int) -> list[Route]:
    """SIREN, plus the encoder with its first ``freeze`` layers fixed."""
    if encoder is None:
        return [Route("siren")]
    return [Route("siren"), Route("encoder" if freeze == 0 else f"encoder-freeze{freeze}",
                                  encoder, freeze)]


def member_params(net: BatchedSiren, member: int) -> list[torch.Tensor]:
    """One member's weights and biases (shared layers as they are), detached copies, in the
    order of ``net.parameters()``."""
    return [(p if i < net.shared else p[member]).detach().clone()
            for group in (net.weights, net.biases) for i, p in enumerate(group)]


def holdout_mask(pixels: int, fraction: float, seed: int, device: torch.device) -> torch.Tensor:
    """A ``[1, pixels]`` bool mask with ``fraction`` of the observed pixels held out."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(pixels, generator=g)[:max(1, round(fraction * pixels))]
    mask = torch.zeros(1, pixels, dtype=torch.bool)
    mask[0, idx] = True
    return mask.to(device)


@dataclass
class Entry:
    """One route in a race: its net, its probe fit and how long that took."""

    route: Route
    net: BatchedSiren
    result: FitResult
    seconds: float

    @property
    def val_loss(self) -> float:
        return min(self.result.history["val_loss"])


def race(routes: list[Route], make_net: Callable[[Route], BatchedSiren],
         train: Callable[[BatchedSiren, int], FitResult],
         steps: int) -> tuple[Entry, list[dict]]:
    """Train every route for ``steps`` and pick the lowest held-out loss; returns the winner
    (its net holds its best weights so far, at ``winner.result.steps_done``) and one record per
    route for the history.

    ``train(net, steps) -> FitResult`` fits a new net with held-out pixels.
    """
    entries = []
    for r in routes:
        net, t0 = make_net(r), time.perf_counter()
        entries.append(Entry(r, net, train(net, steps), time.perf_counter() - t0))
    winner = min(entries, key=lambda e: e.val_loss)
    records = [{"route": e.route.name, "steps": e.result.steps_done,
                "seconds": round(e.seconds, 3),
                "val_loss": e.val_loss, "chosen": e is winner} for e in entries]
    return winner, records
