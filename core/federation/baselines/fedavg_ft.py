"""``fedavg_ft``: dense FedAvg, then each institution fine-tunes every component on its
own data for ``federation.personalize_steps`` steps, and keeps the fine-tuned model only
if it lowers its validation loss (the choice is made on validation, never on test)."""

from __future__ import annotations

from ..build import Federation
from ..institution import seed_for
from .base import BaselineContext, Results
from .common import config_at, fine_tune_if_better
from .dense_fedavg import trained_dense


class FedAvgFineTune:
    name = "fedavg_ft"
    cost = 0.15
    after = "dense_fedavg"  # fine-tunes its trained federation (shared in ctx)

    def run(self, fed: Federation, ctx: BaselineContext) -> Results:
        dense = trained_dense(fed, ctx, self.name)
        f = config_at(fed.config, self.name).federation
        out = {}
        for name, inst in dense.institutions.items():
            model = inst.tested_model(dense.server.state)
            fine_tune_if_better(inst, model, f.personalize_steps, f.lr, seed_for(fed.config.seed, "fedavg_ft", name))
            out[name] = ctx.final.evaluate(self.name, inst, model)[0]
        return out
