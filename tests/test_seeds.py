"""Several seeds: means with 95% intervals, paired comparisons that count an institution
as better only beyond its interval, and the share of institutions with a Wilson interval."""

import json
from pathlib import Path

import pytest
from conftest import tiny_config_dict
from m3tfed.cli import build_parser
from m3tfed.federation.lifecycle import run_seeds
from m3tfed.federation.report import (
    across_seeds,
    mean_interval,
    seeds_to_resolve,
    unresolved,
    wilson,
)


def summary(fed, local):
    """One seed's summary: one task (higher is better), institutions a, b, c."""
    rows = {i: {"fed_moe": fed[k], "local": local[k]} for k, i in enumerate("abc")}
    agg = {m: {"mean": sum(r[m] for r in rows.values()) / 3, "worst": min(r[m] for r in rows.values())} for m in ("fed_moe", "local")}
    return {"pass": {"metric": "accuracy", "higher_is_better": True, "institutions": rows, "summary": agg}}


def test_mean_interval_is_the_t_interval_and_absent_for_one_seed():
    c = mean_interval([1.0, 2.0, 3.0])
    assert c["mean"] == 2.0 and c["hi"] - c["mean"] == pytest.approx(4.303 * 1.0 / 3**0.5)
    assert mean_interval([5.0]) == {"mean": 5.0, "lo": None, "hi": None, "n": 1}


def test_wilson_interval_matches_the_formula():
    lo, hi = wilson(3, 4)
    assert lo == pytest.approx(0.3006, abs=1e-3) and hi == pytest.approx(0.9544, abs=1e-3)
    assert wilson(0, 5)[0] == 0.0 and wilson(5, 5)[1] == 1.0


def test_better_counts_only_a_paired_difference_beyond_its_interval():
    seeds = [
        summary(fed=[0.80, 0.70, 0.60], local=[0.70, 0.72, 0.60]),
        summary(fed=[0.82, 0.71, 0.62], local=[0.71, 0.69, 0.60]),
        summary(fed=[0.81, 0.69, 0.61], local=[0.70, 0.71, 0.60]),
    ]
    c = across_seeds(seeds)["comparison"]["local"]
    # a: +0.11 every seed (better); b: -0.02, +0.02, -0.02 (interval spans 0); c: +0.00, +0.02, +0.01
    assert c["better_at"] == ["a"] and c["worse_at"] == []
    assert c["institutions"]["b"]["lo"] < 0 < c["institutions"]["b"]["hi"]
    assert c["share_better"] == pytest.approx(1 / 3) and c["share_better_interval"] == pytest.approx(wilson(1, 3))
    one = across_seeds(seeds[:1])["comparison"]["local"]
    assert one["better_at"] == [] and one["mean_relative_advantage"]["lo"] is None  # one seed claims nothing


def test_every_method_is_held_against_local_by_the_same_rule():
    def three(fed, cen, local):
        rows = {i: {"fed_moe": fed[k], "centralized": cen[k], "local": local[k]} for k, i in enumerate("abc")}
        agg = {m: {"mean": 0.0, "worst": 0.0} for m in ("fed_moe", "centralized", "local")}
        return {"pass": {"metric": "accuracy", "higher_is_better": True, "institutions": rows, "summary": agg}}

    seeds = [three(fed=[0.8, 0.7, 0.6], cen=[0.9, 0.70, 0.5], local=[0.7, 0.7, 0.6]),
             three(fed=[0.8, 0.7, 0.6], cen=[0.9, 0.72, 0.5], local=[0.7, 0.7, 0.6]),
             three(fed=[0.8, 0.7, 0.6], cen=[0.9, 0.74, 0.5], local=[0.7, 0.7, 0.6])]  # fmt: skip
    out = across_seeds(seeds)
    assert list(out["against_local"]) == ["fed_moe", "centralized"]  # the method first; local not against itself
    assert out["against_local"]["fed_moe"] == out["comparison"]["local"]
    cen = out["against_local"]["centralized"]
    # a: +0.2 every seed (better); c: -0.1 every seed (worse); b: 0, +0.02, +0.04 (open, ahead)
    assert cen["better_at"] == ["a"] and cen["worse_at"] == ["c"]
    # b's mean is its spread (0.02 / 0.667 each): t(n-1)/sqrt(n) < 1 first at n = 7 (2.447 / 2.646)
    assert cen["seeds_to_resolve"]["b"] == 7 and cen["seeds_to_resolve"]["a"] == 2
    assert unresolved(cen).startswith("1 open (0 behind or level on the mean); those ahead would need ")


