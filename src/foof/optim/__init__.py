"""Optimizers: thin ``torch.optim.Optimizer`` subclasses on top of the shared capture."""

from foof.optim.base import CurvatureOptimizer
from foof.optim.foof import FOOF
from foof.optim.kfac import KFAC
from foof.optim.natural import NaturalGradient
from foof.optim.registry import OPTIMIZERS, backward, build_optimizer

__all__ = [
    "FOOF",
    "KFAC",
    "NaturalGradient",
    "OPTIMIZERS",
    "CurvatureOptimizer",
    "backward",
    "build_optimizer",
]
