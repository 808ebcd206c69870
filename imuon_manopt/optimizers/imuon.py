"""iMuon as a Pymanopt optimizer.

One iteration at a point ``x`` (spec §1):

1. ``E = problem.euclidean_gradient(x)`` (one gradient evaluation; the Riemannian gradient, for the
   gradient norm, is ``manifold.euclidean_to_riemannian_gradient(x, E)``, except on
   ``FixedRankEmbedded``, where it is the projection of the gradient with respect to the matrix,
   computed without Pymanopt's divisions by ``s_i^2 - s_j^2``);
2. the iMuon direction ``xi`` and the LMO gap ``<E, xi>`` from
   :func:`imuon_manopt.direction.intrinsic_direction` with the manifold's metric operator
   (:mod:`._pymanopt_geometry`); on small problems the core computes in numpy (no torch call);
3. ``x <- manifold.retraction(x, -eta * xi)``, ``eta`` from the step-size rule (:mod:`.step_size`).

With momentum ``beta > 0`` the buffer is a tangent vector, ``m <- beta * transport(m) + grad f``,
and the direction is taken from ``grad f + beta * m`` (Nesterov) or ``m``, lowered to a Euclidean
covector by the metric. On a manifold whose geometry is ``open_in_ambient`` (``SymmetricPositiveDefinite``,
``Euclidean``; per component of a ``Product``) the buffer is the sum of core Euclidean gradients instead,
``m <- beta * m + E``, kept as it is between points (no transport; see :mod:`imuon_manopt.geometry.spd`): a
transported tangent buffer keeps its norm while ``grad f = X sym(E) X`` shrinks near the boundary, and drove an
eigenvalue to rounding level at constant steps around ``-ln(beta)``.

Cost per iteration (default ``step_size="armijo"``, ``momentum=0``): one gradient evaluation, the
cost evaluations of the line search (usually 1-2; the accepted trial's cost is reused, so the cost
is never evaluated twice at a point), one Riemannian-gradient conversion and one polar factor / sign
per block: e.g. a thin SVD of ``n x p`` for Stiefel and Grassmann, an ``n x n`` Cholesky and
``eigh`` for SPD, thin SVDs of an ``m x k`` and an ``n x k`` matrix for fixed rank. Pymanopt's
``SteepestDescent`` evaluates the cost at each new point again after its line search. Momentum adds
a second direction (the gap reported is always the gradient's).
"""

from __future__ import annotations

import math
import time
from copy import deepcopy
from typing import Any

import numpy as np
from pymanopt.optimizers.optimizer import Optimizer, OptimizerResult
from pymanopt.tools import printer

from ..direction import intrinsic_direction
from ..geometry import MetricOperator
from ..lmo import Norm, PolarSpec, resolve_norm, resolve_polar
from ._pymanopt_geometry import HostGeometry, finite_tree, host_geometry
from .step_size import StepResult, StepSizeRule, resolve_step_size

__all__ = ["IMuon"]

# The stall rule (min_cost_change) looks at the cost change over this many iterations.
_STALL_WINDOW = 5
# A trial point off the manifold is retried at eta * 2^-(2^k - 1), k = 1.._SHORTEN_TRIES: 1/2, 1/8, 1/128, ...,
# down to eta * 2^-2047, below any finite step that can overflow a retraction.
_SHORTEN_TRIES = 11


def _shorten(manifold: Any, host: Any, x: Any, xi: Any, eta: float) -> StepResult:
    """The step ``R_x(-eta' xi)`` for the longest ``eta' = eta 2^-(2^k - 1)`` whose point is on the manifold (finite
    and passing the manifold's point check), or a refusal (``step_size`` 0, ``x`` itself) when none is. A huge
    constant step overflows a retraction (a sphere point becomes the zero vector; fixed-rank factors lose
    orthonormality): such a trial is never taken."""
    for k in range(1, _SHORTEN_TRIES + 1):
        trial_eta = eta * 2.0 ** -(2**k - 1)
        if not trial_eta > 0.0:
            break
        point = manifold.retraction(x, -trial_eta * xi)
        if host.feasible(point):
            return StepResult(trial_eta, point, None, 0)
    return StepResult(0.0, x, None, 0)


