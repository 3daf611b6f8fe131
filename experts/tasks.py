"""Built-in tasks: a head (pool the tokens, then a small MLP), its loss, its metrics and
its label spec, registered through the ``m3tfed`` entry-point group.

==================  ===============  ===================  =========================  ==========
task                prediction       target               metrics                    primary
==================  ===============  ===================  =========================  ==========
classification      logits [B, C]    [B] long             accuracy, macro_f1         accuracy ↑
regression          [B] float        [B] float            rmse, mae                  rmse ↓
multi_regression    [B, n] float     [B, n] float         rmse (mean of per-output   rmse ↓
                                                          rmse), rmse_<output>, mae
next_response       logits [B]       [B] float 0/1        auc, accuracy              auc ↑
multi_label         logits [B, K]    [B, K] float 0/1     micro_f1, label_accuracy,  micro_f1 ↑
                                                          exact_match
==================  ===============  ===================  =========================  ==========

Metrics take the predictions and targets of a whole evaluation set (AUC and macro-F1
do not average over batches: concatenate first) and return plain floats; a metric that
is undefined on the data (AUC with one class, anything on zero samples) is ``nan``.
Rows without a label for this task are the model's to drop before calling ``loss``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from m3tfed import TaskHead, TaskSpec, hookimpl, masked_mean
from torch import nn


class PooledHead(TaskHead):
    """``tokens [B, T, d], mask [B, T] -> pool -> MLP -> [B, out]``.

    ``pooling="mean"`` averages the real tokens; ``"attention"`` learns one query that
    weighs them (useful when one token matters most, e.g. the knowledge-tracing query).
    A sample with no real token pools to zeros either way.
    """

    def __init__(self, d_model: int, out_features: int, hidden: int | None = None, pooling: str = "mean"):
        super().__init__()
        if pooling not in ("mean", "attention"):
            raise ValueError(f"pooling must be 'mean' or 'attention', got {pooling!r}")
        self.pooling = pooling
        if pooling == "attention":
            self.pool_query = nn.Parameter(torch.zeros(d_model))  # zeros: starts as a mean
        hidden = hidden or d_model
        self.mlp = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, out_features))

    def pool(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = mask.bool()
        if self.pooling == "mean":
            return masked_mean(tokens, mask)
        scores = (tokens @ self.pool_query) / math.sqrt(tokens.shape[-1])
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=1).nan_to_num(0.0)  # all-masked row -> zeros
        return torch.einsum("bt,btd->bd", weights, tokens)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.pool(tokens, mask))


# -- metrics (plain functions, so they can be tested on hand-computed cases) -----------


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to("cpu", torch.float64)


def accuracy(pred_labels: torch.Tensor, target: torch.Tensor) -> float:
    if target.numel() == 0:
        return math.nan
    return float((pred_labels.cpu() == target.cpu()).double().mean())


def macro_f1(pred_labels: torch.Tensor, target: torch.Tensor) -> float:
    """Unweighted mean of per-class F1 over the classes present in target or prediction
    (scikit-learn's ``f1_score(average="macro")``)."""
    pred_labels, target = pred_labels.cpu().long(), target.cpu().long()
    if target.numel() == 0:
        return math.nan
    scores = []
    for c in torch.unique(torch.cat([pred_labels, target])).tolist():
        tp = int(((pred_labels == c) & (target == c)).sum())
        fp = int(((pred_labels == c) & (target != c)).sum())
        fn = int(((pred_labels != c) & (target == c)).sum())
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


def rmse(pred: torch.Tensor, target: torch.Tensor) -> float:
    if target.numel() == 0:
        return math.nan
    return float(((_flat(pred) - _flat(target)) ** 2).mean().sqrt())


def mae(pred: torch.Tensor, target: torch.Tensor) -> float:
    if target.numel() == 0:
        return math.nan
    return float((_flat(pred) - _flat(target)).abs().mean())


def auc(scores: torch.Tensor, target: torch.Tensor) -> float:
    """ROC AUC as the Mann-Whitney U statistic: the probability that a random positive
    scores above a random negative, ties counting one half (average ranks)."""
    scores, target = _flat(scores).flatten(), _flat(target).flatten() > 0.5
    n_pos, n_neg = int(target.sum()), int((~target).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    sorted_scores, order = torch.sort(scores)
    # Ranks 1..n; a run of tied scores shares the mean of its ranks.
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts + 1
    ranks = torch.empty_like(scores)
    ranks[order] = (first + (counts - 1) / 2.0).to(scores.dtype)[inverse]
    u = ranks[target].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


# -- heads -------------------------------------------------------------------------------


class ClassificationHead(PooledHead):
    target_dtype = torch.long
    primary_metric = "accuracy"
    higher_is_better = True

    def __init__(self, d_model: int, num_classes: int = 2, hidden: int | None = None, pooling: str = "mean"):
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

    def example_target(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, self.num_classes, (batch_size,), generator=generator)


class ScalarHead(PooledHead):
    """One float per sample (a value or a logit)."""

    target_dtype = torch.float32

    def __init__(self, d_model: int, hidden: int | None = None, pooling: str = "mean"):
        super().__init__(d_model, 1, hidden, pooling)
        self.target_shape = ()

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return super().forward(tokens, mask).squeeze(-1)


class RegressionHead(ScalarHead):
    primary_metric = "rmse"
    higher_is_better = False

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(pred, target.to(pred.dtype))

    def metrics(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        return {"rmse": rmse(pred, target), "mae": mae(pred, target)}

    def example_target(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(batch_size, generator=generator)


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
        names = [str(n) for n in output_names] if output_names else [str(i) for i in range(n_outputs)]
        if len(names) != n_outputs:
            raise ValueError(f"{len(names)} output_names for n_outputs={n_outputs}")
        super().__init__(d_model, n_outputs, hidden, pooling)
        self.output_names = names
        self.target_shape = (n_outputs,)

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(pred, target.to(pred.dtype))

    def metrics(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        per_output = {f"rmse_{name}": rmse(pred[:, i], target[:, i]) for i, name in enumerate(self.output_names)}
        return {"rmse": sum(per_output.values()) / len(per_output), "mae": mae(pred, target), **per_output}

    def example_target(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(batch_size, *self.target_shape, generator=generator)


class NextResponseHead(ScalarHead):
    """Knowledge tracing: will the student answer the next question correctly? Predicts
    a logit; pair it with the ``sequence`` encoder's ``query_skill`` token."""

    primary_metric = "auc"
    higher_is_better = True

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(pred, target.to(pred.dtype))

    def metrics(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        return {"auc": auc(pred, target), "accuracy": accuracy(pred > 0, target > 0.5)}

    def example_target(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, 2, (batch_size,), generator=generator).float()


_COMMON = {"version": "0.1.0", "license": "Apache-2.0"}


@hookimpl
def register_tasks(register):
    register(TaskSpec(name="classification", build=ClassificationHead, description="Cross-entropy over num_classes; accuracy and macro-F1", **_COMMON))
    register(TaskSpec(name="regression", build=RegressionHead, description="One score, MSE loss; RMSE and MAE", **_COMMON))
    register(TaskSpec(name="multi_label", build=MultiLabelHead, description="K independent labels, BCE-with-logits; micro-F1, label accuracy, exact match", **_COMMON))
    register(TaskSpec(name="multi_regression", build=MultiRegressionHead, description="n_outputs scores, MSE loss; mean per-output RMSE (MCRMSE)", **_COMMON))
    register(
        TaskSpec(
            name="next_response",
            build=NextResponseHead,
            modalities=("interactions",),
            description="Knowledge tracing: probability the next response is correct; BCE loss; AUC",
            **_COMMON,
        )
    )


# -- multi-label (appended for the real-data sources: CROHME symbol presence) -----------


def micro_f1(pred: torch.Tensor, target: torch.Tensor) -> float:
    """F1 over all (sample, label) pairs pooled: ``2 TP / (2 TP + FP + FN)``; 0/0 -> nan."""
    pred, target = pred.cpu().bool(), target.cpu().bool()
    tp = int((pred & target).sum())
    denom = 2 * tp + int((pred & ~target).sum()) + int((~pred & target).sum())
    return 2 * tp / denom if denom else math.nan


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
        self.label_names = [str(n) for n in label_names] if label_names else [str(i) for i in range(num_labels)]
        self.target_shape = (num_labels,)

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(pred, target.to(pred.dtype))

    def metrics(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        labels, truth = pred > 0, target > 0.5
        if truth.numel() == 0:
            return {"micro_f1": math.nan, "label_accuracy": math.nan, "exact_match": math.nan}
        return {
            "micro_f1": micro_f1(labels, truth),
            "label_accuracy": float((labels == truth).double().mean()),  # mean over labels and samples
            "exact_match": float((labels == truth).all(1).double().mean()),
        }

    def example_target(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, 2, (batch_size, *self.target_shape), generator=generator).float()
