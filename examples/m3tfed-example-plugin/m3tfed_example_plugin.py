"""An example third-party m3tfed plugin, in one module.

It registers:

- the expert ``micro_mixture``: a few small MLPs mixed per token by a softmax gate, a
  cheap way to give one expert slot more than one "opinion"; tagged for text;
- the task ``ordinal_score``: rubric scores on an ordered scale (essay bands 1..5, ...)
  with a CORAL-style cumulative-logit head; its primary metric is quadratic weighted
  kappa, the usual agreement measure in automated essay scoring.

m3tfed finds this module through the ``m3tfed`` entry-point group declared in
pyproject.toml; nothing in m3tfed names it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from m3tfed import ExpertSpec, TaskHead, TaskSpec, hookimpl, masked_mean
from torch import nn

__version__ = "0.1.0"


# -- expert ------------------------------------------------------------------------------


class MicroMixtureExpert(nn.Module):
    """``x -> sum_i softmax(G x)_i * MLP_i(x)`` with ``n_mlps`` MLPs of width ``hidden``.

    Token-wise (each token's gate and MLPs see only that token), as every m3tfed expert
    must be: the MoE layer hands an expert an arbitrary subset of tokens.
    """

    def __init__(self, d_model: int, n_mlps: int = 4, hidden: int = 64):
        super().__init__()
        self.gate = nn.Linear(d_model, n_mlps)
        # All MLPs as two batched weight tensors, so the forward is two einsums.
        self.w_in = nn.Parameter(torch.randn(n_mlps, d_model, hidden) / math.sqrt(d_model))
        self.w_out = nn.Parameter(torch.randn(n_mlps, hidden, d_model) / math.sqrt(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate(x).softmax(-1)  # [N, m]
        h = F.gelu(torch.einsum("nd,mdh->nmh", x, self.w_in))
        y = torch.einsum("nmh,mhd->nmd", h, self.w_out)
        return torch.einsum("nm,nmd->nd", gate, y)


# -- task --------------------------------------------------------------------------------


def quadratic_weighted_kappa(pred: torch.Tensor, target: torch.Tensor, num_levels: int) -> float:
    """Cohen's kappa with quadratic weights: 1 = perfect agreement, 0 = chance level."""
    pred, target = pred.long().cpu().flatten(), target.long().cpu().flatten()
    if target.numel() == 0:
        return math.nan
    observed = torch.zeros(num_levels, num_levels, dtype=torch.float64)
    observed.index_put_((target, pred), torch.ones(len(target), dtype=torch.float64), accumulate=True)
    expected = torch.outer(observed.sum(1), observed.sum(0)) / len(target)
    levels = torch.arange(num_levels, dtype=torch.float64)
    weights = (levels[:, None] - levels[None, :]) ** 2 / max(1, num_levels - 1) ** 2
    disagreement = float((weights * expected).sum())
    if disagreement == 0.0:
        return math.nan  # everyone (truth and prediction) on one level: undefined
    return 1.0 - float((weights * observed).sum()) / disagreement


class OrdinalScoreHead(TaskHead):
    """CORAL (Cao et al. 2020): one score per sample and ``num_levels - 1`` ordered
    thresholds; logit ``k`` says "level > k". Ordered thresholds keep the cumulative
    probabilities consistent (P(level > k) never rises with k).

    Prediction ``[B, num_levels - 1]`` logits; target ``[B]`` long in ``0..num_levels-1``.
    """

    target_shape = ()
    target_dtype = torch.long
    primary_metric = "qwk"
    higher_is_better = True

    def __init__(self, d_model: int, num_levels: int = 5, hidden: int | None = None):
        super().__init__()
        if num_levels < 2:
            raise ValueError(f"num_levels must be >= 2, got {num_levels}")
        self.num_levels = num_levels
        hidden = hidden or d_model
        self.score = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, 1))
        self.first_threshold = nn.Parameter(torch.tensor(-1.0))
        self.threshold_gaps = nn.Parameter(torch.zeros(num_levels - 2))  # softplus(0) ~ 0.69

    def thresholds(self) -> torch.Tensor:
        gaps = F.softplus(self.threshold_gaps)
        return self.first_threshold + torch.cat([gaps.new_zeros(1), torch.cumsum(gaps, 0)])

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        score = self.score(masked_mean(tokens, mask))  # [B, 1]
        return score - self.thresholds()

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        levels = torch.arange(self.num_levels - 1, device=pred.device)
        above = (target.long()[:, None] > levels).to(pred.dtype)
        return F.binary_cross_entropy_with_logits(pred, above)

    def predict_level(self, pred: torch.Tensor) -> torch.Tensor:
        return (pred > 0).sum(-1)

    def metrics(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        level, target = self.predict_level(pred).cpu(), target.long().cpu()
        if target.numel() == 0:
            return {"qwk": math.nan, "accuracy": math.nan, "mae": math.nan}
        return {
            "qwk": quadratic_weighted_kappa(level, target, self.num_levels),
            "accuracy": float((level == target).double().mean()),
            "mae": float((level - target).abs().double().mean()),
        }

    def example_target(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, self.num_levels, (batch_size,), generator=generator)


# -- registration ------------------------------------------------------------------------

MICRO_MIXTURE = ExpertSpec(
    name="micro_mixture",
    build=MicroMixtureExpert,
    version=__version__,
    license="Apache-2.0",
    # 256 * 4 + 4 (gate) + 2 * 4 * 256 * 64 (MLPs), checked by m3tfed.testing.check_expert
    params=132_100,
    min_memory_mb=3,  # fp32 weights, gradients and AdamW moments of 132,100 parameters
    size="small",
    modalities=("text",),
    description="Four small GELU MLPs mixed per token by a softmax gate",
)

ORDINAL_SCORE = TaskSpec(
    name="ordinal_score",
    build=OrdinalScoreHead,
    version=__version__,
    license="Apache-2.0",
    modalities=("text",),
    description="Ordered rubric levels with a CORAL cumulative-logit head; quadratic weighted kappa",
)


@hookimpl
def register_experts(register):
    register(MICRO_MIXTURE)


@hookimpl
def register_tasks(register):
    register(ORDINAL_SCORE)
