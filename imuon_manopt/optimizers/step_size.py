"""Step-size rules for the Pymanopt iMuon solver.

An iMuon step is ``x_next = R_x(-eta * xi)`` with ``xi`` the iMuon direction at ``x`` (spec §1),
whose intrinsic norm is the LMO budget (1): ``eta`` is the step length *in the chosen norm* (for the
spectral norm, the largest singular value of the whitened step). A rule picks ``eta``.

Every rule implements :class:`StepSizeRule`:

``start(max_iterations)``
    called at the start of each run (schedules with an open horizon take the solver's
    ``max_iterations``);
``search(objective, manifold, x, xi, f0, slope) -> StepResult``
    returns the step length, the new point, its cost if the rule evaluated it (else ``None``) and
    the number of cost evaluations it made. ``slope = <E, xi> = g_x(grad f, xi) >= 0`` is the
    decrease rate along ``-xi`` (the directional derivative along ``-xi`` is ``-slope``; for the
    plain iMuon direction it is the LMO gap).

Rules:

- :class:`Armijo` (default for deterministic problems): backtracking along ``-xi`` with sufficient
  decrease ``f(R_x(-eta xi)) <= f0 - c * eta * slope``. The first trial reuses the last accepted
  ``eta`` and grows it by ``growth_factor`` when the previous step was accepted at its first trial.
  Because ``xi`` has unit intrinsic norm, ``eta`` carries over between iterations (unlike a step in
  units of the gradient norm). Cost: one cost evaluation per trial, usually 1 or 2 per iteration;
  the accepted trial's cost is reused by the solver.
- :class:`Constant`, :class:`InverseSqrt`, :class:`Cosine`, :class:`Exponential`, :class:`Schedule`
  (any callable ``t -> eta``): open-loop schedules, no cost evaluations. They suit stochastic costs;
  on deterministic problems a decaying schedule converges slowly (``1/sqrt(t)`` steps leave an
  ``O(eta_t)`` oscillation) and a constant one does not converge to the optimum, since ``xi`` does
  not shrink near a critical point.

- :class:`LineSearcher`: one of Pymanopt's line searchers (``BackTrackingLineSearcher``,
  ``AdaptiveLineSearcher``, or any object with their ``search(objective, manifold, x, d, f0, df0) ->
  (step_norm, new_x)`` method) along ``d = -xi`` with ``df0 = -slope``. Pymanopt's searchers measure
  steps in the Riemannian norm and return ``x`` itself when no trial decreased the cost, so the
  iterates' costs never increase.

Names accepted by the solver's ``step_size`` argument: ``"armijo"``, ``"inverse_sqrt"``,
``"cosine"``, ``"exponential"`` (the schedules with base step ``0.1``); a positive float means
:class:`Constant`; a Pymanopt line searcher is wrapped in :class:`LineSearcher`.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = [
    "Armijo",
    "Constant",
    "Cosine",
    "Exponential",
    "InverseSqrt",
    "LineSearcher",
    "Schedule",
    "StepResult",
    "StepSizeRule",
    "resolve_step_size",
]


class StepResult(NamedTuple):
    """Outcome of one step.

    Attributes:
        step_size: the accepted ``eta`` (0 when the step was rejected and the point kept).
        point: the new point ``R_x(-eta xi)`` (``x`` itself when rejected).
        cost: the cost at ``point`` if the rule evaluated it, else ``None``.
        cost_evaluations: number of cost evaluations the rule made.
    """

    step_size: float
    point: Any
    cost: float | None
    cost_evaluations: int


def _positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    ok = math.isfinite(v) and (v >= 0 if allow_zero else v > 0)
    if not ok:
        rng = "[0, inf)" if allow_zero else "(0, inf)"
        raise ValueError(f"{name} must be finite and in {rng}, got {value!r}")
    return v


def _in_open_unit(name: str, value: float) -> float:
    v = _positive(name, value)
    if not v < 1:
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    return v


class StepSizeRule(abc.ABC):
    """Interface of a step-size rule (see the module docstring)."""

    def start(self, max_iterations: int) -> None:  # noqa: B027 - optional hook
        """Called at the start of every run; ``max_iterations`` is the solver's iteration budget."""

    @abc.abstractmethod
    def search(
        self,
        objective: Callable[[Any], float],
        manifold: Any,
        x: Any,
        xi: Any,
        f0: float,
        slope: float,
    ) -> StepResult:
        """One step from ``x`` along ``-xi`` (``xi``: a tangent vector, host representation)."""


