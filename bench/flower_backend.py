"""Per-round cost of m3tfed on a real Flower deployment (SuperLink + SuperNodes on loopback).

Same job (bench/flower_toy/apps.py's round-overhead job, tabular/grade, FedAvg over every
component, cut to ``--institutions``), same deployment, in one run:

- ``m3tfed_flower``: m3tfed's ServerApp + ClientApp (``plugins/backends/flower``);
  per-round time is ``RoundReport.seconds`` (jobs out, replies in, screen, aggregate,
  checkpoint);
- ``plain_flower``: Flower's own FedAvg strategy with a ClientApp doing the same local
  training (``flower_toy/plain_fedavg.py``), per-round time between FedAvg's round ends;
- ``in_process``: m3tfed's in-process backend, ``RoundReport.seconds``.

Fair waiting: both apps push a round's messages and pull the replies through the same
loop, ``backend.send_and_receive``, every ``POLL_S`` = 0.1 s. Flower's FedAvg would
otherwise wait through ``Grid.send_and_receive``, which sleeps 3 s between pulls (up to
3 s more per round for the baseline only), so the baseline's strategy gets the Grid
wrapped in ``plain_fedavg.PolledGrid``. Both build the institution in each ClientApp
process (Flower starts one per message) and train with ``Institution.train``.

Goal: m3tfed on Flower costs at most 20% more per round than plain Flower on the same
deployment. Flower 1.41 starts one ClientApp process per message, so both Flower figures
are dominated by process start-up; the in-process one is local compute.

Run: .venv/bin/python bench/flower_backend.py [--rounds 3] [--institutions 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import tomli_w  # noqa: E402
import torch  # noqa: E402
from common import Timer, emit, parse_args  # noqa: E402
from flower_toy.apps import job_config_dict  # noqa: E402
from m3tfed.federation.config import load_config  # noqa: E402
from m3tfed.federation.job import build_federation  # noqa: E402
from m3tfed.plugins.backends.flower.backend import POLL_S  # noqa: E402
from m3tfed.plugins.backends.flower.deploy import Deployment  # noqa: E402

TARGET = 1.2  # m3tfed on Flower / plain Flower, per round

PLAIN_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "plain-fedavg"
version = "1.0.0"
description = "Flower's FedAvg with m3tfed's local training (bench baseline)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "m3tfed"

[tool.flwr.app.components]
serverapp = "plain_fedavg:server"
clientapp = "plain_fedavg:client"

[tool.flwr.app.config]
config = ""
run-dir = ""
"""


def job(rounds: int, institutions: int) -> dict:
    d = job_config_dict()
    d["rounds"] = rounds
    d["institutions"] = d["institutions"][:institutions]
    d["federation"]["min_institutions"] = institutions
    return d


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--institutions", type=int, default=3)
    args = parse_args(p, smoke={"rounds": 1, "institutions": 2})
    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp(prefix="m3tfed-flower-bench-"))
    config = folder / "job.toml"
    config.write_text(tomli_w.dumps(job(args.rounds, args.institutions)))
    names = [i["name"] for i in job(args.rounds, args.institutions)["institutions"]]

    plain_app = folder / "plain-app" / "plain-fedavg"
    plain_app.mkdir(parents=True)
    (plain_app / "pyproject.toml").write_text(PLAIN_PYPROJECT)
    shutil.copy(Path(__file__).parent / "flower_toy" / "plain_fedavg.py", plain_app / "plain_fedavg.py")

    dep = Deployment(folder / "deployment", insecure=True)
    try:
        with Timer() as start:
            dep.start_superlink()
            for n in names:
                dep.start_supernode(n, config)
        # plain Flower first, then m3tfed, on the same SuperLink and SuperNodes
        plain_dir = folder / "plain"
        plain_dir.mkdir()
        with Timer() as t_plain:
            dep.run(config, plain_dir, timeout=1800, app=plain_app)
        ends = json.loads((plain_dir / "plain.json").read_text())["round_end"]
        plain_rounds = [b - a for a, b in zip(ends, ends[1:])]  # from the end of round r-1 (or the start) to r
        m3_dir = folder / "m3tfed"
        with Timer() as t_m3:
            dep.run(config, m3_dir, timeout=1800)
        out = json.loads((m3_dir / "flower.json").read_text())
        m3_rounds = [h["seconds"] for h in out["history"]]
        dropped = [h["dropped"] for h in out["history"] if h["dropped"]]
    finally:
        dep.stop()

    fed = build_federation(load_config(job(args.rounds, args.institutions)))
    local = [fed.server.run_round(r).seconds for r in range(1, args.rounds + 1)]

    # FedAvg's first round end comes after its evaluate_fn call before round 1 (round 0)
    plain_med = statistics.median(plain_rounds) if plain_rounds else float("nan")
    m3_med = statistics.median(m3_rounds)
    ratio = m3_med / plain_med
    print(f"{len(names)} institutions, {args.rounds} rounds, per-round seconds (median):")
    print(f"  plain Flower FedAvg on the deployment   {plain_med:8.2f}  {[round(x, 2) for x in plain_rounds]}")
    print(f"  m3tfed on the same Flower deployment    {m3_med:8.2f}  {[round(x, 2) for x in m3_rounds]}  discovery {out['discover_s']:.1f}s")
    print(f"  m3tfed in-process backend               {statistics.median(local):8.2f}  {[round(x, 3) for x in local]}")
    print(f"  m3tfed/plain Flower = {ratio:.2f} (target <= {TARGET}); deployment start {start.seconds:.1f}s")
    emit(
        {
            "bench": "flower_backend",
            "institutions": len(names),
            "rounds": args.rounds,
            "reply_poll_s": POLL_S,  # both apps, same send_and_receive loop
            "m3tfed_flower_round_s": m3_med,
            "plain_flower_round_s": plain_med,
            "in_process_round_s": statistics.median(local),
            "m3tfed_flower_rounds_s": m3_rounds,
            "plain_flower_rounds_s": plain_rounds,
            "in_process_rounds_s": local,
            "discover_s": out["discover_s"],
            "m3tfed_run_total_s": t_m3.seconds,
            "plain_run_total_s": t_plain.seconds,
            "dropped": dropped,
            "ratio_vs_plain_flower": ratio,
            "flower_overhead_vs_in_process_s": m3_med - statistics.median(local),
            "target_ratio": TARGET,
            "target_met": ratio <= TARGET,
        }
    )


if __name__ == "__main__":
    main()
