"""Dense soft mixture: every token goes to every active expert, weighted by a softmax.

The baseline sparse routers are measured against (no token is ever dropped, compute is
E_active times a single expert's). Not Puigcerver et al.'s "Soft MoE" with slots: the
experts here see tokens, not mixtures of tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from m3tfed import Router, RouterSpec, Routing, active_mask
from torch import nn


class SoftRouter(Router):
    """Softmax over the active experts; M = N * E_active assignments.

    Options:
        temperature: logits are divided by it before the softmax (default 1.0; lower
            is sharper).

    Aux losses: ``router_z`` (ST-MoE z-loss over the active logits), which keeps the
    logits from growing. No balancing loss: every expert sees every token.
    """

    def __init__(self, d_model: int, num_experts: int, temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.num_experts = num_experts
        self.temperature = temperature
        self.gate = nn.Linear(d_model, num_experts, bias=False)

    def forward(self, x: torch.Tensor, expert_mask: torch.Tensor | None = None) -> Routing:
        N, E = x.shape[0], self.num_experts
        mask = active_mask(expert_mask, E, x.device)
        active = mask.nonzero().squeeze(1)  # [E_active]

        with torch.autocast(x.device.type, enabled=False):  # float32 routing (ST-MoE)
            logits = F.linear(x.float(), self.gate.weight.float()) / self.temperature
        logits = logits.masked_fill(~mask, float("-inf"))
        probs = logits.softmax(dim=-1)  # [N, E]

        # Expert-major (all tokens of expert a, then of expert b, ...): already grouped.
        weight = probs[:, active].t().reshape(-1)
        expert_index = active.repeat_interleave(N)
        token_index = torch.arange(N, device=x.device).repeat(len(active))

        lse = torch.logsumexp(logits, dim=-1)
        router_z = (lse**2).mean() if N else lse.sum()
        stats = {
            "tokens_per_expert": mask.long() * N,
            "dropped": 0,
            "tokens_unrouted": 0,
            "gate_entropy": float(torch.special.entr(probs.detach()).sum(-1).mean()) if N else 0.0,
        }
        return Routing(token_index, expert_index, weight, {"router_z": router_z}, stats)


# Registered by the package (``register_routers``).
SPEC = RouterSpec(
    name="soft",
    build=SoftRouter,
    version="0.1.0",
    license="Apache-2.0",
    description="Dense soft mixture: every token to every active expert with softmax weights (baseline)",
)
