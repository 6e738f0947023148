"""`PaliGemmaCausalLM`: keras-hub's image + text generation task on MLX.

    lm = mlx_gemma.PaliGemmaCausalLM.from_preset("pali_gemma_3b_mix_224")
    lm.generate({"images": image, "prompts": "answer en where is the cow standing?\\n"})
    lm.generate({"images": [image, image], "prompts": ["answer en where is the cow standing?\\n", "caption en\\n"]})

As keras-hub 0.32: the preprocessor packs `<bos> prompt` (the prompt's own "\\n"
included, as keras-hub's examples type it) right-padded to max_length text tokens
(the image's tokens come on top), generation follows keras-hub's loop
(pali_gemma_generation.py), and the output is the detokenized prompt + answer
(the answer alone with strip_prompt).  With `preprocessor=None`, `images` (pixels
as the vision tower takes them: [-1, 1], the model's size) + `token_ids` +
`padding_mask` go in, and the dict comes back with the images.

Beyond keras-hub: the prompts' key may also be `"text"`; images may be PIL images
or file paths; arrays of another size are resized (bicubic, as transformers'
processor; keras-hub resizes bilinearly); float arrays in [0, 1] are read as
[0, 1] (keras-hub's converter maps every array as [0, 255], so the seed's
`np.random.rand(224, 224, 3)` is a near-black image there); one image (not in a
list) serves every prompt.
"""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np

from ..arguments import integer_arg
from ..assistant_proposer import is_assistant
from ..errors import GenerationError, ImageError, MlxGemmaError
from ..models.base import GemmaModel
from ..proposers import Speculation
from ..tokenizer import check_vocab_fits
from ..vision import preprocess_image
from .causal_lm import GemmaCausalLM
from .causal_lm_generation import check_packed, output_mask, speculation_of, strip_prompt
from .pali_gemma_backbone import PaliGemmaBackbone
from .pali_gemma_generation import fill_pali
from .pali_gemma_presets import pali_handle
from .preprocessor import GemmaCausalLMPreprocessor, as_texts
from .presets import keras_preprocessor_settings, resolve_preset, tokenizer_file
from .samplers import get_sampler
from .tokenizer import GemmaTokenizer

_FROM_PRESET = object()  # "build the preset's own preprocessor"


class PaliGemmaTokenizer(GemmaTokenizer):
    """keras-hub's PaliGemmaTokenizer: Gemma's SentencePiece tokenizer under PaliGemma's name."""


def _prompts_of(x: dict) -> tuple[list[str], bool]:
    keys = [k for k in ("prompts", "text") if k in x]
    if len(keys) != 1:
        raise GenerationError("PaliGemma inputs need the prompts under one key, 'prompts' (keras-hub) or 'text'")
    try:
        return as_texts(x[keys[0]])
    except MlxGemmaError:
        raise GenerationError(f"inputs[{keys[0]!r}] must be a string or a list of strings") from None


def _image_list(images, n_prompts: int) -> list:
    """One image per prompt: a list (or a 4-D array), or one image for every prompt."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    if not isinstance(images, (list, tuple)):
        return [images] * n_prompts
    if len(images) != n_prompts:
        raise ImageError("images", f"{len(images)} images for {n_prompts} prompts; give one image per prompt "
                                   "(or a single image, not in a list, for all of them)")
    return list(images)


class PaliGemmaCausalLMPreprocessor(GemmaCausalLMPreprocessor):
    """keras-hub's PaliGemmaCausalLMPreprocessor for generation: {"images", "prompts"} -> packed
    {"images" [B, S, S, 3] in [-1, 1], "token_ids", "padding_mask"} (<bos> + prompt, no <eos>)."""

    def __init__(self, tokenizer, image_size: int = 224, sequence_length: int = 1024, add_start_token: bool = True,
                 add_end_token: bool = True, resample: str = "bicubic"):
        super().__init__(tokenizer, sequence_length, add_start_token, add_end_token)
        self.image_size = integer_arg("image_size", image_size, 1)
        self.resample = resample

    @classmethod
    def from_preset(cls, preset: str | os.PathLike, **kwargs) -> PaliGemmaCausalLMPreprocessor:
        """The preset's tokenizer, image size and sequence length (keyword arguments override them)."""
        entry, handle = pali_handle(preset)
        tokenizer = PaliGemmaTokenizer.from_preset(handle)
        if entry is not None:
            settings = {"image_size": entry.image_size, "sequence_length": entry.sequence_length}
        else:  # the shape alone: random weights, never evaluated
            settings = {"image_size": PaliGemmaBackbone.from_preset(preset, load_weights=False).image_size}
        return cls(tokenizer, **{**settings, **kwargs})

    def __call__(self, x, y=None, sample_weight=None, sequence_length=None):
        raise MlxGemmaError("PaliGemma training data ({image, prefix, suffix}) goes through mlx_gemma.tuner.datasets "
                            "and `python -m mlx_gemma.lora`; this preprocessor prepares generation only")

    def images(self, images) -> np.ndarray:
        """Images -> float32 [N, S, S, 3] in [-1, 1]."""
        return pixels_of(images, self.image_size, self.resample)

    def generate_preprocess(self, x, sequence_length: int | None = None) -> dict:
        if not isinstance(x, dict) or "images" not in x:
            raise GenerationError("PaliGemma generate() takes a dict: {'images': ..., 'prompts': ...}")
        texts, batched = _prompts_of(x)
        if not texts:
            raise GenerationError("generate() got an empty list of prompts")
        packed = super().generate_preprocess(texts if batched else texts[0], sequence_length)
        pixels = self.images(_image_list(x["images"], len(texts)))
        return {"images": pixels if batched else pixels[0], **packed}  # one prompt string: unbatched, as keras-hub


