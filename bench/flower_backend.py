"""Per-round cost of m3tfed on a real Flower deployment (SuperLink + SuperNodes on loopback),
and where a round's time goes.

Same job (bench/flower_toy/apps.py's round-overhead job, tabular/grade, FedAvg over every
component, cut to ``--institutions``), same deployment, in one run:

- ``m3tfed_flower``: m3tfed's ServerApp + ClientApp (``plugins/backends/flower``);
  per-round time is ``RoundReport.seconds`` (jobs out, replies in, screen, aggregate,
  checkpoint);
- ``plain_flower``: Flower's own FedAvg strategy with a ClientApp doing the same local
  training (``flower_toy/plain_fedavg.py``), per-round time between FedAvg's round ends;
- ``in_process``: m3tfed's in-process backend, ``RoundReport.seconds``.

The SuperNodes run with m3tfed's warm worker (``worker.py``: one process answers every
message, Flower's own SuperExec loop and ClientApp steps), as ``m3tfed serve/join`` start
them; both apps run on it. Fair waiting: both apps push a round's messages and pull the
replies through the same loop, ``backend.send_and_receive``, every ``POLL_S`` = 0.1 s
(Flower's FedAvg would otherwise sleep 3 s between pulls). The plain app builds the
institution in every call, as a plain Flower ClientApp does; m3tfed's keeps it for the run.

Where a round's time goes: what a message costs on Flower's default SuperNode (a fresh
``flwr-clientapp`` process per message: interpreter and Flower imports, m3tfed and torch
imports, building the institution, training), measured here in subprocesses; and, on
the warm deployment, the messages per round and per message the seconds to pull it from
the node, run the ClientApp and push the reply (the workers' logs). ``--cold`` also runs
both apps on Flower's default process-per-message SuperNodes.

Goal (issue 12): at most 6 s per round and at most 1.0x plain Flower on the same deployment.

Run: .venv/bin/python bench/flower_backend.py [--rounds 3] [--institutions 3] [--cold]
Smoke (seconds, no deployment: the per-message cost breakdown only): --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import tomli_w  # noqa: E402
import torch  # noqa: E402
from common import Timer, emit  # noqa: E402
from flower_toy.apps import job_config_dict  # noqa: E402
from m3tfed.federation.build import build_federation  # noqa: E402
from m3tfed.federation.config import load_config  # noqa: E402
from m3tfed.plugins.backends.flower.backend import POLL_S  # noqa: E402
from m3tfed.plugins.backends.flower.deploy import Deployment  # noqa: E402

TARGET = 1.0  # m3tfed on Flower / plain Flower, per round
TARGET_ROUND_S = 6.0

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


def seconds_of(code: str) -> float:
    """Wall seconds of ``python -c code`` in a fresh process (what a cold message pays)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - t0


def cold_message_cost(config: dict, repeats: int = 2) -> dict[str, float]:
    """Where a message's seconds go when Flower starts a ClientApp process for it (each
    process timing: the best of ``repeats``)."""
    start = min(seconds_of("pass") for _ in range(repeats))
    flower = min(seconds_of("import flwr.supernode.runtime.run_clientapp") for _ in range(repeats))
    app = min(seconds_of("import flwr.supernode.runtime.run_clientapp, m3tfed.plugins.backends.flower.client_app") for _ in range(repeats))
    from m3tfed.federation.build import build_institution

    cfg = load_config(config)
    name = cfg.institutions[0].name
    with Timer() as build:
        inst = build_institution(cfg, name)
    fed = build_federation(cfg)
    job = fed.server.make_job(name, 1, 0)
    with Timer() as train:
        inst.train(job)
    return {
        "process_start_s": start,
        "flower_imports_s": flower - start,
        "m3tfed_torch_imports_s": app - flower,
        "build_institution_s": build.seconds,
        "train_s": train.seconds,
    }


def worker_tasks(logs: Path, since: dict[str, int]) -> list[dict[str, float]]:
    """The tasks the warm workers ran since the log offsets ``since`` (pull/run/push s)."""
    out = []
    for path in sorted(logs.glob("*-worker.log")):
        text = path.read_text(errors="replace")[since.get(path.name, 0):]
        for m in re.finditer(r"pulled in ([\d.]+)s, ran in ([\d.]+)s, pushed in ([\d.]+)s", text):
            out.append({"pull_s": float(m[1]), "run_s": float(m[2]), "push_s": float(m[3])})
    return out


def log_offsets(logs: Path) -> dict[str, int]:
    return {p.name: len(p.read_text(errors="replace")) for p in logs.glob("*-worker.log")}


