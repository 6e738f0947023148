"""`Gemma3CausalLM`: keras-hub 0.32's Gemma 3 task with images, on MLX.

    lm = mlx_gemma.Gemma3CausalLM.from_preset("gemma3_instruct_4b")
    lm.generate({"prompts": "What is in <start_of_image>?", "images": image}, max_length=300)
    lm.generate({"prompts": ["<start_of_image> vs <start_of_image>", "Hi"], "images": [[a, b], []]})

As keras-hub's Gemma3CausalLMPreprocessor: each `<start_of_image>` in a prompt becomes
`"\\n\\n<start_of_image>"`, the image's `num_vision_tokens_per_image` placeholders and
`"<end_of_image>\\n\\n"`, and the whole prompt is tokenized and packed `<bos>` + ids,
right-padded to max_length (the image tokens count; no <eos>).  A prompt takes up to
`max_images_per_prompt` images, one per marker (a prompt without markers takes none: keras-hub
does not move images into a prompt).  The output is the detokenized prompt + completion with
keras-hub's special tokens dropped, `<start_of_image>` kept (its generate_postprocess).  With
`preprocessor=None`, {"token_ids", "padding_mask", "images" [B, max_images, S, S, 3]} goes in
(pixels as the tower takes them, [-1, 1]; a row's first k images go with its k image blocks)
and the dict comes back, generated, with the images.

Generation is keras-hub's loop on mlx_gemma's engine (causal_lm_generation.fill, the pixels
given to its prefill).  Beyond keras-hub: images may be paths or PIL images; they are resized
as transformers' Gemma3ImageProcessor does (Pillow bilinear), so the pixels equal its processor's.
Strings without images go through GemmaCausalLM's path, on the same multimodal model.
"""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np

from ..errors import ImageError, MlxGemmaError
from ..image_chat import image_spans
from ..loading import load_model
from ..tokenizer import check_vocab_fits
from ..vision import preprocess_image
from .backbone import GemmaBackbone, as_dtype
from .causal_lm import GemmaCausalLM
from .causal_lm_generation import check_packed, fill, output_mask, strip_prompt
from .preprocessor import GemmaCausalLMPreprocessor, as_texts
from .presets import keras_preprocessor_settings, preset_of, resolve_preset
from .tokenizer import GemmaTokenizer

# keras-hub 0.32's Gemma 3 presets with a vision encoder -> their Hugging Face checkpoints
# (the text-only `*_text` presets and MedGemma are in presets.PRESETS).
VISION_PRESETS = {
    "gemma3_4b": ("google/gemma-3-4b-pt", False), "gemma3_instruct_4b": ("google/gemma-3-4b-it", True),
    "gemma3_12b": ("google/gemma-3-12b-pt", False), "gemma3_instruct_12b": ("google/gemma-3-12b-it", True),
    "gemma3_27b": ("google/gemma-3-27b-pt", False), "gemma3_instruct_27b": ("google/gemma-3-27b-it", True),
}
_FROM_PRESET = object()


