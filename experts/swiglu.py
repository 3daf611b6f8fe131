"""SwiGLU feed-forward expert (Shazeer 2020), the default expert of the MoE layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLUExpert(nn.Module):
    """``x -> W_down(silu(W_gate x) * W_up x)``; no biases, as in LLaMA/Mixtral experts."""

    def __init__(self, d_model: int, hidden: int | None = None):
        super().__init__()
        # 8/3 * d keeps the parameter count of a 4*d ReLU FFN (Shazeer 2020).
        hidden = hidden or int(8 * d_model / 3)
        self.gate = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))
