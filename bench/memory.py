"""Memory for 100 and 1,000 simulated small institutions in one process.

m3tfed builds institutions' models lazily and shares one model object per selection, so
memory grows with each institution's data and personal state, not with a model copy per
institution. Baseline, measured in the same run: one model copy per institution (what a
naive simulation keeps), at 100 institutions. Target: 1,000 institutions under 8 GiB.

Run: .venv/bin/python bench/memory.py [--institutions 100 1000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
from common import Timer, emit, parse_args, peak_rss_mb, rss_mb  # noqa: E402
from m3tfed.defaults import default_config_dict  # noqa: E402
from m3tfed.federation.build import build_federation  # noqa: E402
from m3tfed.federation.config import load_config  # noqa: E402
from m3tfed.federation.institution import ModelPool  # noqa: E402


def small_federation(n: int, students: int = 32, fraction: float = 0.1):
    d = default_config_dict()
    d["rounds"] = 1
    d["federation"].update({"local_steps": 1, "batch_size": 16, "min_institutions": 2, "fraction": fraction})
    d["institutions"] = [
        {"name": f"school_{i:04d}", "modalities": ["tabular"], "tasks": ["grade"], "compute": "small"} for i in range(n)
    ]
    d["data"]["options"]["profiles"] = {f"school_{i:04d}": {"n": students, "ability_mean": (i % 7 - 3) / 5} for i in range(n)}
    return load_config(d)


def measure(n: int, shared: bool) -> dict:
    """Build and run one round in this process; report its peak RSS."""
    torch.set_num_threads(2)
    start_rss = rss_mb()
    with Timer() as t:
        fed = build_federation(small_federation(n))
        if not shared:  # baseline: a model copy per institution
            for inst in fed.institutions.values():
                inst.pool = ModelPool(inst.pool.config, inst.pool.catalogue)
                inst.model()
        fed.server.run_round(1)
    pools = {id(i.pool): i.pool for i in fed.institutions.values()}
    return {"institutions": n, "shared_models": shared, "peak_rss_mb": peak_rss_mb(), "rss_at_start_mb": start_rss,
            "seconds": t.seconds, "models_built": sum(len(p.models) for p in pools.values())}


def in_child(n: int, shared: bool) -> dict:
    """Each measurement in a fresh process, so freed memory of one cannot hide another's."""
    out = subprocess.run([sys.executable, __file__, "--child", str(n), str(int(shared))], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--institutions", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--baseline", type=int, default=100, help="institutions in the baseline (models not shared)")
    p.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parse_args(p, smoke={"institutions": [4], "baseline": 4})
    if args.child:
        print(json.dumps(measure(args.child[0], bool(args.child[1]))))
        return
    baseline = in_child(args.baseline, shared=False)
    rows = [in_child(n, shared=True) for n in args.institutions]
    print(f"{'institutions':>12} {'shared':>7} {'models':>7} {'peak RSS MiB':>13} {'seconds':>8}")
    for r in [baseline, *rows]:
        print(f"{r['institutions']:>12} {str(r['shared_models']):>7} {r['models_built']:>7} {r['peak_rss_mb']:>13.1f} {r['seconds']:>8.1f}")
    same_n = next(r for r in rows if r["institutions"] == baseline["institutions"])
    largest = rows[-1]
    emit(
        {
            "benchmark": "memory",
            "figures": rows,
            "baseline": baseline,
            "ratio_peak_rss_shared_vs_copy_at_100": same_n["peak_rss_mb"] / baseline["peak_rss_mb"],
            "target": {"institutions": 1000, "max_peak_rss_mb": 8192},
            "met": largest["institutions"] >= 1000 and largest["peak_rss_mb"] < 8192,
        }
    )


if __name__ == "__main__":
    main()
