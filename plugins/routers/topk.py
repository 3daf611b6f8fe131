"""Top-k softmax router with expert capacity (Switch Transformer / GShard / ST-MoE).

Each token goes to the ``k`` active experts with the highest router probability. An
expert takes at most ``capacity`` assignments per batch; the rest are dropped for that
expert (the token keeps its other assignments, with their weights unchanged). Losses:
Switch load balancing and the ST-MoE router z-loss, both over the active experts only.

Not here: the dispatch itself (``m3tfed.moe.MoELayer`` runs the experts).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from m3tfed import Router, RouterSpec, Routing, active_mask
from torch import nn


class TopKRouter(Router):
    """Softmax top-k gating over the active experts.

    Options:
        k: experts per token (default 2, Mixtral/GShard). Clamped to the number of
            active experts, so an institution that selected one expert still routes.
        capacity_factor: capacity = ceil(capacity_factor * N * k / E_active)
            assignments per expert (default 1.25, Switch's training value). ``None`` or
            0 means no limit (nothing is dropped).
        renormalize: rescale each token's top-k weights to sum to 1 (default False,
            as in Switch/GShard: the weights stay the softmax probabilities). Done
            before capacity drops, so a dropped assignment never inflates the others.
        noise_std: std of Gaussian noise added to the logits in training mode only
            (default 0: off, so routing is deterministic).

    Assignments over capacity are dropped in priority order: every token's first
    choice before any second choice, then by token position (GShard).

    Aux losses: ``load_balance`` = E_active * sum_e f_e * P_e, with f_e the share of the
    N*k top-k assignments (before capacity) sent to e and P_e the mean router
    probability of e; it is 1 under perfect balance for any k. ``router_z`` =
    mean_tokens(logsumexp(active logits)^2) (ST-MoE), which keeps logits small.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int = 2,
        capacity_factor: float | None = 1.25,
        renormalize: bool = False,
        noise_std: float = 0.0,
    ):
        super().__init__()
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if capacity_factor is not None and capacity_factor < 0:
            raise ValueError(f"capacity_factor must be >= 0 or None, got {capacity_factor}")
        self.num_experts = num_experts
        self.k = k
        self.capacity_factor = capacity_factor
        self.renormalize = renormalize
        self.noise_std = noise_std
        self.gate = nn.Linear(d_model, num_experts, bias=False)

    def capacity(self, n_tokens: int, k: int, n_active: int) -> int | None:
        """Assignments one expert may take, or None for no limit."""
        if not self.capacity_factor:
            return None
        return math.ceil(self.capacity_factor * n_tokens * k / n_active)

    def forward(self, x: torch.Tensor, expert_mask: torch.Tensor | None = None) -> Routing:
        N, E = x.shape[0], self.num_experts
        mask = active_mask(expert_mask, E, x.device)
        n_active = int(mask.sum())
        k = min(self.k, n_active)

        # Route in float32, also under bf16 autocast: rounding the logits flips top-k
        # choices and destabilises training (ST-MoE, "selective precision").
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.gate.weight.float())
        if self.training and self.noise_std > 0:
            logits = logits + torch.randn_like(logits) * self.noise_std
        logits = logits.masked_fill(~mask, float("-inf"))  # masked gating: prob exactly 0
        probs = logits.softmax(dim=-1)  # [N, E]
        # Select on logits, not probs: an active expert whose prob underflows to 0 must
        # still win over a masked one (-inf), never tie with it.
        top_e = logits.topk(k, dim=-1).indices  # [N, k]
        top_w = probs.gather(1, top_e)
        if self.renormalize:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)

        # Rank-major order (all first choices, then all second choices) is the
        # priority order for capacity: a stable sort by expert keeps it inside each expert.
        expert_index = top_e.t().reshape(-1)  # [k*N]
        token_index = torch.arange(N, device=x.device).repeat(k)
        weight = top_w.t().reshape(-1)
        order = torch.argsort(expert_index, stable=True)
        expert_index, token_index, weight = expert_index[order], token_index[order], weight[order]
        wanted = torch.bincount(expert_index, minlength=E)  # [E] assignments before capacity

        capacity = self.capacity(N, k, n_active)
        if capacity is not None:
            starts = torch.cumsum(wanted, 0) - wanted
            slot = torch.arange(expert_index.numel(), device=x.device) - starts[expert_index]
            keep = (slot < capacity).nonzero().squeeze(1)
            expert_index, token_index, weight = expert_index[keep], token_index[keep], weight[keep]
        kept = torch.bincount(expert_index, minlength=E)

        # Losses over the active experts: masked probs and f are 0, E_active scales.
        f = wanted.float() / max(N * k, 1)
        P = probs.mean(dim=0) if N else probs.sum(dim=0)
        load_balance = n_active * (f * P).sum()
        lse = torch.logsumexp(logits, dim=-1)
        router_z = (lse**2).mean() if N else lse.sum()

        dropped = N * k - expert_index.numel()
        routed = torch.zeros(N, dtype=torch.bool, device=x.device)
        routed[token_index] = True
        stats = {
            "tokens_per_expert": kept.detach(),
            "dropped": int(dropped),
            "dropped_fraction": dropped / max(N * k, 1),
            "tokens_unrouted": int(N - routed.sum()),
            "capacity": capacity,
            "gate_entropy": float(torch.special.entr(probs.detach()).sum(-1).mean()) if N else 0.0,
        }
        return Routing(token_index, expert_index, weight, {"load_balance": load_balance, "router_z": router_z}, stats)


# Registered by the package (``register_routers``).
SPEC = RouterSpec(
    name="topk",
    build=TopKRouter,
    version="0.1.0",
    license="Apache-2.0",
    description="Softmax top-k gating (k=2) with capacity factor 1.25, Switch load-balancing loss and ST-MoE z-loss",
)
