"""``local``: each institution alone — the same architecture, initial weights and steps
as in the federation (``rounds`` x its local steps), on its own data only. It validates
after every ``evaluation.every`` rounds' worth of steps and keeps its best state."""

from __future__ import annotations

import dataclasses

from ..build import Federation
from ..institution import Institution, seed_for
from ..server import initial_state
from .base import BaselineContext, Results
from .common import federation_at


class Local:
    name = "local"
    cost = 1.0
    after = None

    def run(self, fed: Federation, ctx: BaselineContext) -> Results:
        fed = federation_at(fed, self.name)  # at the method's learning rate and local steps
        cfg = fed.config
        init = initial_state(cfg, fed.server.catalogue)
        every = cfg.evaluation.every
        out, curves = {}, {}
        for name, inst in fed.institutions.items():
            alone = Institution(dataclasses.replace(inst.config, personal=[]), inst.data, inst.experts, inst.settings, inst.pool)
            model = alone.load(init)
            best, kept = float("inf"), None
            for rnd in range(1, cfg.rounds + 1):
                alone.fit(model, inst.local_steps(), cfg.federation.lr, seed_for(cfg.seed, "local", name, rnd))
                if rnd % every and rnd != cfg.rounds:
                    continue
                score = alone.validation_loss(model)
                curves.setdefault(rnd, []).append(score)
                if kept is None or score < best:  # a NaN score (diverged) keeps the first state
                    best, kept = score, {c: model.component_state(c) for c in model.component_names()}
            for c, s in kept.items():
                model.load_component_state(c, s)
            out[name] = ctx.final.evaluate(self.name, alone, model)[0]
        ctx.curves[self.name] = [{"round": r, "val_loss": sum(v) / len(v)} for r, v in sorted(curves.items())]
        return out
