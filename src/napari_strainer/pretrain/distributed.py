"""``torch.distributed`` for ``torchrun``: process group set-up, per-rank devices, and
data-parallel pretraining over heads.

Pretraining fits N heads (one per training image) on one shared encoder; the loss is the sum
of the heads' losses. :func:`pretrain_distributed` gives each rank a contiguous share of the
heads (shares differ by at most one when N is not divisible), runs the same loop
(:func:`napari_strainer.core.fit.fit`) on its share, and sums the encoder's gradients over the
ranks before every Adam step (:class:`SharedGradAdam`). The summed gradient is the
single-process gradient, the per-head weights only ever see their own loss, and every rank
starts from the single-process initialisation, so the result equals single-process
pretraining up to floating-point summation order. (``DistributedDataParallel`` would also
reduce the per-head weights, which differ between ranks, so the shared layers are reduced by
hand, in one flattened buffer.)

NCCL is used when CUDA is available (each rank on ``cuda:LOCAL_RANK``), gloo otherwise.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from ..core.checkpoint import Encoder, load_state, save_encoder, save_state
from ..core.device import resolve_device
from ..core.fit import Progress, fit, lr_schedule
from ..core.operators import Identity
from ..core.problems import ImageProblem
from ..core.siren import BatchedSiren, SirenConfig
from ..errors import BadArgumentError
from ..io.intensity import Intensity
from .train import PRETRAIN_LR, PRETRAIN_SCHEDULE, PRETRAIN_STEPS, pretrain

log = logging.getLogger(__name__)


def world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(backend: str = "auto") -> bool:
    """Join the process group when launched by ``torchrun`` with ``WORLD_SIZE`` > 1.

    Returns True when this call initialised it (so the caller should :func:`finish_distributed`).
    ``backend="auto"`` is NCCL with CUDA, gloo without.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() \
            or dist.is_initialized():
        return False
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def finish_distributed() -> None:
    """Leave the process group (after a barrier so no rank exits while others still talk)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def local_device(device: str = "auto") -> str:
    """``auto`` becomes ``cuda:LOCAL_RANK`` under torchrun with CUDA (one GPU per rank)."""
    if device == "auto" and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
    return device


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous ``[start, stop)`` share of ``n`` items; shares differ by at most one."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


class SharedGradAdam(torch.optim.Adam):
    """Adam that first sums the gradients of ``shared`` parameters over all ranks.

    Args:
        params: all trainable parameters (as for Adam).
        shared: the parameters every rank holds a copy of (the encoder).
        lr: learning rate.
    """

    def __init__(self, params, shared: list[torch.nn.Parameter], lr: float):
        super().__init__(params, lr=lr)
        self.shared = shared

    @torch.no_grad()
    def step(self, closure=None):
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.shared]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            for p, g in zip(self.shared, flat.split([g.numel() for g in grads])):
                p.grad = g.view_as(p).clone()
        return super().step(closure)


def pretrain_distributed(images: torch.Tensor, output: str | Path, *,
                         method: str = "strainer",
                         config: SirenConfig | None = None, steps: int | None = None,
                         lr: float | None = None, schedule: str | None = None,
                         batch_coords: int | None = None,
                         device: str = "auto", seed: int = 0, resume: bool = False,
                         checkpoint_every: int = 100,
                         callback: Callable[[Progress], None] | None = None,
                         info: dict | None = None) -> Encoder:
    """:func:`napari_strainer.pretrain.train.pretrain` with the heads sharded over the process group.

    Every rank passes the same ``images`` ``[N, H, W]`` (N >= world size). Rank 0 writes the
    encoder; every rank returns it. Without an initialised process group (or with one process)
    this is exactly :func:`~napari_strainer.pretrain.train.pretrain`. Resumable per rank (state files
    ``<output>.state.rank<R>of<W>.safetensors``, same world size required). ``callback`` is
    used on rank 0 only; its loss is rank 0's share. ``method="reptile"`` and ``"reptile-encoder"``
    run in one process only (:class:`BadArgumentError` under a process group of several).
    """

    config = config or SirenConfig()
    schedule = schedule or PRETRAIN_SCHEDULE
    rank, size = world()
    if size == 1:
        return pretrain(images, output, method=method, config=config, steps=steps, lr=lr,
                        schedule=schedule, batch_coords=batch_coords, device=device, seed=seed,
                        resume=resume, checkpoint_every=checkpoint_every, callback=callback,
                        info=info)
    if method != "strainer":
        raise BadArgumentError(f"--method {method} pretrains in one process; run it without "
                               "torchrun (or with one process)")
    steps = PRETRAIN_STEPS if steps is None else steps
    lr = PRETRAIN_LR if lr is None else lr
    if steps < 1:
        raise BadArgumentError(f"--steps must be at least 1, got {steps}")
    if lr <= 0:
        raise BadArgumentError(f"--lr must be positive, got {lr}")
    lr_at = lr_schedule(schedule, lr, steps)
    n, h, w = images.shape
    if n < size:
        raise BadArgumentError(f"{n} training images for {size} processes: use at most {n}")
    output = Path(output)
    state_path = output.with_name(f"{output.name}.state.rank{rank}of{size}.safetensors")
    dev = resolve_device(local_device(device))
    start, stop = shard_bounds(n, rank, size)
    # The single-process initialisation, then this rank's heads.
    torch.manual_seed(seed)
    full = BatchedSiren(config, batch=n, shared=config.shared_layers, seed=seed)
    net = BatchedSiren(config, batch=stop - start, shared=config.shared_layers, seed=seed)
    with torch.no_grad():
        for i in range(config.layers):
            part = slice(None) if i < config.shared_layers else slice(start, stop)
            net.weights[i].copy_(full.weights[i][part])
            net.biases[i].copy_(full.biases[i][part])
    del full
    net.to(dev)
    shared = [p for i in range(config.shared_layers) for p in (net.weights[i], net.biases[i])]
    opt = SharedGradAdam(net.parameters(), shared, lr=lr)
    target = images[start:stop].reshape(stop - start, h * w, 1).to(dev)
    run = {"config": config.to_dict(), "images": [n, h, w], "lr": lr, "seed": seed,
           "batch_coords": batch_coords, "schedule": schedule, "steps": steps, "rank": rank, "world_size": size,
           "data_sha256": hashlib.sha256(images.numpy().tobytes()).hexdigest()}
    first = 0
    if resume and state_path.exists():
        first = load_state(state_path, net, opt, run)
        log.info("rank %d: resuming from step %d of %s", rank, first, state_path)
    steps_at = torch.tensor([first], dtype=torch.long, device=dev)  # NCCL: on the GPU
    dist.all_reduce(steps_at, op=dist.ReduceOp.MIN)
    if int(steps_at.item()) != first:
        raise BadArgumentError(f"{state_path}: the ranks' saved states are at different steps; "
                               "delete the state files to start again")
    result = fit(net, ImageProblem(target, Identity((h, w)), batch_coords=batch_coords),
                 steps=steps, lr=lr, keep_best=False, callback=callback if rank == 0 else None,
                 seed=seed, optimizer=opt, start_step=first,
                 checkpoint=lambda step: save_state(state_path, net, opt, step, run),
                 checkpoint_every=checkpoint_every, lr_at=lr_at)
    local = result.history["loss"][-1] * (stop - start) if result.history["loss"] else 0.0
    total = torch.tensor([local], dtype=torch.float64, device=dev)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    encoder = Encoder(config, [(a.cpu(), b.cpu()) for a, b in net.encoder_weights()], {
        "method": "strainer", "normalization": Intensity.rule(),
        "trained_on": {"images": n, "shape": [h, w], **(info or {})},
        "steps": result.steps_done, "requested_steps": steps,
        "final_loss": float(total.item()) / n, "lr": lr, "schedule": schedule, "seed": seed,
        "batch_coords": batch_coords, "complete": True, "processes": size})
    if rank == 0:
        save_encoder(encoder, output)
    state_path.unlink(missing_ok=True)
    dist.barrier()
    return encoder
