"""The deadline of the multi-process tests (``tests/_multiprocess.run_ranks``): a hung rank is killed with
everything it started, the test fails with a clear message within the deadline, and a rank's exception
reaches the test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from _multiprocess import run_ranks


def _hang(rank: int, world: int, port: int, out_dir: str) -> None:
    child = subprocess.Popen(["sleep", "300"])  # something the rank started: killed with its process group
    with open(os.path.join(out_dir, f"child{rank}"), "w") as f:
        f.write(str(child.pid))
    while True:  # a rank that never returns (as a deadlocked gloo teardown)
        time.sleep(0.1)


def _raise(rank: int, world: int, port: int, out_dir: str) -> None:
    if rank == 1:
        raise RuntimeError("rank 1 failed on purpose")
    while True:
        time.sleep(0.1)


def _gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (absent, or a zombie waiting for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.distributed
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc to see the killed processes")
def test_hung_ranks_are_killed_with_their_children(tmp_path):
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=r"_hang: the 2 ranks .* had not finished after 2 s"):
        run_ranks(_hang, 2, str(tmp_path), timeout=2.0)
    assert time.monotonic() - start < 20
    pids = [int((tmp_path / f"child{r}").read_text()) for r in range(2)]
    deadline = time.monotonic() + 10
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_gone(p) for p in pids), pids


@pytest.mark.distributed
def test_a_failing_rank_fails_the_test_with_its_error(tmp_path):
    start = time.monotonic()
    with pytest.raises(mp.ProcessRaisedException, match="rank 1 failed on purpose"):
        run_ranks(_raise, 2, str(tmp_path), timeout=60.0)
    assert time.monotonic() - start < 30


@pytest.mark.skipif("IMUON_HANG_DIR" not in os.environ, reason="only run by the test below, in a pytest it kills")
def test_target_hangs_until_killed():
    run_ranks(_hang, 2, os.environ["IMUON_HANG_DIR"], timeout=600.0)


@pytest.mark.distributed
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc to see the killed processes")
def test_sigterm_to_pytest_kills_the_ranks_and_their_children(tmp_path):
    """What ``scripts/test.sh``'s ``timeout`` does to a hung suite: SIGTERM to pytest ends it, and with it the
    ranks of the running multi-process test (which live in process groups of their own) and what they started."""
    env = dict(os.environ, IMUON_HANG_DIR=str(tmp_path))
    here = Path(__file__)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{here}::test_target_hangs_until_killed"],
        cwd=here.parent.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        files = [tmp_path / f"child{r}" for r in range(2)]
        deadline = time.monotonic() + 120
        while not all(f.exists() and f.read_text() for f in files):
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the ranks never started"
            time.sleep(0.1)
        rank_pids = [
            int(line.split()[0])
            for line in subprocess.check_output(["ps", "-o", "pid=", "--ppid", str(proc.pid)]).decode().splitlines()
        ]
        children = [int(f.read_text()) for f in files]
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        deadline = time.monotonic() + 10
        while not all(_gone(p) for p in rank_pids + children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(rank_pids) == 2 and all(_gone(p) for p in rank_pids + children), (rank_pids, children)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc to see the killed processes")
def test_run_command_kills_a_scripts_children_on_timeout(tmp_path):
    """``subprocess.run(timeout=...)`` kills only the shell and then waits for its children, which hold the output
    pipes: a hang. ``run_command`` kills the whole process group and fails the test."""
    from _multiprocess import run_command

    pidfile = tmp_path / "child"
    script = f"sleep 300 & echo $! > {pidfile}; wait"
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="had not finished after 1 s; its process group was killed"):
        run_command(["bash", "-c", script], timeout=1.0)
    assert time.monotonic() - start < 20
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(pid)
    assert run_command(["bash", "-c", "echo ok"], timeout=30).stdout == "ok\n"
