"""``local``: each institution alone — the same architecture, initial weights and steps
as in the federation (``rounds`` x its local steps), on its own data only. It validates
after every ``evaluation.every`` rounds' worth of steps, and its state averaged over
rounds (``evaluation.average``) as the federation's is, and keeps each institution's
state at the round (and candidate) of its own lowest validation loss, whatever
``evaluation.keep`` says: an institution training alone chooses alone. Sessions 18-20
applied the group rule here too; on split validation (choose on half, score on the
other) it raised local's mean loss on all three question-log federations measured
(docs/results.md, "Learning quality" 22), so it weakened the baseline."""

from __future__ import annotations

import dataclasses

from ..build import Federation
from ..evaluation import averaged_wins, exponential_average, kept_now, mean_score
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
        ev, beta = cfg.evaluation, cfg.evaluation.average
        init = initial_state(cfg, fed.server.catalogue)
        alone = {n: Institution(dataclasses.replace(i.config, personal=[]), i.data, i.experts, i.settings, i.pool) for n, i in fed.institutions.items()}
        state = {n: a.load(init).trainable_state() for n, a in alone.items()}  # each its own model
        average: dict = dict.fromkeys(alone)
        kept, earlier, curve = {}, [], []
        for rnd in range(1, cfg.rounds + 1):
            evaluated = not rnd % ev.every or rnd == cfg.rounds
            scores, other = {}, {}
            for name, inst in alone.items():
                model = inst.load(init)
                model.load_trainable_state(state[name])
                inst.fit(model, fed.institutions[name].local_steps(), cfg.federation.lr, seed_for(cfg.seed, "local", name, rnd))
                state[name] = model.trainable_state()
                if beta:  # its state averaged over rounds, as the server's is
                    average[name] = exponential_average(average[name], state[name], beta)
                if evaluated:
                    scores[name] = inst.validation_loss(model)
                    if beta and rnd > 1:  # after round 1 the average is that round's state
                        model.load_trainable_state(average[name])
                        other[name] = inst.validation_loss(model)
            if not evaluated:
                continue
            averaged = averaged_wins("each", scores, other) if other else set()
            scores.update({n: other[n] for n in averaged})
            curve.append({"round": rnd, "val_loss": mean_score(scores)})
            for name in kept_now("each", earlier, scores):
                kept[name] = average[name] if name in averaged else state[name]
            earlier.append(scores)
        ctx.curves[self.name] = curve
        out = {}
        for name, inst in alone.items():
            model = inst.load(init)
            model.load_trainable_state(kept[name])
            out[name] = ctx.final.evaluate(self.name, inst, model)[0]
        return out