def test_seeds_to_resolve_is_the_fewest_seeds_whose_interval_excludes_zero():
    # mean 0.2, sd 0.1: t(2)*0.1/sqrt(3) = 0.248 > 0.2, t(3)*0.1/2 = 0.159 < 0.2
    assert seeds_to_resolve([0.1, 0.2, 0.3]) == 4
    assert seeds_to_resolve([-0.1, -0.2, -0.3]) == 4  # worse resolves the same way
    assert seeds_to_resolve([0.1, 0.1]) == 2  # no spread: two seeds
    assert seeds_to_resolve([0.5]) is None and seeds_to_resolve([1.0, -1.0]) is None
    assert seeds_to_resolve([1.0, -0.9], cap=50) == 51  # beyond the cap
    assert seeds_to_resolve([0.1, float("nan"), 0.2]) is None  # a diverged seed claims nothing
    # past 30 degrees of freedom still a t interval, not the normal's: mean 0.28, sd 1:
    # t(51) = t(40) = 2.021, 2.021 / sqrt(52) = 0.2803 > 0.28 > 2.021 / sqrt(53) = 0.2776
    assert seeds_to_resolve([0.28 + 0.5**0.5, 0.28 - 0.5**0.5]) == 53


def test_tables_carry_intervals_and_the_worst_institution():
    seeds = [summary(fed=[0.8, 0.7, 0.6 + d], local=[0.7, 0.7, 0.6]) for d in (0.0, 0.01, 0.02)]
    t = across_seeds(seeds)["tasks"]["pass"]
    assert t["institutions"]["c"]["fed_moe"]["mean"] == pytest.approx(0.61)
    assert t["summary"]["fed_moe"]["worst"]["mean"] == pytest.approx(0.61)
    assert t["worst_institution"] == {"fed_moe": "c", "local": "c"}


def test_run_seeds_runs_each_seed_in_its_own_folder(tmp_path, capsys):
    lines = []
    out = run_seeds(tiny_config_dict(rounds=1), seeds=2, name="s", runs_dir=tmp_path, progress=lines.append)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["seed_0", "seed_1", "seeds.json"]
    assert json.loads((tmp_path / "s" / "seed_1" / "config.json").read_text())["seed"] == 1
    assert out["seeds"] == 2 and out["seeds_used"] == [0, 1]
    grade = out["tasks"]["grade"]["institutions"]["high_school"]["fed_moe"]
    assert grade["n"] == 2 and grade["lo"] < grade["mean"] < grade["hi"]  # two different seeds
    assert any(line.startswith("[seed 1 (2/2) |") and "left]" in line and "round 1/1" in line for line in lines)
    assert "mean ± half-width of the 95% interval" in capsys.readouterr().out


def test_cli_has_seeds_and_protocol_flags():
    args = build_parser().parse_args(["run", "--seeds", "3", "--protocol"])
    assert args.seeds == 3 and args.protocol


PARENT = """
import multiprocessing, os, time
from m3tfed.federation.lifecycle import _init_worker

def worker(parent):
    _init_worker(None, parent)  # what each protocol worker runs first
    time.sleep(600)

if __name__ == "__main__":
    child = multiprocessing.get_context("spawn").Process(target=worker, args=(os.getpid(),))
    child.start()
    print(child.pid, flush=True)
    time.sleep(600)
"""


def test_a_protocol_worker_ends_when_its_parent_is_killed(tmp_path):
    """SIGKILL runs no cleanup in the parent: the worker notices on its own and ends."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())

    def running(pid: int) -> bool:  # a zombie (ended, not yet reaped) counts as ended
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (FileNotFoundError, ProcessLookupError):
            return False

    assert running(child)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 120  # a liveness bound, not a timing claim: it polls every second
    while running(child) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = running(child)
    if alive:
        os.kill(child, signal.SIGKILL)
    assert not alive
