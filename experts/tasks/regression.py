"""The ``regression`` task: one score per sample, MSE; RMSE and MAE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from m3tfed import TaskSpec

from .common import ScalarHead, mae, rmse


class RegressionHead(ScalarHead):
    primary_metric = "rmse"
    higher_is_better = False

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(pred, target.to(pred.dtype))

    def metrics(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        return {"rmse": rmse(pred, target), "mae": mae(pred, target)}

    def example_target(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return torch.randn(batch_size, generator=generator)


# Registered by the package (``register_tasks``).
SPEC = TaskSpec(
    name="regression",
    build=RegressionHead,
    version="0.1.0",
    license="Apache-2.0",
    description="One score, MSE loss; RMSE and MAE",
)
