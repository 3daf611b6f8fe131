"""``personalized``: the federated MoE after a short local fine-tune of each
institution's router and task heads (its personal gate), from the model it is tested with,
kept only where it lowers that institution's validation loss (as FedAvg + fine-tuning
does). At a learning rate / local steps of its own (``evaluation.tuned``), it first
trains its own federated MoE at that point (round kept on validation)."""

from __future__ import annotations

from ..build import Federation
from ..institution import seed_for
from .base import BaselineContext, Results
from .common import config_at, fine_tune_if_better, kept_text, train_variant


class Personalized:
    name = "personalized"
    cost = 0.15
    after = "fed_moe"  # fine-tunes the federated MoE's kept state

    def run(self, fed: Federation, ctx: BaselineContext) -> Results:
        cfg = config_at(fed.config, self.name)
        if cfg is not fed.config:  # its own point: its own federated MoE
            fed, kept, ctx.curves[self.name] = train_variant(fed, cfg, ctx, "federated MoE (personalized)")
            ctx.progress(f"  federated MoE (personalized): keeping {kept_text(kept)}")
        out = {}
        f = cfg.federation
        for name, inst in fed.institutions.items():
            model = inst.tested_model(fed.server.state)
            fine_tune_if_better(inst, model, f.personalize_steps, f.lr, seed_for(fed.config.seed, "personalize", name), only=lambda c: c == "router" or c.startswith("task."))
            out[name] = ctx.final.evaluate(self.name, inst, model)[0]
        return out
