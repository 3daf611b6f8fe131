"""``dense_fedavg``: a dense feed-forward (one expert as wide as the k active experts)
trained with FedAvg over every component, on the same data and rounds."""

from __future__ import annotations

import copy

from ...model import ExpertConfig, PluginConfig
from ..build import Federation, build_federation
from ..config import FederationConfig
from .base import BaselineContext, Results


def dense_config(cfg: FederationConfig) -> FederationConfig:
    """The same federation with one dense feed-forward as wide as the k active experts."""
    dense = copy.deepcopy(cfg)
    k = int(cfg.model.router.options.get("k", 2))
    first = cfg.model.experts[0]
    hidden = int(first.options.get("hidden", 0) or int(8 * cfg.model.d_model / 3))
    dense.model.experts = [ExpertConfig(name="dense", plugin="swiglu", options={"hidden": k * hidden})]
    dense.model.router = PluginConfig("topk", {"k": 1, "capacity_factor": 0.0})
    dense.model.aux_loss_weights = {}
    dense.aggregation = {"default": PluginConfig("fedavg")}
    for inst in dense.institutions:
        inst.experts, inst.compute, inst.personal = ["dense"], "base", []
    return dense


class DenseFedAvg:
    name = "dense_fedavg"

    def run(self, fed: Federation, ctx: BaselineContext) -> Results:
        cfg = fed.config
        data = {n: i.data for n, i in fed.institutions.items()}
        dense = build_federation(dense_config(cfg), fed.server.catalogue, data=data)
        for rnd in range(1, cfg.rounds + 1):
            dense.server.run_round(rnd)
            ctx.progress(f"  dense FedAvg baseline: round {rnd}/{cfg.rounds}")
        return {n: ctx.final.evaluate(self.name, inst, inst.load(dense.server.state))[0] for n, inst in dense.institutions.items()}
