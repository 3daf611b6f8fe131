"""Base classes for the modules plugins build. Subclassing is optional (the contract
checks look at behaviour, not ancestry) but it documents what each kind must do.

- ``ModalityEncoder``: raw modality input -> :class:`Tokens` ``[B, T, d]`` + mask.
- ``Router``: tokens ``[N, d]`` (+ a mask over the global expert list) -> :class:`Routing`.
- ``TaskHead``: tokens -> prediction, with its loss, metrics and label spec.
Experts need no base class: any module mapping ``[N, d] -> [N, d]`` is an expert.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .specs import Routing, Tokens


class ModalityEncoder(nn.Module):
    """Maps one modality's batch to tokens. Frozen parameters (``requires_grad=False``)
    are a backbone that never travels; trainable ones form the encoder's component."""

    modality: str = ""

    def forward(self, inputs: Any) -> Tokens:  # pragma: no cover - interface
        raise NotImplementedError

    def example_input(self, batch_size: int, generator: torch.Generator | None = None) -> Any:
        """A valid random batch of ``batch_size`` samples (used by contract checks)."""
        raise NotImplementedError


class Router(nn.Module):
    """Chooses experts for tokens. ``expert_mask[e]`` False means expert ``e`` is not
    selected by this institution: it must never receive a token."""

    num_experts: int

    def forward(self, x: torch.Tensor, expert_mask: torch.Tensor | None = None) -> Routing:  # pragma: no cover
        raise NotImplementedError


class TaskHead(nn.Module):
    """A task's head, loss and metrics.

    ``target_shape`` is the per-sample label shape (``()`` for a scalar) and
    ``target_dtype`` its dtype; ``primary_metric`` names the metric used to compare
    runs, ``higher_is_better`` says which way is better.
    """

    target_shape: tuple[int, ...] = ()
    target_dtype: torch.dtype = torch.float32
    primary_metric: str = "loss"
    higher_is_better: bool = False

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def metrics(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:  # pragma: no cover
        raise NotImplementedError

    def example_target(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


def active_mask(expert_mask: torch.Tensor | None, num_experts: int, device: torch.device) -> torch.Tensor:
    """A router's validated ``[E]`` bool mask of selectable experts (None = all)."""
    if expert_mask is None:
        return torch.ones(num_experts, dtype=torch.bool, device=device)
    if expert_mask.shape != (num_experts,):
        raise ValueError(f"expert_mask must be [{num_experts}] bool, got {list(expert_mask.shape)}")
    mask = expert_mask.to(device=device, dtype=torch.bool)
    if not bool(mask.any()):
        raise ValueError("expert_mask selects no expert: an institution must select at least one")
    return mask


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens of each sample: ``[B, T, d], [B, T] -> [B, d]``."""
    w = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * w).sum(1) / w.sum(1).clamp_min(1.0)
