"""``ditto``: Ditto (Li et al. 2021). Dense FedAvg trains the global model; after each
round every institution also trains its own personal model v for the same local steps
on its loss + (lambda/2)||v - w_global||^2. Each institution is judged by its v (or v
averaged over rounds where that validates lower, ``evaluation.average``, as every method
may: each institution its own choice, whatever ``evaluation.keep``); the round kept is
chosen on validation by the federation's rule (``keep``: with its group). ``lambda`` = 0.1 (the middle of the paper's grid).

It differs from the federated MoE's own Ditto form (``federation.personal_model``, which
this dense model turns off): that one trains v inside each sampled institution's round
from the model it received and keeps v's optimizer moments; here v trains after
aggregation, toward the new global model, with a fresh optimizer, under DP-SGD too, and
is always the one tested. The baseline ran as that form on the dense model in session 14
(one loop for both): on the question-level logs' test its mean AUC fell from 0.704 to
0.688 (v always) and 0.691 (the lower of v and the shared model), so the stronger,
published variant stays the baseline (docs/results.md, Learning quality 15)."""

from __future__ import annotations

from typing import Any

from ..build import Federation
from ..evaluation import exponential_average, lower_of
from ..institution import seed_for
from .base import BaselineContext, Results
from .common import config_at, kept_text, train_variant
from .dense_fedavg import dense_config

LAMBDA = 0.1


class Ditto:
    name = "ditto"
    cost = 2.0  # a global and a personal model
    after = None

    def run(self, fed: Federation, ctx: BaselineContext) -> Results:
        cfg = dense_config(config_at(fed.config, self.name))
        beta = cfg.evaluation.average
        # institution -> its personal model v (every component), and v averaged over rounds
        # (evaluation.average: as the federation's state is; None when off)
        own: dict[str, dict[str, Any]] = {}

        def personal_step(variant: Federation, rnd: int) -> None:
            for name, inst in variant.institutions.items():
                model = inst.load(variant.server.state)
                global_w = model.trainable_state()
                model.load_trainable_state(own[name]["v"] if name in own else global_w)  # v starts at the first global model
                mu = dict.fromkeys(global_w, LAMBDA)
                inst.fit(model, inst.local_steps(), cfg.federation.lr, seed_for(cfg.seed, "ditto", name, rnd), anchor=global_w, proximal_mu=mu)
                v = model.trainable_state()
                average = exponential_average(own[name]["average"] if name in own else None, v, beta) if beta else None
                own[name] = {"v": v, "average": average}
                model.load_trainable_state(global_w)  # leave the pool model as the global one

        def judged(variant: Federation, name: str):
            """v, or v averaged over rounds where that has the lower validation loss (each
            institution its own choice, whatever evaluation.keep)."""
            inst, mine = variant.institutions[name], own[name]
            model = inst.model()
            model.load_trainable_state(mine["v"])
            average = mine["average"] if variant.server.round > 1 else None  # after round 1 it is v
            _, chosen = lower_of(model, mine["v"], average, lambda: inst.validation_loss(model))
            model.load_trainable_state(chosen)
            return model

        variant, kept, ctx.curves[self.name] = train_variant(fed, cfg, ctx, "Ditto", after_round=personal_step, model_of=judged, carry=own)
        ctx.progress(f"  Ditto: keeping {kept_text(kept)}")
        return {n: ctx.final.evaluate(self.name, inst, judged(variant, n))[0] for n, inst in variant.institutions.items()}
