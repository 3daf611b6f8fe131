"""The round-overhead job, and the Flower apps that run it (Flower 1.41 Message API).

The same job runs in m3tfed's in-process backend and in Flower's simulation: ten
institutions with the tabular modality and the grade task, a ~1M-parameter mixture of
experts, one local step, FedAvg over every component, no evaluation.

The ClientApp runs m3tfed's own :meth:`Institution.train` on the institution's data (the
same code, data, seeds and model as the in-process run), so "local compute" means the
same thing on both sides: ``TrainResult.seconds``, which each client returns in its
reply's MetricRecord. Everything else in a Flower round (sampling, ArrayRecord
(de)serialization, message transport through the Simulation Runtime and Ray, Flower's
aggregation) is Flower's per-round overhead.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import torch  # noqa: E402
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from m3tfed.defaults import default_config_dict  # noqa: E402
from m3tfed.federation.build import build_federation  # noqa: E402
from m3tfed.federation.checkpoint import flatten_components, unflatten_components  # noqa: E402
from m3tfed.federation.config import load_config  # noqa: E402
from m3tfed.federation.institution import TrainJob, seed_for  # noqa: E402

INSTITUTIONS = 10
STUDENTS = 64
D_MODEL = 128
N_LAYERS = 2
N_EXPERTS = 8
EXPERT_HIDDEN = 136  # 8 SwiGLU experts x 2 layers: ~0.84M of the ~0.99M parameters
# Torch threads per process. One: on a shared 2-core machine, two OpenMP threads per
# process slow a step down several-fold whenever another process competes for the cores.
THREADS = int(os.environ.get("M3TFED_BENCH_THREADS", "1"))


def job_config_dict() -> dict[str, Any]:
    """The benchmark job as an m3tfed config dict (the default federation, reshaped)."""
    d = default_config_dict()
    d["name"] = "round-overhead"
    model = d["model"]
    model.update({"d_model": D_MODEL, "n_layers": N_LAYERS, "n_heads": 4})
    # Only what the institutions use: the global model is then exactly each institution's model.
    model["encoders"] = {"tabular": model["encoders"]["tabular"]}
    model["tasks"] = {"grade": model["tasks"]["grade"]}
    model["experts"] = [
        {"name": f"expert_{i}", "plugin": "swiglu", "options": {"hidden": EXPERT_HIDDEN}}
        for i in range(N_EXPERTS)
    ]
    d["federation"].update(
        {
            "fraction": 1.0,
            "min_institutions": INSTITUTIONS,
            "local_steps": 1,
            "batch_size": 32,
            # FedAvg weights every component by samples, as Flower's FedAvg does (num-examples).
            "weight_experts_by": "samples",
        }
    )
    d["aggregation"] = {"default": {"plugin": "fedavg"}}
    d["evaluation"] = {"baselines": [], "personalize": False, "plots": False}
    names = [f"school_{i:02d}" for i in range(INSTITUTIONS)]
    # max_experts = 0: every expert, as a Flower client trains the whole model (the
    # default "base" budget would train 4 of the N_EXPERTS)
    d["institutions"] = [{"name": n, "modalities": ["tabular"], "tasks": ["grade"], "max_experts": 0} for n in names]
    d["data"]["options"]["profiles"] = {
        n: {"n": STUDENTS, "ability_mean": (i % 5 - 2) / 4} for i, n in enumerate(names)
    }
    return d


# -- ClientApp (runs in Ray actors) -------------------------------------------------------
_CACHE: dict[str, Any] = {}


def _federation():
    """The job's institutions (data, model pool), built once per worker process."""
    if "fed" not in _CACHE:
        torch.set_num_threads(THREADS)
        _CACHE["fed"] = build_federation(load_config(job_config_dict()))
    return _CACHE["fed"]


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    called_at = time.time()
    fed = _federation()
    name = list(fed.institutions)[int(context.node_config["partition-id"])]
    inst = fed.institutions[name]
    rnd = int(msg.content["config"]["server-round"])
    received = msg.content["arrays"].to_torch_state_dict()
    state = unflatten_components(received)
    f = fed.config.federation
    job = TrainJob(
        institution=name,
        round=rnd,
        components=state,
        versions={c: 0 for c in state},
        steps=inst.local_steps(),
        lr=f.lr,
        seed=seed_for(fed.config.seed, "train", rnd, 0, name),  # the seed m3tfed's server uses
        timeout_s=f.timeout_s,
    )
    result = inst.train(job)  # local compute: result.seconds, as in m3tfed
    trained = dict(received)
    for u in result.updates:  # FedAvg in Flower averages weights: weights = received + delta
        for k, delta in u.delta.items():
            trained[f"{u.component}::{k}"] = state[u.component][k] + delta
    metrics = MetricRecord(
        {
            "num-examples": result.num_samples,
            "train-loss": float(result.loss),
            "compute-s": float(result.seconds),
            "called-at": called_at,
        }
    )
    return Message(RecordDict({"arrays": ArrayRecord(trained), "metrics": metrics}), reply_to=msg)


