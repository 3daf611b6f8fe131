"""The ``multi_regression`` task: several scores per sample, MSE; mean per-output RMSE."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from m3tfed import TaskSpec

from .common import PooledHead, mae, rmse


class MultiRegressionHead(PooledHead):
    """Several scores per sample (e.g. ELLIPSE's cohesion, syntax, vocabulary, ...).
    ``rmse`` is the mean of the per-output RMSEs (MCRMSE, the usual essay metric)."""

    target_dtype = torch.float32
    primary_metric = "rmse"
    higher_is_better = False

    def __init__(
        self,
        d_model: int,
        n_outputs: int = 2,
        output_names: Sequence[str] | None = None,
        hidden: int | None = None,
        pooling: str = "mean",
    ):
        names = (
            [str(n) for n in output_names] if output_names else [str(i) for i in range(n_outputs)]
        )
        if len(names) != n_outputs:
            raise ValueError(f"{len(names)} output_names for n_outputs={n_outputs}")
        super().__init__(d_model, n_outputs, hidden, pooling)
        self.output_names = names
        self.target_shape = (n_outputs,)

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(pred, target.to(pred.dtype))

    def metrics(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        per_output = {
            f"rmse_{name}": rmse(pred[:, i], target[:, i])
            for i, name in enumerate(self.output_names)
        }
        return {
            "rmse": sum(per_output.values()) / len(per_output),
            "mae": mae(pred, target),
            **per_output,
        }

    def example_target(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return torch.randn(batch_size, *self.target_shape, generator=generator)


# Registered by the package (``register_tasks``).
SPEC = TaskSpec(
    name="multi_regression",
    build=MultiRegressionHead,
    version="0.1.0",
    license="Apache-2.0",
    description="n_outputs scores, MSE loss; mean per-output RMSE (MCRMSE)",
)
