"""CPU threads for this process's torch work: ``federation.threads``.

torch's default is one intra-op thread per core. The models m3tfed trains on CPUs are
small (a few hundred thousand parameters, batches of 32), so a second thread gains
little, and when anything else runs on the machine (another run, a test, a second
institution) the threads of an OpenMP region wait for each other on a busy core: a
default run measured ~5x slower beside one CPU-bound process with two threads than with
one. So the setting defaults to 1; 0 takes every core this process may use (for a large
model on a machine of its own). bench/threads.py measures both, idle and busy.

Processes that m3tfed starts (DeepSpeed ranks, Flower nodes) set their threads from
OMP_NUM_THREADS, read through :func:`env_threads`.
"""

from __future__ import annotations

import os

import torch


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


def resolve_threads(setting: int) -> int:
    """The thread count a ``federation.threads`` value means (0 = every usable core)."""
    if setting < 0:
        raise ValueError(f"federation.threads must be >= 0 (0 = every usable core), got {setting}")
    return setting or usable_cores()


def apply_threads(setting: int) -> int:
    """Set torch's intra-op threads for this process; returns the count set."""
    n = resolve_threads(setting)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