# -- ServerApp (runs in a thread of the benchmark process) --------------------------------
@dataclass
class FlowerLog:
    """Timestamps and client-reported compute, filled while the simulation runs."""

    round_end: dict[int, float] = field(default_factory=dict)  # perf_counter; 0 = before round 1
    # perf_counter when Flower resumed after round r (after ``between_rounds`` returned)
    resumed: dict[int, float] = field(default_factory=dict)
    # Called at the end of each Flower round r (and with 0 before round 1), outside the
    # round's timing: the benchmark runs an m3tfed round there, so the two alternate.
    between_rounds: Callable[[int], None] | None = None
    compute: dict[int, float] = field(default_factory=dict)  # sum of clients' TrainResult.seconds
    replies: dict[int, int] = field(default_factory=dict)
    errors: dict[int, list[str]] = field(default_factory=dict)
    first_client_call: float | None = None  # time.time() of the first ClientApp call
    loss: dict[int, float] = field(default_factory=dict)


class TimedFedAvg(FedAvg):
    """Flower's FedAvg, recording each round's client-reported local compute."""

    def __init__(self, record: FlowerLog, **kwargs):
        super().__init__(**kwargs)
        self.record = record

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        ok = [m.content["metrics"] for m in replies if not m.has_error()]
        self.record.compute[server_round] = sum(float(m["compute-s"]) for m in ok)
        self.record.replies[server_round] = len(ok)
        self.record.errors[server_round] = [m.error.reason for m in replies if m.has_error()]
        if ok:
            self.record.loss[server_round] = sum(float(m["train-loss"]) for m in ok) / len(ok)
            first = min(float(m["called-at"]) for m in ok)
            if self.record.first_client_call is None or first < self.record.first_client_call:
                self.record.first_client_call = first
        return super().aggregate_train(server_round, replies)


def make_server_app(record: FlowerLog, initial_state: dict, num_rounds: int) -> ServerApp:
    """A ServerApp running FedAvg over all INSTITUTIONS nodes for ``num_rounds`` rounds.

    Flower calls the strategy's ``evaluate_fn`` once before round 1 and at the end of
    every round; round r's wall time is from the return of the call for r-1 to the call
    for r (whatever ``record.between_rounds`` does in between is not counted).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = TimedFedAvg(
            record,
            fraction_train=1.0,
            fraction_evaluate=0.0,  # evaluation off, as on the m3tfed side
            min_train_nodes=INSTITUTIONS,
            min_available_nodes=INSTITUTIONS,
        )

        def mark_round_end(server_round: int, arrays: ArrayRecord) -> None:
            record.round_end[server_round] = time.perf_counter()
            if record.between_rounds is not None:
                record.between_rounds(server_round)
            record.resumed[server_round] = time.perf_counter()
            return None

        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(flatten_components(initial_state)),
            num_rounds=num_rounds,
            evaluate_fn=mark_round_end,
        )

    return app
