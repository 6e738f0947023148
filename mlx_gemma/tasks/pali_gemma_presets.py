"""keras-hub's PaliGemma preset names -> Hugging Face repositories, Kaggle handles and shapes.

`PALI_PRESETS` lists keras-hub 0.32's PaliGemma 1 and 2 presets
(`keras_hub/src/models/pali_gemma/pali_gemma_presets.py`), each with the Hugging
Face repository of the same checkpoint (Google's `google/paligemma-*` and
`google/paligemma2-*` model cards), its Kaggle handle, the preprocessor's text
length (keras-hub's descriptions give it for PaliGemma 1; PaliGemma 2's presets
do not say, so keras-hub's default 1024 is used), and the shape as a Hugging Face
config, enough for `load_weights=False` without downloading the weights.
tests/test_tasks_paligemma.py checks every shape against keras-hub's recorded
parameter counts.
"""

from __future__ import annotations

from dataclasses import dataclass

# Gemma's 256,000 pieces + 1,024 <loc> + 128 <seg>: keras-hub's embedding rows (its parameter
# counts say so); Hugging Face's checkpoints pad to 257,216. Random weights take keras-hub's shape.
VOCAB = 257_152
IMAGE_TOKEN = 257_152  # transformers' "<image>", the first id past the pieces

_GEMMA_2B = dict(model_type="gemma", hidden_size=2048, num_hidden_layers=18, num_attention_heads=8,
                 num_key_value_heads=1, intermediate_size=16_384, head_dim=256)
