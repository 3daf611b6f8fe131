"""``local``: each institution alone — the same architecture, the same initial weights
and the same number of steps as in the federation, on its own data only."""

from __future__ import annotations

import dataclasses

from ..build import Federation
from ..institution import Institution, seed_for
from ..server import initial_state
from .base import BaselineContext, Results


class Local:
    name = "local"

    def run(self, fed: Federation, ctx: BaselineContext) -> Results:
        cfg = fed.config
        init = initial_state(cfg, fed.server.catalogue)
        out = {}
        for name, inst in fed.institutions.items():
            alone = Institution(dataclasses.replace(inst.config, personal=[]), inst.data, inst.experts, inst.settings, inst.pool)
            model = alone.load(init)
            alone.fit(model, cfg.rounds * inst.local_steps(), cfg.federation.lr, seed_for(cfg.seed, "local", name))
            out[name] = ctx.final.evaluate(self.name, alone, model)[0]
        return out
