"""geoopt manifolds that geoopt itself lacks.

- :class:`Grassmann`: p-dimensional subspaces of ``R^n``, orthonormal ``(..., n, p)``
  representatives, Frobenius (quotient) metric.
"""

from .grassmann import Grassmann

__all__ = ["Grassmann"]
