"""Interaction-log encoder for knowledge tracing (DKT/SAKT style).

Input::

    {"skill":   [B, L] long,  skill (question concept) id of each interaction, 0..num_skills-1
     "correct": [B, L] long,  1 if answered correctly, else 0
     "mask":    [B, L] bool,  True = a real interaction (padding anywhere is fine)
     "query_skill": [B] long  optional: the skill of the next question
     "question": [B, L] long  optional (factored tokens only): question id, 0..num_questions-1
     "query_question": [B] long  optional: the next question's id}

Two ways to embed an interaction (option ``tokens``):

- ``"pair"``: one embedding per DKT interaction id ``skill * 2 + correct``. Nothing is
  shared between skills, so with many ids (question-level ids, ~1000) each is seen a
  few times and little is learned.
- ``"factored"`` (the default; AKT's Rasch embedding, Ghosh et al. 2020): concept + response, so
  "answered correctly" is one vector learned from every interaction; with question ids,
  each question adds only a scalar difficulty ``mu_q`` times a per-concept (and
  per-response) variation vector, so ~1000 questions cost ~1000 parameters and a
  question never seen in training falls back to its concept. A source with question
  ids but no concepts passes them as ``skill`` (or all-zero skills and ``question``).
  The default since it won on validation both with 1000 question ids and on the
  default federation's 12 skills (docs/results.md, "Learning quality").

Then a position embedding and one causal transformer layer: token ``t`` sees only
interactions ``<= t``, so a head reading token ``t`` cannot peek at later answers.

With ``query_skill`` one extra token is appended (SAKT's query): the next question's
skill embedding, placed after the last real interaction; it sees the whole history and
is what a "will the next response be correct" head should read (pooling reaches it).
Without it a head only knows the history, not which question comes next.

``query_bias`` (default on) adds the wide part of a wide-and-deep model to the query
token: one learned scalar per next-question id (``query_question`` when given, else
``query_skill``) along one shared direction, the per-item difficulty a logistic model
learns from a one-hot. Why it is needed: an id's own vectors move only when that id is
asked, a few times in a short federated schedule, and Adam moves a parameter by about
the learning rate per step; measured, 1000 question ids as skills left the neural
models at the AUC of a logistic model that ignores the question. The scalar therefore
trains at ``QUERY_BIAS_LR_MULTIPLIER`` times the local learning rate (declared by
:meth:`InteractionEncoder.lr_multipliers`, read by every trainer's optimizer; value
chosen on validation with AdamW, docs/results.md, "Learning quality" 6). Until December
2026 it was multiplied by 300 in the forward pass instead: the same AdamW steps
(validation AUC equal to 0.0005 per institution, 3 seeds), but SGD then stepped 300**2
times the learning rate, and under DP-SGD its 300x gradient took most of each sample's
clipped norm. 300 is an AdamW value: Adam normalises a rarely-seen row's gradient, SGD
does not, and with SGD the bias barely moves at 300x (measured: the same AUC as without
it).

Logs longer than ``max_len`` are rejected rather than silently cut: which window to keep
(the most recent interactions, usually) is the data source's decision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from m3tfed import EncoderSpec, ModalityEncoder, Tokens
from torch import nn

# The per-id query bias trains at this multiple of the local learning rate: under AdamW
# an id seen k times moves about k * QUERY_BIAS_LR_MULTIPLIER * lr (a logit per few
# sightings at lr 3e-3). Chosen on validation of a question-level federation.
QUERY_BIAS_LR_MULTIPLIER = 300.0
# The wide features' "recent accuracy": the share correct of the last RECENT answers.
RECENT = 5


class CausalBlock(nn.Module):
    """Pre-norm self-attention + MLP; ``allowed [B, L, L]`` says which keys a query sees."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, d_model)
        )

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(
            self.qkv(self.norm1(x)), "b l (three h e) -> three b h l e", three=3, h=self.heads
        )
        attn = F.scaled_dot_product_attention(
            q, k, v, attn_mask=rearrange(allowed, "b q k -> b 1 q k")
        )
        x = x + self.out(rearrange(attn, "b h l e -> b l (h e)"))
        return x + self.mlp(self.norm2(x))


