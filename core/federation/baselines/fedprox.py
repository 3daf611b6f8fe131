"""``fedprox``: the dense model of ``dense_fedavg`` trained with FedProx (Li et al. 2020):
each institution adds (mu/2)||w - w_global||^2 to its local loss. Same personal parts,
same rounds, round kept on validation. ``mu`` = 0.01 (the paper's grid starts there)."""

from __future__ import annotations

from ...model import PluginConfig
from ..build import Federation
from .base import BaselineContext, Results
from .common import config_at, kept_text, train_variant
from .dense_fedavg import dense_config

MU = 0.01


class FedProx:
    name = "fedprox"
    cost = 1.0
    after = None

    def run(self, fed: Federation, ctx: BaselineContext) -> Results:
        cfg = dense_config(config_at(fed.config, self.name), PluginConfig("fedprox", {"mu": MU}))
        variant, kept, ctx.curves[self.name] = train_variant(fed, cfg, ctx, "FedProx")
        ctx.progress(f"  FedProx: keeping {kept_text(kept)}")
        return {n: ctx.final.evaluate(self.name, inst, inst.tested_model(variant.server.state))[0] for n, inst in variant.institutions.items()}
