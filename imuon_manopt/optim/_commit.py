"""The commit engine of :class:`~imuon_manopt.optim.IMuon`: a step is applied whole or not at all.

Every group's update is computed into temporaries (``writes``: ``(param or (param, state key), new local
tensor)``), and the tensors whose finiteness decides the step (``checks``) are reduced to one device-side flag
(:meth:`CommitEngine._finite`, the one place where finiteness is decided). Then:

- on the CPU the flag is read at once: all writes are copied (:meth:`CommitEngine._commit`) or none, and the
  ``nonfinite`` policy (``"raise"`` or ``"skip"``) applies (:meth:`CommitEngine._reject`);
- on other devices nothing waits for the device: a masked write commits all or nothing
  (:meth:`CommitEngine._commit_masked`), the flag is copied to the host asynchronously, and the policy is applied
  once the device has finished that step (:meth:`CommitEngine._poll`, at a later ``step()``, at
  :meth:`CommitEngine.check_finite` or at ``last_step_skipped``).

Sharded (FSDP2) parameters: all ranks agree on the flag (:func:`~imuon_manopt.optim._distributed.agree`), so they
commit or reject together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ._distributed import agree, like, local
from ._groups import Group
from ._momentum import Stacked
from ._state import host_step

__all__ = ["CommitEngine", "StackedParams", "StackedState"]


@dataclass
class StackedParams:
    """A write of a group's (unsharded) parameters from its stacked result: ``new`` holds the stacked chunks of
    the new values in the parameters' dtype, ``old`` the stacked old values (the masked commit keeps them)."""

    params: list[torch.Tensor]
    new: list[torch.Tensor]
    old: torch.Tensor


@dataclass
class StackedState:
    """A write of a group's stacked state (:class:`~imuon_manopt.optim._momentum.Stacked`): ``new`` becomes the
    stacked tensor (no copy), its rows the state entries; ``old`` is what the masked commit keeps."""

    params: list[torch.Tensor]
    cache: Stacked
    new: torch.Tensor
    old: torch.Tensor


def _rows(chunks: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t for c in chunks for t in c.unbind(0)]