def _parts(host: HostGeometry) -> list[HostGeometry] | None:
    """The component adapters of a built-in ``Product`` (``None`` for any other adapter, a user geometry included)."""
    return getattr(host, "parts", None)


def _accumulate(host: HostGeometry, x: Any, rgrad: Any, e_core: Any, buffer: Any, beta: float, nesterov: bool):
    """One momentum step at ``x``: ``(covector, candidate)``, the core Euclidean gradient the direction is taken
    from and the buffer to carry to the next point. Per component of a product: where the geometry is
    ``open_in_ambient`` the buffer sums core Euclidean gradients (``m <- beta m + E``, covector ``E + beta m`` or
    ``m``); elsewhere it sums Riemannian gradients (``m <- beta m + grad f``, already transported) and the
    combination is lowered by the adapter's ``flat``. ``buffer`` is ``None`` on the first step."""
    parts = _parts(host)
    if parts is not None:
        pairs = [
            _accumulate(h, xc, r, e, None if buffer is None else b, beta, nesterov)
            for h, xc, r, e, b in zip(parts, x, rgrad, e_core, buffer if buffer is not None else parts)
        ]
        return [c for c, _ in pairs], [m for _, m in pairs]
    g = e_core if host.geometry.open_in_ambient else rgrad
    candidate = g if buffer is None else beta * buffer + g
    combined = g + beta * candidate if nesterov else candidate
    return (combined if host.geometry.open_in_ambient else host.flat(x, combined)), candidate


def _restart(host: HostGeometry, rgrad: Any, e_core: Any) -> Any:
    """The buffer restarted from the gradient: ``E`` where the geometry is ``open_in_ambient``, else ``grad f``."""
    parts = _parts(host)
    if parts is not None:
        return [_restart(h, r, e) for h, r, e in zip(parts, rgrad, e_core)]
    return e_core if host.geometry.open_in_ambient else rgrad


def _carry(host: HostGeometry, manifold: Any, x: Any, new_x: Any, buffer: Any) -> Any:
    """The buffer at ``new_x``: a sum of Euclidean gradients (``open_in_ambient``) as it is, a tangent vector by
    ``manifold.transport``; per component of a product."""
    parts = _parts(host)
    if parts is not None:
        return [_carry(h, m, a, b, v) for h, m, a, b, v in zip(parts, manifold.manifolds, x, new_x, buffer)]
    return buffer if host.geometry.open_in_ambient else manifold.transport(x, new_x, buffer)


