"""Metric operators: one module per (manifold, metric); imports neither Pymanopt nor geoopt."""

from .base import Blocks, MetricOperator
from .euclidean import Euclidean
from .fixed_rank import AmbientFixedRank, FixedRank
from .grassmann import Grassmann
from .product import Product
from .spd import SPD
from .sphere import Sphere
from .stiefel import Stiefel

__all__ = [
    "AmbientFixedRank",
    "Blocks",
    "Euclidean",
    "FixedRank",
    "Grassmann",
    "MetricOperator",
    "Product",
    "SPD",
    "Sphere",
    "Stiefel",
]
