"""A plain Flower app for bench/flower_backend.py: Flower's own FedAvg strategy on a real
deployment, each node training its institution with m3tfed's ``Institution.train`` (the
same local compute as the m3tfed app). Shipped inside the app folder (FAB), so Flower's
processes import it from there. Round end times go to ``run-dir/plain.json``."""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

client = ClientApp()
server = ServerApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    from m3tfed.federation.checkpoint import unflatten_components
    from m3tfed.federation.config import load_config
    from m3tfed.federation.institution import TrainJob, seed_for
    from m3tfed.federation.job import build_institution

    cfg = load_config(Path(str(context.node_config["config"])))
    inst = build_institution(cfg, str(context.node_config["institution"]))
    received = msg.content["arrays"].to_torch_state_dict()
    state = unflatten_components(received)
    state = {c: s for c, s in state.items() if c in inst.component_names()}
    rnd = int(msg.content["config"]["server-round"])
    job = TrainJob(inst.name, rnd, state, {c: 0 for c in state}, inst.local_steps(), cfg.federation.lr, seed_for(cfg.seed, "train", rnd, 0, inst.name))
    result = inst.train(job)
    trained = dict(received)
    for u in result.updates:
        for k, d in u.delta.items():
            trained[f"{u.component}::{k}"] = state[u.component][k] + d
    metrics = MetricRecord({"num-examples": result.num_samples, "compute-s": float(result.seconds)})
    return Message(RecordDict({"arrays": ArrayRecord(trained), "metrics": metrics}), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    from m3tfed.federation.checkpoint import flatten_components
    from m3tfed.federation.config import load_config
    from m3tfed.federation.server import initial_state
    from m3tfed.plugin_manager import get_catalogue

    rc = context.run_config
    cfg = load_config(Path(str(rc["config"])))
    n = len(cfg.institutions)
    out = Path(str(rc["run-dir"])) / "plain.json"
    ends: list[float] = []

    def mark(server_round: int, arrays: ArrayRecord):
        ends.append(time.perf_counter())
        out.write_text(json.dumps({"round_end": ends}))
        return None

    while len(list(grid.get_node_ids())) < n:
        time.sleep(0.2)
    FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n).start(
        grid=grid,
        initial_arrays=ArrayRecord(flatten_components(initial_state(cfg, get_catalogue()))),
        train_config=ConfigRecord({}),
        num_rounds=cfg.rounds,
        evaluate_fn=mark,
    )