class IMuon(Optimizer):
    """Intrinsic Muon: steepest descent in a unitarily invariant norm of the whitened gradient.

    Works on Pymanopt's ``Euclidean``, ``Sphere``, ``Stiefel``, ``Grassmann``,
    ``SymmetricPositiveDefinite``, ``FixedRankEmbedded`` and ``Product`` of these (``k > 1`` stacks
    included), with each manifold's own metric, retraction, transport and tangent-vector type; any
    other manifold through ``geometry=``.

    On ``FixedRankEmbedded`` the cost must depend on ``(u, s, vt)`` only through ``u diag(s) vt``;
    its Euclidean gradient (``euclidean_gradient=`` or an autodiff backend) may be Pymanopt's
    factor gradients ``(du, ds, dvt)`` or the gradient with respect to the matrix: an ``m x n``
    array, a ``scipy.sparse`` matrix or the factored ``(U, S, V)`` with ``U @ S @ V.T``. Repeated
    singular values are fine (the Riemannian gradient is formed without Pymanopt's divisions by
    ``s_i^2 - s_j^2``).

    Args:
        step_size: the step-size rule: ``"armijo"`` (default; backtracking along the iMuon
            direction), a positive float (constant step: ``x <- R_x(-step_size * xi)``),
            ``"inverse_sqrt"``, ``"cosine"``, ``"exponential"``, a
            :class:`~imuon_manopt.optimizers.step_size.StepSizeRule` or a callable ``t -> eta``. The
            step length is measured in the chosen norm (``xi`` has norm 1).
        momentum: ``beta`` in ``[0, 1)`` (default 0: with a line search on a deterministic cost,
            momentum did not reduce iterations in our measurements). The buffer is a tangent vector
            carried by ``manifold.transport``, or, where the geometry is ``open_in_ambient`` (SPD,
            Euclidean), the sum of Euclidean gradients, not transported. If the momentum direction is not
            a descent direction, the buffer restarts from the gradient.
        nesterov: ``True``: Nesterov (``grad + beta * m``, default); ``False``: heavy-ball (``m``)
            momentum. Anything but a bool is a ``ValueError``.
        norm: a name or a ``(name, parameter)`` pair, resolved by :func:`imuon_manopt.lmo.resolve_norm` as
            everywhere in the package: ``"spectral"`` (default), ``"frobenius"`` (Riemannian steepest descent
            with normalized steps), ``"nuclear"``, ``("schatten", p)``, ``("kyfan", k)`` (the step ``U_k V_k^T``
            of the whitened gradient's top ``k`` singular pairs per block) or ``("fmuon", alpha)`` (``alpha
            polar(H) + (1 - alpha) H / ||H||_F``).
        polar: the LMO solver, a name or a dict as in :func:`imuon_manopt.lmo.resolve_polar`: ``"svd"`` (exact,
            default), ``"newton_schulz"`` (fast, approximate polar factors; spectral and F-Muon only) or
            ``"randomized"`` (Ky Fan only: a range finder, ``{"method": "randomized", "oversample": 8,
            "power_iters": 2}``).
        min_lmo_gap: stop when the LMO gap ``<E, xi>`` (the dual norm of the whitened gradient)
            drops below it; ``None`` (default) disables the criterion.
        min_cost_change: stop when the steps of the last 5 iterations together changed the cost by at
            most this fraction of ``|cost|`` (default ``1e-14``: the steps change nothing but rounding);
            ``None`` or 0 disables it. It ends the stretch of tiny steps that would otherwise run until
            ``min_step_size`` or ``max_iterations``.
        geometry: a :class:`~imuon_manopt.geometry.MetricOperator` to use instead of the built-in
            one (required for manifolds without one). It receives Pymanopt's points and Euclidean
            gradients as they are.
        max_time: Pymanopt's stopping criterion (seconds), with the default of Pymanopt's solvers.
        max_iterations: Pymanopt's stopping criterion, with the default of Pymanopt's solvers.
        min_gradient_norm: Pymanopt's stopping criterion, with the default of Pymanopt's solvers.
        min_step_size: Pymanopt's stopping criterion, applied to ``eta``.
        max_cost_evaluations: Pymanopt's stopping criterion; counts real cost evaluations (line-search trials
            included).
        verbosity: Pymanopt's output control (``verbosity=2`` prints a table, as its solvers do).
        log_verbosity: Pymanopt's logging control, as in its solvers.

    Table (``verbosity >= 2``) and log (``log_verbosity >= 1``): one row per iteration, counted from
    1 as in Pymanopt's solvers (at most ``max_iterations`` rows); row ``k`` is the point iteration
    ``k`` starts from: ``iteration, point, cost, gradient_norm, lmo_gap, step_size``
    (``step_size`` is the step that reached the point; NaN in row 1). After ``max_iterations``
    steps the run stops at the last step's point, which has no row (the result holds its cost).
    """

    def __init__(
        self,
        step_size: Any = "armijo",
        momentum: float = 0.0,
        nesterov: bool = True,
        norm: str | tuple[str, Any] = "spectral",
        polar: str | dict[str, Any] = "svd",
        min_lmo_gap: float | None = None,
        geometry: MetricOperator | None = None,
        min_cost_change: float | None = 1e-14,
        *,
        max_time: float = 1000,
        max_iterations: int = 1000,
        min_gradient_norm: float = 1e-6,
        min_step_size: float = 1e-10,
        max_cost_evaluations: int = 5000,
        verbosity: int = 2,
        log_verbosity: int = 0,
    ) -> None:
        super().__init__(
            max_time=max_time,
            max_iterations=max_iterations,
            min_gradient_norm=min_gradient_norm,
            min_step_size=min_step_size,
            max_cost_evaluations=max_cost_evaluations,
            verbosity=verbosity,
            log_verbosity=log_verbosity,
        )
        self._step_size = resolve_step_size(step_size)
        self.step_size_rule: StepSizeRule | None = None

        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be a float in [0, 1), got {momentum!r}")
        self._momentum = float(momentum)
        if not isinstance(nesterov, (bool, np.bool_)):
            raise ValueError(f"nesterov must be True (Nesterov momentum) or False (heavy ball), got {nesterov!r}")
        self._nesterov = bool(nesterov)

        nrm = resolve_norm(norm)  # the one validation of norm specs
        self._nrm: Norm = nrm
        self._norm = nrm.name

        spec: PolarSpec = resolve_polar(polar)
        if spec.method == "eigh":
            raise ValueError("polar='eigh' is not a solver choice here: use 'svd' (eigh is used for symmetric blocks)")
        if spec.method == "newton_schulz" and nrm.name not in ("spectral", "fmuon"):
            raise ValueError(
                f"polar='newton_schulz' applies to norm='spectral' and ('fmuon', alpha) only, got norm={norm!r}"
            )
        if spec.method == "randomized" and nrm.name != "kyfan":
            raise ValueError(f"polar='randomized' solves the Ky Fan LMO: it needs norm=('kyfan', k), got norm={norm!r}")
        self._polar_spec = spec
        self._polar = spec.method

        if min_lmo_gap is not None and (
            isinstance(min_lmo_gap, bool)
            or not isinstance(min_lmo_gap, (int, float))
            or not 0.0 <= min_lmo_gap < math.inf
        ):
            raise ValueError(f"min_lmo_gap must be None or a float in [0, inf), got {min_lmo_gap!r}")
        self._min_lmo_gap = min_lmo_gap

        if min_cost_change is not None and (
            isinstance(min_cost_change, bool)
            or not isinstance(min_cost_change, (int, float))
            or not 0.0 <= min_cost_change < 1.0
        ):
            raise ValueError(f"min_cost_change must be None or a float in [0, 1), got {min_cost_change!r}")
        self._min_cost_change = float(min_cost_change or 0.0)

        if geometry is not None and not isinstance(geometry, MetricOperator):
            raise TypeError(f"geometry must be an imuon_manopt.geometry.MetricOperator, got {type(geometry).__name__}")
        self._geometry = geometry

    # ---------------------------------------------------------------------------------------------

    def _direction(self, host, x, e_core):
        """``(xi, gap)``: the iMuon direction at ``x`` as a Pymanopt tangent vector, and the LMO
        gap, for the core Euclidean gradient ``e_core``."""
        d = intrinsic_direction(host.geometry, host.core_point(x), e_core, self._nrm, polar=self._polar_spec)
        return host.tangent(x, d.xi), float(d.gap)

    def _gradient_function(self, problem, host):
        """``x -> (riemannian gradient, core Euclidean gradient)`` with one gradient evaluation."""
        user_riemannian = (
            getattr(problem, "_euclidean_gradient", None) is None
            and getattr(problem, "_riemannian_gradient", None) is not None
        )
        if user_riemannian:
            riemannian_gradient = problem.riemannian_gradient

            def gradients(x):
                rgrad = riemannian_gradient(x)
                host.check_gradient(x, rgrad, "riemannian_gradient")
                return rgrad, host.flat(x, rgrad)
        else:
            euclidean_gradient = problem.euclidean_gradient

            def gradients(x):
                return host.gradients(x, euclidean_gradient(x))

        return gradients

    def run(self, problem, *, initial_point=None, reuse_line_searcher: bool = False) -> OptimizerResult:
        """Run iMuon on a Pymanopt ``Problem``.

        Args:
            problem: the problem; its manifold must be supported (or ``geometry=`` given).
            initial_point: the starting point (checked to lie on the manifold); random if ``None``.
            reuse_line_searcher: keep the step-size rule's state (Armijo's remembered step, a
                schedule's counter) from the previous run instead of starting from a fresh copy.

        Returns:
            Pymanopt's ``OptimizerResult``; ``point`` is always finite: a non-finite cost or
            gradient stops the run at the last point with a finite cost.
        """
        manifold = problem.manifold
        objective = problem.cost
        host = host_geometry(manifold, self._geometry)
        gradients = self._gradient_function(problem, host)

        if not reuse_line_searcher or self.step_size_rule is None:
            self.step_size_rule = deepcopy(self._step_size)
        rule = self.step_size_rule
        rule.start(self._max_iterations)

        x = manifold.random_point() if initial_point is None else initial_point
        host.check_point(x)

        if self._verbosity >= 1:
            print("Optimizing...")
        if self._verbosity >= 2:
            width = int(np.log10(max(self._max_iterations, 1))) + 1
            column_printer = printer.ColumnPrinter(
                columns=[
                    ("Iteration", f"{width}d"),
                    ("Cost", "+.16e"),
                    ("Gradient norm", ".8e"),
                    ("LMO gap", ".8e"),
                ]
            )
        else:
            column_printer = printer.VoidPrinter()
        column_printer.print_header()

        self._initialize_log(
            optimizer_parameters={
                "step_size": rule,
                "momentum": self._momentum,
                "nesterov": self._nesterov,
                "norm": self._nrm.spec,
                "polar": self._polar,
                "geometry": host.geometry,
            }
        )
        self._log["stopping_criteria"]["min_lmo_gap"] = self._min_lmo_gap
        self._log["stopping_criteria"]["min_cost_change"] = self._min_cost_change
        recent_costs: list[float] = []  # the costs of the last _STALL_WINDOW + 1 points

        beta = self._momentum
        start_time = time.time()
        iteration = 0
        step_size = math.nan
        cost = float(objective(x))
        cost_evaluations = 1
        rgrad, e_core = gradients(x)
        previous = None  # (point, cost, gradient norm, gap) of the last point with a finite cost
        buffer = None
        gradient_norm = gap = math.nan
        # x is known to be finite: every new point passed host.feasible, which checks finiteness (the start is
        # checked once, below)
        x_finite = False

        while True:
            stopping_criterion = None
            if not x_finite:
                x_finite = finite_tree(x)
            finite = math.isfinite(cost) and x_finite
            if iteration >= self._max_iterations and finite:
                # Pymanopt's convention: max_iterations rows, counted from 1; the last step's point
                # is the result (its cost is the result's cost), with no row of its own.
                stopping_criterion = self._check_stopping_criterion(start_time=start_time, iteration=iteration)
                if finite_tree(rgrad):
                    gradient_norm = float(manifold.norm(x, rgrad))
                if self._verbosity >= 1:
                    print(stopping_criterion)
                    print("")
                break
            # (a non-finite Riemannian gradient shows in its norm)
            gradient_norm = float(manifold.norm(x, rgrad)) if finite else math.nan
            if math.isfinite(gradient_norm) and finite_tree(e_core):
                xi, gap = self._direction(host, x, e_core)
                finite_direction = math.isfinite(gap) and finite_tree(xi)
            else:
                finite_direction = False
            if not finite_direction:
                stopping_criterion = (
                    f"Terminated - non-finite cost, gradient or direction after {iteration} "
                    "iterations; returned "
                    "the last point with a finite cost."
                )
                if not finite and previous is not None:
                    x, cost, gradient_norm, gap = previous
                else:
                    gradient_norm = gap = math.nan

            column_printer.print_row([iteration + 1, cost, gradient_norm, gap])
            self._add_log_entry(
                iteration=iteration + 1,
                point=x,
                cost=cost,
                gradient_norm=gradient_norm,
                lmo_gap=gap,
                step_size=step_size,
            )

            if stopping_criterion is None:
                stopping_criterion = self._check_stopping_criterion(
                    start_time=start_time,
                    iteration=iteration,
                    gradient_norm=gradient_norm,
                    step_size=step_size,
                    cost_evaluations=cost_evaluations,
                )
            if stopping_criterion is None and self._min_lmo_gap is not None and gap < self._min_lmo_gap:
                stopping_criterion = (
                    f"Terminated - min LMO gap reached after {iteration} iterations, "
                    f"{time.time() - start_time:.2f} seconds."
                )
            if stopping_criterion:
                if self._verbosity >= 1:
                    print(stopping_criterion)
                    print("")
                break

            slope = gap
            candidate = None  # the momentum buffer at x, committed only if the step is taken
            if beta > 0.0:
                covector, candidate = _accumulate(host, x, rgrad, e_core, buffer, beta, self._nesterov)
                xi_m, _ = self._direction(host, x, covector)
                slope_m = float(manifold.inner_product(x, rgrad, xi_m))
                if slope_m > 0.0 and math.isfinite(slope_m):
                    xi, slope = xi_m, slope_m
                else:  # not a descent direction: restart the momentum from the gradient
                    candidate = _restart(host, rgrad, e_core)
            elif self._polar != "svd":  # approximate polar factors: use the exact slope
                slope = float(manifold.inner_product(x, rgrad, xi))

            step = rule.search(objective, manifold, x, xi, cost, slope)
            cost_evaluations += step.cost_evaluations
            if step.point is not x and not host.feasible(step.point):
                tried = float(step.step_size)
                step = _shorten(manifold, host, x, xi, tried)
                if step.point is x:
                    stopping_criterion = (
                        f"Terminated - the step left the manifold at every length tried (from step size "
                        f"{tried:g}) after {iteration} iterations; returned the last point on it."
                    )
            step_size = float(step.step_size)
            iteration += 1
            if step.point is x and stopping_criterion:
                if self._verbosity >= 1:
                    print(stopping_criterion)
                    print("")
                break
            if not (step_size == 0.0 and step.point is x):  # (a rejected step leaves x, cost and gradients)
                previous = (x, cost, gradient_norm, gap)
                new_x = step.point
                if step.cost is None:
                    cost = float(objective(new_x))
                    cost_evaluations += 1
                else:
                    cost = float(step.cost)
                if candidate is not None:
                    buffer = _carry(host, manifold, x, new_x, candidate)
                x = new_x
                x_finite = True  # (it passed host.feasible)
                if math.isfinite(cost):
                    rgrad, e_core = gradients(x)
            if self._min_cost_change > 0.0 and math.isfinite(cost):
                recent_costs.append(cost)
                if len(recent_costs) > _STALL_WINDOW + 1:
                    del recent_costs[0]
                if (
                    len(recent_costs) == _STALL_WINDOW + 1
                    and max(recent_costs) - min(recent_costs) <= self._min_cost_change * abs(cost)
                    and iteration < self._max_iterations
                ):
                    stalled = (
                        f"Terminated - the last {_STALL_WINDOW} steps changed the cost by at most "
                        f"{self._min_cost_change:g} of its value (rounding level) after {iteration} iterations."
                    )
                    gradient_norm = float(manifold.norm(x, rgrad)) if finite_tree(rgrad) else math.nan
                    self._add_log_entry(
                        iteration=iteration + 1,
                        point=x,
                        cost=cost,
                        gradient_norm=gradient_norm,
                        lmo_gap=math.nan,
                        step_size=step_size,
                    )
                    column_printer.print_row([iteration + 1, cost, gradient_norm, math.nan])
                    stopping_criterion = stalled
                    if self._verbosity >= 1:
                        print(stopping_criterion)
                        print("")
                    break

        return self._return_result(
            start_time=start_time,
            point=x,
            cost=cost,
            iterations=iteration,
            stopping_criterion=stopping_criterion,
            cost_evaluations=cost_evaluations,
            step_size=step_size,
            gradient_norm=gradient_norm,
        )
