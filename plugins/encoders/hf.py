"""Kept so existing imports work: the ``hf_text`` and ``hf_vision`` encoders live in
:mod:`.hf_backbone` (loading, freezing, LoRA, the embedding cache: its docstring says how),
:mod:`.hf_text` and :mod:`.hf_vision`, one model per file."""

from .hf_backbone import (
    ADAPTERS,
    PACKAGE_PREFIX,
    EmbeddingCache,
    FrozenBackbone,
    add_lora,
    check_adapter,
    clear_caches,
    load_backbone,
    load_tokenizer,
    lora_targets,
    resolve_model_dir,
    shared_copy,
)
from .hf_text import HFTextEncoder
from .hf_vision import TINY_VIT, HFVisionEncoder, vision_backbone

__all__ = [
    "ADAPTERS",
    "PACKAGE_PREFIX",
    "TINY_VIT",
    "EmbeddingCache",
    "FrozenBackbone",
    "HFTextEncoder",
    "HFVisionEncoder",
    "add_lora",
    "check_adapter",
    "clear_caches",
    "load_backbone",
    "load_tokenizer",
    "lora_targets",
    "resolve_model_dir",
    "shared_copy",
    "vision_backbone",
]
