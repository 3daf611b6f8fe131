"""Helpers for the modules plugins build: the routers' expert mask and the heads'
masked mean. The base classes (``ModalityEncoder``, ``Expert``, ``Router``,
``TaskHead``) are in :mod:`m3tfed.interfaces` and stay importable from here.
"""

from __future__ import annotations

import torch

from .interfaces import Expert, ModalityEncoder, Router, TaskHead

__all__ = ["Expert", "ModalityEncoder", "Router", "TaskHead", "active_mask", "masked_mean", "text_statistics"]


def active_mask(
    expert_mask: torch.Tensor | None, num_experts: int, device: torch.device
) -> torch.Tensor:
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


def column_scales(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of each column of ``raw`` ``[n, k]`` to standardize by,
    except that a column holding only 0 and 1 (a one-hot, an indicator) keeps mean 0 and
    scale 1, so that a rare one stays 1 rather than becoming huge (its L2 penalty, or its
    weight's step size, would be void), and a constant column keeps scale 1."""
    binary = ((raw == 0) | (raw == 1)).all(0)
    std = raw.std(0) if len(raw) > 1 else torch.ones(raw.shape[1])
    return torch.where(binary, 0.0, raw.mean(0)), torch.where(binary | (std < 1e-6), 1.0, std)


def text_statistics(texts: list[str]) -> torch.Tensor:
    """``[n, 4]`` float per text: characters, words, mean word length, distinct words per
    word (what a linear model reads from an essay without a vocabulary)."""
    rows = []
    for t in texts:
        words = t.split()
        rows.append([len(t), len(words), sum(map(len, words)) / max(len(words), 1), len(set(words)) / max(len(words), 1)])
    return torch.tensor(rows, dtype=torch.float32).reshape(len(texts), 4)
