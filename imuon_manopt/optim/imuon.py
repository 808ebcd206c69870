"""iMuon as a ``torch.optim`` optimizer for plain tensors, geoopt manifold parameters and LoRA factor pairs.

:class:`IMuon` is a geoopt ``OptimMixin`` + ``torch.optim.Optimizer``. Each parameter is routed by what it is:

- plain tensor (or geoopt ``Euclidean``) with ``ndim >= 2``: Muon, ``p - lr * lmo(E~)``; tensors with ``ndim > 2``
  are viewed as ``(shape[0], -1)`` (the group option ``flatten=True``, default: convolutions) or take one LMO per
  trailing ``(m, n)`` slice (``flatten=False``: per-expert and per-head weights ``(E, m, n)``), batched;
- plain tensor with ``ndim < 2`` (biases, norms, scalars): the group's ``fallback``, torch's own AdamW (default) or
  SGD (:mod:`imuon_manopt.optim._fallback`);
- ``ManifoldParameter`` on a supported manifold: ``retr(p, -lr * xi)`` with ``xi`` the iMuon direction of the
  manifold's metric (spec §2);
- a ``(B, A)`` pair listed in ``pairs``: ``B - lr * xi_B``, ``A - lr * xi_A``, the invariant fixed-rank step, with
  ``lr`` backtracked if the product would lose rank.

Grouped steps. Parameters of one param group that share a kind, geometry, shape, dtype and device are stacked and
take one batched direction, one batched LMO and one batched retraction (:mod:`~imuon_manopt.optim._steps`,
:mod:`~imuon_manopt.optim._pairs`); the numerical work per step is a fixed number of calls per group, not per
parameter. The grouping (:mod:`~imuon_manopt.optim._groups`) is structure, rebuilt from the parameters when the
param groups or the set of parameters with gradients change. Plain matrices and pairs keep their momentum as one
stacked tensor per group between steps, whose rows are the per-parameter entries (``state[p]["momentum_buffer"]``),
so ``state_dict()`` keeps its layout; their step is one gather of parameters and gradients and one scatter of the
new values per group.

Momentum (spec §3): :mod:`~imuon_manopt.optim._momentum` (plain matrices and pairs: Nesterov on the Euclidean
gradients; manifold parameters: a transported tangent buffer, on SPD the sum of Euclidean gradients). Finiteness
and the all-or-nothing commit: :mod:`~imuon_manopt.optim._commit`. Buffers are kept in at least float32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from geoopt.optim.mixin import OptimMixin

from ..geometry import FixedRank, MetricOperator
from ..lmo import resolve_norm
from . import _dispatch, _groups, _momentum, _options, _pairs, _steps
from ._commit import CommitEngine, StackedParams, StackedState
from ._distributed import agree_structure, apply_full, full, is_dtensor_loaded, is_sharded, local
from ._fallback import fallback_outputs
from ._groups import Group
from ._state import work_dtype

__all__ = ["IMuon"]

#: Parameter types whose ``detach()`` is a plain tensor (geoopt's ManifoldTensor would route every operation through
#: ``__torch_function__``).
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_REPR_ALWAYS = object()
#: Feasibility tolerances of the first-step manifold check, by parameter dtype.
_CHECK_TOL = {torch.float64: 1e-5, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


class IMuon(CommitEngine, OptimMixin, torch.optim.Optimizer):
    r"""Intrinsic Muon: spectral steepest descent in each parameter's own geometry (arXiv:2605.09238).

    One step per parameter (routing and grouping: the module docstring; momentum:
    :mod:`~imuon_manopt.optim._momentum`): ``x <- R_x(-lr * xi)``, where ``xi = G^{-1/2} lmo(G^{-1/2} P_x(E~))`` is
    the iMuon direction of the parameter's manifold and metric for the (momentum-combined) Euclidean gradient ``E~``
    (spec §1–§3). The manifold is read from ``ManifoldParameter.manifold`` and dispatched on its concrete class:
    ``geoopt.EuclideanStiefel``,
    ``geoopt.CanonicalStiefel`` (what ``geoopt.Stiefel()`` returns; its canonical metric changes the direction),
    ``geoopt.SymmetricPositiveDefinite`` (affine-invariant), ``geoopt.Sphere`` (row-wise) and
    ``imuon_manopt.manifolds.Grassmann``; more via :func:`~imuon_manopt.optim.register_manifold`. The retraction and
    vector transport are the manifold's own (``retr`` / ``retr_transp``).

    Args:
        params: parameters or param-group dicts (every option below except ``pairs``, ``nonfinite`` and
            ``stabilize`` can be set per group; groups also take ``use_imuon`` and ``pair_momentum``, see below).
        lr: learning rate (step length in the chosen norm; ``tau`` of the LMO is 1).
        momentum: ``beta`` in ``[0, 1)`` (default 0.95); 0 disables the buffers.
        nesterov: Nesterov combination ``E~ = E + beta * buf`` (default) instead of ``E~ = buf``.
        weight_decay: decoupled decay ``p <- (1 - lr * wd) p`` (unadjusted ``lr``) for plain tensors (the iMuon
            matrices and the fallback) and for pairs (each factor, as AdamW decays LoRA factors, so the product by
            ``(1 - lr * wd)^2``; this keeps the rank and the gauge invariance). A group with ``weight_decay > 0`` may
            not hold manifold parameters (decay leaves the manifold): ``ValueError``. **The constraint behind it**
            (Lion-K, Chen-Li-Liu): since the step has norm ``a * lr`` and the decay is ``lr * wd``, IMuon with the
            spectral norm converges to the solution of ``min f(X) s.t. ||X||_2 <= a / wd`` (plain matrices; for a
            pair the product ``X = B A``, of rank at most r), reached exponentially fast in ``lr * wd * steps``, to
            within the step size. The scale ``a`` comes from ``adjust_lr_fn``: ``None`` 1, ``"original"``
            ``sqrt(max(1, a / b))``, ``"match_rms_adamw"`` ``0.2 sqrt(max(a, b))``, a registered rule ``fn(lr,
            shape) / lr``. With another norm the set is that norm's ball of radius ``a / wd`` in the dual sense (Ky
            Fan k: ``||X||_2 <= a / wd`` and ``||X||_* <= k a / wd``); Newton–Schulz's inexact polar factors
            (singular values up to ~1.2) widen it by as much.
        norm: the LMO's norm (:func:`imuon_manopt.lmo.resolve_norm`): ``"spectral"`` (default), ``"frobenius"``,
            ``"nuclear"``, ``("schatten", p)``, ``("kyfan", k)`` (the step ``U_k V_k^T`` of the top ``k`` singular
            pairs of each whitened block: low-rank Muon / Fanion-k; ``k = 1`` is ``"nuclear"``) or ``("fmuon",
            alpha)`` (F-Muon, ``alpha polar(H) + (1 - alpha) H / ||H||_F``; ``alpha = 1`` is ``"spectral"``).
            All are LMOs of unitarily invariant norms, valid on every geometry.
        polar: the LMO solver, ``"newton_schulz"`` (default: fast, approximate polar factor, as in Muon; the core's
            Polar Express schedule, :func:`imuon_manopt.lmo.polar`), ``"svd"`` (exact and rank-aware; eigh for
            SPD) or ``"randomized"`` (for ``("kyfan", k)``: a range finder of ``k + oversample`` columns with
            ``power_iters`` power iterations, then the exact top-k LMO of the sketch), or a dict ``{"method":
            "newton_schulz", "steps": 5, "dtype": torch.bfloat16}`` (``{"method": "randomized", "oversample": 8,
            "power_iters": 2, "dtype": ...}``): ``steps`` iterations (default 5) with the products in ``dtype``
            (default: the update's working dtype; bfloat16 suits GPUs with fast bfloat16 matmuls, as
            ``torch.optim.Muon`` always uses it). Only the orthogonalization (the sketch's matmuls) is rounded to
            ``dtype``; whitening, projection and retraction stay in the working dtype. A method that does not solve
            the chosen norm (Newton–Schulz for Ky Fan, say: it cannot select singular values) uses the exact path.
        adjust_lr_fn: shape-based lr scaling, off by default: ``"original"`` (``lr * sqrt(max(1, a / b))``),
            ``"match_rms_adamw"`` (``lr * 0.2 * sqrt(max(a, b))``, which lets one lr serve iMuon and the AdamW
            fallback), or the name of a rule registered with :func:`~imuon_manopt.optim.register_adjust_lr_fn`
            (a callable ``(lr, (a, b)) -> lr``; param groups hold names, so ``state_dict()`` pickles; a callable
            passed here is refused with that advice). ``(a, b)`` is the matrix shape the step lives in: the
            ``(shape[0], -1)`` view for plain tensors, the trailing two dims for manifold parameters (``(n, 1)`` for a
            sphere, whatever its batch), ``(m, n)`` of the product for a pair.
        pairs: fixed-rank factor pairs ``[(B, A), ...]`` with ``X = B @ A``, ``B`` (..., m, r), ``A`` (..., r, n),
            ``r >= 1``, both plain tensors of the same group in ``params``. Pairs are structure, not state: pass the
            same pairs when rebuilding the optimizer before ``load_state_dict``. See :func:`lora_pairs`.
        fallback: update for plain tensors with ``ndim < 2`` (and for groups with ``use_imuon=False``): ``"adamw"``
            (default), ``"sgd"`` (the group's ``momentum`` and ``nesterov``), or a dict ``{"name": "adamw", "lr":
            ..., "betas": (0.9, 0.999), "eps": 1e-8}``. ``lr`` is the fallback's learning rate at the group's initial
            ``lr`` (default: the group's ``lr``) and follows later changes of ``lr`` proportionally. Weight decay is
            decoupled for both. AdamW's ``betas`` live only in this dict, so torch's schedulers that cycle momentum
            (``OneCycleLR``, ``CyclicLR`` with ``cycle_momentum=True``) cycle iMuon's ``momentum``.
        nonfinite: what a non-finite gradient or update does: ``"raise"`` a ``FloatingPointError`` (default) or
            ``"skip"`` the step (``last_step_skipped`` tells). Either way no parameter or state entry changes: every
            update is computed into temporaries and committed only when all of them are finite. On a CPU this is
            decided at once. On other devices it is decided on the device, without a host synchronization (a masked
            write commits all or nothing); ``"raise"`` then raises at a later ``step()`` once the device has finished
            the bad one, or at :meth:`check_finite` (which waits), and ``last_step_skipped`` waits for the device.
        stabilize: geoopt's option: every ``stabilize`` steps (calls of ``step``), project manifold parameters back
            onto their manifold (``projx``) and momentum buffers onto the tangent space.
        compile: compile each plain-matrix and pair group's numerical step (momentum, direction, LMO, rank guard,
            update) with ``torch.compile(fullgraph=True)`` (:func:`~imuon_manopt.optim._steps.group_step`), or a dict
            of further ``torch.compile`` arguments (e.g. ``{"backend": "aot_eager"}``, ``{"mode":
            "max-autotune-no-cudagraphs"}``); the bookkeeping around it (grouping, gathers, finiteness, commit)
            stays eager. The learning rate and decay enter as tensors, so schedulers cause no recompilation;
            changing other options recompiles. The pair step then takes the sync-free path (all candidate step
            lengths at once). First steps pay the compile time (seconds to minutes). Manifold parameters and the
            fallback are not compiled.
        capturable: make ``step()`` capturable in a CUDA graph (``torch.cuda.graph``): the finiteness decision
            and the commit stay on the device (masked writes, as off the CPU), state is updated in place at fixed
            addresses, step counts live on the device, and the pair step is the sync-free one. A non-finite step
            is not applied, whatever ``nonfinite`` says; :meth:`check_finite` (outside the graph) reads the flag of
            the last step and applies the policy. Give ``lr`` as a 0-d device tensor to change it between replays
            (a float is baked into the graph at capture; ``adjust_lr_fn`` is then applied as ``lr * fn(1, shape)``,
            exact for the built-in rules). Take one
            eager step before capturing (it allocates the state and runs the first-step checks). Supported for
            plain matrices, pairs and the AdamW fallback; manifold retractions may synchronize (geoopt's).

    Param-group options besides these: ``use_imuon=False`` sends every plain tensor of the group to the fallback (e.g.
    embeddings and output heads, as is common with Muon); ``flatten`` (default ``True``) says how a plain tensor with
    ``ndim > 2`` is stepped: ``True`` orthogonalizes its ``(shape[0], prod(shape[1:]))`` view, one matrix per tensor,
    which is what Muon does with convolution kernels ``(out, in, kh, kw)`` (the most common such parameters in torch
    models, whose ``(kh, kw)`` slices are not matrices worth an LMO each); ``False`` takes one LMO per trailing ``(m,
    n)`` slice, batched over the leading dims in one call (mixture-of-experts ``(E, m, n)``, per-head weights; Dion's
    ``flatten=False``), with ``adjust_lr_fn`` seeing ``(m, n)``; ``pair_momentum="ambient"`` selects the reference LoRA
    mode for the group's pairs; ``error_feedback=True`` (with ``norm=("kyfan", k)``, plain matrices and pairs only)
    replaces the momentum by Dion's error feedback: ``M <- M + E``, the step is the Ky Fan LMO of ``M`` (of its whitened
    blocks for pairs), then ``M <- M - (1 - momentum) P P^T M`` with ``P`` spanning the step, so what the low-rank step
    leaves out stays in the buffer (``nesterov`` is not used); ``input_transform`` (plain matrices
    only, and MiMuon's switch also on pairs; see
    :mod:`imuon_manopt.transforms`: ``"muoneq_row"``, ``"muoneq_col"``, ``"muoneq_rowcol"``, ``("root_clip",
    percentile)``, ``("mimuon", threshold)``) transforms the momentum before the LMO: these are not LMOs of a norm, they
    break the invariances elsewhere and are refused there. Each option has one spelling, the same in the constructor, in
    param-group dicts and in ``state_dict()["param_groups"]`` (stored as given); keys of earlier layouts (``ns_steps``,
    ``fallback_lr``, ``betas``, ...) are refused with the spelling that replaces them. ``repr(opt)`` lists per group
    ``lr``, ``momentum`` and the options that differ from their defaults.

    Notes:
        - Updates and optimizer state (momentum, AdamW moments) are kept in at least float32: half-precision
          parameters are upcast, and written back in their dtype.
        - Parameters whose ``grad`` is ``None`` are skipped (a pair is skipped when both factors have none; a single
          missing factor gradient counts as zero).
        - A manifold parameter is checked to lie on its manifold (``check_point_on_manifold``), and a pair to have
          full-rank factors, on its first step (one host synchronization, once).
        - A pair step is shortened (per pair, to the largest of ``lr * 2^-k``, ``k <= 12``, or not taken) while the
          product's ``s_min / s_max`` would fall below ``sqrt(eps)`` of the working dtype (or below its current
          value, if already lower).
        - ``CanonicalStiefel``: geoopt's Cayley retraction takes a covector, so the optimizer hands it ``flat(xi)``
          and the point moves along ``xi`` (momentum is transported along the same curve); one Newton–Schulz
          polishing step after it removes the orthonormality error rounding accumulates over long runs.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        norm: str | tuple[str, Any] = "spectral",
        polar: str | dict[str, Any] = "newton_schulz",
        adjust_lr_fn: str | None = None,
        pairs: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
        fallback: str | dict[str, Any] = "adamw",
        nonfinite: str = "raise",
        stabilize: int | None = None,
        compile: bool | dict[str, Any] = False,
        capturable: bool = False,
    ) -> None:
        _options.check_optimizer_options(nonfinite, stabilize, compile, capturable)
        defaults = dict(_options.GROUP_DEFAULTS)
        defaults.update(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            norm=norm,
            polar=polar,
            adjust_lr_fn=adjust_lr_fn,
            fallback=fallback,
        )
        defaults = _options.fold(defaults)
        _options.check_options(defaults)
        self._init_commit(nonfinite, capturable)
        self.compile = compile
        self._pairs, self._pair_index = _options.prepare_pairs(pairs)
        self._rules: dict[torch.Tensor, tuple[_dispatch.ManifoldRule, MetricOperator, Any]] = {}
        self._structure_key: Any = None
        self._groups: list[Group] = []
        super().__init__(params, defaults, stabilize=stabilize)  # type: ignore[call-arg]  # geoopt's OptimMixin
        self._check_pairs_membership()

    def __repr__(self) -> str:
        """torch's format (one block per param group), listing ``lr``, ``momentum`` and the options a group sets
        to other than their defaults (not every stored key)."""
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            for key in sorted(group):
                if key in ("params", "param_names", "lr_at_init", "step") or key.startswith("_"):
                    continue
                default = _options.GROUP_DEFAULTS.get(key, _REPR_ALWAYS)
                if key in ("lr", "momentum") or default is _REPR_ALWAYS or group[key] != default:
                    if key == "stabilize" and group[key] is None:
                        continue
                    lines.append(f"    {key}: {group[key]}")
        lines.append(")")
        return "\n".join(lines)

    # ------------------------------------------------------------------ construction

    def _check_pairs_membership(self) -> None:
        group_of = {p: gi for gi, g in enumerate(self.param_groups) for p in g["params"]}
        for i, (b, a) in enumerate(self._pairs):
            for name, t in (("B", b), ("A", a)):
                if t not in group_of:
                    raise ValueError(
                        f"pairs[{i}]: {name} (shape {tuple(t.shape)}) is not among the optimizer's params; pass both "
                        "factors in params as well"
                    )
            if group_of[b] != group_of[a]:
                raise ValueError(
                    f"pairs[{i}]: B is in param group {group_of[b]} and A in group {group_of[a]}; a pair's factors "
                    "must share one group (its options apply to the pair)"
                )
            grp_opts = self.param_groups[group_of[b]]
            transform = grp_opts["input_transform"]
            mimuon = isinstance(transform, tuple) and transform[0] == "mimuon"
            if mimuon and grp_opts["pair_momentum"] != "factor":
                raise ValueError(
                    f"pairs[{i}] is in param group {group_of[b]} with input_transform={transform!r} and "
                    "pair_momentum='ambient': MiMuon's switch on pairs is defined for the invariant step "
                    "(pair_momentum='factor'), where it keeps the gauge invariance"
                )
            if mimuon and resolve_norm(grp_opts["norm"]).joint:
                raise ValueError(
                    f"pairs[{i}] is in param group {group_of[b]} with input_transform={transform!r} and the joint "
                    f"norm {grp_opts['norm']!r}: MiMuon's switch on pairs needs a max-rule norm (spectral, nuclear, "
                    "Ky Fan)"
                )
            if transform is not None and not mimuon:
                raise ValueError(
                    f"pairs[{i}] is in param group {group_of[b]} with input_transform={transform!r}: the transform "
                    "would break the pair step's gauge invariance (elementwise clipping, equilibration along the rank "
                    "dimension); it applies to plain matrices only (MiMuon's switch, which keeps the invariance, also "
                    "to pairs). Put the pair in another param group."
                )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (torch semantics), validating its options and its parameters' manifolds."""
        gi = len(getattr(self, "param_groups", []))
        params = param_group["params"]
        if isinstance(params, set):
            raise TypeError("optimizer parameters must be an ordered collection (a list), not a set")
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        where = f"param group {gi}: "
        param_group = _options.fold({k: v for k, v in param_group.items() if k != "params"}, where)
        opts = {**self.defaults, **param_group}
        _options.check_options(opts, where=where)
        for pi, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(
                    f"param group {gi}, parameter {pi}: IMuon optimizes tensors, got {type(p).__name__} ({p!r:.60}); "
                    "pass torch.nn.Parameter objects (e.g. model.parameters())"
                )
            what = f"param group {gi}, parameter {pi} (shape {tuple(p.shape)})"
            if not p.is_floating_point() or p.is_complex():
                raise TypeError(
                    f"{what}: IMuon needs real floating-point tensors, got {getattr(p, 'dtype', type(p).__name__)}"
                )
            manifold = getattr(p, "manifold", None)
            if _dispatch.is_euclidean(manifold):
                continue
            if p in self._pair_index:
                raise ValueError(f"{what} is a pair factor and a ManifoldParameter on {manifold!r}")
            rule, geometry = _dispatch.lookup(manifold)
            self._rules[p] = (rule, geometry, _dispatch.batch_key(manifold))
            if opts["weight_decay"] > 0:
                raise ValueError(
                    f"{what} lies on {manifold!r} and its group has weight_decay={opts['weight_decay']}: decoupled "
                    "decay would leave the manifold. Put manifold parameters in a param group with weight_decay=0."
                )
            if not opts["use_imuon"]:
                raise ValueError(
                    f"{what} lies on {manifold!r}: use_imuon=False (the Euclidean fallback) would leave the manifold"
                )
            if opts["error_feedback"]:
                raise ValueError(
                    f"{what} lies on {manifold!r} and its group has error_feedback=True: the fed-back residual never "
                    "decays, and no transport keeps such a buffer meaningful on a curved manifold. Error feedback is "
                    "defined for plain matrices and pairs; put manifold parameters in another param group."
                )
            if opts["input_transform"] is not None:
                raise ValueError(
                    f"{what} lies on {manifold!r} and its group has input_transform={opts['input_transform']!r}: "
                    "these transforms are not LMOs of a norm and break the manifold's tangency or invariances; they "
                    "apply to plain matrices only. Put manifold parameters in another param group."
                )
        param_group["params"] = params
        param_group.setdefault("lr_at_init", float(opts["lr"]))
        super().add_param_group(param_group)
        self._structure_key = None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``; options missing from older state dicts take the constructor's values.

        State of half-precision parameters is restored from the saved tensors in the working dtype (float32), bit
        for bit: torch's loader casts every floating-point state tensor to the parameter's dtype, which would round
        a float32 buffer of a bfloat16 parameter and turn a float16 parameter's AdamW second moment above 65504
        into ``inf``.
        """
        self._check_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params):
            wdt = work_dtype(p)
            if wdt == p.dtype or i not in saved_state:
                continue
            st = self.state[p]
            for key, value in saved_state[i].items():
                if key != "step" and isinstance(value, torch.Tensor) and value.is_floating_point():
                    st[key] = value.to(device=p.device, dtype=wdt, copy=True)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            for p in group["params"]:  # buffers stay >= float32 (older state dicts may hold half-precision ones)
                st = self.state.get(p, {})
                for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
                    if isinstance(st.get(key), torch.Tensor) and st[key].dtype != work_dtype(p):
                        st[key] = st[key].to(work_dtype(p))
        self._structure_key = None

    def _check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``ValueError`` before anything is loaded when the state dict does not fit this optimizer: a param group
        of an earlier option layout, another number of groups or of parameters per group, or saved state whose
        shape is not its parameter's (param groups, or the parameters in them, in another order)."""
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        fix = (
            "build the optimizer with the same param groups, each with the same parameters in the same order, as "
            "the one that saved the state dict"
        )
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"the state dict has {len(saved_groups)} param groups, this optimizer {len(self.param_groups)}: {fix}"
            )
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            try:
                _options.check_removed(saved, where=f"state dict param group {gi}: ")
            except TypeError as err:
                raise ValueError(str(err)) from None
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"param group {gi}: the state dict has {len(saved['params'])} parameters, this optimizer "
                    f"{len(group['params'])}: {fix}"
                )
            for pi, (i, p) in enumerate(zip(saved["params"], group["params"])):
                for key, value in saved_state.get(i, {}).items():
                    if isinstance(value, torch.Tensor) and value.ndim and tuple(value.shape) != tuple(p.shape):
                        raise ValueError(
                            f"param group {gi}, parameter {pi}: the saved {key!r} has shape {tuple(value.shape)}, the "
                            f"parameter {tuple(p.shape)}; the state dict's param groups or parameters come in "
                            f"another order: {fix}"
                        )

    # ------------------------------------------------------------------ structure

    def _structure(self) -> list[Group]:
        """The groups of this step: cached, rebuilt when the param groups or the set of gradients change."""
        key = _groups.scan(self.param_groups)
        if key != self._structure_key:
            self._groups = _groups.build(self.param_groups, self._pairs, self._pair_index, self._rules)
            self._structure_key = key
        return self._groups

    def _agree_structure(self) -> None:
        """Sharded (FSDP2) parameters: every rank steps the same ones, each with a gradient on every rank or on none
        (:func:`~imuon_manopt.optim._distributed.agree_structure`: one small ``all_reduce`` per step, a clear error
        on every rank otherwise). Nothing without sharded parameters, nor while a CUDA graph is being captured (the
        check reads its result on the host; a replay runs no Python)."""
        if not is_dtensor_loaded() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
            return
        sharded, codes = [], []
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if is_sharded(p):
                    sharded.append((gi, pi, p))
                    codes.append((gi, pi, *p.shape, int(p.grad is not None)))
        if not sharded:
            return

        def describe(i: int) -> str:
            gi, pi, p = sharded[i]
            names = self.param_groups[gi].get("param_names")
            name = f" {names[pi]!r}" if names else ""
            grad = "with" if p.grad is not None else "without"
            return f"param group {gi} parameter {pi}{name} (shape {tuple(p.shape)}, {grad} a gradient)"

        agree_structure(codes, [p for _, _, p in sharded], describe)

    # ------------------------------------------------------------------ first-step checks

    def _check_new(self, grp: Group) -> None:
        """Manifold membership and full-rank pairs, once per parameter (before anything is written); not on the
        meta device, whose tensors have no values."""
        state = self.state
        if grp.params[0].device.type == "meta":
            return
        if grp.kind == "manifold":
            for p in grp.params:
                if "step" in state[p]:
                    continue
                x = full(p).detach().to(work_dtype(p))  # whole (collective) if sharded
                tol = _CHECK_TOL.get(p.dtype, 1e-5)
                manifold = _dispatch.manifold_of(p)
                ok, reason = manifold.check_point_on_manifold(x, explain=True, atol=tol, rtol=tol)
                if not ok:
                    raise ValueError(
                        f"parameter of shape {tuple(p.shape)} is not on its manifold {manifold!r}: {reason}. "
                        "Initialize it on the manifold (e.g. manifold.random(...) or manifold.projx(...))"
                    )
        elif grp.kind == "pair":
            n = len(grp.pair_ids)
            for j, i in enumerate(grp.pair_ids):
                b, a = grp.params[j], grp.params[n + j]
                if "step" in state[b]:
                    continue
                try:
                    FixedRank().at((full(b).detach().to(work_dtype(b)), full(a).detach().to(work_dtype(a))))
                except ValueError as err:
                    raise ValueError(f"pairs[{i}] (B {tuple(b.shape)}, A {tuple(a.shape)}): {err}") from err

    # ------------------------------------------------------------------ one group's update

    def _update(self, grp: Group, lazy: bool, writes: list, checks: list) -> None:
        """Append ``(param or (param, state key), new local tensor)`` for every tensor the group would change, and to
        ``checks`` the tensors whose finiteness decides the step.

        Momentum of plain matrices and pairs is elementwise and runs here, on local tensors; everything that needs
        whole matrices runs in the group's function through ``apply_full`` (the one call site for sharded
        parameters: without sharding it is ``fn(inputs)``). Their buffers need no check of their own: a non-finite
        buffer makes ``E~`` and hence the new parameter non-finite.
        """
        group, params = grp.group, grp.params
        p0 = params[0]
        wdt = work_dtype(p0)
        if grp.kind in ("matrix", "pair") and all(local(p) is p for p in params):  # no DTensor
            self._update_stacked(grp, lazy, writes, checks)
            return
        grads = [None if p.grad is None else local(p.grad) for p in params]
        # plain tensors: geoopt's ManifoldTensor would route every operation through __torch_function__
        xs = [local(p).detach().as_subclass(torch.Tensor) for p in params]
        if grp.kind == "fallback":
            # AdamW's step counts stay on the device (torch's capturable path; not on the CPU, nor on the meta device,
            # where there is nothing to capture and torch's AdamW refuses it)
            capturable = not lazy and p0.device.type not in ("cpu", "meta")
            new, entries = fallback_outputs(group, xs, grads, [self.state[p] for p in params], capturable)
            writes.extend(zip(params, new))
            checks.extend(new)
            for key, values in entries.items():
                writes.extend(((p, key), v) for p, v in zip(params, values))
                checks.extend(values)
            return
        es = [torch.zeros_like(x, dtype=wdt) if g is None else g.to(wdt) for g, x in zip(grads, xs)]
        beta = group["momentum"]
        if grp.kind == "manifold":
            if grp.rule is None or grp.geometry is None:  # set for every manifold group (_groups.build)
                raise RuntimeError("internal error: a manifold group without its rule and geometry")
            manifold = _dispatch.manifold_of(p0)
            fn = _steps.manifold_fn(group, manifold, grp.rule, grp.geometry, p0.shape, wdt, p0.dtype)
            inputs = list(zip(xs, es, _momentum.buffers(self.state, params, es))) if beta > 0 else list(zip(xs, es))
            outputs = apply_full(params, inputs, fn, owner=True)
            for p, out in zip(params, outputs):
                writes.append((p, out[0]))
                checks.extend(out)
                if beta > 0:
                    writes.append(((p, "momentum_buffer"), out[1]))
            return
        feedback = bool(group["error_feedback"])
        if feedback:  # the summed momentum M = buf + E; the group's function returns the new buffers
            es = _momentum.accumulate(es, _momentum.buffers(self.state, params, es))
        elif beta > 0:  # per shape (a pair group holds two), so that the tensors stack
            es = _momentum.plain(self.state, params, es, grp.parts, beta, group["nesterov"], writes)
        sketch = None
        if grp.kind == "matrix":
            eps = max(torch.finfo(p0.dtype).eps, torch.finfo(wdt).eps)
            sketch = _steps.sketched_lmo(group, grp.shape2d, params, eps)
        if sketch is not None:  # FSDP2 rows, randomized Ky Fan LMO: every rank steps its rows, sketches travel
            body = _steps.matrix_body(group, grp.shape2d, p0.dtype, local_lmo=sketch)
            scalars = _steps.step_scalars(group, grp.shape2d, False)
            (stepped,) = body(torch.stack([x.to(wdt) for x in xs]), torch.stack(es), *scalars)
            news = list(stepped.unbind(0))
            bufs: list[torch.Tensor] = []  # no error feedback in the sketch mode
        elif grp.kind == "matrix":
            fn = _steps.matrix_fn(group, grp.shape2d, wdt, p0.dtype)
            outputs = apply_full(params, list(zip(xs, es)), fn, owner=True)
            news = [out[0] for out in outputs]
            bufs = [out[1] for out in outputs] if feedback else []
        else:  # pairs: one item (B, A, E~_B, E~_A) per pair; small, so computed on every rank
            n = len(grp.pair_ids)
            fn = _pairs.pair_fn(group, grp.shape2d, wdt, p0.dtype, lazy)
            items = [(params[j], params[n + j], params[j], params[n + j]) for j in range(n)]
            pair_inputs = [(xs[j], xs[n + j], es[j], es[n + j]) for j in range(n)]
            outputs = apply_full(items, pair_inputs, fn, owner=False)
            news = [out[0] for out in outputs] + [out[1] for out in outputs]
            bufs = [out[2] for out in outputs] + [out[3] for out in outputs] if feedback else []
        writes.extend(zip(params, news))
        checks.extend(news)
        writes.extend(((p, _momentum.KEY), v) for p, v in zip(params, bufs))
        checks.extend(bufs)

    def _update_stacked(self, grp: Group, lazy: bool, writes: list, checks: list) -> None:
        """:meth:`_update` for plain matrices and pairs that are not sharded: one gather (``torch.stack``) of the
        parameters and one of the gradients per run of equal shapes, the momentum on the group's stacked buffers
        (kept between steps, :class:`~imuon_manopt.optim._momentum.Stacked`), the group's body on the stacked
        tensors (:func:`~imuon_manopt.optim._steps.group_step`, compiled with ``compile=``), and one scatter of
        the new values at commit (``torch._foreach_copy_``); no per-parameter arithmetic."""
        group, params = grp.group, grp.params
        p0 = params[0]
        wdt = work_dtype(p0)
        beta = group["momentum"]
        feedback = bool(group["error_feedback"])
        keep = beta > 0 or feedback  # a buffer per parameter
        if keep and len(grp.momentum) != len(grp.parts):
            grp.momentum = [_momentum.Stacked() for _ in grp.parts]
        xs, gs, bufs = [], [], []
        for k, part in enumerate(grp.parts):
            ps = params[part]
            xs.append(
                torch.stack([p.detach() if type(p) in _PLAIN else p.detach().as_subclass(torch.Tensor) for p in ps])
            )
            grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in ps]  # a factor without one: zero
            gs.append(torch.stack(grads))
            if keep:
                bufs.append(grp.momentum[k].current(self.state, ps, gs[k], wdt))
        compiled = bool(self.compile)
        scalars = _steps.step_scalars(group, grp.shape2d, tensor=compiled)
        key = (beta, group["nesterov"], feedback, group["weight_decay"] > 0, group["pair_momentum"], lazy, compiled)
        if grp.step_fn is None or grp.step_key != key:
            if grp.kind == "matrix":
                body = _steps.matrix_body(group, grp.shape2d, p0.dtype)
            else:
                body = _pairs.pair_body(group, grp.shape2d, p0.dtype, lazy and not compiled)
            fn: Callable[..., Any] = functools.partial(
                _steps.group_step, body, beta=beta, use_nesterov=group["nesterov"], feedback=feedback, wdt=wdt
            )
            if compiled:
                options = {"dynamic": False, **(self.compile if isinstance(self.compile, dict) else {})}
                fn = torch.compile(fn, fullgraph=True, **options)
            grp.step_fn, grp.step_key = fn, key
        outs, new_bufs = grp.step_fn(xs, gs, bufs if keep else None, scalars)
        for k, part in enumerate(grp.parts):
            writes.append(StackedParams(params[part], outs[k], xs[k]))
            checks.extend(outs[k])
            if keep:
                writes.append(StackedState(params[part], grp.momentum[k], new_bufs[k], bufs[k]))
                if feedback:  # the fed-back residual is not implied by the parameters' finiteness
                    checks.append(new_bufs[k])

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One iMuon step for every parameter with a gradient.

        Args:
            closure: re-evaluates the model and returns the loss (run under ``torch.enable_grad()``).

        Returns:
            The closure's loss, or ``None``.

        Raises:
            FloatingPointError: a gradient or update is not finite and ``nonfinite="raise"`` (nothing changed; on
                a non-CPU device possibly at a later step, see ``nonfinite``).
            ValueError: a gradient of the wrong shape, a manifold parameter off its manifold, or a pair with a
                rank-deficient factor on its first step.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._poll(wait=False)
        groups = self._structure()
        self._calls += 1
        self._agree_structure()
        if groups:
            device_mode = self.capturable or self._defer_checks(groups)
            for grp in groups:
                if not grp.checked:
                    self._check_new(grp)
                    grp.checked = True
            writes: list = []
            checks: list = []
            failure = None
            try:
                for grp in groups:
                    self._update(grp, lazy=not device_mode, writes=writes, checks=checks)
            except torch.linalg.LinAlgError as err:  # a factorization failed: the nonfinite path
                failure = err
            reason = self._settle(groups, writes, checks, failure is not None, device_mode)
            if reason is not None:
                if failure is not None and str(failure):
                    reason += f" [{failure}]"
                self._count_and_stabilize()
                return self._reject(loss, reason)
        self._count_and_stabilize()
        return loss

    # ------------------------------------------------------------------ stabilize

    def _count_and_stabilize(self) -> None:
        """geoopt's schedule: every ``stabilize`` calls of ``step`` (with or without gradients)."""
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            if group["stabilize"] is not None and group["step"] % group["stabilize"] == 0:
                self.stabilize_group(group)

    @torch.no_grad()
    def stabilize_group(self, group: dict[str, Any]) -> None:
        """Project manifold parameters onto their manifolds, their buffers onto tangent spaces."""
        for p in group["params"]:
            if p not in self._rules:
                continue
            rule, geometry, _ = self._rules[p]
            manifold = p.manifold
            p.copy_(manifold.projx(p.detach().to(work_dtype(p))))
            buf = self.state[p].get(_momentum.KEY)
            if buf is not None:
                x = p.detach().to(work_dtype(p))
                buf.copy_(_momentum.project(manifold, rule, geometry, x, buf.to(x.dtype)))
