"""A linear head solved in closed form on the current sine features (ridge regression).

The head (last layer) of a SIREN is linear in the features ``F`` of its last sine layer:
``f(x) = F(x) w + b``. For a given rest of the network, the head that best fits the observed
pixels is a least-squares problem, so an encoder-initialised fit can start from it instead of a
random head: on unseen 64 x 64 brain slices with an MRI encoder this lifts the PSNR at step 0
from 8 to 31 dB, and +23 dB over SIREN at step 100 (``benchmarks/README.md``, section
``head``). Measured to help plain fitting; through super-resolution it ends slightly worse than
a random head (it fits the coarse observations too well), so callers apply it to fitting only.

It applies through any operator that acts linearly and channel by channel on the rendering
(:class:`~.operators.Identity`, :class:`~.operators.AreaDownsample`), and maps constants to
constants (so the bias stays a bias): ``A(F w + b) = A(F) w + b``.
"""

from __future__ import annotations

import math

import torch

from ..errors import BadArgumentError
from .coords import grid
from .operators import AreaDownsample, Identity
from .siren import BatchedSiren, _layer_forward

DEFAULT_RIDGE = 1e-2
"""Ridge penalty relative to the mean feature energy ``trace(F^T F) / width``. In domain
1e-6..1e-1 agree within 1 dB and 1 costs 5 dB; 1e-2 was best at steps 50-200 (sweep in
``benchmarks/README.md``, section ``head``)."""

WARMUP_STEPS = 10
"""After a solved head, the learning rate ramps up linearly over this many steps
(:func:`~.fit.warmup_lr`): Adam's first updates move every weight by about ``lr`` whatever
its gradient, which undid the solved head for ~10 steps and dipped below SIREN out of domain
(``benchmarks/paper/README.md``, section on the warm-up)."""

LINEAR_OPERATORS = (Identity, AreaDownsample)
"""Operators :func:`solve_head` solves through: linear, channel-wise, constant-preserving."""


def _features(net: BatchedSiren, coords: torch.Tensor,
              member: int | None = None) -> torch.Tensor:
    """Output of the last sine layer at ``coords`` ``[P, d]``: ``[P, width]`` while every
    sine layer is shared, else ``[batch, P, width]`` (``[1, P, width]`` for one ``member``)."""
    h = coords
    for i in range(net.config.layers - 1):
        w, b = net.weights[i], net.biases[i]
        if member is not None and w.dim() == 3:
            w, b = w[member:member + 1], b[member:member + 1]
        h = torch.sin(_layer_forward(h, w, b, net.config.omega(i)))
    return h


