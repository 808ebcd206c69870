"""Momentum of :class:`~imuon_manopt.optim.IMuon` for every kind of parameter (spec §3), with ``beta = momentum``.

- Plain matrices and factor pairs (:func:`plain`): the buffer sums Euclidean gradients, ``buf <- beta buf + E``, and
  the step's gradient is ``E~ = E + beta buf`` (Nesterov) or ``E~ = buf``. Elementwise, so it runs on local shards
  of sharded parameters. For pairs the buffers are on the factor gradients ``E_B``, ``E_A`` (GL(r)-equivariant).
- Parameters on a manifold that is an open subset of its ambient space (SPD; the geometry's ``open_in_ambient``,
  :func:`covector`): as plain matrices, the buffer sums Euclidean gradients, kept as they are between points (every
  cotangent space is the ambient space). A transported tangent buffer would keep its norm while the Riemannian
  gradient shrinks towards the boundary, and carry the normalized steps into it (see
  :mod:`imuon_manopt.geometry.spd`).
- Other manifold parameters (:func:`tangent`): the buffer is a tangent vector, the running sum of Riemannian gradients
  ``egrad2rgrad(x, E)``, carried to the new point by the manifold's vector transport (the retraction's
  ``retr_transp``, see :mod:`~imuon_manopt.optim._steps`); the Nesterov combination is lowered to a Euclidean
  covector by the geometry's ``flat`` before the iMuon template.

The spectral LMO is scale invariant, so this sum form gives the same directions as ``torch.optim.Muon``'s EMA form
(whose combined update is ``(1 - beta)`` times this one). Buffers live in the working dtype (at least float32) under
``state[p]["momentum_buffer"]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import geoopt
import torch

from ..geometry import MetricOperator
from ._dispatch import ManifoldRule
from ._distributed import local
from ._stack import stack

__all__ = [
    "KEY",
    "Stacked",
    "accumulate",
    "buffers",
    "covector",
    "euclidean",
    "euclidean_stacked",
    "plain",
    "project",
    "stacked_buffer",
    "tangent",
]

#: The state key of a momentum buffer.
KEY = "momentum_buffer"


def buffers(state: Any, params: Sequence[torch.Tensor], like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The momentum buffers of ``params`` (local, in ``like``'s dtypes); zeros where none exists yet (the same as no
    buffer)."""
    out = []
    for p, x in zip(params, like):
        buf = state[p].get(KEY)
        out.append(torch.zeros_like(x) if buf is None else local(buf).to(x.dtype))
    return out


