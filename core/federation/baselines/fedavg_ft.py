"""``fedavg_ft``: dense FedAvg, then each institution fine-tunes every component on its
own data for ``federation.personalize_steps`` steps, and keeps the fine-tuned model only
if it lowers its validation loss (the choice is made on validation, never on test)."""

from __future__ import annotations

from ..build import Federation
from ..institution import seed_for
from .base import BaselineContext, Results
from .common import config_at, val_loss
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
            model = inst.load(dense.server.state)
            before = val_loss(inst, model)
            saved = {c: model.component_state(c) for c in model.component_names()}
            inst.fit(model, f.personalize_steps, f.lr, seed_for(fed.config.seed, "fedavg_ft", name))
            if val_loss(inst, model) > before:  # fine-tuning did not help on validation: undo
                for c, s in saved.items():
                    model.load_component_state(c, s)
            out[name] = ctx.final.evaluate(self.name, inst, model)[0]
        return out
