"""Test problems with closed-form optima, shared by the Pymanopt solver's tests."""

from __future__ import annotations

from typing import Any

import numpy as np
import pymanopt
from pymanopt import manifolds as pm


def rayleigh(n: int = 8, seed: int = 0) -> tuple[pm.Sphere, Any, Any, np.ndarray, np.ndarray]:
    """``min x^T C x`` on the sphere ``S^{n-1}``, ``C`` a random symmetric ``(n, n)`` matrix: the optimum is the
    smallest eigenvalue of ``C`` (closed form). Returns ``(manifold, cost, egrad, x0, C)``, ``egrad(x) = 2 C x`` and
    ``x0`` a random unit vector, drawn after ``C`` from ``numpy.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, n))
    cov = a + a.T
    manifold = pm.Sphere(n)

    @pymanopt.function.numpy(manifold)
    def cost(x):
        return float(x @ cov @ x)

    @pymanopt.function.numpy(manifold)
    def egrad(x):
        return 2.0 * (cov @ x)

    x0 = rng.standard_normal(n)
    return manifold, cost, egrad, x0 / np.linalg.norm(x0), cov