@dataclass
class Stacked:
    """The momentum buffers of one run of equally shaped parameters kept as one stacked tensor between steps:
    ``state[p]["momentum_buffer"]`` are its rows (views), so ``state_dict()`` keeps its per-parameter layout while
    the step reads and writes one tensor. Rebuilt by one copy when the state entries are no longer its rows
    (``load_state_dict``, a user's edit)."""

    tensor: torch.Tensor | None = None
    views: list[torch.Tensor] = field(default_factory=list)

    def current(
        self, state: Any, params: Sequence[torch.Tensor], like: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """The stacked buffers of ``params`` with ``like``'s shape and device, in ``dtype`` (zeros where none exists
        yet)."""
        t = self.tensor
        if (
            t is not None
            and t.dtype == dtype
            and t.shape == like.shape
            and len(self.views) == len(params)
            and all(state[p].get(KEY) is v for p, v in zip(params, self.views))
        ):
            return t
        return stacked_buffer(state, params, like, dtype)

    def set(self, state: Any, params: Sequence[torch.Tensor], new: torch.Tensor) -> None:
        """Make ``new`` the buffers (no copy): the state entries become its rows."""
        views = list(new.unbind(0))
        for p, v in zip(params, views):
            state[p][KEY] = v
        self.tensor, self.views = new, views


def stacked_buffer(state: Any, params: Sequence[torch.Tensor], like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The buffers of ``params`` stacked in ``dtype`` (one copy; zeros where none exists yet)."""
    bufs = [state[p].get(KEY) for p in params]
    if all(b is None for b in bufs):
        return torch.zeros_like(like, dtype=dtype)
    rows = [torch.zeros_like(like[0], dtype=dtype) if b is None else local(b).to(dtype) for b in bufs]
    return torch.stack(rows)


def euclidean_stacked(
    e: torch.Tensor, buf: torch.Tensor, beta: float, use_nesterov: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`euclidean` on stacked tensors: ``(e~, new buf)`` (two elementwise ops)."""
    new = torch.add(e, buf, alpha=beta)
    return (torch.add(e, new, alpha=beta) if use_nesterov else new), new


def accumulate(e: list[torch.Tensor], bufs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Error feedback's momentum (Dion): ``M = buf + E``, a sum without decay; the group's step returns the new
    buffer ``M - (1 - beta) P P^T M`` (what the low-rank step used decays, the rest stays;
    :func:`~imuon_manopt.optim._steps.matrix_body`, :func:`~imuon_manopt.optim._pairs.pair_body`)."""
    return list(torch._foreach_add(e, bufs))


def _stack(ts: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return stack([(t,) for t in ts], 0, dtype)


def euclidean(
    e: list[torch.Tensor], bufs: list[torch.Tensor], beta: float, use_nesterov: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``buf <- beta buf + e``; returns ``(e~, new bufs)`` with ``e~ = e + beta buf`` (Nesterov) or ``buf``.

    Stacked when all tensors share one shape (three batched ops), else ``torch._foreach`` ops."""
    if len({t.shape for t in e}) == 1 and len({t.shape for t in bufs}) == 1:
        es, bs = _stack(e, e[0].dtype), _stack(bufs, e[0].dtype)
        new = torch.add(es, bs, alpha=beta)
        out = torch.add(es, new, alpha=beta) if use_nesterov else new
        return list(out.unbind(0)), list(new.unbind(0))
    new_bufs = list(torch._foreach_add(e, torch._foreach_mul(bufs, beta)))
    return (list(torch._foreach_add(e, new_bufs, alpha=beta)) if use_nesterov else new_bufs), new_bufs


def plain(
    state: Any,
    params: list[torch.Tensor],
    es: list[torch.Tensor],
    parts: Sequence[slice],
    beta: float,
    use_nesterov: bool,
    writes: list,
) -> list[torch.Tensor]:
    """The momentum step of plain matrices and pairs: ``E~`` for every gradient in ``es`` (local tensors, working
    dtype); appends ``((p, "momentum_buffer"), new buffer)`` to ``writes``. ``parts`` cut ``params`` into runs of
    one shape each (a pair group holds its B factors, then its A factors), so that each run stacks."""
    out: list[torch.Tensor] = []
    for part in parts:
        e, bufs = euclidean(es[part], buffers(state, params[part], es[part]), beta, use_nesterov)
        out += e
        writes.extend(((p, KEY), v) for p, v in zip(params[part], bufs))
    return out


def covector(e: torch.Tensor, buf: torch.Tensor, beta: float, use_nesterov: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The momentum step of manifold parameters whose geometry is ``open_in_ambient`` (batched): ``(E~, new
    buffer)`` with ``buf <- E + beta buf`` and ``E~ = E + beta buf`` (Nesterov) or ``buf``; no transport."""
    new = torch.add(e, buf, alpha=beta)
    return (torch.add(e, new, alpha=beta) if use_nesterov else new), new


def tangent(
    manifold: geoopt.Manifold,
    x: torch.Tensor,
    e: torch.Tensor,
    buf: torch.Tensor,
    beta: float,
    use_nesterov: bool,
    lower: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The momentum step of manifold parameters (batched): ``(E~, new buffer)`` with ``r = egrad2rgrad(x, E)``,
    ``buf <- r + beta buf`` (``buf`` already transported to ``x``), and ``E~ = lower(x, r + beta buf)`` (Nesterov)
    or ``lower(x, buf)``, the covector the iMuon template takes. The caller transports the new buffer to the next
    point with the retraction (``retr_transp``)."""
    r = manifold.egrad2rgrad(x, e)
    new = torch.add(r, buf, alpha=beta)
    return lower(x, torch.add(r, new, alpha=beta) if use_nesterov else new), new


def project(
    manifold: geoopt.Manifold, rule: ManifoldRule, geometry: MetricOperator, x: torch.Tensor, buf: torch.Tensor
) -> torch.Tensor:
    """A manifold parameter's buffer projected onto the tangent space at ``x`` (``stabilize``). geoopt's ``proju``
    takes a covector where the rule says so (``proju(flat(v)) = v`` on tangents). A buffer of Euclidean gradients
    (``open_in_ambient``) is no tangent vector and is returned as it is."""
    if geometry.open_in_ambient:
        return buf
    v = geometry.flat(geometry.at(x), buf) if rule.covector_update else buf
    return manifold.proju(x, v)
