"""Starting the ranks of a multi-process test with a hard deadline.

``run_ranks(fn, world, *args, timeout=...)`` runs ``fn(rank, world, port, *args)`` in ``world`` processes
(forked where the platform allows: the children inherit the imported modules, else spawned). Each child
first makes itself the leader of a new process group, so that whatever it starts (threads die with it,
subprocesses join its group) can be killed as one. If the ranks have not all finished when ``timeout``
seconds have passed, every child's process group is killed with SIGKILL and the test fails with a message
that names the test function, the deadline and the pids, instead of hanging CI (a forked gloo rank can
deadlock in its process group's destructor). A rank that raises makes the others be terminated and the
test fail with that rank's traceback (torch's ``ProcessRaisedException``).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch.multiprocessing as mp

#: Seconds a multi-process test may take before its ranks are killed (generous: 2 shared cores in CI).
DEFAULT_TIMEOUT = 180.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for ``init_method="tcp://..."``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when the test process dies, even if that is killed without cleanup
    (``scripts/test.sh``'s ``timeout`` kills pytest's process group, which the ranks have left)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _entry(rank: int, fn: Callable[..., None], parent: int, args: tuple) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the test process's handler (conftest.py)
    os.setpgid(0, 0)  # this rank and everything it starts: one process group, killed together on timeout
    _die_with_parent()
    if os.getppid() != parent:  # the test process died before the line above took effect
        os._exit(1)
    fn(rank, *args)


def _kill_groups(pids: list[int]) -> None:
    for pid in pids:
        for kill in (os.killpg, os.kill):  # the group; the process itself if it never got to setpgid
            try:
                kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def run_ranks(fn: Callable[..., None], world: int, *args: Any, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Run ``fn(rank, world, port, *args)`` on ``world`` ranks; fail the test (never hang) after ``timeout`` s."""
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.start_processes(
        _entry, args=(fn, os.getpid(), (world, free_port(), *args)), nprocs=world, join=False, start_method=method
    )
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.05, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                pids = ctx.pids()
                _kill_groups(pids)
                for p in ctx.processes:
                    p.join(10)
                pytest.fail(
                    f"{getattr(fn, '__name__', fn)}: the {world} ranks (pids {pids}) had not finished after "
                    f"{timeout:g} s; their process groups were killed (a hung collective or a deadlocked "
                    "process-group teardown)",
                    pytrace=False,
                )
    finally:
        alive = [p.pid for p in ctx.processes if p.is_alive()]
        if alive:  # a rank raised (torch terminated the others) or the test is being interrupted
            _kill_groups(alive)
            for p in ctx.processes:
                p.join(10)


def run_command(args: list[str], timeout: float, **kwargs: Any) -> subprocess.CompletedProcess:
    """``subprocess.run(args, capture_output=True, text=True, **kwargs)`` in a new session; after ``timeout`` seconds
    its whole process group (a shell script's children too, which ``subprocess.run``'s own timeout leaves running,
    holding the pipes open) is killed and the test fails with a clear message."""
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_groups([proc.pid])
        out, err = proc.communicate()
        pytest.fail(
            f"{' '.join(args)[:200]} had not finished after {timeout:g} s; its process group was killed.\n"
            f"stderr (end): {err[-2000:]}",
            pytrace=False,
        )
    except BaseException:  # interrupted: leave nothing running
        _kill_groups([proc.pid])
        proc.communicate()
        raise
    return subprocess.CompletedProcess(args, proc.returncode, out, err)
