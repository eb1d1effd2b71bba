"""Pure-PyTorch core: SIREN layers, the shared-encoder model, the one fitting loop, the problems
it fits, operators and least-squares solvers."""

from .checkpoint import Encoder, load_encoder, save_encoder
from .fit import FitResult, Progress, StopRule, fit
from .head import solve_head
from .operators import AreaDownsample, Identity
from .problems import ImageProblem, StackProblem, render
from .siren import BatchedSiren, SirenConfig

__all__ = ["AreaDownsample", "BatchedSiren", "Encoder", "FitResult", "Identity", "ImageProblem",
           "Progress", "SirenConfig", "StackProblem", "StopRule", "fit", "load_encoder", "render", "save_encoder",
           "solve_head"]
