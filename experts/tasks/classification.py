"""The ``classification`` task: logits ``[B, C]``, cross-entropy; accuracy and macro-F1."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from m3tfed import TaskSpec

from .common import PooledHead, accuracy, macro_f1


class ClassificationHead(PooledHead):
    target_dtype = torch.long
    primary_metric = "accuracy"
    higher_is_better = True

    def __init__(
        self, d_model: int, num_classes: int = 2, hidden: int | None = None, pooling: str = "mean"
    ):
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        super().__init__(d_model, num_classes, hidden, pooling)
        self.num_classes = num_classes
        self.target_shape = ()

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(pred, target.long())

    def metrics(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        labels = pred.argmax(-1)
        return {"accuracy": accuracy(labels, target), "macro_f1": macro_f1(labels, target)}

    def example_target(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return torch.randint(0, self.num_classes, (batch_size,), generator=generator)


# Registered by the package (``register_tasks``).
SPEC = TaskSpec(
    name="classification",
    build=ClassificationHead,
    version="0.1.0",
    license="Apache-2.0",
    description="Cross-entropy over num_classes; accuracy and macro-F1",
)
