"""SwiGLU feed-forward expert (Shazeer 2020), the default expert of the MoE layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from m3tfed import ExpertSpec
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


# Registered by the package (``register_experts``).
SPEC = ExpertSpec(
    name="swiglu",
    build=SwiGLUExpert,
    version="0.1.0",
    license="Apache-2.0",
    params=523_776,  # 3 * 256 * int(8 * 256 / 3)
    size="base",
    min_memory_mb=8,  # fp32 weights, gradients and AdamW moments
    description="SwiGLU feed-forward (LLaMA/Mixtral style), hidden = 8/3 d; the default expert",
)