_GEMMA2 = dict(model_type="gemma2", head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
               attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
_GEMMA2_2B = dict(_GEMMA2, hidden_size=2304, num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                  intermediate_size=9216)
_GEMMA2_9B = dict(_GEMMA2, hidden_size=3584, num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8,
                  intermediate_size=14_336)
# Queries scaled by (hidden / heads) ** -0.5 = 144 ** -0.5, as Gemma 2 27B.
_GEMMA2_27B = dict(_GEMMA2, hidden_size=4608, num_hidden_layers=46, num_attention_heads=32, num_key_value_heads=16,
                   intermediate_size=36_864, head_dim=128, query_pre_attn_scalar=144)


def hf_config(text: dict, image_size: int) -> dict:
    """A Hugging Face PaliGemma config: So400m/14 (VisionArgs' defaults) at `image_size`, and `text`."""
    width = text["hidden_size"]
    return {
        "model_type": "paligemma",
        "image_token_index": IMAGE_TOKEN,
        "projection_dim": width,
        "text_config": {**text, "vocab_size": VOCAB},
        "vision_config": {"image_size": image_size, "projection_dim": width},
    }


@dataclass(frozen=True)
class PaliPreset:
    hf_repo: str
    kaggle: str
    text: dict
    image_size: int
    sequence_length: int = 1024  # the preprocessor's (text tokens, prompt + answer)

    @property
    def config(self) -> dict:
        return hf_config(self.text, self.image_size)


def _p1(repo: str, handle: str, size: int, length: int) -> PaliPreset:
    return PaliPreset(repo, "kaggle://keras/paligemma/keras/" + handle, _GEMMA_2B, size, length)


def _p2(repo: str, handle: str, text: dict, size: int) -> PaliPreset:
    return PaliPreset(repo, "kaggle://keras/paligemma2/keras/" + handle, text, size)


PALI_PRESETS: dict[str, PaliPreset] = {
    "pali_gemma_3b_mix_224": _p1("google/paligemma-3b-mix-224", "pali_gemma_3b_mix_224/4", 224, 256),
    "pali_gemma_3b_mix_448": _p1("google/paligemma-3b-mix-448", "pali_gemma_3b_mix_448/4", 448, 512),
    "pali_gemma_3b_224": _p1("google/paligemma-3b-pt-224", "pali_gemma_3b_224/4", 224, 128),
    "pali_gemma_3b_448": _p1("google/paligemma-3b-pt-448", "pali_gemma_3b_448/4", 448, 512),
    "pali_gemma_3b_896": _p1("google/paligemma-3b-pt-896", "pali_gemma_3b_896/4", 896, 512),
    # keras-hub spells this one "pali_gemma_2_..." (the others "pali_gemma2_...").
    "pali_gemma_2_ft_docci_3b_448": _p2("google/paligemma2-3b-ft-docci-448", "pali_gemma_2_ft_docci_3b_448/2",
                                        _GEMMA2_2B, 448),
    "pali_gemma2_ft_docci_10b_448": _p2("google/paligemma2-10b-ft-docci-448", "pali_gemma2_ft_docci_10b_448/3",
                                        _GEMMA2_9B, 448),
    "pali_gemma2_mix_3b_224": _p2("google/paligemma2-3b-mix-224", "pali_gemma2_mix_3b_224/2", _GEMMA2_2B, 224),
    "pali_gemma2_mix_3b_448": _p2("google/paligemma2-3b-mix-448", "pali_gemma2_mix_3b_448/2", _GEMMA2_2B, 448),
    "pali_gemma2_mix_10b_224": _p2("google/paligemma2-10b-mix-224", "pali_gemma2_mix_10b_224/3", _GEMMA2_9B, 224),
    "pali_gemma2_mix_10b_448": _p2("google/paligemma2-10b-mix-448", "pali_gemma2_mix_10b_448/3", _GEMMA2_9B, 448),
    # keras-hub's Kaggle handles for the 28B mix presets read "28b_mix" (its preset names "mix_28b").
    "pali_gemma2_mix_28b_224": _p2("google/paligemma2-28b-mix-224", "pali_gemma2_28b_mix_224/3", _GEMMA2_27B, 224),
    "pali_gemma2_mix_28b_448": _p2("google/paligemma2-28b-mix-448", "pali_gemma2_28b_mix_448/3", _GEMMA2_27B, 448),
    "pali_gemma2_pt_3b_224": _p2("google/paligemma2-3b-pt-224", "pali_gemma2_pt_3b_224/2", _GEMMA2_2B, 224),
    "pali_gemma2_pt_3b_448": _p2("google/paligemma2-3b-pt-448", "pali_gemma2_pt_3b_448/2", _GEMMA2_2B, 448),
    "pali_gemma2_pt_3b_896": _p2("google/paligemma2-3b-pt-896", "pali_gemma2_pt_3b_896/2", _GEMMA2_2B, 896),
    "pali_gemma2_pt_10b_224": _p2("google/paligemma2-10b-pt-224", "pali_gemma2_pt_10b_224/3", _GEMMA2_9B, 224),
    "pali_gemma2_pt_10b_448": _p2("google/paligemma2-10b-pt-448", "pali_gemma2_pt_10b_448/3", _GEMMA2_9B, 448),
    "pali_gemma2_pt_10b_896": _p2("google/paligemma2-10b-pt-896", "pali_gemma2_pt_10b_896/3", _GEMMA2_9B, 896),
    "pali_gemma2_pt_28b_224": _p2("google/paligemma2-28b-pt-224", "pali_gemma2_pt_28b_224/4", _GEMMA2_27B, 224),
    "pali_gemma2_pt_28b_448": _p2("google/paligemma2-28b-pt-448", "pali_gemma2_pt_28b_448/3", _GEMMA2_27B, 448),
    "pali_gemma2_pt_28b_896": _p2("google/paligemma2-28b-pt-896", "pali_gemma2_pt_28b_896/3", _GEMMA2_27B, 896),
}


def pali_preset_names() -> list[str]:
    return sorted(PALI_PRESETS)


def pali_handle(preset) -> tuple[PaliPreset | None, object]:
    """(table entry or None, the handle `resolve_preset` takes: hf://repo for a preset name)."""
    entry = PALI_PRESETS.get(preset) if isinstance(preset, str) else None
    return entry, ("hf://" + entry.hf_repo if entry is not None else preset)
