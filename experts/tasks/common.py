"""What the built-in task heads share: the pooled head (pool the tokens, then a small
MLP), the scalar head, and the metrics as plain functions on a whole evaluation set (so
they can be tested on hand-computed cases)."""

from __future__ import annotations

import math

import torch
from m3tfed import TaskHead, masked_mean
from torch import nn


class PooledHead(TaskHead):
    """``tokens [B, T, d], mask [B, T] -> pool -> MLP -> [B, out]``.

    ``pooling="mean"`` averages the real tokens; ``"attention"`` learns one query that
    weighs them (useful when one token matters most, e.g. the knowledge-tracing query).
    A sample with no real token pools to zeros either way.
    """

    def __init__(
        self, d_model: int, out_features: int, hidden: int | None = None, pooling: str = "mean"
    ):
        super().__init__()
        if pooling not in ("mean", "attention"):
            raise ValueError(f"pooling must be 'mean' or 'attention', got {pooling!r}")
        self.pooling = pooling
        self.output_shape = (out_features,)
        if pooling == "attention":
            self.pool_query = nn.Parameter(torch.zeros(d_model))  # zeros: starts as a mean
        hidden = hidden or d_model
        self.mlp = nn.Sequential(
            nn.LayerNorm(d_model),
            nn.Linear(d_model, hidden),
            nn.GELU(),
            nn.Linear(hidden, out_features),
        )

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


class ScalarHead(PooledHead):
    """One float per sample (a value or a logit)."""

    target_dtype = torch.float32

    def __init__(self, d_model: int, hidden: int | None = None, pooling: str = "mean"):
        super().__init__(d_model, 1, hidden, pooling)
        self.target_shape = self.output_shape = ()

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return super().forward(tokens, mask).squeeze(-1)


# -- metrics ---------------------------------------------------------------------------


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
    _, inverse, counts = torch.unique_consecutive(
        sorted_scores, return_inverse=True, return_counts=True
    )
    first = torch.cumsum(counts, 0) - counts + 1
    ranks = torch.empty_like(scores)
    ranks[order] = (first + (counts - 1) / 2.0).to(scores.dtype)[inverse]
    u = ranks[target].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def micro_f1(pred: torch.Tensor, target: torch.Tensor) -> float:
    """F1 over all (sample, label) pairs pooled: ``2 TP / (2 TP + FP + FN)``; 0/0 -> nan."""
    pred, target = pred.cpu().bool(), target.cpu().bool()
    tp = int((pred & target).sum())
    denom = 2 * tp + int((pred & ~target).sum()) + int((~pred & target).sum())
    return 2 * tp / denom if denom else math.nan
