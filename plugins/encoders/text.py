"""Text encoder: a tokenizer, a transformer backbone and a projection to ``d_model``.

Input: a ``list[str]`` (tokenized here) or ``{"input_ids": [B, L] long,
"attention_mask": [B, L]}`` (already tokenized). Output: ``T <= max_tokens`` tokens,
each the mean of a contiguous chunk of ``ceil(max_length / max_tokens)`` backbone
states, so a long essay does not put hundreds of tokens into the MoE layers; a short
text yields fewer tokens (``T`` follows the longest text in the batch).

The three parts are separable on purpose:

- the tokenizer is any callable with Hugging Face's signature
  ``tok(texts, padding=True, truncation=True, max_length=..., return_tensors="pt")``;
  :class:`ByteTokenizer` is the built-in one (UTF-8 bytes, needs no download);
- the backbone is any module called as ``backbone(input_ids=..., attention_mask=...)``
  returning ``.last_hidden_state`` and exposing ``config.hidden_size``; the built-in
  one is a tiny BERT built from a config (random init, never ``from_pretrained``);
- the adapter (``proj``) maps hidden states to ``d_model``.

A wrapper around a local pretrained model passes its own tokenizer and backbone to
:class:`TextEncoder` and freezes the backbone (``freeze_backbone=True``) or adds LoRA
to it; only trainable parameters travel in a round.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from einops import rearrange
from m3tfed import EncoderSpec, ModalityEncoder, Tokens, text_statistics
from torch import nn


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids ``0..2`` are ``[PAD] [CLS] [SEP]``, byte ``b`` is
    ``b + 3``. No vocabulary file, no unknown token, works offline for every language.

    Truncation keeps ``[CLS]``, the first bytes that fit and ``[SEP]``, and never cuts
    a multi-byte character in half.
    """

    pad_token_id, cls_token_id, sep_token_id = 0, 1, 2
    offset = 3
    vocab_size = 256 + offset

    def __init__(self, max_length: int = 512):
        if max_length < 3:
            raise ValueError(f"max_length must leave room for [CLS] text [SEP], got {max_length}")
        self.max_length = max_length

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        limit = (max_length or self.max_length) - 2
        data = text.encode("utf-8")
        if len(data) > limit:
            cut = limit
            while cut > 0 and (data[cut] & 0xC0) == 0x80:  # inside a character
                cut -= 1
            data = data[:cut]
        return [self.cls_token_id, *(b + self.offset for b in data), self.sep_token_id]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        data = bytes(i - self.offset for i in ids if i >= self.offset)
        return data.decode("utf-8", errors="replace")

    def __call__(
        self,
        texts: str | Sequence[str],
        padding: bool = True,
        truncation: bool = True,
        max_length: int | None = None,
        return_tensors: str | None = "pt",
    ) -> dict[str, Any]:
        if isinstance(texts, str):
            texts = [texts]
        limit = (max_length or self.max_length) if truncation else 1 << 62
        rows = [self.encode(t, limit) for t in texts]
        if return_tensors is None and not padding:
            return {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]}
        width = max((len(r) for r in rows), default=2)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": (ids != self.pad_token_id).long()}


