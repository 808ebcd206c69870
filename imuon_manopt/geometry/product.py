"""Products of geometries: points, gradients and directions are lists, one entry per factor.

The blocks of all factors are concatenated, so the template's block rule applies across factors: spectral and
nuclear norms combine with ``max`` (each block gets the full budget), Frobenius and Schatten-p jointly.
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import Blocks, MetricOperator


class Product(MetricOperator):
    """Cartesian product of metric operators."""

    def __init__(self, factors: Sequence[MetricOperator]) -> None:
        factors = tuple(factors)
        if not factors:
            raise ValueError("Product needs at least one factor geometry")
        for f in factors:
            if not isinstance(f, MetricOperator):
                raise TypeError(f"Product factors must be MetricOperator instances, got {type(f).__name__}")
        self.factors = factors
        self.structure = tuple(s for f in factors for s in f.structure)
        self._sizes = tuple(len(f.structure) for f in factors)
        self.supports_numpy = all(f.supports_numpy for f in factors)

    def _check(self, seq, what: str):
        if not isinstance(seq, (list, tuple)) or len(seq) != len(self.factors):
            n = len(seq) if isinstance(seq, (list, tuple)) else type(seq).__name__
            raise ValueError(
                f"Product of {len(self.factors)} factors needs a list of {len(self.factors)} {what}, got {n}"
            )
        return seq

    def _split(self, blocks: Blocks) -> list[Blocks]:
        out, start = [], 0
        for size in self._sizes:
            out.append(tuple(blocks[start : start + size]))
            start += size
        return out

    def at(self, x):
        return [f.at(xi) for f, xi in zip(self.factors, self._check(x, "points"))]

    def project(self, state, egrad) -> Blocks:
        egrad = self._check(egrad, "gradients")
        return tuple(b for f, s, e in zip(self.factors, state, egrad) for b in f.project(s, e))

    def whiten(self, state, blocks: Blocks) -> Blocks:
        return tuple(b for f, s, bl in zip(self.factors, state, self._split(blocks)) for b in f.whiten(s, bl))

    def unwhiten(self, state, blocks: Blocks) -> Blocks:
        return tuple(b for f, s, bl in zip(self.factors, state, self._split(blocks)) for b in f.unwhiten(s, bl))

    def block_ranks(self, state) -> tuple[int | None, ...] | None:
        per = [f.block_ranks(s) for f, s in zip(self.factors, state)]
        if all(r is None for r in per):
            return None
        return tuple(b for f, r in zip(self.factors, per) for b in (r if r is not None else (None,) * len(f.structure)))

    def tangent(self, state, blocks: Blocks) -> list:
        return [f.tangent(s, bl) for f, s, bl in zip(self.factors, state, self._split(blocks))]

    def flat(self, state, v) -> list:
        v = self._check(v, "tangent vectors")
        return [f.flat(s, vi) for f, s, vi in zip(self.factors, state, v)]

    def __repr__(self) -> str:
        return f"Product({list(self.factors)!r})"