class CommitEngine:
    """Finiteness, commit and the ``nonfinite`` policy, mixed into the optimizer (which provides ``state`` and
    ``param_groups``)."""

    state: Any
    param_groups: list[dict[str, Any]]

    def _init_commit(self, nonfinite: str, capturable: bool = False) -> None:
        self.nonfinite = nonfinite
        #: keep the finiteness flag on the device, write state in place (a CUDA-graph-capturable step)
        self.capturable = capturable
        self._flag: torch.Tensor | None = None  # capturable: the last step's flag, on the device
        self._flag_call = -1  # the call of step() that wrote it
        self._skipped = False
        self._pending: list[tuple[torch.Tensor, Any, int]] = []  # device mode: (flag on the host, event, step)
        self._calls = 0

    def _settle(self, groups: list[Group], writes: list, checks: list, failed: bool, device_mode: bool) -> str | None:
        """Commit the step's ``writes`` if it is finite; otherwise change nothing and return why (for
        :meth:`_reject`). ``failed``: a factorization met non-finite values. In device mode the decision is made on
        the device (masked commit) and the policy applied later (:meth:`_poll`)."""
        if groups and groups[0].params[0].device.type == "meta" and not failed:
            self._commit(groups, writes)  # shapes only: no values, no finiteness to decide
            return None
        if device_mode and not failed:
            # sharded parameters: all ranks commit or reject together (each sees only its shards)
            self._commit_masked(groups, writes, agree(self._finite(checks), self._all_params(groups)))
            return None
        self._skipped = False
        if failed or not bool(agree(self._finite(checks), self._all_params(groups))):
            return self._diagnose(groups, failed)
        self._commit(groups, writes)
        return None

    @staticmethod
    def _defer_checks(groups: list[Group]) -> bool:
        """Decide finiteness on the device (masked commit, deferred policy) unless every parameter is on the CPU,
        where reading the flag costs nothing."""
        return any(p.device.type != "cpu" for grp in groups for p in grp.params[:1])

    @staticmethod
    def _all_params(groups: list[Group]) -> list[torch.Tensor]:
        return [p for grp in groups for p in grp.params]

    @staticmethod
    def _finite(tensors: list[torch.Tensor]) -> torch.Tensor:
        """All entries finite? A 0-d bool tensor on the first tensor's device, without a host synchronization.

        Outputs of one batched call are views of one tensor: each such base is reduced once (``aminmax``, which
        propagates NaN and cannot overflow). This is the one place where the step's finiteness is decided."""
        bases: dict[int, torch.Tensor] = {}
        for t in tensors:
            if t.is_floating_point() and t.numel():
                base = t._base if t._base is not None else t
                bases[id(base)] = base
        if not bases:
            return torch.ones((), dtype=torch.bool)
        device = tensors[0].device
        flags = []
        for base in bases.values():
            lo, hi = torch.aminmax(base)
            flags.append((torch.isfinite(lo) & torch.isfinite(hi)).to(device))
        return flags[0] if len(flags) == 1 else torch.stack(flags).all()

    def _commit(self, groups: list[Group], writes: list) -> None:
        dst: list[torch.Tensor] = []
        src: list[torch.Tensor] = []
        for entry in writes:
            if isinstance(entry, StackedParams):
                dst.extend(p.detach() for p in entry.params)
                src.extend(_rows(entry.new))
                continue
            if isinstance(entry, StackedState):
                entry.cache.set(self.state, entry.params, entry.new)
                continue
            target, value = entry
            if isinstance(target, torch.Tensor):
                dst.append(local(target).detach())
                src.append(value)
                continue
            p, key = target
            state = self.state[p]
            old = state.get(key)
            if (
                old is not None
                and type(old) is not torch.Tensor
                and old.dtype == value.dtype
                and local(old).shape == value.shape
            ):  # a wrapper (the DTensor state of a sharded parameter) is written in place
                dst.append(local(old))
                src.append(value)
            else:
                # a plain tensor is replaced by the new one: a view of the group's stacked result (no copy; the next
                # step stacks the views back for free). State of a sharded parameter is a DTensor laid out like it
                # (torch.optim's FSDP2 convention).
                state[key] = like(p, value)
        if dst:
            torch._foreach_copy_(dst, src)
        for grp in groups:
            for p in grp.params:
                st = self.state[p]
                st["step"] = host_step(st.get("step", 0)) + 1

    def _commit_masked(self, groups: list[Group], writes: list, ok: torch.Tensor) -> None:
        """Device mode: commit every write where the whole step is finite (``ok``), keep the old values elsewhere."""
        dst: list[torch.Tensor] = []
        src: list[torch.Tensor] = []
        for entry in writes:
            if isinstance(entry, StackedParams):
                dst.extend(p.detach() for p in entry.params)
                start = 0
                for c in entry.new:
                    kept = entry.old[start : start + c.shape[0]]
                    src.extend(torch.where(ok.to(c.device), c, kept).unbind(0))
                    start += c.shape[0]
                continue
            if isinstance(entry, StackedState):
                kept = torch.where(ok.to(entry.new.device), entry.new, entry.old)
                if self.capturable and entry.old is entry.cache.tensor:
                    entry.old.copy_(kept)  # in place: the address a captured graph writes to stays fixed
                else:
                    entry.cache.set(self.state, entry.params, kept)
                continue
            target, value = entry
            if isinstance(target, torch.Tensor):
                old = local(target).detach()
                old.copy_(torch.where(ok.to(old.device), value.to(old.dtype), old))
                continue
            p, key = target
            state = self.state[p]
            old = state.get(key)
            if old is None or old.dtype != value.dtype or local(old).shape != value.shape:
                state[key] = like(p, torch.where(ok.to(value.device), value, torch.zeros_like(value)))
            else:
                old = local(old)
                old.copy_(torch.where(ok.to(old.device), value, old))
        if dst:
            torch._foreach_copy_(dst, src)
        steps = []
        for grp in groups:
            for p in grp.params:
                st = self.state[p]
                step = st.get("step", 0)
                if not isinstance(step, torch.Tensor) or step.device != p.device:
                    step = st["step"] = torch.as_tensor(step, dtype=torch.float32, device=p.device).clone()
                steps.append(step)
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for step in steps:
            by_device.setdefault(step.device, []).append(step)
        for device, ts in by_device.items():
            torch._foreach_add_(ts, ok.to(device=device, dtype=torch.float32))
        if self.capturable:  # no host copy, no event: the flag stays on the device (check_finite reads it)
            if self._flag is None or self._flag.device != ok.device:
                self._flag = ok.clone()
            else:
                self._flag.copy_(ok)
            self._flag_call = self._calls  # (a graph replay runs no Python: the captured call stays the last)
            return
        host = torch.empty((), dtype=torch.bool, pin_memory=ok.is_cuda)
        host.copy_(ok, non_blocking=True)
        event = None
        if ok.is_cuda:
            event = torch.cuda.Event()
            event.record()
        self._pending.append((host, event, self._calls))

    def _poll(self, wait: bool) -> None:
        """Device mode: read the finiteness flags of finished steps (``wait``: of all steps) and apply the policy."""
        while self._pending:
            host, event, call = self._pending[0]
            if event is not None:
                if wait:
                    event.synchronize()
                elif not event.query():
                    return
            self._pending.pop(0)
            self._skipped = not bool(host)
            if self._skipped and self.nonfinite == "raise":
                self._pending.clear()
                self._reject(None, f"non-finite gradient or update in step {call} (that step was not applied)")

    def _read_flag(self) -> None:
        """Capturable mode: the last step's device flag decides ``last_step_skipped`` (a host synchronization)."""
        if self.capturable and self._flag is not None and self._flag_call == self._calls:
            self._skipped = not bool(self._flag)

    def check_finite(self) -> bool:
        """Wait for the device and apply the ``nonfinite`` policy to every step taken so far; ``True`` when the last
        step was applied. Needed only off the CPU, where the check is otherwise deferred (see ``nonfinite``), and
        with ``capturable=True`` (where it reads the last step's flag)."""
        self._poll(wait=True)
        if self.capturable and self._flag is not None and self._flag_call == self._calls:
            self._read_flag()
            if self._skipped and self.nonfinite == "raise":
                self._reject(None, "non-finite gradient or update in the last step (that step was not applied)")
        return not self._skipped

    @property
    def last_step_skipped(self) -> bool:
        """Whether the last ``step()`` was skipped (``nonfinite="skip"``); waits for the device off the CPU."""
        self._poll(wait=True)
        self._read_flag()
        return self._skipped

    @last_step_skipped.setter
    def last_step_skipped(self, value: bool) -> None:
        self._skipped = bool(value)

    def _diagnose(self, groups: list[Group], linalg_failed: bool) -> str:
        bad = []
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                    bad.append(f"group {gi} parameter {pi} (shape {tuple(p.shape)})")
        if bad:
            return f"non-finite gradient in {', '.join(bad)}"
        cause = "a factorization failed" if linalg_failed else "finite gradients"
        return f"non-finite update ({cause}; check the learning rate and the parameters' conditioning)"

    def _reject(self, loss: Any, what: str) -> Any:
        if self.nonfinite == "skip":
            self._skipped = True
            return loss
        raise FloatingPointError(
            f"IMuon: {what}; no parameter or optimizer state was changed. Pass nonfinite='skip' to skip such steps "
            "instead of raising."
        )
