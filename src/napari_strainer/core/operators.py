"""Forward operators ``A``: the fitting loop minimises ``||A(f(x)) - y||^2``.

``f`` is rendered on the operator's ``render_shape`` grid; ``A`` maps that rendering, shaped
``[batch, pixels, channels]``, to the observation grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import BadArgumentError


class Identity:
    """Plain fitting and denoising: the observation is the image itself."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = self.render_shape = tuple(shape)

    def __call__(self, pred: torch.Tensor) -> torch.Tensor:
        return pred


class AreaDownsample:
    """Super-resolution: ``A`` averages ``factor`` x ``factor`` blocks of the fine grid.

    Args:
        shape: the observed (coarse) image shape ``(rows, cols)``.
        factor: integer refinement per axis, an int or one per axis.
    """

    def __init__(self, shape: tuple[int, ...], factor: int | tuple[int, ...]):
        factors = (factor,) * len(shape) if isinstance(factor, int) else tuple(factor)
        if any(int(f) != f or f < 1 for f in factors):
            raise BadArgumentError(f"--scale must be a positive integer, got {factor}")
        self.shape = tuple(shape)
        self.factors = tuple(int(f) for f in factors)
        self.render_shape = tuple(n * f for n, f in zip(shape, self.factors))

    def __call__(self, pred: torch.Tensor) -> torch.Tensor:
        b, _, c = pred.shape
        img = pred.transpose(1, 2).reshape(b, c, *self.render_shape)
        pool = F.avg_pool2d if len(self.shape) == 2 else F.avg_pool3d
        low = pool(img, kernel_size=self.factors, stride=self.factors)
        return low.reshape(b, c, -1).transpose(1, 2)
