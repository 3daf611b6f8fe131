"""The ``multi_label`` task: K independent yes/no labels, BCE per label; micro-F1 (CROHME symbol presence)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from m3tfed import TaskSpec

from .common import PooledHead, micro_f1


class MultiLabelHead(PooledHead):
    """Independent yes/no labels per sample (e.g. which symbols a formula contains).
    Logits ``[B, K]``, targets ``[B, K]`` float 0/1, BCE-with-logits per label.
    ``micro_f1`` is primary: label accuracy looks high when most labels are absent."""

    target_dtype = torch.float32
    primary_metric = "micro_f1"
    higher_is_better = True

    def __init__(
        self,
        d_model: int,
        num_labels: int = 4,
        label_names: Sequence[str] | None = None,
        hidden: int | None = None,
        pooling: str = "mean",
    ):
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        if label_names is not None and len(label_names) != num_labels:
            raise ValueError(f"{len(label_names)} label_names for num_labels={num_labels}")
        super().__init__(d_model, num_labels, hidden, pooling)
        self.label_names = (
            [str(n) for n in label_names] if label_names else [str(i) for i in range(num_labels)]
        )
        self.target_shape = (num_labels,)

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(pred, target.to(pred.dtype))

    def metrics(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        labels, truth = pred > 0, target > 0.5
        if truth.numel() == 0:
            return {"micro_f1": math.nan, "label_accuracy": math.nan, "exact_match": math.nan}
        return {
            "micro_f1": micro_f1(labels, truth),
            "label_accuracy": float(
                (labels == truth).double().mean()
            ),  # mean over labels and samples
            "exact_match": float((labels == truth).all(1).double().mean()),
        }

    def example_target(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return torch.randint(0, 2, (batch_size, *self.target_shape), generator=generator).float()


# Registered by the package (``register_tasks``).
SPEC = TaskSpec(
    name="multi_label",
    build=MultiLabelHead,
    version="0.1.0",
    license="Apache-2.0",
    description="K independent labels, BCE-with-logits; micro-F1, label accuracy, exact match",
)
