"""`Gemma4CausalLM`: keras-hub 0.32's Gemma 4 text-generation task, on MLX.

    lm = mlx_gemma.Gemma4CausalLM.from_preset("gemma4_instruct_2b")
    lm.generate("<|turn>user\\nWhy is the sky blue?<turn|>\\n<|turn>model\\n", max_length=128)

keras-hub's preset names (`gemma4_2b`, `gemma4_instruct_2b`, `gemma4_4b`, ..., `gemma4_instruct_31b`:
presets.GEMMA4_PRESETS) load the same checkpoints from Hugging Face (`google/gemma-4-E2B`, ...);
`hf://org/repo`, `kaggle://...` and folders (MLX / HF, or a keras-hub `Gemma4Backbone` preset,
converted once by convert/keras_gemma4.py) work as for `GemmaCausalLM`, whose methods this task keeps:
`generate`, `generate_preprocess` / `generate_postprocess` (the preprocessor's), `score`, `predict`,
`fit`, `evaluate`, LoRA on the backbone.

As keras-hub's Gemma4CausalLMPreprocessor lays out a text prompt: `<bos>` + its SentencePiece ids
(control pieces such as `<|turn>` written in the text become their tokens), right-padded to
max_length, no `<eos>`.  Generation is keras-hub's loop on mlx_gemma's engine (causal_lm_generation.fill).

Stop ids, `"auto"`: `<eos>`, `<turn|>` and `<|tool_response>`, as Gemma 4's generation_config.json
(Google's release); keras-hub's Gemma4CausalLM stops at the first two only, so a model that opens a
tool response stops here where keras-hub would go on.

A multimodal checkpoint (a `gemma4` folder, as every Hugging Face Gemma 4 repository is, or a keras-hub
preset with a vision encoder) serves text through its language half; images and audio go through
`mlx_gemma.generate` (`--image` / `--audio`), not through this task yet.
"""

from __future__ import annotations

import os

from ..chat_template import GEMMA4_STOP_PIECES
from ..errors import MlxGemmaError, UnsupportedModelError
from ..models import gemma4_mm
from .backbone import GemmaBackbone
from .causal_lm import GemmaCausalLM
from .preprocessor import GemmaCausalLMPreprocessor


class Gemma4CausalLM(GemmaCausalLM):
    """GemmaCausalLM on a Gemma 4 text model (keras-hub's Gemma4CausalLM, text prompts)."""

    def __init__(self, backbone: GemmaBackbone, preprocessor: GemmaCausalLMPreprocessor | None = None):
        model = backbone.model
        if isinstance(model, gemma4_mm.Model):
            backbone = GemmaBackbone.from_model(model.text_model())  # a `gemma4` folder: its language half
        if backbone.model.args.model_type != "gemma4_text":
            raise UnsupportedModelError(None, f"Gemma4CausalLM needs a Gemma 4 model, got "
                                              f"{backbone.model.args.model_type!r}")
        super().__init__(backbone, preprocessor)

    @classmethod
    def from_preset(cls, preset: str | os.PathLike, load_weights: bool = True, **settings) -> Gemma4CausalLM:
        """A keras-hub Gemma 4 preset name, `hf://org/repo`, `kaggle://...`, or a folder; `settings`
        as GemmaCausalLM.from_preset's (`dtype`, `preprocessor`, `sequence_length`)."""
        if not load_weights:
            raise MlxGemmaError("Gemma4CausalLM.from_preset loads the weights: the Gemma 4 shapes are not recorded "
                                "for load_weights=False")
        return super().from_preset(preset, True, **settings)

    def _stop_ids(self, stop_token_ids) -> tuple[int, ...] | None:
        """"auto": `<eos>` and Gemma 4's turn / tool-response ends (see the module's text)."""
        if not (isinstance(stop_token_ids, str) and stop_token_ids == "auto" and self.preprocessor is not None):
            return super()._stop_ids(stop_token_ids)
        tok = self.preprocessor.tokenizer
        ends = (i for i in map(tok.piece_to_id, GEMMA4_STOP_PIECES) if i is not None)
        return tuple(dict.fromkeys([tok.end_token_id, *ends]))
