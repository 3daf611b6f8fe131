"""CPU threads for this process's torch work: ``federation.threads``.

torch's default is one intra-op thread per core. When anything else runs on the machine
(another run, a test, a second institution) the threads of an OpenMP region wait for
each other on a busy core: a default run measured 3-5x slower beside one CPU-bound
process with two threads than with one. On an idle machine the second thread saves
15-30%. So the default, ``"auto"``, counts the cores that are idle when the process
starts (sampled from /proc/stat, not the load average, which lags by minutes) and takes
that many; OMP_NUM_THREADS, when set, decides instead. An integer fixes the count (0 =
every usable core). bench/threads.py measures the settings idle and busy.

Threads change how CPU reductions round, so runs with different counts differ in the
last digits: "auto" records its pick in the run folder's ``run.json``; set that number
(or OMP_NUM_THREADS) to reproduce a run bit for bit.

Processes that m3tfed starts (DeepSpeed ranks, Flower nodes) set their threads from
OMP_NUM_THREADS, read through :func:`env_threads`.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Literal

import torch

Threads = int | Literal["auto"]
SAMPLE_S = 0.25  # how long "auto" watches the cores
# A core counts as idle at 80% idle: a thread on a busy core costs the whole run far
# more (3x measured) than a thread missing from an idle one saves (1.3x).
IDLE_SHARE = 0.8


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def env_threads(env: dict[str, str] | None = None, default: int = 1) -> int:
    """The thread count OMP_NUM_THREADS asks for; ``default`` when it is unset, empty or
    not a positive integer (``OMP_NUM_THREADS=`` is common in shells and CI files)."""
    value = (os.environ if env is None else env).get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else default


def cpu_times(stat: str, cpus: set[int]) -> dict[int, tuple[int, int]]:
    """``{cpu: (idle, total)}`` jiffies of the ``cpuN`` lines of a /proc/stat text, for
    the cpus in ``cpus`` (idle counts iowait: a core waiting on a disk is free to run)."""
    out = {}
    for line in stat.splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            ticks = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
            out[int(name[3:])] = (ticks[3] + ticks[4], sum(ticks))
    return out


def idle_cores(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> int:
    """Cores at least ``IDLE_SHARE`` idle between two :func:`cpu_times` samples."""
    idle = 0
    for cpu, (idle1, total1) in after.items():
        idle0, total0 = before.get(cpu, (idle1, total1))
        if total1 > total0 and (idle1 - idle0) / (total1 - total0) >= IDLE_SHARE:
            idle += 1
    return idle


def read_stat() -> str:
    with open("/proc/stat") as f:
        return f.read()


@functools.cache
def auto_threads() -> int:
    """What ``"auto"`` means in this process, decided once: OMP_NUM_THREADS when set, else
    the usable cores idle right now (at least 1; 1 where /proc/stat cannot be read)."""
    asked = env_threads(default=0)
    if asked:
        return asked
    try:
        cpus = os.sched_getaffinity(0)
        before = cpu_times(read_stat(), cpus)
        time.sleep(SAMPLE_S)  # this process sleeps: only other work shows as busy
        after = cpu_times(read_stat(), cpus)
    except (AttributeError, OSError):  # not Linux
        return 1
    return max(1, idle_cores(before, after))


def resolve_threads(setting: Threads) -> int:
    """The thread count a ``federation.threads`` value means (0 = every usable core,
    "auto" = :func:`auto_threads`)."""
    if setting == "auto":
        return auto_threads()
    if setting < 0:
        raise ValueError(f"federation.threads must be >= 0 (0 = every usable core) or \"auto\", got {setting}")
    return setting or usable_cores()


def apply_threads(setting: Threads) -> int:
    """Set torch's intra-op threads for this process; returns the count set."""
    n = resolve_threads(setting)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
