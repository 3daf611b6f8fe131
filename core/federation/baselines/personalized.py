"""``personalized``: the federated MoE after a short local fine-tune of each
institution's router and task heads (its personal gate), from the kept global state."""

from __future__ import annotations

from ..build import Federation
from ..institution import seed_for
from .base import BaselineContext, Results


class Personalized:
    name = "personalized"

    def run(self, fed: Federation, ctx: BaselineContext) -> Results:
        out = {}
        f = fed.config.federation
        for name, inst in fed.institutions.items():
            model = inst.load(fed.server.state)
            inst.fit(model, f.personalize_steps, f.lr, seed_for(fed.config.seed, "personalize", name), only=lambda c: c == "router" or c.startswith("task."))
            out[name] = ctx.final.evaluate(self.name, inst, model)[0]
        return out
