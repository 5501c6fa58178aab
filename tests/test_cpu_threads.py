import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from memshare.engine import cpu_threads
from memshare.engine.cpu_threads import ThreadGovernor, allowed_cpus, busy_seconds, threads_for

STAT = """cpu  900 0 900 9000 0 0 0 0 0 0
cpu0 100 10 200 5000 77 1 2 3 0 0
cpu1 400 0 300 4000 0 0 0 0 0 0
cpu2 1000 0 1000 1000 0 0 0 0 0 0
intr 12345
"""


def test_busy_seconds_counts_only_busy_fields_of_the_given_cpus() -> None:
    ticks = (100 + 10 + 200 + 1 + 2 + 3) + (400 + 300)
    assert busy_seconds({0, 1}, STAT) == pytest.approx(ticks / os.sysconf("SC_CLK_TCK"))
    assert busy_seconds({5}, STAT) == 0


@pytest.mark.parametrize(("cores", "other", "max_threads", "expected"),
                         [(2, 0.0, 2, 2), (2, 0.3, 2, 2), (2, 0.7, 2, 1), (2, 1.0, 2, 1), (2, 3.0, 2, 1),
                          (8, 3.0, 4, 4), (8, 5.2, 8, 3)])
def test_threads_for_the_cores_left_free(cores: int, other: float, max_threads: int, expected: int) -> None:
    assert threads_for(cores, other, max_threads) == expected


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.skipif(len(allowed_cpus()) < 2 or not Path("/proc/stat").exists(), reason="needs 2 CPUs and procfs")
def test_governor_yields_a_core_to_a_busy_process_and_takes_it_back(restore_threads) -> None:
    cpus = set(sorted(allowed_cpus())[:2])
    governor = ThreadGovernor(2, interval_s=0.5, cpus=cpus)
    assert governor.update() == 2 and torch.get_num_threads() == 2
    hog = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{min(cpus)}}})\n"
                            "while True: pass"])
    try:
        time.sleep(1.5)
        assert governor.update() == 1 and torch.get_num_threads() == 1
    finally:
        hog.kill()
        hog.wait()
    deadline = time.monotonic() + 5  # a moment of another process's load must not fail the test
    while governor.update() != 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert governor.threads == 2 and torch.get_num_threads() == 2


def test_governor_without_procfs_keeps_its_threads(restore_threads, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(cpu_threads, "PROC_STAT", tmp_path / "missing")
    governor = ThreadGovernor(2, interval_s=0.0)
    assert governor.update() == 2 and governor.update() == 2 and torch.get_num_threads() == 2