class InteractionEncoder(ModalityEncoder):
    modality = "interactions"

    def __init__(
        self,
        d_model: int,
        num_skills: int = 50,
        max_len: int = 64,
        heads: int | None = None,
        tokens: str = "factored",
        num_questions: int = 0,
        query_bias: bool = True,
    ):
        super().__init__()
        if tokens not in ("pair", "factored"):
            raise ValueError(f"tokens must be 'pair' or 'factored', got {tokens!r}")
        if num_questions and tokens != "factored":
            raise ValueError(
                "num_questions needs tokens = 'factored' (question ids are embedded as Rasch difficulties)"
            )
        self.num_skills, self.max_len, self.tokens, self.num_questions = (
            num_skills,
            max_len,
            tokens,
            num_questions,
        )
        heads = heads or next(h for h in (4, 2, 1) if d_model % h == 0)
        if tokens == "pair":
            self.interaction = nn.Embedding(2 * num_skills, d_model)
        else:
            self.concept = nn.Embedding(num_skills, d_model)
            self.response = nn.Embedding(2, d_model)
            if num_questions:
                # mu_q starts at 0: every question starts as its concept's average.
                self.difficulty = nn.Embedding(num_questions, 1)
                nn.init.zeros_(self.difficulty.weight)
                self.concept_variation = nn.Embedding(num_skills, d_model)
                self.response_variation = nn.Embedding(2, d_model)
        self.query = nn.Embedding(num_skills, d_model)
        self.query_bias: nn.Parameter | None = None
        if query_bias:
            # Zero: every id starts unbiased. Neither draws from torch's global generator,
            # so the option changes no other module's initial weights.
            self.query_bias = nn.Parameter(torch.zeros(num_questions or num_skills, 1))
            fixed = torch.Generator().manual_seed(0)
            self.query_bias_direction = nn.Parameter(
                torch.randn(d_model, generator=fixed) / d_model**0.5
            )
        self.position = nn.Embedding(max_len + 1, d_model)  # +1: the query token's slot
        self.block = CausalBlock(d_model, heads)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, inputs: dict[str, torch.Tensor]) -> Tokens:
        skill, correct = inputs["skill"].long(), inputs["correct"].long()
        mask = inputs.get("mask")
        mask = torch.ones_like(skill, dtype=torch.bool) if mask is None else mask.bool()
        b, length = skill.shape
        if length > self.max_len:
            raise ValueError(
                f"interaction log has {length} steps, max_len is {self.max_len}; window it in the data source"
            )
        real = skill[mask]
        if real.numel() and (real.min() < 0 or real.max() >= self.num_skills):
            raise ValueError(
                f"skill ids must be in 0..{self.num_skills - 1}, got {int(real.min())}..{int(real.max())}"
            )
        skill = torch.where(mask, skill, 0)  # padding: any valid id
        response = torch.where(mask, correct.clamp(0, 1), 0)
        question = self._questions(inputs.get("question"), mask)
        # Position = how many real interactions came before, so left and right padding
        # give the same tokens.
        step = (mask.long().cumsum(1) - 1).clamp_min(0)
        x = self.embed(skill, response, question) + self.position(step)
        # Causal: query t sees key s <= t that is real. A query always sees itself, so
        # no row is empty (an all-masked softmax row would be NaN).
        index = torch.arange(length, device=skill.device)
        eye = torch.eye(length, dtype=torch.bool, device=skill.device)
        allowed = (index[None, :, None] >= index[None, None, :]) & (mask[:, None, :] | eye)

        query = inputs.get("query_skill")
        if query is not None:
            q_pos = mask.long().sum(1)  # right after the real interactions
            q_tok = self.query(query.long()) + self.position(q_pos)
            next_question = self._questions(
                inputs.get("query_question"), torch.ones_like(query, dtype=torch.bool)
            )
            if next_question is not None:
                q_tok = q_tok + self.difficulty(next_question) * self.concept_variation(
                    query.long()
                )
            # With num_questions the bias table is indexed by question id: without the next
            # question's id there is no row to read (a skill id would pick a wrong one).
            if self.query_bias is not None and (next_question is not None or not self.num_questions):
                item = query.long() if next_question is None else next_question
                q_tok = q_tok + F.embedding(item, self.query_bias) * self.query_bias_direction
            x = torch.cat([x, q_tok[:, None]], dim=1)
            see = torch.cat([mask, torch.ones(b, 1, dtype=torch.bool, device=mask.device)], dim=1)
            allowed = torch.cat([F.pad(allowed, (0, 1), value=False), see[:, None, :]], dim=1)
            mask = see

        x = self.norm(self.block(x, allowed))
        return Tokens(x, mask)

    @property
    def wide_width(self) -> int:
        return 5 * self.num_skills + 3 + self.num_questions

    def wide_features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """What a logistic knowledge-tracing model reads (PFA, Pavlik et al. 2009; the
        "question one-hot + recent accuracy" model): per skill, log(1 + successes) and
        log(1 + failures) so far; the next question's skill one-hot, and its own
        successes and failures in that skill's slot (a learning rate per skill); the
        share correct overall and over the last ``RECENT`` answers; log(1 + answers); the next
        question's id one-hot (``num_questions``). Without a query those parts are 0."""
        skill, correct = inputs["skill"].long(), inputs["correct"].long()
        mask = inputs.get("mask")
        mask = torch.ones_like(skill, dtype=torch.bool) if mask is None else mask.bool()
        b, S = skill.shape[0], self.num_skills
        right = (mask & (correct > 0)).float()
        wrong = (mask & (correct <= 0)).float()
        idx = torch.where(mask, skill, 0).clamp(0, S - 1)
        succ = torch.zeros(b, S, device=skill.device).scatter_add_(1, idx, right)
        fail = torch.zeros(b, S, device=skill.device).scatter_add_(1, idx, wrong)
        n = mask.float().sum(1, keepdim=True)
        from_end = mask.flip(1).long().cumsum(1).flip(1)  # 1 = the last real answer
        overall = right.sum(1, keepdim=True) / n.clamp_min(1)
        recent = (right * (from_end <= RECENT)).sum(1, keepdim=True) / n.clamp(1, RECENT)
        query_hot = torch.zeros(b, S, device=skill.device)
        query = inputs.get("query_skill")
        if query is not None:
            query_hot.scatter_(1, query.long().clamp(0, S - 1)[:, None], 1.0)
        succ, fail = succ.log1p(), fail.log1p()
        parts = [succ, fail, query_hot, query_hot * succ, query_hot * fail, overall, recent, n.log1p()]
        if self.num_questions:
            question_hot = torch.zeros(b, self.num_questions, device=skill.device)
            next_question = inputs.get("query_question")
            if next_question is not None:
                question_hot.scatter_(1, next_question.long().clamp(0, self.num_questions - 1)[:, None], 1.0)
            parts.append(question_hot)
        return torch.cat(parts, dim=1)

    def lr_multipliers(self) -> dict[str, float]:
        """The query bias trains faster than the rest (m3tfed.LearningRateMultipliers)."""
        return {"query_bias": QUERY_BIAS_LR_MULTIPLIER} if self.query_bias is not None else {}

    def embed(
        self, skill: torch.Tensor, response: torch.Tensor, question: torch.Tensor | None
    ) -> torch.Tensor:
        if self.tokens == "pair":
            return self.interaction(skill * 2 + response)
        x = self.concept(skill) + self.response(response)
        if question is not None:
            x = x + self.difficulty(question) * (
                self.concept_variation(skill) + self.response_variation(response)
            )
        return x

    def _questions(self, question: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor | None:
        if question is None:
            return None
        if not self.num_questions:
            raise ValueError(
                "the log has question ids but the encoder has num_questions = 0; set num_questions (and tokens = 'factored')"
            )
        question = question.long()
        real = question[mask]
        if real.numel() and (real.min() < 0 or real.max() >= self.num_questions):
            raise ValueError(
                f"question ids must be in 0..{self.num_questions - 1}, got {int(real.min())}..{int(real.max())}"
            )
        return torch.where(mask, question, 0)

    def example_input(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        length = min(self.max_len, 8)
        skill = torch.randint(0, self.num_skills, (batch_size, length), generator=generator)
        correct = torch.randint(0, 2, (batch_size, length), generator=generator)
        lengths = torch.randint(1, length + 1, (batch_size,), generator=generator)
        lengths[0] = length
        mask = torch.arange(length)[None, :] < lengths[:, None]
        query = torch.randint(0, self.num_skills, (batch_size,), generator=generator)
        out = {"skill": skill, "correct": correct, "mask": mask, "query_skill": query}
        if self.num_questions:
            out["question"] = torch.randint(
                0, self.num_questions, (batch_size, length), generator=generator
            )
            out["query_question"] = torch.randint(
                0, self.num_questions, (batch_size,), generator=generator
            )
        return out


# Registered by the package (``register_encoders``); ``params`` is counted at
# REFERENCE_D_MODEL with default options and checked against the module.
SPEC = EncoderSpec(
    name="sequence",
    modality="interactions",
    build=InteractionEncoder,
    version="0.4.0",  # 0.3: the query bias is unscaled in the forward pass (lr multiplier); 0.4: wide features
    license="Apache-2.0",
    params=570_674,
    min_memory_mb=9,  # fp32 weights, gradients and AdamW moments
    description="Knowledge-tracing log encoder: DKT interaction embedding, or factored concept + response (+ Rasch question difficulty: tokens=factored, num_questions), + causal transformer layer; a per-item bias on the next-question query (query_bias)",
)
