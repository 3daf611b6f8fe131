"""Shared bench helpers: environment, timing, the ``--smoke`` switch and the JSON last line."""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


def rss_mb() -> float:
    """Current resident set size in MiB (Linux)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


SMOKE = False  # set by parse_args(--smoke); emit() marks the result


def parse_args(parser: argparse.ArgumentParser, smoke: dict) -> argparse.Namespace:
    """Parse the bench's arguments plus ``--smoke``, which replaces them by ``smoke``
    (tiny sizes: seconds). tests/test_bench_smoke.py runs every bench that way, so a
    bench cannot silently break; its figures then mean nothing and are marked so."""
    global SMOKE
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: checks that the bench runs; figures mean nothing")
    args = parser.parse_args()
    if args.smoke:
        SMOKE = True
        for key, value in smoke.items():
            setattr(args, key, value)
    return args


def emit(result: dict) -> None:
    """The benchmark's last line: one JSON object."""
    sys.stdout.flush()
    print(json.dumps({**result, "smoke": True} if SMOKE else result, default=float))