def solve_head(net: BatchedSiren, target: torch.Tensor, operator=None,
               ridge: float = DEFAULT_RIDGE, holdout: torch.Tensor | None = None,
               chunk_elements: int = 1 << 22) -> None:
    """Set ``net``'s head (last layer) to the ridge-regression fit of ``target``, in place.

    For each member ``b`` and channel: ``min_w ||A([F_b, 1]) w - y_b||^2 + lam ||w_F||^2``
    with ``F_b`` the last sine layer's features on the render grid (the layers before the
    head as they are now: the loaded encoder, any fresh layers after it at their SIREN
    init) and ``lam = ridge * trace(A(F_b)^T A(F_b)) / width``. The bias is not penalised.
    Normal equations in float64, one Cholesky solve per member; members are independent.

    Call it after loading the encoder and before the first optimiser step. Nothing else of
    ``net`` changes; ``requires_grad`` of the head is kept.

    Args:
        net: the members to initialise; ``net.config.out_features`` must equal ``C``.
        target: observations ``[batch, pixels, C]`` on the operator's observation grid, as
            passed to :func:`~.fit.fit`.
        operator: :class:`~.operators.Identity` (default, on a square grid of ``pixels``
            only if omitted: pass it for non-square images) or
            :class:`~.operators.AreaDownsample`. Other operators raise
            :class:`~napari_strainer.errors.BadArgumentError` (no cheap linear action known).
        ridge: relative ridge penalty (> 0 keeps rank-deficient cases solvable, e.g. fewer
            observed pixels than features).
        holdout: bool mask ``[batch or 1, pixels]`` of observations to leave out (the same
            mask :func:`~.fit.fit` holds out for self-validation; they must not be fitted).
        chunk_elements: feature elements computed at once under the identity operator
            (memory bound; other operators build the full features of one member at a time).

    Example:
        >>> net = BatchedSiren(SirenConfig(width=32, layers=3, shared_layers=2), batch=2)
        >>> y = torch.rand(2, 64, 1)
        >>> solve_head(net, y, Identity((8, 8)))
    """
    if target.dim() != 3 or target.shape[0] != net.batch:
        raise BadArgumentError(f"target must be [{net.batch}, pixels, channels], got "
                               f"{tuple(target.shape)}")
    b, pixels, c = target.shape
    if c != net.config.out_features:
        raise BadArgumentError(f"target has {c} channels, the net {net.config.out_features}")
    if ridge < 0 or not math.isfinite(ridge):
        raise BadArgumentError(f"ridge must be a non-negative number, got {ridge}")
    if operator is None:
        side = math.isqrt(pixels)
        if net.config.in_features != 2 or side * side != pixels:
            raise BadArgumentError("pass the operator: the grid of target is not a square image")
        operator = Identity((side, side))
    if not isinstance(operator, LINEAR_OPERATORS):
        raise BadArgumentError(f"solve_head cannot solve through {type(operator).__name__}; "
                               f"supported: {', '.join(o.__name__ for o in LINEAR_OPERATORS)}")
    if math.prod(operator.shape) != pixels:
        raise BadArgumentError(f"target has {pixels} pixels, the operator observes "
                               f"{math.prod(operator.shape)}")
    device = target.device
    width = net.config.width
    f64 = torch.float64
    keep = None
    if holdout is not None:
        keep = (~holdout.to(device)).expand(b, -1).to(f64)  # [B, pixels]
    gram = torch.zeros(b, width + 1, width + 1, dtype=f64, device=device)
    rhs = torch.zeros(b, width + 1, c, dtype=f64, device=device)
    y64 = target.to(f64)
    coords = grid(operator.render_shape, device)

    def accumulate(feats: torch.Tensor, rows: slice, members: slice) -> None:
        """Add the rows ``rows`` of the observed features ``[m or 1, p, width]``."""
        f = feats.to(f64)
        f = torch.cat([f, f.new_ones(*f.shape[:-1], 1)], dim=-1)  # the bias column
        y = y64[members, rows]
        if keep is not None:
            w = keep[members, rows, None]
            gram[members] += (f * w).mT @ f
            rhs[members] += (f * w).mT @ y
        else:
            gram[members] += f.mT @ f
            rhs[members] += f.mT @ y

    shared = net.shared >= net.config.layers - 1  # one set of features for all members
    with torch.no_grad():
        if isinstance(operator, Identity):  # observed = rendered: stream pixel chunks
            step = max(1, chunk_elements // (width * (1 if shared else b)))
            for s in range(0, pixels, step):
                rows = slice(s, min(s + step, pixels))
                f = _features(net, coords[rows])
                accumulate(f if f.dim() == 3 else f[None], rows, slice(None))
        elif shared:  # the operator needs whole images: all members' features at once
            accumulate(operator(_features(net, coords)[None]), slice(None), slice(None))
        else:  # ... or one member at a time
            for m in range(b):
                accumulate(operator(_features(net, coords, m)), slice(None), slice(m, m + 1))
        # ridge on the feature block only, relative to the mean feature energy per member
        diag = torch.diagonal(gram, dim1=-2, dim2=-1)
        energy = diag[:, :width].sum(-1) / width  # [B]
        # a member with no observed pixel gets a zero head rather than a singular system
        lam = torch.where(energy > 0, ridge * energy, torch.ones_like(energy))
        eye = torch.eye(width + 1, dtype=f64, device=device)
        eye[width, width] = 1e-9  # the bias is (almost) free: just keeps the system definite
        system = gram + lam[:, None, None] * eye
        solve_dev = torch.device("cpu") if device.type == "mps" else device  # no f64 on MPS
        system, rhs_s = system.to(solve_dev), rhs.to(solve_dev)
        chol, info = torch.linalg.cholesky_ex(system)
        if bool((info == 0).all()):
            sol = torch.cholesky_solve(rhs_s, chol)
        else:  # numerically indefinite (e.g. ridge 0 on a rank-deficient set): least squares
            sol = torch.linalg.lstsq(system, rhs_s).solution
        sol = sol.to(device)
        net.weights[-1].copy_(sol[:, :width].to(net.weights[-1].dtype))
        net.biases[-1].copy_(sol[:, width].to(net.biases[-1].dtype))
