"""`GemmaCausalLM`: keras-hub's text-generation task on MLX.

    lm = mlx_gemma.GemmaCausalLM.from_preset("gemma2_instruct_2b_en")
    lm.compile(sampler="top_k")
    lm.generate("I want to say", max_length=30)

`generate` follows keras-hub 0.32 (`CausalLM.generate`): strings are packed by
the preprocessor to `max_length` (the preprocessor's `sequence_length` when not
given), prompt included; the output is the detokenized prompt + completion
(without it when `strip_prompt`); with `preprocessor=None` a dict of `token_ids`
/ `padding_mask` goes in and comes out.  The decode loop is mlx_gemma's own
(see causal_lm_generation.py).  It serves Gemma, Gemma 2 and Gemma 3 text models alike.

Stop ids: `"auto"` is the tokenizer's end token (<eos>), as keras-hub's
GemmaCausalLM, plus <end_of_turn> for instruction-tuned presets and Gemma 3 (as
keras-hub's Gemma3CausalLM); `None` generates to max_length; or a list of ids.
"""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np

from ..arguments import integer_arg
from ..errors import GenerationError, MlxGemmaError
from ..generate import looks_instruct
from ..loading import load_model
from ..score import score
from ..tokenizer import check_vocab_fits
from .backbone import GemmaBackbone, as_dtype
from .causal_lm_generation import check_packed, fill, output_mask, speculation_of, strip_prompt
from .preprocessor import GemmaCausalLMPreprocessor, as_texts
from .presets import keras_preprocessor_settings, preset_of, resolve_preset
from .samplers import get_sampler
from .tokenizer import GemmaTokenizer
from .causal_lm_data import row_batches
from .causal_lm_training import evaluate, fit

_FROM_PRESET = object()  # "build the preset's own preprocessor"


