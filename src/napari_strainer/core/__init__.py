"""Pure-PyTorch core: SIREN layers, the shared-encoder model, the fitting loop, operators."""

from .checkpoint import Encoder, load_encoder, save_encoder
from .fit import FitResult, Progress, StopRule, fit, render
from .head import solve_head
from .operators import AreaDownsample, Identity
from .siren import BatchedSiren, SirenConfig

__all__ = ["AreaDownsample", "BatchedSiren", "Encoder", "FitResult", "Identity", "Progress",
           "SirenConfig", "StopRule", "fit", "load_encoder", "render", "save_encoder",
           "solve_head"]
