"""``local``: each institution alone — the same architecture, initial weights and steps
as in the federation (``rounds`` x its local steps), on its own data only. It validates
after every ``evaluation.every`` rounds' worth of steps, and its state averaged over
rounds (``evaluation.average``) as the federation's is, and keeps its best state."""

from __future__ import annotations

import dataclasses

from ..build import Federation
from ..evaluation import exponential_average, lower_of
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
            best, kept, average = float("inf"), None, None
            for rnd in range(1, cfg.rounds + 1):
                alone.fit(model, inst.local_steps(), cfg.federation.lr, seed_for(cfg.seed, "local", name, rnd))
                current = model.trainable_state()
                if beta := cfg.evaluation.average:  # its state averaged over rounds, as the server's is
                    average = exponential_average(average, current, beta)
                if rnd % every and rnd != cfg.rounds:
                    continue
                score, state = lower_of(model, current, average if rnd > 1 else None, lambda alone=alone, model=model: alone.validation_loss(model))
                curves.setdefault(rnd, []).append(score)
                if kept is None or score < best:  # a NaN score (diverged) keeps the first state
                    best, kept = score, state
            model.load_trainable_state(kept)
            out[name] = ctx.final.evaluate(self.name, alone, model)[0]
        ctx.curves[self.name] = [{"round": r, "val_loss": sum(v) / len(v)} for r, v in sorted(curves.items())]
        return out
