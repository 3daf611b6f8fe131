"""Interaction-log encoder for knowledge tracing (DKT/SAKT style).

Input::

    {"skill":   [B, L] long,  skill (question concept) id of each interaction, 0..num_skills-1
     "correct": [B, L] long,  1 if answered correctly, else 0
     "mask":    [B, L] bool,  True = a real interaction (padding anywhere is fine)
     "query_skill": [B] long  optional: the skill of the next question}

Each interaction becomes one token from the DKT interaction id ``skill * 2 + correct``
plus a position embedding, then one causal transformer layer: token ``t`` sees only
interactions ``<= t``, so a head reading token ``t`` cannot peek at later answers.

With ``query_skill`` one extra token is appended (SAKT's query): the next question's
skill embedding, placed after the last real interaction; it sees the whole history and
is what a "will the next response be correct" head should read (pooling reaches it).
Without it a head only knows the history, not which question comes next.

Logs longer than ``max_len`` are rejected rather than silently cut: which window to keep
(the most recent interactions, usually) is the data source's decision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from m3tfed import EncoderSpec, ModalityEncoder, Tokens
from torch import nn


class CausalBlock(nn.Module):
    """Pre-norm self-attention + MLP; ``allowed [B, L, L]`` says which keys a query sees."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, d_model))

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(self.norm1(x)), "b l (three h e) -> three b h l e", three=3, h=self.heads)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=rearrange(allowed, "b q k -> b 1 q k"))
        x = x + self.out(rearrange(attn, "b h l e -> b l (h e)"))
        return x + self.mlp(self.norm2(x))


class InteractionEncoder(ModalityEncoder):
    modality = "interactions"

    def __init__(self, d_model: int, num_skills: int = 50, max_len: int = 64, heads: int | None = None):
        super().__init__()
        self.num_skills, self.max_len = num_skills, max_len
        heads = heads or next(h for h in (4, 2, 1) if d_model % h == 0)
        self.interaction = nn.Embedding(2 * num_skills, d_model)
        self.query = nn.Embedding(num_skills, d_model)
        self.position = nn.Embedding(max_len + 1, d_model)  # +1: the query token's slot
        self.block = CausalBlock(d_model, heads)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, inputs: dict[str, torch.Tensor]) -> Tokens:
        skill, correct = inputs["skill"].long(), inputs["correct"].long()
        mask = inputs.get("mask")
        mask = torch.ones_like(skill, dtype=torch.bool) if mask is None else mask.bool()
        b, length = skill.shape
        if length > self.max_len:
            raise ValueError(f"interaction log has {length} steps, max_len is {self.max_len}; window it in the data source")
        real = skill[mask]
        if real.numel() and (real.min() < 0 or real.max() >= self.num_skills):
            raise ValueError(f"skill ids must be in 0..{self.num_skills - 1}, got {int(real.min())}..{int(real.max())}")
        ids = torch.where(mask, skill * 2 + correct.clamp(0, 1), 0)  # padding: any valid id
        # Position = how many real interactions came before, so left and right padding
        # give the same tokens.
        step = (mask.long().cumsum(1) - 1).clamp_min(0)
        x = self.interaction(ids) + self.position(step)
        # Causal: query t sees key s <= t that is real. A query always sees itself, so
        # no row is empty (an all-masked softmax row would be NaN).
        index = torch.arange(length, device=skill.device)
        eye = torch.eye(length, dtype=torch.bool, device=skill.device)
        allowed = (index[None, :, None] >= index[None, None, :]) & (mask[:, None, :] | eye)

        query = inputs.get("query_skill")
        if query is not None:
            q_pos = mask.long().sum(1)  # right after the real interactions
            q_tok = self.query(query.long()) + self.position(q_pos)
            x = torch.cat([x, q_tok[:, None]], dim=1)
            see = torch.cat([mask, torch.ones(b, 1, dtype=torch.bool, device=mask.device)], dim=1)
            allowed = torch.cat([F.pad(allowed, (0, 1), value=False), see[:, None, :]], dim=1)
            mask = see

        x = self.norm(self.block(x, allowed))
        return Tokens(x, mask)

    def example_input(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        length = min(self.max_len, 8)
        skill = torch.randint(0, self.num_skills, (batch_size, length), generator=generator)
        correct = torch.randint(0, 2, (batch_size, length), generator=generator)
        lengths = torch.randint(1, length + 1, (batch_size,), generator=generator)
        lengths[0] = length
        mask = torch.arange(length)[None, :] < lengths[:, None]
        query = torch.randint(0, self.num_skills, (batch_size,), generator=generator)
        return {"skill": skill, "correct": correct, "mask": mask, "query_skill": query}


# Registered by the package (``register_encoders``); ``params`` is counted at
# REFERENCE_D_MODEL with default options and checked against the module.
SPEC = EncoderSpec(
    name="sequence",
    modality="interactions",
    build=InteractionEncoder,
    version="0.1.0",
    license="Apache-2.0",
    params=582_656,
    min_memory_mb=9,  # fp32 weights, gradients and AdamW moments
    description="Knowledge-tracing log encoder: DKT interaction embedding + causal transformer layer",
)
