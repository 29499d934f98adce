"""foof: gradient descent on neurons, KFAC and exact natural gradients for PyTorch.

A library and reproduction suite for F. Benzing, *Gradient Descent on Neurons and its Link to
Approximate Second-Order Optimization* (ICML 2022).
"""

from foof.capture import Capture, is_supported
from foof.curvature.sampling import LossScaleWarning
from foof.fisher import KroneckerLaplace, LaplacePosterior, SubsampledFisher
from foof.optim import (
    FOOF,
    KFAC,
    CurvatureOptimizer,
    NaturalGradient,
    backward,
    build_optimizer,
)

__version__ = "0.1.0"

__all__ = [
    "FOOF",
    "KFAC",
    "KroneckerLaplace",
    "LaplacePosterior",
    "LossScaleWarning",
    "NaturalGradient",
    "SubsampledFisher",
    "Capture",
    "CurvatureOptimizer",
    "__version__",
    "backward",
    "build_optimizer",
    "is_supported",
]
