"""The Pymanopt adapter: :class:`IMuon` (a Pymanopt ``Optimizer``) and its step-size rules.

Example::

    import numpy as np
    import pymanopt
    from imuon_manopt.optimizers import IMuon

    manifold = pymanopt.manifolds.Grassmann(100, 5)
    C = np.cov(np.random.randn(100, 500))

    @pymanopt.function.autograd(manifold)
    def cost(X):
        return -np.trace(X.T @ C @ X)

    result = IMuon(verbosity=0).run(pymanopt.Problem(manifold, cost))
"""

from ._pymanopt_geometry import SUPPORTED as SUPPORTED_MANIFOLDS
from .imuon import IMuon
from .step_size import (
    Armijo,
    Constant,
    Cosine,
    Exponential,
    InverseSqrt,
    LineSearcher,
    Schedule,
    StepResult,
    StepSizeRule,
)

__all__ = [
    "SUPPORTED_MANIFOLDS",
    "Armijo",
    "Constant",
    "Cosine",
    "Exponential",
    "IMuon",
    "InverseSqrt",
    "LineSearcher",
    "Schedule",
    "StepResult",
    "StepSizeRule",
]
