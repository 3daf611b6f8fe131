"""Top-k softmax router with expert capacity (Switch Transformer / GShard / ST-MoE).

Each token goes to the ``k`` active experts with the highest router probability. In
training an expert takes at most ``capacity`` assignments per batch; the rest are
dropped for that expert (the token keeps its other assignments, with their weights
unchanged). In eval mode nothing is dropped, so a sample's prediction does not depend on
the other samples in its batch. Losses:
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
            assignments per expert in training (default 1.25, Switch's training
            value). ``None`` or 0 means no limit; eval mode never limits. m3tfed's
            shipped configs use 0: with every expert in one process there is no
            per-device buffer to bound, so the limit only drops training tokens
            that evaluation keeps (docs/results.md, Learning quality 16).
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

    # Capability (m3tfed.privacy.dpsgd.PER_SAMPLE_RULE): this class routes by exactly the
    # softmax top-k gate rule above (``gate``, ``k``, ``renormalize``, ``capacity``,
    # ``noise_std``), so DP-SGD can route each sample as if alone. A subclass that
    # changes the rule does not inherit the claim (it is looked up on the class itself).
    per_sample_rule = "softmax_top_k_gate"

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

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Gate logits ``[N, E]``, in float32 also under bf16 autocast: rounding them flips
        top-k choices and destabilises training (ST-MoE, "selective precision")."""
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.gate.weight.float())

    def forward(self, x: torch.Tensor, expert_mask: torch.Tensor | None = None) -> Routing:
        N, E = x.shape[0], self.num_experts
        mask = active_mask(expert_mask, E, x.device)
        n_active = int(mask.sum())
        k = min(self.k, n_active)

        logits = self.logits(x)
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

        # Capacity is a training-time compute bound; at evaluation it would make a
        # sample's prediction depend on which other samples share its batch.
        capacity = self.capacity(N, k, n_active) if self.training else None
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
        return Routing(
            token_index,
            expert_index,
            weight,
            {"load_balance": load_balance, "router_z": router_z},
            stats,
        )


class TaskTopKRouter(TopKRouter):
    """Top-k gating plus a learned bias per task on the gate logits: ``W @ t`` with ``t``
    the task's embedding scaled to norm ``sqrt(d)``, ``W`` zero-initialised (so it starts
    as ``topk``). The token-wise gate sees the task only added to every token, and
    measured within an institution its tasks routed identically (docs/results.md).

    Its own class, so DP-SGD (which checks ``per_sample_rule`` on the class) does not
    take it for ``topk``'s batched rule, which lacks the task bias: it falls back to one
    backward per sample."""

    takes_task = True  # the MoE layer passes the task embedding (``task=``)

    def __init__(self, d_model: int, num_experts: int, **options):
        super().__init__(d_model, num_experts, **options)
        self.task_gate = nn.Parameter(torch.zeros(num_experts, d_model))
        self._task: torch.Tensor | None = None

    def forward(
        self,
        x: torch.Tensor,
        expert_mask: torch.Tensor | None = None,
        task: torch.Tensor | None = None,
    ) -> Routing:
        self._task = task
        try:
            return super().forward(x, expert_mask)
        finally:
            self._task = None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().logits(x)
        if self._task is None:  # no task: exactly topk (a zero bias, still in the graph)
            t = self.task_gate.new_zeros(self.task_gate.shape[1])
        else:
            t = self._task.float()
            t = t * (t.shape[-1] ** 0.5 / t.norm().clamp_min(1e-8))
        return logits + self.task_gate.float() @ t


# Registered by the package (``register_routers``).
SPEC = RouterSpec(
    name="topk",
    build=TopKRouter,
    version="0.1.0",
    license="Apache-2.0",
    description="Softmax top-k gating (k=2) with capacity factor 1.25, Switch load-balancing loss and ST-MoE z-loss",
)

TASK_SPEC = RouterSpec(
    name="task_topk",
    build=TaskTopKRouter,
    version="0.1.0",
    license="Apache-2.0",
    description="topk plus a learned per-task bias on the gate logits (task-conditioned routing)",
)