class Schedule(StepSizeRule):
    """Open-loop schedule ``eta_t = fn(t)``, ``t`` counting the steps this rule has taken.

    The counter survives between runs when the solver reuses the rule
    (``reuse_line_searcher=True``).
    """

    def __init__(self, fn: Callable[[int], float]) -> None:
        if not callable(fn):
            raise TypeError(f"Schedule needs a callable t -> step size, got {type(fn).__name__}")
        self._fn = fn
        self._t = 0

    def rate(self, t: int) -> float:
        """The step length at step ``t``."""
        return float(self._fn(t))

    def search(self, objective, manifold, x, xi, f0, slope) -> StepResult:
        eta = self.rate(self._t)
        self._t += 1
        if not (math.isfinite(eta) and eta >= 0):
            raise ValueError(f"step-size schedule returned {eta!r} at step {self._t - 1}; expected a finite eta >= 0")
        return StepResult(eta, manifold.retraction(x, -eta * xi), None, 0)

    def __repr__(self) -> str:
        return f"Schedule({self._fn!r})"


class Constant(Schedule):
    """``eta_t = step_size``: ``x_next = R_x(-step_size * xi)`` at every iteration."""

    def __init__(self, step_size: float) -> None:
        self.step_size = _positive("step_size", step_size)
        super().__init__(lambda t: self.step_size)

    def __repr__(self) -> str:
        return f"Constant({self.step_size!r})"


class InverseSqrt(Schedule):
    """``eta_t = initial / sqrt(1 + t / warmup)``."""

    def __init__(self, initial: float = 0.1, warmup: float = 1.0) -> None:
        self.initial = _positive("initial", initial)
        self.warmup = _positive("warmup", warmup)
        super().__init__(lambda t: self.initial / math.sqrt(1.0 + t / self.warmup))

    def __repr__(self) -> str:
        return f"InverseSqrt(initial={self.initial!r}, warmup={self.warmup!r})"


class Exponential(Schedule):
    """``eta_t = initial * decay ** t``."""

    def __init__(self, initial: float = 0.1, decay: float = 0.99) -> None:
        self.initial = _positive("initial", initial)
        self.decay = _in_open_unit("decay", decay)
        super().__init__(lambda t: self.initial * self.decay**t)

    def __repr__(self) -> str:
        return f"Exponential(initial={self.initial!r}, decay={self.decay!r})"


class Cosine(Schedule):
    """Cosine decay from ``initial`` to ``final`` over ``T = horizon`` steps.

    ``eta_t = final + (initial - final) * (1 + cos(pi * min(t, T) / T)) / 2``.

    With ``horizon=None`` the horizon is the solver's ``max_iterations``.
    """

    def __init__(self, initial: float = 0.1, horizon: int | None = None, final: float = 0.0) -> None:
        self.initial = _positive("initial", initial)
        self.final = _positive("final", final, allow_zero=True)
        if self.final > self.initial:
            raise ValueError(f"final must not exceed initial ({self.initial!r}), got {final!r}")
        if horizon is not None and (not isinstance(horizon, int) or horizon < 1):
            raise ValueError(f"horizon must be a positive integer or None, got {horizon!r}")
        self.horizon = horizon
        self._horizon = horizon or 1
        super().__init__(self._cosine)

    def _cosine(self, t: int) -> float:
        frac = min(t, self._horizon) / self._horizon
        return self.final + (self.initial - self.final) * 0.5 * (1.0 + math.cos(math.pi * frac))

    def start(self, max_iterations: int) -> None:
        if self.horizon is None:
            self._horizon = max(1, int(max_iterations))

    def __repr__(self) -> str:
        return f"Cosine(initial={self.initial!r}, horizon={self.horizon!r}, final={self.final!r})"


