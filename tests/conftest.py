import os
import signal

import pytest
import torch


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


# SIGTERM (scripts/test.sh's timeout, CI cancelling a job) interrupts pytest like Ctrl-C: cleanup runs, among
# it tests/_multiprocess.py's killing of the ranks a multi-process test started.
if os.name == "posix":
    signal.signal(signal.SIGTERM, _interrupt)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The test matrices are small: one intra-op thread is as fast and avoids OpenMP stalls when
    the cores are shared with other jobs (tests that need more threads set them themselves)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state."""
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