def tiny_bert(vocab_size: int, max_length: int, hidden: int = 32, layers: int = 1, heads: int = 2) -> nn.Module:
    """A small BERT from a config: random init, no download. Pooler dropped (unused)."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=max_length,
        # Dropout off: these models are tiny and federated rounds are short; dropout
        # would also make the contract checks' determinism test depend on RNG state.
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertModel(config, add_pooling_layer=False)


class TextEncoder(ModalityEncoder):
    """``texts -> tokenizer -> backbone -> chunk means (<= max_tokens) -> proj -> [B, T, d]``."""

    modality = "text"

    def __init__(
        self,
        d_model: int,
        max_length: int = 512,  # bytes incl. [CLS]/[SEP]; ~ a 100-word paragraph
        max_tokens: int = 16,  # tokens per sample handed to the MoE layers
        hidden: int = 32,
        layers: int = 1,
        heads: int = 2,
        freeze_backbone: bool = False,
        tokenizer: Callable[..., Any] | None = None,
        backbone: nn.Module | None = None,
    ):
        super().__init__()
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.max_length, self.max_tokens = max_length, max_tokens
        # Fixed from max_length, not from the batch's padded length, so a sample's
        # tokens never depend on which other samples share its batch.
        self.chunk_size = math.ceil(max_length / max_tokens)
        self.tokenizer = tokenizer or ByteTokenizer(max_length)
        self.backbone = backbone or tiny_bert(ByteTokenizer.vocab_size, max_length, hidden, layers, heads)
        if freeze_backbone:
            self.backbone.requires_grad_(False)
        self.proj = nn.Linear(self.backbone.config.hidden_size, d_model)

    def tokenize(self, texts: str | Sequence[str]) -> dict[str, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]  # one sample, not a batch of characters
        return self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )

    def features(self, inputs: Sequence[str] | dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Chunk-mean backbone states before the projection: ``([B, T, hidden], [B, T] bool)``.
        With ``max_tokens=1`` this is the mean-pooled sentence embedding."""
        batch = inputs if isinstance(inputs, dict) else self.tokenize(inputs)
        device = self.proj.weight.device
        ids = batch["input_ids"].to(device)
        attention = batch["attention_mask"].to(device).bool()
        hidden = self.backbone(input_ids=ids, attention_mask=attention.long()).last_hidden_state
        return chunk_mean(hidden, attention, self.chunk_size)

    def forward(self, inputs: Sequence[str] | dict[str, torch.Tensor]) -> Tokens:
        tokens, mask = self.features(inputs)
        return Tokens(self.proj(tokens), mask)

    wide_width = 4

    def wide_features(self, inputs: str | Sequence[str]) -> torch.Tensor:
        """Length and vocabulary of each text (``m3tfed.text_statistics``), the counts on a
        log scale: log(1 + characters), log(1 + words), mean word length, distinct words
        per word. Token ids alone (a pre-tokenized batch) carry no words: refused."""
        if isinstance(inputs, dict):
            raise ValueError("wide features read the texts; this batch holds token ids")
        stats = text_statistics([inputs] if isinstance(inputs, str) else list(inputs))
        return torch.cat([stats[:, :2].log1p(), stats[:, 2:]], dim=1).to(self.proj.weight.device)

    def example_input(self, batch_size: int, generator: torch.Generator | None = None) -> list[str]:
        words = ["essay", "student", "because", "Schüler", "élève", "学生", "reading", "the", "a"]
        texts = []
        for i in range(batch_size):
            n = 1 + int(torch.randint(0, 12, (), generator=generator)) + 3 * i  # ragged
            picks = torch.randint(0, len(words), (n,), generator=generator).tolist()
            texts.append(" ".join(words[j] for j in picks))
        return texts


def chunk_mean(hidden: torch.Tensor, mask: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of contiguous chunks of ``size`` positions: ``[B, L, h] -> [B, ceil(L/size), h]``;
    a chunk holding no real position is masked (and zero)."""
    length = hidden.shape[1]
    pad = (-length) % size
    if pad:
        hidden = nn.functional.pad(hidden, (0, 0, 0, pad))
        mask = nn.functional.pad(mask, (0, pad), value=False)
    hidden = rearrange(hidden, "b (t c) h -> b t c h", c=size)
    weight = rearrange(mask, "b (t c) -> b t c 1", c=size).to(hidden.dtype)
    count = weight.sum(2)
    return (hidden * weight).sum(2) / count.clamp_min(1.0), count.squeeze(-1) > 0


# Registered by the package (``register_encoders``); ``params`` is counted at
# REFERENCE_D_MODEL with default options and checked against the module.
SPEC = EncoderSpec(
    name="text",
    modality="text",
    build=TextEncoder,
    version="0.2.0",  # 0.2: wide features
    license="Apache-2.0",
    params=41_792,
    min_memory_mb=64,
    description="Byte-level tokenizer + tiny BERT (built from a config) + projection; chunk-mean pooled to max_tokens",
)
