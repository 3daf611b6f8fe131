"""CPU threads for this process's torch work: ``federation.threads``.

torch's default is one intra-op thread per core. When anything else runs on the machine
(another run, a test, a second institution) the threads of an OpenMP region wait for
each other on a busy core: a default run measured 3-5x slower beside one CPU-bound
process with two threads than with one. On an idle machine the second thread saves
15-30%. So the default, ``"auto"``, counts the cores that are idle when the process
starts (sampled from /proc/stat, not the load average, which lags by minutes) and takes
that many, at most the cgroup's CPU quota and ``AUTO_MAX``; OMP_NUM_THREADS, when set,
decides instead. An integer fixes the count (0 = every usable core). bench/threads.py
measures the settings idle and busy.

Threads change how CPU reductions round, so runs with different counts differ in the
last digits: "auto" records its pick in the run folder's ``run.json``, a resumed or
forgotten run reuses it, and setting that number (or OMP_NUM_THREADS) reproduces a run
bit for bit.

Processes that m3tfed starts (DeepSpeed ranks, Flower nodes) set their threads from
OMP_NUM_THREADS, read through :func:`env_threads`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Iterator
from typing import Literal

import torch

Threads = int | Literal["auto"]
SAMPLE_S = 0.25  # how long "auto" watches the cores
# A core counts as idle at 80% idle: a thread on a busy core costs the whole run far
# more (3x measured) than a thread missing from an idle one saves (1.3x).
IDLE_SHARE = 0.8
# At most this many: measured only on 2 cores, and the models are small; a many-core
# host that looks idle must not get 64 OpenMP threads per run. Set a number to go above.
AUTO_MAX = 4
_pinned: int | None = None  # what "auto" means inside pinned_auto_threads


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


def cpu_quota(text: str) -> float | None:
    """Cores a cgroup v2 ``cpu.max`` text allows ("max 100000": no limit -> None). A
    container limited to 2 CPUs still sees every host core in its affinity."""
    quota, _, period = text.strip().partition(" ")
    try:
        return None if quota == "max" else int(quota) / int(period)
    except ValueError:
        return None


def read_cpu_max() -> str:
    with open("/sys/fs/cgroup/cpu.max") as f:
        return f.read()


@contextlib.contextmanager
def pinned_auto_threads(n: int | None) -> Iterator[None]:
    """Within the block "auto" means ``n`` (None: as usual). A resumed or forgotten run
    keeps the count its ``run.json`` recorded, so it rounds as the run it continues; a
    Flower node uses its own ``threads`` setting without sampling."""
    global _pinned
    before, _pinned = _pinned, n
    try:
        yield
    finally:
        _pinned = before


def auto_threads() -> int:
    """What ``"auto"`` means in this process: a pinned count (:func:`pinned_auto_threads`),
    else OMP_NUM_THREADS when set, else :func:`sampled_threads`."""
    return _pinned or env_threads(default=0) or sampled_threads()


@functools.cache
def sampled_threads() -> int:
    """The usable cores idle right now, within the cgroup's CPU quota and ``AUTO_MAX``;
    decided once per process. 1 where /proc/stat cannot be read or parsed."""
    try:
        cpus = os.sched_getaffinity(0)
        before = cpu_times(read_stat(), cpus)
        time.sleep(SAMPLE_S)  # this process sleeps: only other work shows as busy
        after = cpu_times(read_stat(), cpus)
        idle = idle_cores(before, after)
    except Exception:  # not Linux, or a procfs of another shape: the safe count
        return 1
    try:
        quota = cpu_quota(read_cpu_max())
    except OSError:  # cgroup v1 or none
        quota = None
    limit = AUTO_MAX if quota is None else min(AUTO_MAX, max(1, int(quota)))
    return max(1, min(idle, limit))


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