class GemmaCausalLM:
    """A GemmaBackbone and (optionally) a GemmaCausalLMPreprocessor; greedy until compiled otherwise."""

    def __init__(self, backbone: GemmaBackbone, preprocessor: GemmaCausalLMPreprocessor | None = None):
        if not isinstance(backbone, GemmaBackbone):
            raise MlxGemmaError(f"backbone must be a GemmaBackbone, got {type(backbone).__name__}")
        self.backbone = backbone
        self.preprocessor = preprocessor
        # Gemma 3 checkpoints end their turns with <end_of_turn> (keras-hub's Gemma3CausalLM
        # stops there too); from_preset also sets this for instruction-tuned presets.
        self.stop_on_end_of_turn = backbone.args.model_type not in ("gemma", "gemma2")
        self.compile()

    @classmethod
    def from_preset(cls, preset: str | os.PathLike, load_weights: bool = True, dtype=None,
                    preprocessor=_FROM_PRESET, sequence_length: int | None = None) -> GemmaCausalLM:
        """A preset name (`gemma2_2b_en`, ...), `hf://org/repo`, `kaggle://...`, or a local folder.

        `load_weights=False`: random weights of the preset's shape (only the tokenizer
        is fetched).  `dtype`: the weights' float type (default: as stored; float32
        for random weights).  `preprocessor=None` leaves it off (generate then takes
        and returns token-id dicts); `sequence_length` is the preprocessor's default
        max_length: a keras-hub preset folder's preprocessor.json says, else 1024 (keras-hub's default).
        """
        entry = preset_of(preset)
        folder = None
        if load_weights:
            folder = resolve_preset(preset)
            backbone = GemmaBackbone.from_model(load_model(folder, dtype=as_dtype(dtype)))
        else:
            backbone = GemmaBackbone.from_preset(preset, load_weights=False, dtype=dtype)
        if preprocessor is _FROM_PRESET:
            tokenizer = GemmaTokenizer.from_folder(folder) if folder is not None else GemmaTokenizer.from_preset(preset)
            check_vocab_fits(tokenizer, backbone.vocabulary_size, tokenizer.path)
            settings = {"sequence_length": 1024, **keras_preprocessor_settings(preset)}
            if sequence_length is not None:
                settings["sequence_length"] = sequence_length
            preprocessor = GemmaCausalLMPreprocessor(tokenizer, **settings)
        lm = cls(backbone, preprocessor)
        instruct = entry.instruct if entry is not None else looks_instruct(os.fspath(preset), folder)
        lm.stop_on_end_of_turn = lm.stop_on_end_of_turn or instruct
        return lm

    # ----- compile / generate ------------------------------------------------------------

    def compile(self, sampler="greedy", speculative: dict | None = None, **training_settings) -> None:
        """Choose generate()'s sampler: a name ("greedy", "top_k", "top_p", "random",
        "beam", "contrastive") or a sampler object (mlx_gemma.tasks.samplers or keras_hub.samplers).

        `speculative` (mlx_gemma's own; keras-hub has no speculative decoding): a dict of settings beside
        the sampler, as keras takes an optimizer or sampler by name and settings, not a second argument per
        knob: `{"prompt_lookup": N}` (n-grams of the prompt and text so far) or `{"draft_model": lm}` (a
        GemmaCausalLM, GemmaBackbone or MLX model with this vocabulary), with `"num_draft_tokens": k`
        (default 3).  generate() then checks up to k proposed tokens per forward pass, one prompt at a
        time; the output is the compiled sampler's exactly (greedy: the same tokens).  Greedy or a
        sampling sampler only (not beam / contrastive search).

        `optimizer` ("auto" = Adam, as keras-hub; "adamw", "sgd", "adafactor", or an
        `mlx.optimizers` optimizer), `learning_rate` (default 2e-5) and `weight_decay`
        are kept in `self.training_settings` for `fit`.
        """
        self.sampler = get_sampler(sampler)
        tokenizer = self.preprocessor.tokenizer if self.preprocessor is not None else None
        self.speculation = speculation_of(speculative, self.sampler, tokenizer)
        self.training_settings = training_settings

    @property
    def model(self):
        """The MLX model (for mlx_gemma.generate & co.)."""
        return self.backbone.model

    # ----- fit / evaluate / score / predict (causal_lm_training.py, causal_lm_data.py, mlx_gemma/score.py) ----

    def fit(self, x=None, y=None, batch_size: int = 2, epochs: int = 1, sample_weight=None, **kwargs):
        """keras' fit: strings (through the preprocessor) or {"token_ids", "padding_mask"} with y and
        sample_weight; trains the adapters after `backbone.enable_lora(rank)`, else every weight.

        Keywords: `validation_data` (as x: strings, a dict, or a tuple (x, y[, sample_weight])),
        `shuffle` (True: rows bucketed by length, batches in a random order each epoch; False:
        in order), `verbose`, `seed`, `grad_checkpoint`.  Each batch is cut to its longest row
        (no work on padding; the same loss and gradients).  Returns a History: `history["loss"]`
        and, with validation data, `history["val_loss"]`, per epoch.
        """
        return fit(self, x, y, batch_size, epochs, sample_weight, **kwargs)

    def evaluate(self, x=None, y=None, batch_size: int | None = None, sample_weight=None, verbose="auto"):
        """keras' evaluate: the loss over x (the sample-weighted mean next-token cross-entropy, as fit's),
        computed without gradients and without work on padding; batch_size None: 32, as keras."""
        return evaluate(self, x, y, batch_size, sample_weight, verbose)

    def score(self, token_ids, padding_mask=None, scoring_mode: str = "logits", layer_intercept_fn=None,
              target_ids=None, trim_padding: bool = True):
        """keras-hub's score: per-token logits [B, T, V] or losses [B, T] (see mlx_gemma.score).

        Real positions get keras-hub's values; with `trim_padding` (the default) the trailing
        columns that are padding in every row are not computed and come back as 0;
        `trim_padding=False` computes them as keras-hub does, at full cost.
        """
        return score(self.model, token_ids, padding_mask, scoring_mode, layer_intercept_fn, target_ids,
                     trim_padding=trim_padding)

    def predict(self, x, batch_size: int | None = None, verbose="auto", trim_padding: bool = True) -> np.ndarray:
        """keras' predict: the logits [N, sequence_length, vocab] (numpy) of strings, packed by the
        preprocessor as for fit, or of a {"token_ids", "padding_mask"} dict.

        As `score`: real positions are keras-hub's; with `trim_padding` the columns past
        a batch's longest row are not computed and come back as 0.  batch_size None: 32.
        """
        ids, mask = self._packed(x)
        batch_size = integer_arg("batch_size", 32 if batch_size is None else batch_size, 1)
        lengths = mask.sum(axis=1)
        out = None
        for rows in row_batches(lengths, batch_size, by_length=True):  # any order: rows go back in place
            logits = score(self.model, ids[rows], mask[rows], trim_padding=trim_padding)
            if out is None:
                out = np.zeros((len(ids), *logits.shape[1:]), np.float32)
            out[rows] = np.asarray(logits.astype(mx.float32))
        return out

    def _packed(self, x) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, padding mask) [N, T] of predict's input."""
        if isinstance(x, dict):
            if "token_ids" not in x:
                raise MlxGemmaError("predict(x=dict) needs 'token_ids' (and 'padding_mask')")
            ids = np.asarray(x["token_ids"])
            mask = np.asarray(x.get("padding_mask", np.ones(ids.shape, bool))).astype(bool)
            ids, mask = (ids[None], mask[None]) if ids.ndim == 1 else (ids, mask)
            if ids.ndim != 2 or mask.shape != ids.shape or ids.shape[0] == 0:
                raise MlxGemmaError(f"predict: token_ids {ids.shape} and padding_mask {mask.shape} must both be "
                                    "[batch, tokens], batch > 0")
            return ids, mask
        if self.preprocessor is None:
            raise MlxGemmaError("predict() on strings needs a preprocessor; without one pass "
                                "x={'token_ids', 'padding_mask'}")
        inputs = self.preprocessor(as_texts(x)[0])[0]  # keras' predict keeps x of (x, y, sample_weight)
        if len(inputs["token_ids"]) == 0:
            raise MlxGemmaError("predict() got an empty list of strings")
        return inputs["token_ids"], inputs["padding_mask"]

    def _stop_ids(self, stop_token_ids) -> tuple[int, ...] | None:
        if stop_token_ids is None:
            return None
        if isinstance(stop_token_ids, str):
            if stop_token_ids != "auto":
                raise GenerationError(f"stop_token_ids must be 'auto', None or a list of ids, got {stop_token_ids!r}")
            if self.preprocessor is None:
                raise GenerationError(
                    "stop_token_ids='auto' needs a preprocessor (its tokenizer's end token); with preprocessor=None "
                    "pass stop_token_ids=None to generate up to the padded length, or a list of ids")
            tok = self.preprocessor.tokenizer
            ids = [tok.end_token_id]
            if self.stop_on_end_of_turn and tok.end_of_turn_id is not None:
                ids.append(tok.end_of_turn_id)
            return tuple(ids)
        try:
            ids = tuple(int(i) for i in np.asarray(stop_token_ids).reshape(-1))
        except (TypeError, ValueError):
            raise GenerationError(f"stop_token_ids must be 'auto', None or a list of ids, got {stop_token_ids!r}")
        vocab = self.backbone.vocabulary_size
        if any(not 0 <= i < vocab for i in ids):
            raise GenerationError(f"stop_token_ids {list(ids)} must be ids in 0..{vocab - 1}")
        return ids

    def generate(self, inputs, max_length: int | None = None, stop_token_ids="auto", strip_prompt: bool = False):
        """Generate from a string, a list of strings, or (preprocessor=None) a token-id dict.

        Returns the same form: a string, a list of strings, or a dict of numpy
        `token_ids` / `padding_mask`.  max_length counts the prompt (keras-hub);
        with preprocessor=None the dict's own length is used and max_length ignored.
        """
        stops = self._stop_ids(stop_token_ids)
        if self.preprocessor is None:
            if not isinstance(inputs, dict) or "token_ids" not in inputs or "padding_mask" not in inputs:
                raise GenerationError("without a preprocessor, generate() takes a dict of 'token_ids' and "
                                      "'padding_mask' arrays")
            ids = np.asarray(inputs["token_ids"])
            single = ids.ndim == 1
            mask = np.asarray(inputs["padding_mask"])
            out = self._generate_packed(ids[None] if single else ids, mask[None] if single else mask, stops,
                                        strip_prompt)
            return {k: v[0] for k, v in out.items()} if single else out
        if isinstance(inputs, dict):
            raise GenerationError("with a preprocessor, generate() takes strings; set preprocessor=None "
                                  "(e.g. from_preset(..., preprocessor=None)) to pass token ids")
        texts, batched = as_texts(inputs)
        if not texts:
            raise GenerationError("generate() got an empty list of prompts")
        packed = self.preprocessor.generate_preprocess(texts, sequence_length=max_length)
        out = self._generate_packed(packed["token_ids"], packed["padding_mask"], stops, strip_prompt)
        result = self.preprocessor.generate_postprocess(out)
        return result if batched else result[0]

    def _generate_packed(self, token_ids, padding_mask, stops, strip: bool) -> dict:
        ids, prompt_mask, lengths = check_packed(token_ids, padding_mask, self.backbone.vocabulary_size)
        generated = fill(self.model, ids, lengths, self.sampler, stops, speculation=self.speculation)
        out = {"token_ids": generated, "padding_mask": output_mask(generated, prompt_mask, stops)}
        return strip_prompt(out, prompt_mask) if strip else out
