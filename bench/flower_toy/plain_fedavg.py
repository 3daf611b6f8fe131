"""A plain Flower app for bench/flower_backend.py: Flower's own FedAvg strategy on a real
deployment, each node training its institution with m3tfed's ``Institution.train`` (the
same local compute as the m3tfed app). Shipped inside the app folder (FAB), so Flower's
processes import it from there. Round end times go to ``run-dir/plain.json``.

FedAvg sends and waits through ``grid.send_and_receive``, which in Flower 1.41 sleeps 3 s
between pulls for replies; m3tfed's backend pulls every ``POLL_S`` (0.1 s). For a fair
comparison the strategy gets the Grid through :class:`PolledGrid`, whose
``send_and_receive`` is m3tfed's own loop (``backend.send_and_receive``, same interval):
both apps then wait for replies the same way, and what differs is the rest of the round."""

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


class PolledGrid:
    """The Grid, with ``send_and_receive`` done by m3tfed's backend loop (same poll interval)."""

    def __init__(self, grid: Grid):
        self._grid = grid

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        from m3tfed.plugins.backends.flower.backend import send_and_receive

        _, replies = send_and_receive(self._grid, list(messages), float("inf") if timeout is None else timeout)
        return list(replies.values())


@client.train()
def train(msg: Message, context: Context) -> Message:
    from m3tfed.federation.build import build_institution
    from m3tfed.federation.checkpoint import unflatten_components
    from m3tfed.federation.config import load_config
    from m3tfed.federation.institution import TrainJob, seed_for

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
        grid=PolledGrid(grid),
        initial_arrays=ArrayRecord(flatten_components(initial_state(cfg, get_catalogue()))),
        train_config=ConfigRecord({}),
        num_rounds=cfg.rounds,
        evaluate_fn=mark,
    )
