"""``ditto``: Ditto (Li et al. 2021) on the dense model of ``dense_fedavg``: the dense
federation with the federated MoE's personal-model form (``federation.personal_model =
"ditto"``, ``Institution.train_personal_model``). In each round every institution trains
the shared model as in dense FedAvg and its own personal model v for the same local steps
on its loss + (lambda/2)||v - w||^2, w the model it received, lambda the federation's
``personal_lambda`` (0.1, the middle of the paper's grid); v keeps its optimizer moments
and never leaves. Each institution is tested with its v, as in the paper
(``personal_serve = "personal"``), at the round kept on validation. With the same
``personal_serve``, the federated MoE's Ditto form and this baseline differ by the model
alone. Institutions under sample-level DP-SGD or DeepSpeed train no v
(``trains_personal_model``) and are tested with the shared model."""

from __future__ import annotations

from ..build import Federation
from .base import BaselineContext, Results
from .common import config_at, kept_text, train_variant
from .dense_fedavg import dense_config


class Ditto:
    name = "ditto"
    cost = 2.0  # a shared and a personal model
    after = None

    def run(self, fed: Federation, ctx: BaselineContext) -> Results:
        cfg = dense_config(config_at(fed.config, self.name))
        cfg.federation.personal_model, cfg.federation.personal_serve = "ditto", "personal"
        variant, kept, ctx.curves[self.name] = train_variant(fed, cfg, ctx, "Ditto")
        ctx.progress(f"  Ditto: keeping {kept_text(kept)}")
        return {n: ctx.final.evaluate(self.name, inst, inst.tested_model(variant.server.state))[0] for n, inst in variant.institutions.items()}
