"""The slice path: one 2D INR per slice, in batches, for fitting, in-plane super-resolution and
denoising; the route (SIREN, encoder, warm start) chosen on held-out pixels (:mod:`.routes`).
"""

from __future__ import annotations

import logging
import time
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..core.checkpoint import Encoder
from ..core.device import resolve_device
from ..core.fit import (
    PlateauStop,
    Progress,
    activation_bytes,
    available_bytes,
    fit,
    warmup_lr,
)
from ..core.head import WARMUP_STEPS, solve_head
from ..core.operators import AreaDownsample, Identity
from ..core.problems import ImageProblem, render
from ..core.siren import BatchedSiren, SirenConfig
from ..errors import BadArgumentError
from ..io.intensity import Intensity, busy_slices
from ..io.scan import Scan, upsampled_affine
from ..pretrain.encoders import SELF_STEPS, get_encoder, self_encoder
from .base import Restoration, check_output_size
from .routes import PROBE_STEPS, Route, candidates, holdout_mask, member_params, race

log = logging.getLogger(__name__)

TASKS = ("fit", "superres", "denoise")
# Layers kept fixed at test time, per task (chosen by benchmarks/inverse on brain MRI; the
# paper fine-tunes everything, i.e. 0). Capped at the encoder's shared layers minus one.
DEFAULT_FREEZE = {"fit": 0, "superres": 3, "denoise": 4}
DEFAULT_STEPS = {"fit": 500, "superres": 240, "denoise": 300}
# super-resolution first fits the observed pixels at their own centres (the coarse grid: 1/S^2
# of a step's cost), then goes on through the exact area operator with the same Adam state:
# on 4 neighbouring 96 x 96 T1 slices x2, 200 coarse + 40 exact steps end 1.0 dB below SIREN's
# 500 exact steps (39.12 against 40.08 dB) in a quarter of their time, within a paper loop's
# 100 iterations per slice (benchmarks/README.md#defaults)
COARSE_STEPS = 200
INITS = ("auto", "fixed")
# how an encoder route's head starts: "solved" (ridge regression on the encoder features)
# for fitting, where it lifts step 0 from 8 to 31 dB; through super-resolution it ends
# 0.4 dB lower and as a denoiser it fits the noise, so there the head stays random
HEADS = ("solved", "random")
DEFAULT_HOLDOUT = 0.1  # share of observed pixels held out to choose the route and stop
# convergence stop of fitting: (steps, relative gain) without which a slice has converged
PATIENCE = {"fit": (50, 0.01)}  # benchmarks/defaults.py
# tasks whose auto route races a warm start from the neighbouring slice on the second batch
# (for super-resolution it wins the short race, then ends 4 dB below SIREN on 96 x 96 T1
# slices: benchmarks/README.md#defaults)
WARM_TASKS = ("fit", "denoise")
CPU_BATCH_PIXELS = 16384


def default_freeze(task: str, shared_layers: int | None) -> int:
    """The freeze depth a task uses by default with an encoder of ``shared_layers`` layers
    (``None``: no encoder, nothing to freeze); at least one encoder layer stays trainable."""
    if shared_layers is None:
        return 0
    return max(0, min(DEFAULT_FREEZE[task], shared_layers - 1))


def check_freeze(freeze: int | None, shared_layers: int | None) -> None:
    """Refuse a ``--freeze`` outside ``0..shared_layers`` (``None``: no encoder, so only 0)."""
    limit = shared_layers or 0
    if freeze is not None and not 0 <= freeze <= limit:
        raise BadArgumentError(f"--freeze must be between 0 and {limit} (the encoder's layers"
                               f"{'; --encoder none has none' if shared_layers is None else ''}"
                               f"), got {freeze}")


