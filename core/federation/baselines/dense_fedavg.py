"""``dense_fedavg``: a dense feed-forward (one expert as wide as the k active experts)
trained with FedAvg on the same data and rounds. Each institution keeps the personal
parts the dense model has (its task heads, encoders, router), so against the federated
MoE without personal models it is MoE versus dense, not personalization versus none
(the dense counterpart of its Ditto personal models is the ``ditto`` baseline); the
round kept is chosen on validation."""

from __future__ import annotations

import copy

from ...model import ExpertConfig, PluginConfig
from ..build import Federation
from ..config import FederationConfig
from .base import BaselineContext, Results
from .common import config_at, keep_personal, kept_text, train_variant


def dense_config(cfg: FederationConfig, aggregator: PluginConfig | None = None) -> FederationConfig:
    """The same federation with one dense feed-forward as wide as the k active experts
    (aggregated by ``aggregator``, default FedAvg); personal parts kept where they exist."""
    dense = copy.deepcopy(cfg)
    k = int(cfg.model.router.options.get("k", 2))
    first = cfg.model.experts[0]
    hidden = int(first.options.get("hidden", 0) or int(8 * cfg.model.d_model / 3))
    dense.model.experts = [ExpertConfig(name="dense", plugin="swiglu", options={"hidden": k * hidden})]
    dense.model.router = PluginConfig("topk", {"k": 1, "capacity_factor": 0.0})
    dense.model.aux_loss_weights = {}
    agg = copy.deepcopy(aggregator or PluginConfig("fedavg"))
    rule = cfg.aggregator_for("encoder").options  # the encoders' row rule, as the MoE has it
    if "changed_rows" in rule:
        agg.options.setdefault("changed_rows", rule["changed_rows"])
    dense.aggregation = {"default": agg}
    dense.federation.personal_model = "none"  # a personal model is Ditto's (the ditto baseline)
    for inst in dense.institutions:
        inst.experts, inst.compute, inst.max_experts = ["dense"], "base", None
    keep_personal(dense, lambda c: not c.startswith("expert."))  # the one dense expert is shared
    return dense


def trained_dense(fed: Federation, ctx: BaselineContext, method: str = "dense_fedavg") -> Federation:
    """The dense FedAvg federation at ``method``'s learning rate and local steps, at its
    best validation round, trained once per run and point (FedAvg + fine-tuning starts
    from it too)."""
    cfg = config_at(fed.config, method)
    key = ("dense_fedavg", cfg.federation.lr, cfg.federation.local_steps)
    if key not in ctx.shared:
        variant, kept, curve = train_variant(fed, dense_config(cfg), ctx, f"dense FedAvg ({method})")
        ctx.shared[key] = variant
        ctx.curves.setdefault(method, curve)
        ctx.progress(f"  dense FedAvg ({method}): keeping {kept_text(kept)}")
    return ctx.shared[key]


class DenseFedAvg:
    name = "dense_fedavg"
    cost = 1.0
    after = None

    def run(self, fed: Federation, ctx: BaselineContext) -> Results:
        dense = trained_dense(fed, ctx, self.name)
        return {n: ctx.final.evaluate(self.name, inst, inst.tested_model(dense.server.state))[0] for n, inst in dense.institutions.items()}
