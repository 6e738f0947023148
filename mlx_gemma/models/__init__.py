"""The model registry: which module builds which `model_type`, and the contract they keep.

An explicit table, never a name taken from a checkpoint and imported: a
`config.json` can only choose among these.  Every registered `Model` is a
`GemmaModel` (base.py): the one list of what the rest of the package may use.
"""

from . import embedding_gemma, gemma, gemma2, gemma3, gemma3_vlm, gemma4, gemma4_assistant, gemma4_mm, paligemma, shieldgemma2
from .base import AudioInput, Block, GemmaArgs, GemmaModel, ImageInput, RankShare

__all__ = ["DRAFTERS", "ENCODERS", "MODELS", "TEXT_PART_OF", "AudioInput", "Block", "GemmaArgs", "GemmaModel", "ImageInput", "RankShare", "supported_model_types"]

# model_type -> module with `ModelArgs.from_dict` and `Model`.
MODELS = {
    "gemma": gemma,
    "gemma2": gemma2,
    "gemma3_text": gemma3,
    "gemma4_text": gemma4,  # dense Gemma 4 (E2B/E4B with per-layer inputs and shared KV, 31B)
    "paligemma": paligemma,  # SigLIP + Gemma / Gemma 2 (PaliGemma 1 / 2)
    "gemma3": gemma3_vlm,  # SigLIP + Gemma 3 (a gemma3 config with a vision_config)
    "gemma4": gemma4_mm,  # Gemma 4 text + vision and / or audio towers (a gemma4 config with a vision_config or audio_config)
    "shieldgemma2": shieldgemma2,  # Gemma 3 with images + Yes/No ids (the classifier: mlx_gemma.shieldgemma2)
}

# Multimodal configs whose language half we run as a text model when they carry no
# `vision_config` (nor `audio_config`): the text settings live under `text_config`.
TEXT_PART_OF = {"gemma3": "gemma3_text", "gemma4": "gemma4_text"}

# Sentence encoders: a config of this model_type with `use_bidirectional_attention: true`,
# in a sentence-transformers folder (EmbeddingGemma).  Not causal LMs: they keep their own
# contract (`Model(ids, padding_mask) -> embeddings`), not `GemmaModel`.
ENCODERS = {"gemma3_text": embedding_gemma}

# Draft models: not causal LMs on their own (no cache, no token input), so not `GemmaModel`s.  Each
# keeps its own contract (its module docstring) and loads and converts like a registered model.
DRAFTERS = {"gemma4_assistant": gemma4_assistant}  # Gemma 4's assistant: reads its target's states


def supported_model_types() -> list[str]:
    return sorted({*MODELS, *TEXT_PART_OF, *DRAFTERS})
