"""Expert-choice router (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice
Routing"): experts pick tokens instead of tokens picking experts.

Each active expert takes its ``C`` tokens of highest affinity, so the load is balanced
by construction (no balancing loss) and a token may get zero, one or several experts.
It needs the whole batch to route, so it suits encoders and training, not
token-by-token decoding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from m3tfed import Router, RouterSpec, Routing, active_mask
from torch import nn


class ExpertChoiceRouter(Router):
    """Each active expert picks its top-C tokens by affinity.

    Options:
        k: average experts per token the compute budget is sized for (default 2, the
            same budget as top-2 routing).
        capacity_factor: C = min(N, ceil(capacity_factor * N * k / E_active)) tokens
            per expert (default 1.0: exactly the top-k compute budget).

    Affinity is the softmax over the active experts of each token's logits (the paper's
    S = softmax(X W_g)); the gate weight of a pick is that affinity.

    Aux losses: ``router_z`` only (ST-MoE z-loss over the active logits); load is
    balanced by construction. Stats: ``tokens_unrouted`` (= ``dropped``) counts tokens
    no expert picked; ``experts_per_token_max`` shows how uneven the coverage is.
    """

    def __init__(self, d_model: int, num_experts: int, k: int = 2, capacity_factor: float = 1.0):
        super().__init__()
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
        self.num_experts = num_experts
        self.k = k
        self.capacity_factor = capacity_factor
        self.gate = nn.Linear(d_model, num_experts, bias=False)

    def capacity(self, n_tokens: int, n_active: int) -> int:
        """Tokens each active expert picks."""
        return min(n_tokens, math.ceil(self.capacity_factor * n_tokens * self.k / n_active))

    def forward(self, x: torch.Tensor, expert_mask: torch.Tensor | None = None) -> Routing:
        N, E = x.shape[0], self.num_experts
        mask = active_mask(expert_mask, E, x.device)
        active = mask.nonzero().squeeze(1)  # [E_active]
        C = self.capacity(N, len(active))

        with torch.autocast(x.device.type, enabled=False):  # float32 routing (ST-MoE)
            logits = F.linear(x.float(), self.gate.weight.float())
        logits = logits.masked_fill(~mask, float("-inf"))
        affinity = logits.softmax(dim=-1)  # [N, E]; masked experts 0
        # Only active experts choose: a masked expert never picks (never gets) a token.
        weight, token_index = affinity[:, active].t().topk(C, dim=-1)  # [E_active, C]
        expert_index = active.unsqueeze(1).expand(-1, C)

        lse = torch.logsumexp(logits, dim=-1)
        router_z = (lse**2).mean() if N else lse.sum()

        token_index, expert_index, weight = token_index.reshape(-1), expert_index.reshape(-1), weight.reshape(-1)
        per_token = torch.bincount(token_index, minlength=N)
        unrouted = int((per_token == 0).sum())
        stats = {
            "tokens_per_expert": torch.bincount(expert_index, minlength=E).detach(),
            "dropped": unrouted,
            "tokens_unrouted": unrouted,
            "capacity": C,
            "experts_per_token_max": int(per_token.max()) if N else 0,
            "gate_entropy": float(torch.special.entr(affinity.detach()).sum(-1).mean()) if N else 0.0,
        }
        return Routing(token_index, expert_index, weight, {"router_z": router_z}, stats)


# Registered by the package (``register_routers``).
SPEC = RouterSpec(
    name="expert_choice",
    build=ExpertChoiceRouter,
    version="0.1.0",
    license="Apache-2.0",
    description="Expert-choice routing (Zhou et al. 2022): each expert picks its top-C tokens; balanced by construction",
)
