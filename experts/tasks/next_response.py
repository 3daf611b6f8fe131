"""The ``next_response`` task: knowledge tracing, a logit per sample; BCE; AUC."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from m3tfed import TaskSpec

from .common import ScalarHead, accuracy, auc


class NextResponseHead(ScalarHead):
    """Knowledge tracing: will the student answer the next question correctly? Predicts
    a logit; pair it with the ``sequence`` encoder's ``query_skill`` token."""

    primary_metric = "auc"
    higher_is_better = True

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(pred, target.to(pred.dtype))

    def metrics(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        return {"auc": auc(pred, target), "accuracy": accuracy(pred > 0, target > 0.5)}

    def example_target(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return torch.randint(0, 2, (batch_size,), generator=generator).float()


# Registered by the package (``register_tasks``).
SPEC = TaskSpec(
    name="next_response",
    build=NextResponseHead,
    modalities=("interactions",),
    # a logistic model of the log (per-skill counts, recent accuracy, the next question)
    # beside the deep head: lower validation loss in 6 of 6 seed x federation runs
    # (docs/results.md, Learning quality 15)
    wide=("interactions",),
    description="Knowledge tracing: probability the next response is correct; BCE loss; AUC; by default a wide term on the interaction log's features",
    version="0.1.0",
    license="Apache-2.0",
)