class Gemma3CausalLMPreprocessor(GemmaCausalLMPreprocessor):
    """keras-hub's Gemma3CausalLMPreprocessor for generation: {"prompts", "images"} -> packed
    {"token_ids", "padding_mask", "images" [B, max_images, S, S, 3]} (see the module's text)."""

    def __init__(self, tokenizer, image_input=None, sequence_length: int = 1024, add_start_token: bool = True,
                 add_end_token: bool = True, max_images_per_prompt: int = 2):
        super().__init__(tokenizer, sequence_length, add_start_token, add_end_token)
        self.image_input = image_input  # models.base.ImageInput; None: a text-only preprocessor
        self.max_images_per_prompt = max_images_per_prompt
        if image_input is not None and self.sequence_length <= max_images_per_prompt * image_input.num_tokens:
            raise MlxGemmaError("sequence_length must be greater than max_images_per_prompt * "
                                f"num_vision_tokens_per_image ({max_images_per_prompt * image_input.num_tokens}), "
                                f"as keras-hub requires; got {self.sequence_length}")

    def _row(self, prompt: str, n_images: int, length: int) -> list[int]:
        spec, tok = self.image_input, self.tokenizer
        marker = tok.id_to_piece(spec.start_id)
        parts = prompt.split(marker)
        if len(parts) - 1 != n_images:
            raise ImageError("images", f"the prompt holds {len(parts) - 1} {marker} markers for {n_images} image(s); "
                                       "keras-hub places one image at each marker")
        ids = [tok.start_token_id]
        for i, text in enumerate(parts):  # keras-hub's regex replacement, tokenized with the pieces it adds
            text = ("\n\n" if i else "") + text + ("\n\n" if i < n_images else "")
            ids += tok.encode(text, add_bos=False, parse_special=True)
            if i < n_images:
                ids += [spec.start_id] + [spec.token_id] * spec.num_tokens + [spec.end_id]
        if len(ids) > length and spec.token_id in ids[length - 1: length + 1]:
            raise ImageError("images", f"max_length {length} cuts an image's tokens; give a longer max_length")
        return ids[:length]

    def generate_preprocess(self, x, sequence_length: int | None = None) -> dict:
        if not isinstance(x, dict) or "prompts" not in x:
            return super().generate_preprocess(x, sequence_length)
        texts, batched = as_texts(x["prompts"])
        if x.get("images") is None or self.image_input is None:
            if x.get("images") is not None:
                raise ImageError("images", "this preprocessor is text-only (the model has no vision encoder)")
            return super().generate_preprocess(x["prompts"], sequence_length)
        per_prompt = _images_per_prompt(x["images"], len(texts), batched)
        length = sequence_length or self.sequence_length
        token_ids = np.full((len(texts), length), self.tokenizer.pad_token_id, dtype=np.int32)
        padding_mask = np.zeros((len(texts), length), dtype=bool)
        for b, (text, images) in enumerate(zip(texts, per_prompt)):
            if len(images) > self.max_images_per_prompt:
                raise ImageError("images", f"prompt {b} has {len(images)} images; max_images_per_prompt is "
                                           f"{self.max_images_per_prompt}")
            row = self._row(text, len(images), length)
            token_ids[b, :len(row)], padding_mask[b, :len(row)] = row, True
        size = self.image_input.image_size
        pixels = np.zeros((len(texts), self.max_images_per_prompt, size, size, 3), np.float32)  # keras-hub's padding
        for b, images in enumerate(per_prompt):
            for i, image in enumerate(images):  # bilinear: Gemma3ImageProcessor's resample
                pixels[b, i] = preprocess_image(image, size, "bilinear", name=f"images[{b}][{i}]")
        out = {"token_ids": token_ids, "padding_mask": padding_mask, "images": pixels}
        return out if batched else {k: v[0] for k, v in out.items()}

    def generate_postprocess(self, x: dict):
        """As GemmaCausalLMPreprocessor's, also dropping the image placeholders and `<end_of_image>`
        (keras-hub strips its special tokens but `<start_of_image>`)."""
        if self.image_input is None or not isinstance(x, dict) or "token_ids" not in x:
            return super().generate_postprocess(x)
        ids = np.asarray(x["token_ids"])
        keep = np.asarray(x["padding_mask"]).astype(bool) & ~np.isin(
            ids, [self.image_input.token_id, self.image_input.end_id])
        return super().generate_postprocess({"token_ids": ids, "padding_mask": keep})


def _images_per_prompt(images, n_prompts: int, batched: bool) -> list[list]:
    """keras-hub's forms: one image or a list of images for one prompt; for a batch, one image or
    a list of images per prompt."""
    if not batched:
        return [list(images) if isinstance(images, (list, tuple)) else
                list(images) if isinstance(images, np.ndarray) and images.ndim == 4 else [images]]
    if isinstance(images, np.ndarray) and images.ndim >= 4:
        images = list(images)
    if not isinstance(images, (list, tuple)) or len(images) != n_prompts:
        raise ImageError("images", f"give one entry (an image or a list of images) per prompt, {n_prompts} in all")
    return [list(im) if isinstance(im, (list, tuple)) or (isinstance(im, np.ndarray) and im.ndim == 4) else [im]
            for im in images]


