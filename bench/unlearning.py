"""Cost of forgetting an institution against a full retrain without it.

One run of the tiny default federation (``--rounds`` rounds, ``--fraction`` of the
institutions sampled per round, so some first contribute late), then for the institution
whose first contribution is latest: ``forget --scope touched`` (retrains rounds r0 ..
last, only the components it touched), ``forget --scope all`` (the exact one: every
round from the initial state) and, as the baseline, a fresh full run of the same config
without it. Wall-clock seconds each, in this process, one after the other.

Reference points (not measured here): SISA reports unlearning 1.4-4.6x faster than
retraining; FedEraser about 4x. ``touched`` saves the rounds before r0 and nothing else
(every remaining institution still trains in each retrained round); ``all`` is a full
retrain by construction and must cost about the same as the baseline.

Run: .venv/bin/python bench/unlearning.py [--rounds 6] [--fraction 0.5] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import Timer, emit  # noqa: E402
from m3tfed.defaults import default_config_dict  # noqa: E402
from m3tfed.federation.checkpoint import latest_checkpoint, load_checkpoint  # noqa: E402
from m3tfed.federation.lifecycle import run_job  # noqa: E402
from m3tfed.federation.unlearning import forget  # noqa: E402


def quiet(msg: str) -> None:
    pass


def tiny_config(rounds: int, n: int, fraction: float) -> dict:
    """The default federation shrunk: n students a profile, 2 local steps, no baselines."""
    d = default_config_dict()
    d["rounds"] = rounds
    d["federation"].update({"local_steps": 2, "batch_size": 8, "min_institutions": 2, "fraction": fraction})
    for profile in d["data"]["options"]["profiles"].values():
        profile["n"] = n
    d["evaluation"] = {"baselines": [], "personalize": False, "plots": False}
    return d


def run(rounds: int, fraction: float, n: int) -> dict:
    d = tiny_config(rounds, n, fraction)
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp)
        with Timer() as original:
            run_job(json.loads(json.dumps(d)), name="orig", runs_dir=runs, progress=quiet)
        meta = load_checkpoint(latest_checkpoint(runs / "orig"))[1]
        first: dict[str, int] = {}
        for r, name, _ in meta["contributions"]:
            first[name] = min(first.get(name, r), r)
        x = max(sorted(first), key=lambda name: first[name])
        with Timer() as touched:
            rec = forget(
                runs / "orig", x, out_dir=runs / "touched", scope="touched", progress=quiet
            )
        with Timer() as exact:
            forget(runs / "orig", x, out_dir=runs / "all", scope="all", progress=quiet)
        without = {**d, "institutions": [i for i in d["institutions"] if i["name"] != x]}
        with Timer() as retrain:
            run_job(without, name="retrain", runs_dir=runs, progress=quiet)
    return {
        "institution": x,
        "first_contribution_round": first[x],
        "rounds": rounds,
        "fraction": fraction,
        "seconds": {
            "original_run": round(original.seconds, 2),
            "forget_touched": round(touched.seconds, 2),
            "forget_all": round(exact.seconds, 2),
            "full_retrain_baseline": round(retrain.seconds, 2),
        },
        "retrained_rounds": {"touched": len(rec["retrained_rounds"]), "all": rounds},
        "speedup_vs_retrain": {
            "touched": round(retrain.seconds / touched.seconds, 2),
            "all": round(retrain.seconds / exact.seconds, 2),
        },
        "target": "all ~ 1x (exact, a full retrain); touched ~ rounds / (rounds - r0 + 1); references: SISA 1.4-4.6x, FedEraser ~4x",
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--fraction", type=float, default=0.5)
    p.add_argument("--students", type=int, default=48, help="students per data profile")
    p.add_argument("--smoke", action="store_true", help="seconds: 2 rounds, 24 students")
    a = p.parse_args(argv)
    if a.smoke:
        a.rounds, a.students = 2, 24
    result = {"smoke": a.smoke, **run(a.rounds, a.fraction, a.students)}
    emit(result)
    return result


if __name__ == "__main__":
    main()
