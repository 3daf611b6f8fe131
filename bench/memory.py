"""Memory for 100 and 1,000 simulated small institutions in one process.

m3tfed builds institutions' models lazily and shares one model object per selection, so
memory grows with each institution's data and personal state, not with a model copy per
institution. Baseline, measured in the same run: one model copy per institution (what a
naive simulation keeps), at 100 institutions. Target: 1,000 institutions under 8 GiB.

Run: .venv/bin/python bench/memory.py [--institutions 100 1000]
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
from common import Timer, emit, rss_mb  # noqa: E402
from m3tfed.defaults import default_config_dict  # noqa: E402
from m3tfed.federation.config import load_config  # noqa: E402
from m3tfed.federation.institution import ModelPool  # noqa: E402
from m3tfed.federation.job import build_federation  # noqa: E402


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
    gc.collect()
    before = rss_mb()
    with Timer() as t:
        fed = build_federation(small_federation(n))
        if not shared:  # baseline: a model copy per institution
            for inst in fed.institutions.values():
                inst.pool = ModelPool(inst.pool.config, inst.pool.catalogue)
                inst.model()
        fed.server.run_round(1)
        if not shared:
            for inst in fed.institutions.values():
                inst.model()
    after = rss_mb()
    res = {"institutions": n, "shared_models": shared, "rss_growth_mb": after - before, "seconds": t.seconds,
           "models_built": sum(len(i.pool.models) for i in {id(x.pool): x for x in fed.institutions.values()}.values())}
    del fed
    gc.collect()
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--institutions", type=int, nargs="+", default=[100, 1000])
    args = p.parse_args()
    torch.set_num_threads(2)
    base_rss = rss_mb()
    baseline = measure(100, shared=False)
    rows = [measure(n, shared=True) for n in args.institutions]
    print(f"{'institutions':>12} {'shared':>7} {'models':>7} {'RSS growth MiB':>15} {'seconds':>8}")
    for r in [baseline, *rows]:
        print(f"{r['institutions']:>12} {str(r['shared_models']):>7} {r['models_built']:>7} {r['rss_growth_mb']:>15.1f} {r['seconds']:>8.1f}")
    largest = rows[-1]
    per_inst_shared = rows[0]["rss_growth_mb"] / rows[0]["institutions"]
    per_inst_copy = baseline["rss_growth_mb"] / baseline["institutions"]
    emit(
        {
            "benchmark": "memory",
            "process_rss_mb_at_start": base_rss,
            "figures": rows,
            "baseline": baseline,
            "ratio_per_institution_shared_vs_copy": per_inst_shared / per_inst_copy if per_inst_copy > 0 else None,
            "largest_total_rss_mb": base_rss + largest["rss_growth_mb"],
            "target": {"institutions": 1000, "max_total_rss_mb": 8192},
            "met": largest["institutions"] >= 1000 and base_rss + largest["rss_growth_mb"] < 8192,
        }
    )


if __name__ == "__main__":
    main()