class Gemma3CausalLM(GemmaCausalLM):
    """GemmaCausalLM on a Gemma 3 model that may take images (keras-hub's Gemma3CausalLM)."""

    def __init__(self, backbone: GemmaBackbone, preprocessor: GemmaCausalLMPreprocessor | None = None, vlm=None):
        super().__init__(backbone, preprocessor)
        self.vlm = vlm  # the whole vision-language model (the backbone holds its language half)
        self.stop_on_end_of_turn = True  # keras-hub's Gemma3CausalLM stops at <end_of_turn> too

    @property
    def model(self):
        return self.vlm if self.vlm is not None else self.backbone.model

    @classmethod
    def from_preset(cls, preset: str | os.PathLike, load_weights: bool = True, dtype=None,
                    preprocessor=_FROM_PRESET, sequence_length: int | None = None,
                    max_images_per_prompt: int = 2) -> Gemma3CausalLM:
        """A keras-hub Gemma 3 preset name (`gemma3_instruct_4b`, ..., text-only ones too),
        `hf://org/repo`, `kaggle://...`, or a folder; weights are always loaded."""
        if not load_weights:
            raise MlxGemmaError("Gemma3CausalLM.from_preset loads the weights (load_weights=False is "
                                "GemmaCausalLM's, for the text presets)")
        handle = f"hf://{VISION_PRESETS[preset][0]}" if preset in VISION_PRESETS and preset_of(preset) is None else preset
        folder = resolve_preset(handle)
        model = load_model(folder, dtype=as_dtype(dtype))
        vlm = model if model.image_input is not None and model.image_input.start_id is not None else None
        backbone = GemmaBackbone.from_model(model)
        if preprocessor is _FROM_PRESET:
            tokenizer = GemmaTokenizer.from_folder(folder)
            check_vocab_fits(tokenizer, backbone.vocabulary_size, tokenizer.path)
            settings = {"sequence_length": 1024, **keras_preprocessor_settings(preset)}
            if sequence_length is not None:
                settings["sequence_length"] = sequence_length
            preprocessor = Gemma3CausalLMPreprocessor(tokenizer, None if vlm is None else vlm.image_input,
                                                      max_images_per_prompt=max_images_per_prompt, **settings)
        return cls(backbone, preprocessor, vlm)

    def generate(self, inputs, max_length: int | None = None, stop_token_ids="auto", strip_prompt: bool = False):
        """Strings, {"prompts", "images"}, or (preprocessor=None) {"token_ids", "padding_mask"[, "images"]};
        returns the same form (see the module's text)."""
        with_images = isinstance(inputs, dict) and inputs.get("images") is not None
        if self.preprocessor is not None and isinstance(inputs, dict) and "prompts" in inputs:
            if not with_images:
                return super().generate(inputs["prompts"], max_length, stop_token_ids, strip_prompt)
            stops = self._stop_ids(stop_token_ids)
            packed = self.preprocessor.generate_preprocess(inputs, sequence_length=max_length)
            single = packed["token_ids"].ndim == 1
            batch = {k: v[None] for k, v in packed.items()} if single else packed
            out = self._generate_images(batch, stops, strip_prompt)
            texts = self.preprocessor.generate_postprocess(out)
            return texts[0] if single else texts
        if self.preprocessor is None and with_images:
            ids = np.asarray(inputs["token_ids"])
            single = ids.ndim == 1
            batch = {k: np.asarray(inputs[k])[None] if single else np.asarray(inputs[k])
                     for k in ("token_ids", "padding_mask", "images")}
            out = {**self._generate_images(batch, self._stop_ids(stop_token_ids), strip_prompt),
                   "images": batch["images"]}
            return {k: v[0] for k, v in out.items()} if single else out
        return super().generate(inputs, max_length, stop_token_ids, strip_prompt)

    def _generate_images(self, batch: dict, stops, strip: bool) -> dict:
        if self.vlm is None:
            raise ImageError("images", "this Gemma 3 model has no vision encoder; give text only")
        ids, prompt_mask, lengths = check_packed(batch["token_ids"], batch["padding_mask"], self.backbone.vocabulary_size)
        spec = self.vlm.image_input
        pixels = np.asarray(batch["images"], dtype=np.float32)
        if pixels.ndim != 5 or pixels.shape[0] != ids.shape[0] or pixels.shape[2:] != (spec.image_size,) * 2 + (3,):
            raise ImageError("images", f"images must be [batch, max_images, {spec.image_size}, {spec.image_size}, 3] "
                                       f"pixels for token_ids of batch {ids.shape[0]}; got {pixels.shape}")
        rows = []  # each row's images: its first k for its k image blocks (keras-hub's vision_indices)
        for b in range(ids.shape[0]):
            blocks = len(image_spans(ids[b][prompt_mask[b]].tolist(), spec.token_id))
            if blocks > pixels.shape[1]:
                raise ImageError("images", f"row {b} holds {blocks} images' tokens but {pixels.shape[1]} images")
            rows.append(mx.array(pixels[b, :blocks]) if blocks else None)
        generated = fill(self.model, ids, lengths, self.sampler, stops, images=rows, speculation=self.speculation)
        out = {"token_ids": generated, "padding_mask": output_mask(generated, prompt_mask, stops)}
        return strip_prompt(out, prompt_mask) if strip else out
