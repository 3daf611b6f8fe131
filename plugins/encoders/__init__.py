"""Built-in modality encoders, registered through the ``m3tfed`` entry-point group
exactly as a third-party package would register its own.

One encoder per file, its spec (``SPEC``) beside it; all are built from options only
(no downloads):

==========  ==============  ===========================================================
name        modality        input
==========  ==============  ===========================================================
tabular     tabular         ``{"numeric": [B, n] float (NaN = missing), "categorical": [B, k] long (-1 = missing)}``
text        text            ``list[str]`` or ``{"input_ids", "attention_mask"}``
image       image           ``[B, C, H, W]`` float
sequence    interactions    ``{"skill", "correct", "mask"[, "query_skill", "question", "query_question"]}``
hf_text     text            as ``text``; a local Hugging Face model, frozen, LoRA/projection
hf_vision   image           as ``image``; a local or from-config HF ViT, LoRA/projection/full
==========  ==============  ===========================================================

Importing them is cheap: ``transformers`` and ``peft`` load when a text or HF encoder is
built, so listing the catalogue (``m3tfed plugins``) does not pay for them.
"""

from __future__ import annotations

from m3tfed import hookimpl

from . import hf_text, hf_vision, image, sequence, tabular, text
from .hf_text import HFTextEncoder
from .hf_vision import HFVisionEncoder
from .image import ImageEncoder
from .sequence import InteractionEncoder
from .tabular import TabularEncoder
from .text import TextEncoder

__all__ = [
    "HFTextEncoder",
    "HFVisionEncoder",
    "ImageEncoder",
    "InteractionEncoder",
    "TabularEncoder",
    "TextEncoder",
    "build_hf_text_encoder",
    "build_hf_vision_encoder",
    "build_text_encoder",
]

# Earlier names of the factories, kept for code that imports them.
build_text_encoder, build_hf_text_encoder, build_hf_vision_encoder = TextEncoder, HFTextEncoder, HFVisionEncoder

MODULES = (tabular, text, image, sequence, hf_text, hf_vision)


@hookimpl
def register_encoders(register):
    for module in MODULES:
        register(module.SPEC)
