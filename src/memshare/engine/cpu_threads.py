"""CPU threads that follow the machine's load.

An OpenMP parallel region ends only when every thread has done its share; a thread waiting for a core that another
process holds stalls all the others (12x slower with one of two cores busy, docs/BENCHMARKS.md). So the engine runs
as many threads as its cores minus what other processes use of them, measured from /proc/stat about once a second.
"""

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

PROC_STAT = Path("/proc/stat")
BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # user nice system irq softirq steal; idle and iowait are not busy


def allowed_cpus() -> set[int]:
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def busy_seconds(cpus: set[int], stat: str) -> float:
    """Seconds the given CPUs spent busy since boot, from the text of /proc/stat."""
    ticks = 0
    for line in stat.splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            ticks += sum(int(values[i]) for i in BUSY_FIELDS)
    return ticks / os.sysconf("SC_CLK_TCK")


def threads_for(num_cores: int, other_load: float, max_threads: int) -> int:
    """Threads for the cores other processes leave free (`other_load` in cores), at least one."""
    return max(1, min(max_threads, int(num_cores - other_load + 0.5)))


@dataclass(slots=True)
class ThreadGovernor:
    """Sets torch's thread count from the load of other processes on this process's cores."""

    max_threads: int
    interval_s: float = 1.0
    cpus: set[int] = field(default_factory=allowed_cpus)
    threads: int = 0
    last: tuple[float, float, float] | None = None  # (wall, busy seconds of our CPUs, our own CPU seconds)

    def __post_init__(self) -> None:
        self.threads = self.max_threads
        torch.set_num_threads(self.threads)

    def update(self) -> int:
        """Re-measure at most once per interval; returns the thread count in force."""
        wall = time.monotonic()
        if self.last is not None and wall - self.last[0] < self.interval_s:
            return self.threads
        try:
            busy = busy_seconds(self.cpus, PROC_STAT.read_text())
        except OSError:  # no procfs (macOS, Windows): the thread count stays fixed
            self.interval_s = math.inf
            self.last = (wall, 0.0, 0.0)
            return self.threads
        own = os.times()
        now = (wall, busy, own.user + own.system)
        if self.last is not None:
            other = ((now[1] - self.last[1]) - (now[2] - self.last[2])) / (now[0] - self.last[0])
            threads = threads_for(len(self.cpus), max(other, 0.0), self.max_threads)
            if threads != self.threads:
                torch.set_num_threads(threads)
                self.threads = threads
        self.last = now
        return self.threads
