"""ShieldGemma 2 (`model_type: "shieldgemma2"`; transformers' ShieldGemma2ForImageClassification):
a Gemma 3 4B vision-language model whose config adds the ids of the "Yes" and "No" tokens.

The network is exactly `gemma3_vlm`'s; the classifier (the last position's Yes/No logits and
their softmax, per image and policy) is `mlx_gemma.shieldgemma2`.  This module only reads the
config as ShieldGemma2Config does and the weights under the classifier's extra `model.` level.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from ..arguments import is_integer
from ..errors import ConfigError
from . import gemma3_vlm

# ShieldGemma2ForImageClassification's fallbacks (getattr on the config): the ids of "Yes"
# and "No" in Gemma 3's vocabulary.
YES_TOKEN_INDEX, NO_TOKEN_INDEX = 10_784, 3_771
SAVED_5_25 = "model.language_model.model."  # after the classifier's `model.`: see Model.sanitize


@dataclass
class ModelArgs(gemma3_vlm.ModelArgs):
    model_type: str = "shieldgemma2"
    yes_token_index: int = YES_TOKEN_INDEX  # the logit read as "violates the policy"
    no_token_index: int = NO_TOKEN_INDEX  # and the one read as "does not"

    @classmethod
    def from_dict(cls, config: dict, path=None, where: str = "") -> "ModelArgs":
        if isinstance(config, dict) and isinstance(config.get("text_config"), dict):
            # ShieldGemma2Config: tie_word_embeddings defaults to False but is turned True whenever
            # text_config's is (Gemma3TextConfig's default True), so any True of the two ties.
            tie = config.get("tie_word_embeddings") is True or config["text_config"].get("tie_word_embeddings", True)
            config = {**config, "tie_word_embeddings": bool(tie)}
        args = super().from_dict(config, path, where)
        for name in ("yes_token_index", "no_token_index"):
            v = getattr(args, name)
            if not is_integer(v) or not 0 <= v < args.text.vocab_size:
                raise ConfigError(path, f"{name} must be a token id below vocab_size {args.text.vocab_size}, "
                                        f"got {v!r:.80}")
        return args


class Model(gemma3_vlm.Model):
    """Gemma 3 with images, from a ShieldGemma 2 checkpoint (generation works as for Gemma 3)."""

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        # The classifier wraps Gemma3ForConditionalGeneration as `model`: every HF key carries one
        # more `model.` (the hub's 4.50 layout model.language_model.model.*, model.vision_tower.*).
        # Without it, each layout (ours included: model.language_model.* becomes language_model.*)
        # is one that image_text.canonical_key maps back, except transformers 5.25's own
        # save_pretrained, which writes model.model.language_model.model.*.
        out = {}
        for key, value in weights.items():
            key = key.removeprefix("model.")
            if key.startswith(SAVED_5_25):
                key = "model.language_model." + key[len(SAVED_5_25):]
            out[key] = value
        return super().sanitize(out)