def coarse_phase(scale: int, steps: int, coarse_steps: int | None = None) -> int:
    """Steps of super-resolution's coarse phase: ``coarse_steps``, by default
    :data:`COARSE_STEPS` but at most 5/6 of ``steps``; none without super-resolution."""
    if scale == 1:
        return 0
    if coarse_steps is None:
        return min(COARSE_STEPS, steps * 5 // 6)
    return min(coarse_steps, steps)



def auto_batch(pixels: int, config: SirenConfig, device: torch.device) -> int:
    """How many slices to fit at once: as many as half the free memory holds (GPU), and on
    CPU at most about 16k pixels per batch, because larger batches fall out of cache and run
    slower per slice (measured in benchmarks/speed.py)."""
    fit_in_memory = available_bytes(device) // 2 // activation_bytes(config, 1, pixels)
    if device.type == "cuda":
        return max(1, int(fit_in_memory))
    return max(1, min(CPU_BATCH_PIXELS // pixels, int(fit_in_memory)))


def restore(scan: Scan, *, task: str = "fit", encoder: str | Path | Encoder | None = "default",
            init: str = "auto", holdout: float = DEFAULT_HOLDOUT, head: str = "solved",
            steps: int | None = None, coarse_steps: int | None = None,
            lr: float = 1e-4, scale: int = 1, freeze: int | None = None, stop=None,
            reference: Scan | None = None, device: str = "auto", seed: int = 0,
            log_every: int = 10, batch_size: int | None = None,
            callback: Callable[[Progress], None] | None = None, cancel=None) -> Restoration:
    """Fit one INR per slice of ``scan`` (in batches), for ``task``:

    * ``fit``: represent the scan (output: same grid);
    * ``superres``: the scan is the ``scale``-times area-downsampled view of the output;
    * ``denoise``: like ``fit``, stopped per slice by ``stop`` (a :class:`StopRule` factory
      ``stop(norm_slices, units_per_norm) -> StopRule``, see :mod:`napari_strainer.restore.noise`).

    ``init="auto"`` (default) chooses how the INRs start from the scan itself (see
    :mod:`napari_strainer.restore.routes`): ``holdout`` of the observed pixels are held out, SIREN and
    the encoder (at the task's default freeze, or ``freeze`` when given) race on the
    middle batch of slices, then (fitting, denoising) a warm start from the neighbouring
    slice's fit races the winner; the rest of the scan follows the winner slice by slice
    outwards from the middle.
    Fitting then stops a slice when its data loss has converged and denoising keeps its noise
    stop (``steps`` is a maximum); super-resolution runs every step on every pixel.
    Super-resolution spends its first ``coarse_steps`` steps (default :data:`COARSE_STEPS`, at
    most 5/6 of ``steps``; 0: none, the paper's loop) fitting the observed pixels at their own
    centres, at ``1 / scale**2`` of the cost, then goes on through the exact area operator.
    ``init="fixed"`` is the paper's recipe: the encoder (``None``: SIREN) initialises every
    batch, the first ``freeze`` layers stay fixed, all ``steps`` run.
    ``head="solved"`` (default) starts an encoder route's head, for fitting, from the ridge
    regression of the slice on the encoder's features (:func:`~.core.head.solve_head`);
    ``"random"`` is the paper's random head.

    Output voxels are in the input's units and dtype. The history records the route, the
    probes (held-out loss, seconds) and why each batch stopped.
    """
    if task not in TASKS:
        raise BadArgumentError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if init not in INITS:
        raise BadArgumentError(f"--init must be one of {', '.join(INITS)}, got {init!r}")
    if not 0 < holdout <= 0.5:
        raise BadArgumentError(f"--holdout must be in (0, 0.5], got {holdout}")
    if head not in HEADS:
        raise BadArgumentError(f"--head must be one of {', '.join(HEADS)}, got {head!r}")
    steps = DEFAULT_STEPS[task] if steps is None else steps
    if steps < 0:
        raise BadArgumentError(f"--steps must be non-negative, got {steps}")
    if lr <= 0:
        raise BadArgumentError(f"--lr must be positive, got {lr}")
    if int(scale) != scale or scale < 1:
        raise BadArgumentError(f"--scale must be a positive integer, got {scale}")
    scale = int(scale) if task == "superres" else 1
    if coarse_steps is not None and coarse_steps < 0:
        raise BadArgumentError(f"--coarse-steps must be non-negative, got {coarse_steps}")
    coarse = coarse_phase(scale, steps, coarse_steps)
    if isinstance(encoder, str) and encoder.lower() == "self":
        encoder = self_encoder(scan, device=device, seed=seed, cancel=cancel, callback=None
                               if callback is None else lambda p: callback(
                                   replace(p, phase="pretrain on this scan")))
    enc = get_encoder(encoder)
    config = enc.config if enc is not None else SirenConfig()
    check_freeze(freeze, None if enc is None else config.shared_layers)
    task_freeze = default_freeze(task, None if enc is None else config.shared_layers)
    z, h, w = scan.shape
    out_shape = (z, h * scale, w * scale)
    check_output_size(out_shape, f"--scale {scale}")
    ref_norm = None
    if reference is not None and reference.shape != out_shape:
        raise BadArgumentError(f"--reference has shape {reference.shape}, the output will "
                               f"have {out_shape}")
    dev = resolve_device(device)
    inten = Intensity.for_scan(scan)
    norm = inten.forward(np.nan_to_num(scan.data, nan=inten.low))
    if reference is not None:
        ref_norm = inten.forward(reference.data)
        ref_range = float(np.ptp(reference.data)) / (inten.high - inten.low) or 1.0
    operator = AreaDownsample((h, w), scale) if scale > 1 else Identity((h, w))
    centres = Identity((h, w))  # the coarse phase: observed pixels at their own centres
    bs = batch_size or min(z, auto_batch(h * w * scale * scale, config, dev))
    n_batches = -(-z // bs)
    auto = init == "auto" and steps > 0  # nothing to race without steps
    if not auto:
        routes = [Route("encoder" if enc is not None else "siren", enc,
                        task_freeze if freeze is None else freeze)]
    else:
        # the encoder races at the task's freeze only: fine-tuning everything (freeze 0) wins
        # short probes and then ends lower (denoising 1.3 dB; super-resolution x4 1.25 dB on
        # an MNI T1 slice with an encoder from other slices of that T1)
        routes = candidates(enc, task_freeze if freeze is None else freeze)
    mask = holdout_mask(h * w, holdout, seed, dev) if auto else None
    converge = auto and task == "fit"
    warm_race = auto and task in WARM_TASKS
    solved_head = head == "solved" and task == "fit"
    result = np.empty(out_shape, np.float32)
    parts, best, stopped, ran, sigmas, probes, reasons = [], {}, {}, {}, [], [], set()
    done_steps, parents, phases, chosen = 0, {}, {}, None
    solved = weakref.WeakSet()  # nets whose head was solved
    t_start = time.perf_counter()

    order = _batch_order(norm, bs)
    uses = Counter(parent for _, parent in order)  # batches still to start from each slice
    for k, (start, parent) in enumerate(order):
        sl = slice(start, min(z, start + bs))
        b = sl.stop - sl.start
        target = torch.from_numpy(norm[sl]).reshape(b, h * w, 1).to(dev)
        ref_t = None if ref_norm is None else torch.from_numpy(ref_norm[sl]).reshape(
            b, -1, 1).to(dev)
        rule = stop(norm[sl], inten.high - inten.low) if stop is not None else None
        if rule is not None:
            sigmas += [float(v) * (inten.high - inten.low) for v in rule.sigma]
            reasons.add(rule.reason)
        bound = done_steps + (n_batches - k) * steps  # steps left at most, probes aside

        def train(net, first, last, opt, *, val=True, rule=rule, target=target, ref_t=ref_t,
                  bound=bound, where=(sl.start, sl.stop), op=operator):
            nonlocal done_steps
            # a solved head's first Adam steps ramp up (core.head.WARMUP_STEPS); step-indexed,
            # so a probe's winner continues the same ramp
            lr_at = warmup_lr(lr, WARMUP_STEPS) if net in solved else None
            base = done_steps - first
            phase = phases.get(id(net), "")

            def progress(p: Progress) -> None:
                if callback is not None:  # steps over probes and batches; total: at most
                    callback(Progress(base + p.step, max(bound, base + p.step), p.loss,
                                      p.psnr, p.seconds, p.preview, where, phase))

            res = fit(net,
                      ImageProblem(target, op, holdout=mask if val else None, reference=ref_t, data_range=ref_range if ref_t is not None else 1.0, view=operator.render_shape),
                      steps=last, lr=lr, stop=rule, log_every=log_every, callback=progress,
                      cancel=cancel, seed=seed, optimizer=opt, start_step=first, lr_at=lr_at)
            done_steps += res.steps_done - first
            return res

        def make(route, start=start, b=b, parent=parent, probe=False, target=target):
            net = route.build(config, b, seed + start, dev, parents.get(parent))
            if solved_head and route.encoder is not None and not route.warm \
                    and not route.encoder.whole:  # a Reptile network keeps its own head
                solve_head(net, target, operator, holdout=mask if probe else None)
                solved.add(net)
            phases[id(net)] = f"probe {route.name}" if probe else route.name
            return net

        torch.manual_seed(seed)
        if chosen is None or (k == 1 and warm_race):  # the candidates, then warm vs winner
            field_ = routes if chosen is None else [chosen, Route("warm", chosen.encoder,
                                                                  chosen.freeze, warm=True)]
            if len(field_) > 1:
                winner, records = race(field_, lambda r: make(r, probe=True),
                                       lambda n, last: train(n, 0, last, None, rule=None,
                                                             op=centres if coarse else operator),
                                       min(PROBE_STEPS[task], coarse or steps))  # <= --steps
                phases[id(winner.net)] = winner.route.name
                probes += [{**r, "slices": [sl.start, sl.stop]} for r in records]
                entry_route, net, segs = winner.route, winner.net, [winner.result]
                if coarse:  # the race only picks the route: its winner starts again on every
                    # pixel (cheap on the coarse grid); going on from its held-out probe ended
                    # 0.8 dB below --encoder none on 48 x 64 EPI slices x2
                    net, segs = make(entry_route), []
            else:
                entry_route, net, segs = field_[0], make(field_[0]), []
            if chosen is None or entry_route.warm:
                chosen = entry_route
        else:
            entry_route, net, segs = chosen, make(chosen), []
        at = segs[-1].steps_done if segs else 0
        opt = segs[-1].optimizer if segs else None
        if coarse:
            # every pixel from step 0; the exact phase keeps the coarse phase's Adam (a fresh
            # one dips 8 dB); no stop: ending on a held-out plateau cost 1.1 dB on 96 x 96 T1
            # slices (benchmarks/README.md#defaults)
            segs.append(train(net, 0, coarse, None, val=False, op=centres))
            segs.append(train(net, coarse, steps, segs[-1].optimizer, val=False))
        elif auto and task == "superres":  # every step through the exact operator
            segs.append(train(net, at, steps, None, val=False))
        elif converge:  # fitting: every pixel counts, the data loss is the quality
            rule = PlateauStop(*PATIENCE[task])
            segs.append(train(net, at, steps, opt, val=False, rule=rule))
        elif at < steps or not segs:  # denoising (noise stop) and init="fixed"
            segs.append(train(net, at, steps, opt, val=False))
        res = segs[-1]
        result[sl] = render(net, operator.render_shape)[..., 0].cpu().numpy()
        # keep only the weights a later batch starts from (its nearest finished slice)
        uses[parent] -= 1
        if uses[parent] <= 0:
            parents.pop(parent, None)
        for edge, member in ((sl.start, 0), (sl.stop - 1, b - 1)):
            if warm_race and uses[edge] > 0:
                parents[edge] = member_params(net, member)
        parts.append((b, _concat(segs)))
        for i in range(b):
            best[sl.start + i] = res.best_step[i]
            stopped[sl.start + i] = res.stop_step[i]
            ran[sl.start + i] = res.steps_done
        if rule is not None and any(s is not None for s in res.stop_step):
            reasons.add(rule.reason)
        if res.cancelled:
            _fill_unfinished(result, norm, scale, [i for i in range(z) if i not in ran])
            break
    history = _merge_histories(parts)
    history.update(task=task, scale=scale, freeze=chosen.freeze, steps=steps,
                   coarse_steps=coarse,
                   encoder="none" if chosen.encoder is None else "pretrained",
                   init=init, route=chosen.name, probes=probes,
                   head="the network's own" if chosen.encoder is not None
                   and chosen.encoder.whole else
                   "solved" if solved_head and chosen.encoder is not None else "random",
                   probe_seconds=round(sum(p["seconds"] for p in probes), 3),
                   holdout=holdout if auto else None,
                   best_step=[best.get(i) for i in range(z)],
                   stop_step=[stopped.get(i) for i in range(z)],
                   steps_run=[ran.get(i) for i in range(z)],
                   stop_reason="; ".join(sorted(reasons)) or "ran all steps",
                   sigma=sigmas or None, seconds_total=round(time.perf_counter() - t_start, 3),
                   cancelled=bool(cancel is not None and cancel.is_set()))
    affine = upsampled_affine(scan.affine, (1, scale, scale)) if scale > 1 else scan.affine
    what = {"fit": "INR fit", "superres": f"INR super-resolution x{scale}",
            "denoise": "INR denoising"}[task]
    start = "SIREN" if chosen.encoder is None else {
        "reptile": "Reptile", "reptile-encoder": "Reptile encoder"}.get(
        chosen.encoder.info.get("method"), "STRAINER")
    desc = f"{what} ({start}, napari-strainer)"
    how = (f"{desc}: route {chosen.name}, head {history['head']}, freeze {chosen.freeze}, "
           f"at most {steps} Adam steps per slice at lr {lr:g} ({history['stop_reason']}"
           f"{f'; the first {coarse} on the observed grid' if coarse else ''}), seed {seed}")
    out = scan.derive(inten.inverse(result, scan.data.dtype), affine=affine, description=desc,
                      derivation=how)
    return Restoration(out, history)


def estimate_seconds(scan: Scan, *, task: str = "fit", encoder="default", init: str = "auto",
                     steps: int | None = None, scale: int = 1, device: str = "auto",
                     batch_size: int | None = None, probe_steps: int = 3,
                     coarse_steps: int | None = None) -> float:
    """Upper bound on the seconds :func:`restore` needs with these options, from short timed
    probes (``probe_steps`` training steps of one batch of slices on each grid; about a
    second): every batch running all ``steps`` plus the route probes. Fitting (plateau) and
    denoising (noise level) may stop earlier; super-resolution runs every step."""
    steps = DEFAULT_STEPS.get(task, 500) if steps is None else steps
    scale = int(scale) if task == "superres" else 1
    coarse = coarse_phase(scale, steps, coarse_steps)
    own = isinstance(encoder, str) and encoder.lower() == "self"
    enc = None if own else get_encoder(encoder)
    config = enc.config if enc is not None else SirenConfig()
    dev = resolve_device(device)
    z, h, w = scan.shape
    bs = batch_size or min(z, auto_batch(h * w * scale * scale, config, dev))
    net = BatchedSiren(config, batch=bs).to(dev)
    target = torch.zeros(bs, h * w, 1, device=dev)

    def seconds_per_step(operator) -> float:
        fit(net, ImageProblem(target, operator), steps=1, keep_best=False)  # warm-up
        t0 = time.perf_counter()
        fit(net, ImageProblem(target, operator), steps=probe_steps, keep_best=False)
        return (time.perf_counter() - t0) / probe_steps

    per_step = seconds_per_step(AreaDownsample((h, w), scale) if scale > 1 else Identity((h, w)))
    per_coarse = seconds_per_step(Identity((h, w))) if coarse else per_step
    n_routes = 1 if init == "fixed" else 2 if enc is not None or own else 1
    warm = z > bs and task in WARM_TASKS  # the warm start's race on the second batch
    # probe runs beside the winner's own steps (a coarse winner starts again: every probe)
    probes = (n_routes if coarse and n_routes > 1 else n_routes - 1) + warm
    probe = 0 if init == "fixed" else probes * PROBE_STEPS[task]
    pretraining = SELF_STEPS * min(10, z) / bs if own else 0  # heads cost like slices
    batches = -(-z // bs)
    return (per_step * (batches * (steps - coarse) + pretraining)
            + per_coarse * (batches * coarse + probe))


def _batch_order(norm: np.ndarray, bs: int) -> list[tuple[int, int | None]]:
    """Batches of ``bs`` slices as ``(first slice, parent slice)``, the batch holding the
    middle non-empty slice first, then outwards; the parent is the nearest slice of the batch
    processed before it on that side (for warm starts)."""
    z = norm.shape[0]
    busy = busy_slices(norm) or list(range(z))
    mid = (busy[len(busy) // 2] // bs) * bs
    order = [(mid, None)]
    order += [(s, s - 1) for s in range(mid + bs, z, bs)]
    order += [(s, s + bs) for s in range(mid - bs, -1, -bs)]
    return order


def _fill_unfinished(result: np.ndarray, norm: np.ndarray, scale: int, slices: list[int]):
    """Cancelled: unfinished slices get the input resampled, clearly not restored."""
    if slices:
        rest = torch.from_numpy(norm[slices])[:, None]
        result[slices] = F.interpolate(rest, scale_factor=scale, mode="nearest")[:, 0].numpy()


def _concat(results: list) -> dict:
    """One history from consecutive fit segments of the same net (each segment logs its first
    step, which the previous one logged as its last: kept once)."""
    hist: dict = {}
    for r in results:
        h = r.history
        skip = 1 if hist.get("iterations") and h["iterations"][:1] == hist["iterations"][-1:] \
            else 0
        offset = hist["seconds"][-1] if hist.get("seconds") else 0.0
        for key, values in h.items():
            values = values[skip:]
            if key == "seconds":
                values = [v + offset for v in values]
            hist.setdefault(key, []).extend(values)
    return hist


def _merge_histories(parts: list[tuple[int, dict]]) -> dict:
    """Average per-batch histories over slices (weights = batch sizes); a batch that stopped
    early counts with its last entry; seconds add up."""
    if len(parts) == 1:
        return dict(parts[0][1])
    n = max(len(h["iterations"]) for _, h in parts)
    total = sum(b for b, _ in parts)

    def at(values: list, i: int):
        return values[min(i, len(values) - 1)]

    longest = next(h for _, h in parts if len(h["iterations"]) == n)
    merged = {"iterations": list(longest["iterations"])}
    for key in ("loss", "val_loss", "psnr"):
        if all(h.get(key) for _, h in parts):
            merged[key] = [sum(b * at(h[key], i) for b, h in parts) / total for i in range(n)]
    merged["seconds"] = [sum(at(h["seconds"], i) for _, h in parts) for i in range(n)]
    return merged
