"""The ``hf_text`` encoder: a local pretrained Hugging Face text model, frozen, with a
LoRA or projection adapter and an optional embedding cache (loading, LoRA and the cache
are in :mod:`.hf_backbone`; docs/backbones.md)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from m3tfed import EncoderSpec
from torch.nn.utils.rnn import pad_sequence

from .hf_backbone import (
    EmbeddingCache,
    FrozenBackbone,
    add_lora,
    check_adapter,
    load_backbone,
    load_tokenizer,
    resolve_model_dir,
    shared_copy,
    shared_embedding_cache,
)
from .text import TextEncoder


class HFTextEncoder(FrozenBackbone, TextEncoder):
    """``TextEncoder`` with a local pretrained tokenizer + backbone, frozen, and a LoRA or
    projection adapter. ``features`` (chunk means before the projection) is what the
    cache stores; with ``max_tokens = 1`` it is the mean-pooled sentence embedding."""

    def __init__(
        self,
        d_model: int,
        path: str | None = None,
        adapter: str = "lora",
        r: int = 8,
        alpha: float = 16.0,
        target_modules: list[str] | None = None,
        max_length: int = 256,  # subword tokens incl. [CLS]/[SEP]; all-MiniLM-L6-v2 was trained at 256
        max_tokens: int = 16,
        cache: bool = False,
        cache_size: int = 4096,  # texts; ~25 kB each at hidden 384 and 16 tokens
    ):
        check_adapter(adapter)
        if cache and adapter != "projection":
            raise ValueError(
                "cache = true needs adapter = 'projection': with LoRA the backbone's output changes as it trains"
            )
        model_dir = resolve_model_dir(path) if path is not None else None
        if model_dir is None:  # a tiny BERT from a config, byte tokenizer (TextEncoder's own)
            tokenizer = backbone = None
        else:
            tokenizer, backbone = load_tokenizer(model_dir), shared_copy(load_backbone(model_dir))
            limit = getattr(backbone.config, "max_position_embeddings", None)
            if limit is not None and max_length > limit:
                raise ValueError(
                    f"max_length {max_length} exceeds the backbone's max_position_embeddings {limit} ({model_dir})"
                )
        super().__init__(
            d_model,
            max_length=max_length,
            max_tokens=max_tokens,
            freeze_backbone=True,
            tokenizer=tokenizer,
            backbone=backbone,
        )
        self.model_dir, self.adapter = model_dir, adapter
        if adapter == "lora":
            self.backbone = add_lora(self.backbone, r, alpha, target_modules)
        self.backbone.eval()
        self.cache: EmbeddingCache | None = None
        if cache:
            key = (self.model_dir, max_length, self.chunk_size)
            # Without a path the backbone is this encoder's own random one: its own cache.
            self.cache = (
                shared_embedding_cache(key, cache_size)
                if self.model_dir
                else EmbeddingCache(cache_size)
            )

    def features(
        self, inputs: Sequence[str] | dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache is None or isinstance(inputs, dict):
            return super().features(inputs)
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        entries = {t: e for t in dict.fromkeys(texts) if (e := self.cache.get(t)) is not None}
        missing = [t for t in dict.fromkeys(texts) if t not in entries]
        self.cache.hits += len(texts) - sum(texts.count(t) for t in missing)
        self.cache.misses += len(missing)
        # One text at a time: padded beside a longer text, the backbone's output differs in
        # the last bits, and a cached embedding would depend on the batch that first held
        # it, so a method's results on the process's history. Once per text and process;
        # on CPU no slower (no padding), on a GPU slower.
        for t in missing:
            with torch.no_grad():
                chunks, mask = super().features([t])
            c, m = chunks[0].cpu(), mask[0].cpu()
            kept = int(m.nonzero().max()) + 1 if m.any() else 1  # drop trailing padding chunks
            entries[t] = (c[:kept].clone(), m[:kept].clone())
            self.cache.put(t, entries[t])
        device = self.proj.weight.device
        chunks = pad_sequence([entries[t][0] for t in texts], batch_first=True).to(device)
        mask = pad_sequence(
            [entries[t][1] for t in texts], batch_first=True, padding_value=False
        ).to(device)
        return chunks, mask


# Registered by the package (``register_encoders``); ``params`` is counted at
# REFERENCE_D_MODEL with default options and checked against the module.
SPEC = EncoderSpec(
    name="hf_text",
    modality="text",
    build=HFTextEncoder,
    version="0.1.0",
    license="Apache-2.0",
    params=34_624,  # the tiny from-config BERT + LoRA (no path)
    min_memory_mb=64,
    description="Local Hugging Face text model (path, local_files_only), frozen; LoRA or projection trains; optional embedding cache",
)
