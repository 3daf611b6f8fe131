"""Built-in modality encoders, registered through the ``m3tfed`` entry-point group
exactly as a third-party package would register its own.

Each encoder lives in one file and is built from options only (no downloads):

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

``params`` is the parameter count at ``REFERENCE_D_MODEL`` with default options; the
contract checks compare it with the real module.
"""

from __future__ import annotations

from m3tfed import EncoderSpec, hookimpl

from .image import ImageEncoder
from .sequence import InteractionEncoder
from .tabular import TabularEncoder

__all__ = ["ImageEncoder", "InteractionEncoder", "TabularEncoder", "build_hf_text_encoder", "build_hf_vision_encoder", "build_text_encoder"]


def build_text_encoder(d_model: int, **options):
    """Imported lazily: loading transformers costs seconds, and listing the catalogue
    (``m3tfed plugins``) should not pay for it."""
    from .text import TextEncoder

    return TextEncoder(d_model, **options)


def build_hf_text_encoder(d_model: int, **options):
    from .hf import HFTextEncoder

    return HFTextEncoder(d_model, **options)


def build_hf_vision_encoder(d_model: int, **options):
    from .hf import HFVisionEncoder

    return HFVisionEncoder(d_model, **options)


_COMMON = {"version": "0.1.0", "license": "Apache-2.0"}


@hookimpl
def register_encoders(register):
    register(
        EncoderSpec(
            name="tabular",
            modality="tabular",
            build=TabularEncoder,
            params=PARAMS["tabular"],
            description="FT-Transformer feature tokenizer: one token per column; missing values get a learned embedding",
            **_COMMON,
        )
    )
    register(
        EncoderSpec(
            name="text",
            modality="text",
            build=build_text_encoder,
            params=PARAMS["text"],
            description="Byte-level tokenizer + tiny BERT (built from a config) + projection; chunk-mean pooled to max_tokens",
            min_memory_mb=64,
            **_COMMON,
        )
    )
    register(
        EncoderSpec(
            name="image",
            modality="image",
            build=ImageEncoder,
            params=PARAMS["image"],
            description="ViT patch embedding + small transformer; one token per patch",
            **_COMMON,
        )
    )
    register(
        EncoderSpec(
            name="sequence",
            modality="interactions",
            build=InteractionEncoder,
            params=PARAMS["sequence"],
            description="Knowledge-tracing log encoder: DKT interaction embedding, or factored concept + response (+ Rasch question difficulty: tokens=factored, num_questions), + causal transformer layer",
            **_COMMON,
        )
    )
    register(
        EncoderSpec(
            name="hf_text",
            modality="text",
            build=build_hf_text_encoder,
            params=PARAMS["hf_text"],
            description="Local Hugging Face text model (path, local_files_only), frozen; LoRA or projection trains; optional embedding cache",
            min_memory_mb=64,
            **_COMMON,
        )
    )
    register(
        EncoderSpec(
            name="hf_vision",
            modality="image",
            build=build_hf_vision_encoder,
            params=PARAMS["hf_vision"],
            description="Local or from-config Hugging Face ViT; patch tokens; frozen + LoRA/projection, or fully trainable",
            min_memory_mb=64,
            **_COMMON,
        )
    )


# At REFERENCE_D_MODEL (256) with default options; tests/test_conformance.py checks them.
PARAMS = {
    "tabular": 6_144,
    "text": 41_792,
    "image": 548_352,
    "sequence": 582_656,
    "hf_text": 34_624,  # the tiny from-config BERT + LoRA (no path)
    "hf_vision": 20_736,  # the tiny from-config ViT + LoRA (no path)
}