def pixels_of(images: list, size: int, resample: str = "bicubic") -> np.ndarray:
    """Images -> float32 [N, size, size, 3] in [-1, 1] (see mlx_gemma.vision.preprocess_image)."""
    return np.stack([preprocess_image(im, size, resample, name=f"images[{i}]") for i, im in enumerate(images)])


def raw_pixels(images, image_size: int) -> np.ndarray:
    """The dict form's images: arrays are pixels as they are (keras-hub: no preprocessing),
    [S, S, 3] or [B, S, S, 3]; PIL images and paths are preprocessed."""
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = images[None]
    if isinstance(images, (list, tuple)) and not all(isinstance(im, np.ndarray) for im in images):
        return pixels_of(images, image_size)
    if not isinstance(images, (np.ndarray, list, tuple)):
        return pixels_of([images], image_size)
    try:
        pixels = np.asarray(images, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ImageError("images", f"not an array of pixels: {e}") from None
    if pixels.ndim != 4 or pixels.shape[1:] != (image_size, image_size, 3):
        raise ImageError("images", f"with preprocessor=None, images are pixels [batch, {image_size}, {image_size}, 3] "
                                   f"in [-1, 1], got shape {pixels.shape}")
    if not np.isfinite(pixels).all():
        raise ImageError("images", "pixel values hold NaN or infinity")
    return pixels


_PALI_DRAFT = ("a PaliGemma draft would have to see the image, which the draft proposer does not feed it: "
               "give a text Gemma with PaliGemma's vocabulary as draft_model, or prompt_lookup")


class PaliGemmaCausalLM:
    """A PaliGemmaBackbone and (optionally) a PaliGemmaCausalLMPreprocessor; greedy until compiled otherwise."""

    stop_on_end_of_turn = False  # PaliGemma answers end with <eos>, as keras-hub's stop id
    _stop_ids = GemmaCausalLM._stop_ids  # the same "auto" / None / ids rules

    def __init__(self, backbone: PaliGemmaBackbone, preprocessor: PaliGemmaCausalLMPreprocessor | None = None):
        if not isinstance(backbone, PaliGemmaBackbone):
            raise MlxGemmaError(f"backbone must be a PaliGemmaBackbone, got {type(backbone).__name__}")
        if preprocessor is not None and not isinstance(preprocessor, PaliGemmaCausalLMPreprocessor):
            raise MlxGemmaError(f"preprocessor must be a PaliGemmaCausalLMPreprocessor or None, "
                                f"got {type(preprocessor).__name__}")
        self.backbone = backbone
        self.preprocessor = preprocessor
        self.compile()

    @classmethod
    def from_preset(cls, preset: str | os.PathLike, load_weights: bool = True, dtype=None,
                    preprocessor=_FROM_PRESET, sequence_length: int | None = None) -> PaliGemmaCausalLM:
        """A preset name (`pali_gemma_3b_mix_224`, `pali_gemma2_mix_3b_448`, ...), `hf://org/repo`,
        `kaggle://...`, or a folder (Hugging Face / MLX, or a keras-hub preset, converted once).

        `load_weights=False`: random weights of the preset's shape (only the tokenizer is
        fetched).  `preprocessor=None` leaves it off; `sequence_length` is the
        preprocessor's default max_length (text tokens): the preset's, else 1024 as keras-hub.
        """
        entry, handle = pali_handle(preset)
        folder = resolve_preset(handle) if load_weights else None
        backbone = PaliGemmaBackbone.from_preset(folder if load_weights else preset, load_weights, dtype)
        if preprocessor is _FROM_PRESET:
            path = folder if folder is not None else tokenizer_file(os.fspath(handle))
            tokenizer = PaliGemmaTokenizer.from_folder(path) if path.is_dir() else PaliGemmaTokenizer.from_file(path)
            check_vocab_fits(tokenizer, backbone.vocabulary_size, tokenizer.path)
            settings = {"sequence_length": entry.sequence_length if entry is not None else 1024,
                        **keras_preprocessor_settings(handle)}
            if sequence_length is not None:
                settings["sequence_length"] = sequence_length
            preprocessor = PaliGemmaCausalLMPreprocessor(tokenizer, backbone.image_size, **settings)
        return cls(backbone, preprocessor)

    def compile(self, sampler="greedy", speculative: dict | None = None, **training_settings) -> None:
        """Choose generate()'s sampler: "greedy", "top_k", "top_p", "random" or a sampler object.

        `speculative` (mlx_gemma's own, as GemmaCausalLM.compile's): `{"prompt_lookup": N}` or
        `{"draft_model": d}` with `"num_draft_tokens": k` (default 3).  A draft here is a text Gemma
        with PaliGemma's vocabulary (a GemmaCausalLM, GemmaBackbone or MLX model): it reads the
        image's positions as `<image>` tokens, never the pixels, which costs acceptance, not
        exactness.  A PaliGemma draft would need the image fed to it, which the draft proposer does
        not do, and a Gemma 4 assistant reads a Gemma 4 target's states: both are refused.  Each row
        is then decoded alone, to keras-hub's ids under greedy (pali_gemma_generation.py).
        """
        if training_settings:
            raise MlxGemmaError(f"PaliGemmaCausalLM has no fit() here, so compile() takes only a sampler and "
                                f"speculative (got {sorted(training_settings)}); fine-tune with `python -m mlx_gemma.lora`")
        sampler = get_sampler(sampler)
        tokenizer = self.preprocessor.tokenizer if self.preprocessor is not None else None
        draft = speculative.get("draft_model") if isinstance(speculative, dict) else None
        if isinstance(draft, (PaliGemmaCausalLM, PaliGemmaBackbone)):
            raise GenerationError(_PALI_DRAFT)
        speculation = speculation_of(speculative, sampler, tokenizer)
        if speculation is not None and speculation.draft_model is not None:
            self._check_draft(speculation)
        self.sampler, self.speculation = sampler, speculation

    def _check_draft(self, speculation: Speculation) -> None:
        draft = speculation.draft_model
        model = draft[0] if isinstance(draft, tuple) else draft
        if not isinstance(model, GemmaModel):
            raise GenerationError(f"compile(speculative=...)'s draft_model must be a GemmaCausalLM, GemmaBackbone, "
                                  f"MLX Gemma model or folder, got {type(model).__name__}")
        if model.prefix_lm:
            raise GenerationError(_PALI_DRAFT)
        if is_assistant(model):
            raise GenerationError("a Gemma 4 assistant drafter reads a Gemma 4 target's states; it cannot draft "
                                  "for PaliGemma: give a text Gemma with PaliGemma's vocabulary, or prompt_lookup")
        image_id = self.model.args.image_token_index
        if model.args.vocab_size <= image_id:
            raise GenerationError(f"the draft model has {model.args.vocab_size} vocabulary rows, fewer than "
                                  f"PaliGemma's (the <image> token is id {image_id}): a draft must share the "
                                  "target's vocabulary")

    @property
    def model(self):
        """The MLX PaliGemma model (for mlx_gemma.generate & co.)."""
        return self.backbone.model

    def generate(self, inputs: dict, max_length: int | None = None, stop_token_ids="auto",
                 strip_prompt: bool = False):
        """{"images", "prompts"} -> the prompt + answer text (a string for one prompt string, else a
        list); with preprocessor=None, {"images", "token_ids", "padding_mask"} -> that dict, generated.
        max_length counts the text tokens, prompt included (keras-hub)."""
        stops = self._stop_ids(stop_token_ids)
        if not isinstance(inputs, dict):
            raise GenerationError("PaliGemma generate() takes a dict: {'images', 'prompts'}, or with "
                                  "preprocessor=None {'images', 'token_ids', 'padding_mask'}")
        if self.preprocessor is None:
            missing = [k for k in ("images", "token_ids", "padding_mask") if k not in inputs]
            if missing:
                raise GenerationError(f"without a preprocessor, generate() takes 'images', 'token_ids' and "
                                      f"'padding_mask'; missing {missing}")
            ids, mask = np.asarray(inputs["token_ids"]), np.asarray(inputs["padding_mask"])
            pixels = raw_pixels(inputs["images"], self.backbone.image_size)
            out = self._generate_packed(ids, mask, pixels, stops, strip_prompt)
            return out if strip_prompt else {**out, "images": pixels}
        packed = self.preprocessor.generate_preprocess(inputs, sequence_length=max_length)
        ids, mask = packed["token_ids"], packed["padding_mask"]
        single = ids.ndim == 1
        pixels = packed["images"][None] if single else packed["images"]
        out = self._generate_packed(ids[None] if single else ids, mask[None] if single else mask, pixels, stops,
                                    strip_prompt)
        texts = self.preprocessor.generate_postprocess(out)
        return texts[0] if single else texts

    def _generate_packed(self, token_ids, padding_mask, pixels: np.ndarray, stops, strip: bool) -> dict:
        ids, prompt_mask, lengths = check_packed(token_ids, padding_mask, self.backbone.vocabulary_size)
        if pixels.shape[0] != ids.shape[0]:
            raise ImageError("images", f"{pixels.shape[0]} images for {ids.shape[0]} rows of token_ids; "
                                       "give one image per row")
        generated = fill_pali(self.model, ids, lengths, mx.array(pixels), self.sampler, stops, self.speculation)
        out = {"token_ids": generated, "padding_mask": output_mask(generated, prompt_mask, stops)}
        return strip_prompt(out, prompt_mask) if strip else out