class Armijo(StepSizeRule):
    """Backtracking (Armijo) line search along ``-xi`` with a remembered step length.

    Args:
        initial_step_size: first trial of the first iteration (``eta``, in units of the LMO norm).
        contraction_factor: ``eta <- contraction_factor * eta`` after a failed trial, in (0, 1).
        sufficient_decrease: Armijo constant ``c`` in (0, 1): accept when ``f_new <= f0 - c * eta *
            slope``.
        growth_factor: ``>= 1``; the next first trial is ``growth_factor * eta`` after a first-trial
            acceptance, else the accepted ``eta``.
        max_backtracks: failed trials before the step is rejected (``step_size = 0``, point
            unchanged; the solver's ``min_step_size`` criterion then stops the run).
        max_step_size: upper bound on every trial ``eta``.

    A trial whose cost is NaN or infinite counts as failed, so the rule never accepts a non-finite
    point. A trial must decrease the cost strictly: once the required decrease ``c * eta * slope`` is
    below the rounding unit of ``f0`` and a trial's cost is within rounding of ``f0``, the step is
    rejected at once (no decrease can be resolved there), so the solver stops on ``min_step_size``
    as Pymanopt's solvers do, instead of accepting zero-decrease steps until ``max_iterations``.
    """

    def __init__(
        self,
        initial_step_size: float = 1.0,
        contraction_factor: float = 0.5,
        sufficient_decrease: float = 1e-4,
        growth_factor: float = 2.0,
        max_backtracks: int = 30,
        max_step_size: float = math.inf,
    ) -> None:
        self.initial_step_size = _positive("initial_step_size", initial_step_size)
        self.contraction_factor = _in_open_unit("contraction_factor", contraction_factor)
        self.sufficient_decrease = _in_open_unit("sufficient_decrease", sufficient_decrease)
        g = float(growth_factor)
        if not (math.isfinite(g) and g >= 1):
            raise ValueError(f"growth_factor must be finite and >= 1, got {growth_factor!r}")
        self.growth_factor = g
        if not isinstance(max_backtracks, int) or max_backtracks < 0:
            raise ValueError(f"max_backtracks must be a non-negative integer, got {max_backtracks!r}")
        self.max_backtracks = max_backtracks
        m = float(max_step_size)
        if not m > 0:
            raise ValueError(f"max_step_size must be in (0, inf], got {max_step_size!r}")
        self.max_step_size = m
        self._next: float | None = None

    def search(self, objective, manifold, x, xi, f0, slope) -> StepResult:
        if not (slope > 0 and math.isfinite(slope)):
            return StepResult(0.0, x, f0, 0)  # no decrease available along -xi
        eta = self.initial_step_size if self._next is None else self._next
        eta = min(eta, self.max_step_size)
        evaluations = 0
        for trial in range(self.max_backtracks + 1):
            new_x = manifold.retraction(x, -eta * xi)
            new_f = float(objective(new_x))
            evaluations += 1
            required = f0 - self.sufficient_decrease * eta * slope
            # A step must decrease the cost: when the required decrease is below the cost's rounding
            # unit, f0 - c eta slope rounds to f0 and "new_f <= required" would accept new_f == f0.
            if math.isfinite(new_f) and new_f <= required and new_f < f0:
                grow = self.growth_factor if trial == 0 else 1.0
                self._next = min(eta * grow, self.max_step_size)
                return StepResult(eta, new_x, new_f, evaluations)
            eta *= self.contraction_factor
            if required == f0 and new_f - f0 <= _ROUNDING_ULPS * math.ulp(f0):
                # no change beyond rounding where no decrease can be required: shorter steps cannot
                # show one either (a clear increase, an overshoot, still backtracks)
                break
        self._next = eta / self.contraction_factor
        return StepResult(0.0, x, f0, evaluations)

    def __repr__(self) -> str:
        return (
            f"Armijo(initial_step_size={self.initial_step_size!r}, "
            f"contraction_factor={self.contraction_factor!r}, "
            f"sufficient_decrease={self.sufficient_decrease!r}, "
            f"growth_factor={self.growth_factor!r}, "
            f"max_backtracks={self.max_backtracks!r}, max_step_size={self.max_step_size!r})"
        )


