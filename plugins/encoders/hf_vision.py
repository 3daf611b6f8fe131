"""The ``hf_vision`` encoder: a local or from-config Hugging Face ViT-style backbone whose
patch states become tokens; frozen with a LoRA or projection adapter, or fully trainable
(loading and LoRA are in :mod:`.hf_backbone`; docs/backbones.md)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from m3tfed import EncoderSpec, ModalityEncoder, Tokens
from torch import nn

from .hf_backbone import (
    FrozenBackbone,
    add_lora,
    check_adapter,
    load_backbone,
    resolve_model_dir,
    shared_copy,
)

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


def vision_backbone(
    path: str | None, config: dict[str, Any] | None, freeze: bool
) -> tuple[nn.Module, Path | None]:
    """The ViT-style backbone: shared frozen copy of a local directory, a private
    trainable load of it, or a fresh model built from ``config`` (default: tiny ViT)."""
    from transformers import AutoConfig, AutoModel

    if path is not None and config is not None:
        raise ValueError(
            "give either path (a local model directory) or config (build from scratch), not both"
        )
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


class HFVisionEncoder(FrozenBackbone, ModalityEncoder):
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
            raise ValueError(
                f"image batch has {c} channels, the backbone expects {self.channels} (or 1, repeated)"
            )
        if h % p or w % p:
            raise ValueError(
                f"image height and width must be multiples of patch_size {p}; got {list(images.shape)}"
            )
        resize = (h, w) != (self.image_size, self.image_size)
        pixels = images.to(self.proj.weight.dtype)
        extra = {"interpolate_pos_encoding": True} if resize else {}
        hidden = self.backbone(pixel_values=pixels, **extra).last_hidden_state
        patches = hidden[:, -(h // p) * (w // p) :]
        tokens = self.proj(patches)
        return Tokens(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device))

    def example_input(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        s = self.image_size
        return torch.rand(batch_size, self.channels, s, s, generator=generator)


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, (list, tuple)):  # some configs give (height, width)
        if len(set(value)) != 1:
            raise ValueError(f"non-square {name} {value} is not supported")
        value = value[0]
    return int(value)


# Registered by the package (``register_encoders``); ``params`` is counted at
# REFERENCE_D_MODEL with default options and checked against the module.
SPEC = EncoderSpec(
    name="hf_vision",
    modality="image",
    build=HFVisionEncoder,
    version="0.1.0",
    license="Apache-2.0",
    params=20_736,  # the tiny from-config ViT + LoRA (no path)
    min_memory_mb=64,
    description="Local or from-config Hugging Face ViT; patch tokens; frozen + LoRA/projection, or fully trainable",
)
