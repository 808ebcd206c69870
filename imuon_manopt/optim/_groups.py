"""The group structure of an :class:`~imuon_manopt.optim.IMuon` step: which parameters are stepped together.

Within one param group, parameters that share a kind (plain matrix, manifold parameter, factor pair, fallback
tensor), a geometry (for manifolds: the manifold class and settings), a shape, a dtype and a device form one
:class:`Group`, stepped by one batched call. The structure depends only on the param groups, the pairs and which
parameters have gradients; :func:`scan` computes the key the optimizer caches it under (and checks the gradients),
:func:`build` the groups.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..geometry import MetricOperator
from ..lmo import resolve_norm
from ._dispatch import ManifoldRule
from ._momentum import Stacked


@dataclass
class Group:
    """Parameters stepped together (one batched call): ``kind`` is ``matrix``, ``manifold``, ``pair`` or
    ``fallback``; for pairs ``params`` holds the B factors, then the A factors (``pair_ids``: their pair indices)."""

    kind: str
    group: dict[str, Any]
    params: list[torch.Tensor]
    shape2d: tuple[int, int] = (0, 0)
    rule: ManifoldRule | None = None
    geometry: MetricOperator | None = None
    pair_ids: list[int] = field(default_factory=list)
    #: the stacked momentum buffers kept between steps, one per run of equal shapes (pairs: B's, then A's)
    momentum: list[Stacked] = field(default_factory=list)
    #: every parameter passed the first-step checks (membership, full rank)
    checked: bool = False
    #: the group's numerical step (stacked; compiled with ``compile=True``) and the options it was made for
    step_fn: Any = None
    step_key: Any = None

    @property
    def parts(self) -> list[slice]:
        """Runs of ``params`` of one shape each (a pair group holds its B factors, then its A factors)."""
        if self.kind != "pair":
            return [slice(None)]
        n = len(self.pair_ids)
        return [slice(0, n), slice(n, None)]


def matrix_shape(shape: torch.Size, flatten: bool) -> tuple[int, int]:
    """The matrix shape a plain tensor's LMO acts on: ``(shape[0], prod(shape[1:]))`` (``flatten=True``: one
    matrix per tensor, as Muon treats convolution kernels) or ``shape[-2:]`` (``flatten=False``: one LMO per
    trailing ``(m, n)`` slice, batched over the leading dims, for per-expert and per-head weights)."""
    if flatten or len(shape) == 2:
        return (shape[0], math.prod(shape[1:]))
    return (shape[-2], shape[-1])


def scan(param_groups: Sequence[dict[str, Any]]) -> Any:
    """The structure key (which parameters have gradients, and the grouping options); checks every gradient."""
    key = []
    for gi, group in enumerate(param_groups):
        flags = []
        for pi, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                flags.append(False)
                continue
            if g.is_sparse:
                raise RuntimeError("IMuon does not support sparse gradients")
            if g.shape != p.shape:
                raise ValueError(
                    f"param group {gi}, parameter {pi}: gradient of shape {tuple(g.shape)} for a parameter of "
                    f"shape {tuple(p.shape)}; the gradient must have the parameter's shape"
                )
            flags.append(True)
        key.append((id(group["params"]), tuple(flags), group["use_imuon"], group["norm"], group.get("flatten", True)))
    return tuple(key)


def build(
    param_groups: Sequence[dict[str, Any]],
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    pair_index: dict[torch.Tensor, int],
    rules: dict[torch.Tensor, tuple[ManifoldRule, MetricOperator, Any]],
) -> list[Group]:
    """The groups of the parameters with gradients (a pair counts when either factor has one), in order of first
    appearance; joint norms (Frobenius, Schatten) couple a batch, so under them every group holds one item."""
    out: list[Group] = []
    for group in param_groups:
        joint = resolve_norm(group["norm"]).joint
        buckets: dict[Any, Group] = {}
        fallback: list[torch.Tensor] = []
        for p in group["params"]:
            if p in pair_index:
                i = pair_index[p]
                b, a = pairs[i]
                if p is not b or (b.grad is None and a.grad is None):
                    continue
                key = ("pair", b.shape, a.shape, b.dtype, b.device) + ((i,) if joint else ())
                grp = buckets.setdefault(key, Group("pair", group, [], (b.shape[-2], a.shape[-1])))
                grp.params.append(b)
                grp.pair_ids.append(i)
                continue
            if p.grad is None:
                continue
            if p in rules:
                rule, geometry, manifold_key = rules[p]
                key = ("manifold", manifold_key, p.shape, p.dtype, p.device) + ((id(p),) if joint else ())
                buckets.setdefault(key, Group("manifold", group, [], rule=rule, geometry=geometry)).params.append(p)
            elif p.ndim >= 2 and group["use_imuon"]:
                key = ("matrix", p.shape, p.dtype, p.device) + ((id(p),) if joint else ())
                shape2d = matrix_shape(p.shape, group.get("flatten", True))
                buckets.setdefault(key, Group("matrix", group, [], shape2d)).params.append(p)
            else:
                fallback.append(p)
        for grp in buckets.values():
            if grp.kind == "pair":
                grp.params = grp.params + [pairs[i][1] for i in grp.pair_ids]
            out.append(grp)
        if fallback:
            out.append(Group("fallback", group, fallback))
    return out