class LineSearcher(StepSizeRule):
    """A Pymanopt line searcher as the step rule: ``searcher.search(objective, manifold, x, -xi, f0, -slope)``.

    Args:
        searcher: e.g. ``pymanopt.optimizers.line_search.BackTrackingLineSearcher()`` or
            ``AdaptiveLineSearcher()``; any object with that ``search`` method. Its state (the
            previous step it starts from) lives on the object, which the solver copies per run as it
            does for every rule.

    The reported ``step_size`` is ``eta``, the step along ``-xi`` in the LMO norm (the searcher's
    returned Riemannian step length divided by ``||xi||_x``). The cost at the accepted point is
    reused when it was the searcher's last evaluation.
    """

    def __init__(self, searcher: Any) -> None:
        if not callable(getattr(searcher, "search", None)):
            raise TypeError(
                "LineSearcher needs a Pymanopt line searcher (an object with search(objective, manifold, x, d, f0, "
                f"df0)), got {type(searcher).__name__}"
            )
        self.searcher = searcher

    def search(self, objective, manifold, x, xi, f0, slope) -> StepResult:
        if not (slope > 0 and math.isfinite(slope)):
            return StepResult(0.0, x, f0, 0)  # no decrease available along -xi
        seen: list[Any] = [None, None, 0]  # the last evaluated point, its cost, the number of evaluations

        def counted(point):
            value = float(objective(point))
            seen[0], seen[1], seen[2] = point, value, seen[2] + 1
            return value

        step_norm, new_x = self.searcher.search(counted, manifold, x, -xi, f0, -slope)
        evaluations = seen[2]
        if new_x is x or not step_norm:
            return StepResult(0.0, x, f0, evaluations)
        eta = float(step_norm) / float(manifold.norm(x, xi))
        cost = seen[1] if seen[0] is new_x else None
        return StepResult(eta, new_x, cost, evaluations)

    def __repr__(self) -> str:
        return f"LineSearcher({type(self.searcher).__name__})"


# A trial cost within this many units in the last place of f0 shows no change (rounding noise).
_ROUNDING_ULPS = 4

_NAMES: dict[str, Callable[[], StepSizeRule]] = {
    "armijo": Armijo,
    "inverse_sqrt": InverseSqrt,
    "cosine": Cosine,
    "exponential": Exponential,
}


def resolve_step_size(step_size: Any) -> StepSizeRule:
    """The rule for the solver's ``step_size`` argument.

    Accepts a positive float (constant), a name, a :class:`StepSizeRule` or a callable ``t -> eta``.
    """
    if isinstance(step_size, StepSizeRule):
        return step_size
    if not callable(step_size) and callable(getattr(step_size, "search", None)):
        return LineSearcher(step_size)  # a Pymanopt line searcher
    if isinstance(step_size, str):
        try:
            return _NAMES[step_size]()
        except KeyError:
            raise ValueError(
                f"unknown step_size {step_size!r}; expected a positive float, one of "
                f"{sorted(_NAMES)}, "
                "a StepSizeRule or a callable t -> eta"
            ) from None
    if isinstance(step_size, bool):
        raise ValueError(f"step_size must be a positive float, a name or a rule, got {step_size!r}")
    if isinstance(step_size, (int, float)):
        return Constant(step_size)
    if callable(step_size):
        return Schedule(step_size)
    raise TypeError(
        f"step_size must be a positive float, one of {sorted(_NAMES)}, a StepSizeRule or a "
        "callable t -> eta; "
        f"got {type(step_size).__name__}"
    )