def on_deployment(folder: Path, config: Path, names: list[str], plain_app: Path, warm: bool) -> dict:
    """Plain FedAvg, then m3tfed, on one deployment; per-round seconds and worker tasks."""
    dep = Deployment(folder, insecure=True, warm=warm, roots=[folder.parent])
    try:
        with Timer() as start:
            dep.start_superlink()
            for n in names:
                dep.start_supernode(n, config)
        logs = dep.folder / "logs"
        plain_dir = folder.parent / f"plain-{'warm' if warm else 'cold'}"
        plain_dir.mkdir()
        seen = log_offsets(logs)
        dep.run(config, plain_dir, timeout=1800, app=plain_app)
        ends = json.loads((plain_dir / "plain.json").read_text())["round_end"]
        plain_tasks = worker_tasks(logs, seen)
        m3_dir = folder.parent / f"m3tfed-{'warm' if warm else 'cold'}"
        seen = log_offsets(logs)
        dep.run(config, m3_dir, timeout=1800)
        m3_tasks = worker_tasks(logs, seen)
        out = json.loads((m3_dir / "flower.json").read_text())
    finally:
        dep.stop()
    return {
        "start_s": start.seconds,
        "plain_rounds_s": [b - a for a, b in zip(ends, ends[1:])],  # FedAvg's first end: its round-0 evaluate_fn call
        "m3tfed_rounds_s": [h["seconds"] for h in out["history"]],
        "discover_s": out["discover_s"],
        "dropped": [h["dropped"] for h in out["history"] if h["dropped"]],
        "plain_tasks": plain_tasks,
        "m3tfed_tasks": m3_tasks,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--institutions", type=int, default=3)
    p.add_argument("--cold", action="store_true", help="also run both apps on Flower's default SuperNodes (a process per message)")
    p.add_argument("--smoke", action="store_true", help="seconds: the per-message cost breakdown only, no deployment")
    args = p.parse_args()
    torch.set_num_threads(1)
    cold = cold_message_cost(job(1, args.institutions), repeats=1 if args.smoke else 2)
    if args.smoke:
        print("a message on Flower's default SuperNode (fresh process):", {k: round(v, 2) for k, v in cold.items()})
        emit({"bench": "flower_backend", "smoke": True, "cold_message_s": cold, "cold_message_total_s": sum(cold.values())})
        return
    folder = Path(tempfile.mkdtemp(prefix="m3tfed-flower-bench-"))
    config = folder / "job.toml"
    config.write_text(tomli_w.dumps(job(args.rounds, args.institutions)))
    names = [i["name"] for i in job(args.rounds, args.institutions)["institutions"]]
    plain_app = folder / "plain-app" / "plain-fedavg"
    plain_app.mkdir(parents=True)
    (plain_app / "pyproject.toml").write_text(PLAIN_PYPROJECT)
    shutil.copy(Path(__file__).parent / "flower_toy" / "plain_fedavg.py", plain_app / "plain_fedavg.py")

    warm = on_deployment(folder / "warm", config, names, plain_app, warm=True)
    coldrun = on_deployment(folder / "cold", config, names, plain_app, warm=False) if args.cold else None

    fed = build_federation(load_config(job(args.rounds, args.institutions)))
    local = [fed.server.run_round(r).seconds for r in range(1, args.rounds + 1)]

    plain_med = statistics.median(warm["plain_rounds_s"])
    m3_med = statistics.median(warm["m3tfed_rounds_s"])
    ratio = m3_med / plain_med
    tasks = warm["m3tfed_tasks"]
    per_round = len(tasks) / args.rounds  # discovery's queries included
    mean = {k: statistics.mean(t[k] for t in tasks) for k in ("pull_s", "run_s", "push_s")}
    print(f"{len(names)} institutions, {args.rounds} rounds, per-round seconds (median):")
    print(f"  plain Flower FedAvg, warm SuperNodes    {plain_med:8.2f}  {[round(x, 2) for x in warm['plain_rounds_s']]}")
    print(f"  m3tfed, same warm SuperNodes            {m3_med:8.2f}  {[round(x, 2) for x in warm['m3tfed_rounds_s']]}  discovery {warm['discover_s']:.1f}s")
    if coldrun:
        print(f"  plain Flower FedAvg, Flower's default   {statistics.median(coldrun['plain_rounds_s']):8.2f}  {[round(x, 2) for x in coldrun['plain_rounds_s']]}")
        print(f"  m3tfed, Flower's default SuperNodes     {statistics.median(coldrun['m3tfed_rounds_s']):8.2f}  {[round(x, 2) for x in coldrun['m3tfed_rounds_s']]}")
    print(f"  m3tfed in-process backend               {statistics.median(local):8.2f}  {[round(x, 3) for x in local]}")
    print(f"  m3tfed/plain Flower = {ratio:.2f} (target <= {TARGET}); round {m3_med:.2f}s (target <= {TARGET_ROUND_S}s)")
    print("where a round's time goes:")
    print(f"  a message on Flower's default SuperNode (a fresh process each): {sum(cold.values()):.2f}s = "
          + ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.2f}s" for k, v in cold.items()))
    print(f"  warm SuperNodes: {len(tasks)} m3tfed messages in {args.rounds} rounds (~{per_round:.1f}/round, discovery included); "
          f"per message: pull {mean['pull_s']:.2f}s, run {mean['run_s']:.2f}s, push {mean['push_s']:.2f}s")
    emit(
        {
            "bench": "flower_backend",
            "institutions": len(names),
            "rounds": args.rounds,
            "reply_poll_s": POLL_S,  # both apps, same send_and_receive loop
            "m3tfed_flower_round_s": m3_med,
            "plain_flower_round_s": plain_med,
            "in_process_round_s": statistics.median(local),
            "m3tfed_flower_rounds_s": warm["m3tfed_rounds_s"],
            "plain_flower_rounds_s": warm["plain_rounds_s"],
            "in_process_rounds_s": local,
            "cold_m3tfed_rounds_s": coldrun["m3tfed_rounds_s"] if coldrun else None,
            "cold_plain_rounds_s": coldrun["plain_rounds_s"] if coldrun else None,
            "discover_s": warm["discover_s"],
            "cold_message_s": cold,
            "m3tfed_messages": len(tasks),
            "m3tfed_message_mean_s": mean,
            "plain_messages": len(warm["plain_tasks"]),
            "dropped": warm["dropped"],
            "ratio_vs_plain_flower": ratio,
            "target_ratio": TARGET,
            "target_round_s": TARGET_ROUND_S,
            "target_met": ratio <= TARGET and m3_med <= TARGET_ROUND_S,
        }
    )


if __name__ == "__main__":
    main()
