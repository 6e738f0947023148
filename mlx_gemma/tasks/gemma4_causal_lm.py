"""`Gemma4CausalLM`: keras-hub 0.32's Gemma 4 text-generation task, with images and audio, on MLX.

    lm = mlx_gemma.Gemma4CausalLM.from_preset("gemma4_instruct_2b")
    lm.generate("<|turn>user\\nWhy is the sky blue?<turn|>\\n<|turn>model\\n", max_length=128)
    lm.generate({"prompts": "Describe <|image|>", "images": image}, max_length=400)
    lm.generate({"prompts": ["<|audio|> Transcribe.", "<|image|> vs <|image|>"], "images": [[], [a, b]],
                 "audio": [clip, None]})

keras-hub's preset names (`gemma4_2b`, `gemma4_instruct_2b`, `gemma4_4b`, ..., `gemma4_instruct_31b`:
presets.GEMMA4_PRESETS) load the same checkpoints from Hugging Face (`google/gemma-4-E2B`, ...);
`hf://org/repo`, `kaggle://...` and folders (MLX / HF, or a keras-hub `Gemma4Backbone` preset,
converted once by convert/keras_gemma4.py) work as for `GemmaCausalLM`, whose methods this task keeps:
`generate`, `generate_preprocess` / `generate_postprocess` (the preprocessor's), `score`, `predict`,
`fit`, `evaluate`, LoRA on the backbone.  Text goes through the language half of a multimodal model.

As keras-hub's Gemma4CausalLMPreprocessor lays out a text prompt: `<bos>` + its SentencePiece ids
(control pieces such as `<|turn>` written in the text become their tokens), right-padded to
max_length, no `<eos>`.  Generation is keras-hub's loop on mlx_gemma's engine (causal_lm_generation.fill).

Images and audio (a model with its towers) come as keras-hub takes them: {"prompts", "images", "audio"},
each `<|image|>` / `<|audio|>` of a prompt taking the prompt's next image / clip (a prompt without
markers takes none; at most `max_images_per_prompt` / `max_audio_clips_per_prompt`), and the output is
the text with keras-hub's special tokens dropped (`<|image>` kept).  With `preprocessor=None`, the
packed dict goes in and comes back: "token_ids", "padding_mask" and keras-hub's "pixel_values"
[B, max_images, patches, 3 p^2] / "pixel_position_ids" [B, max_images, patches, 2] and "audio_mel"
[B, max_clips, frames, mels] / "audio_mel_mask" [B, max_clips, frames]; a row's first k images (clips)
go with its k image (audio) blocks, as keras-hub's vision_indices place them.  Where keras-hub's
preprocessor differs from transformers' Gemma4Processor (Google's release) we follow the processor:
each image's block holds its own number of soft tokens (keras-hub writes `num_vision_tokens_per_image`
placeholders for every image, the padding patches' outputs filling the rest), and images are resized
with Pillow as its image processor does (keras-hub: TensorFlow's antialiased bicubic), so the ids and
media equal `mlx_gemma.generate`'s for the same prompt (gemma4_prompts.plain_ids, preprocess_media).

Stop ids, `"auto"`: `<eos>`, `<turn|>` and `<|tool_response>`, as Gemma 4's generation_config.json
(Google's release); keras-hub's Gemma4CausalLM stops at the first two only, so a model that opens a
tool response stops here where keras-hub would go on.
"""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np

from ..chat_template import GEMMA4_STOP_PIECES
from ..errors import AudioError, ImageError, MlxGemmaError, UnsupportedModelError
from ..gemma4_prompts import AUDIO_MARKER, IMAGE_MARKER, blocks_of, plain_ids, preprocess_media
from ..image_chat import image_spans
from ..models import gemma4_mm
from .backbone import GemmaBackbone
from .causal_lm import GemmaCausalLM
from .causal_lm_generation import check_packed, fill, output_mask, strip_prompt
from .preprocessor import GemmaCausalLMPreprocessor, as_texts

# What keras-hub's Gemma4CausalLMPreprocessor.generate_postprocess drops beside <bos> / <eos> / <pad>:
# its tokenizer's media tokens but `<|image>`, which the user wrote.
_STRIPPED_MEDIA_PIECES = ("<|image|>", "<image|>", "<|audio>", "<|audio|>", "<audio|>", "<|video|>")
# keras-hub's packed media keys -> mlx_gemma's model keywords (gemma4_prompts.Gemma4Media.inputs).
_PACKED_MEDIA = {"pixel_values": "pixel_values", "pixel_position_ids": "image_positions",
                 "audio_mel": "audio_features", "audio_mel_mask": "audio_mask"}


class Gemma4CausalLMPreprocessor(GemmaCausalLMPreprocessor):
    """keras-hub's Gemma4CausalLMPreprocessor for generation: {"prompts", "images", "audio"} -> packed ids
    and media (see the module's text).  `model`: the multimodal model whose towers and processor settings
    lay the media out; None: text only."""

    def __init__(self, tokenizer, model=None, sequence_length: int = 1024, add_start_token: bool = True,
                 add_end_token: bool = True, max_images_per_prompt: int = 2, max_audio_clips_per_prompt: int = 1):
        super().__init__(tokenizer, sequence_length, add_start_token, add_end_token)
        self.model = model
        self.max_images_per_prompt = max_images_per_prompt  # keras-hub's defaults: 2 images, 1 clip
        self.max_audio_clips_per_prompt = max_audio_clips_per_prompt

    def generate_preprocess(self, x, sequence_length: int | None = None) -> dict:
        if not isinstance(x, dict) or "prompts" not in x:
            return super().generate_preprocess(x, sequence_length)
        texts, batched = as_texts(x["prompts"])
        images, audio = x.get("images"), x.get("audio")
        if images is None and audio is None:
            return super().generate_preprocess(x["prompts"], sequence_length)
        if self.model is None:
            raise (ImageError if images is not None else AudioError)(
                "images" if images is not None else "audio",
                "this preprocessor is text-only (the model has no vision or audio tower)")
        per_image = _per_prompt(images, len(texts), batched, "images", self.max_images_per_prompt)
        per_clip = _per_prompt(audio, len(texts), batched, "audio", self.max_audio_clips_per_prompt)
        media = preprocess_media(self.model, [im for ims in per_image for im in ims],
                                 [c for cs in per_clip for c in cs])
        image_blocks, audio_blocks = blocks_of(self.model, media)
        length = sequence_length or self.sequence_length
        token_ids = np.full((len(texts), length), self.tokenizer.pad_token_id, dtype=np.int32)
        padding_mask = np.zeros((len(texts), length), dtype=bool)
        i = a = 0
        for b, (text, ims, cls) in enumerate(zip(texts, per_image, per_clip)):
            row = self._row(text, image_blocks[i:i + len(ims)], audio_blocks[a:a + len(cls)], length)
            token_ids[b, :len(row)], padding_mask[b, :len(row)] = row, True
            i, a = i + len(ims), a + len(cls)
        out = {"token_ids": token_ids, "padding_mask": padding_mask,
               **_packed_media(media, [len(ims) for ims in per_image], [len(cs) for cs in per_clip],
                               (self.max_images_per_prompt, self.max_audio_clips_per_prompt))}
        return out if batched else {k: v[0] for k, v in out.items()}

    def _row(self, text: str, image_blocks: list, audio_blocks: list, length: int) -> list[int]:
        """`<bos>` + the prompt with each marker's block, cut to `length` (never inside a block)."""
        for marker, blocks, error, kind in ((IMAGE_MARKER, image_blocks, ImageError, "images"),
                                            (AUDIO_MARKER, audio_blocks, AudioError, "audio")):
            if text.count(marker) != len(blocks):  # keras-hub places media at markers only
                raise error(kind, f"the prompt holds {text.count(marker)} {marker} markers for {len(blocks)} "
                                  f"{kind} input(s); keras-hub places one at each marker")
        ids = plain_ids(self.tokenizer, text, image_blocks, audio_blocks)
        soft = {blk[1] for blk in image_blocks + audio_blocks if len(blk) > 2}
        if len(ids) > length and (ids[length - 1] in soft or ids[length] in soft):
            raise ImageError("images", f"max_length {length} cuts a media block; give a longer max_length")
        return ids[:length]

    def generate_postprocess(self, x: dict):
        """As GemmaCausalLMPreprocessor's, also dropping the media placeholders and ends (keras-hub
        strips its special tokens but `<|image>`)."""
        if not isinstance(x, dict) or "token_ids" not in x or "padding_mask" not in x:
            return super().generate_postprocess(x)
        ids = np.asarray(x["token_ids"])
        media = [i for i in map(self.tokenizer.piece_to_id, _STRIPPED_MEDIA_PIECES) if i is not None]
        keep = np.asarray(x["padding_mask"]).astype(bool) & ~np.isin(ids, media)
        return super().generate_postprocess({"token_ids": ids, "padding_mask": keep})


def _per_prompt(entries, n_prompts: int, batched: bool, kind: str, limit: int) -> list[list]:
    """keras-hub's forms: for one prompt an item or a list of items; for a batch, one entry (None, an
    item or a list) per prompt.  An image array is [H, W, 3], a clip [samples]."""
    error = ImageError if kind == "images" else AudioError
    if entries is None:
        return [[] for _ in range(n_prompts)]
    item_dims = 3 if kind == "images" else 1

    def items(entry) -> list:
        if entry is None:
            return []
        if isinstance(entry, np.ndarray) and entry.ndim == item_dims + 1:
            return list(entry)
        return list(entry) if isinstance(entry, (list, tuple)) else [entry]

    if not batched:
        per = [items(entries)]
    else:
        if isinstance(entries, np.ndarray) and entries.ndim >= item_dims + 1:
            entries = list(entries)
        if not isinstance(entries, (list, tuple)) or len(entries) != n_prompts:
            raise error(kind, f"give one entry (None, an item or a list) per prompt, {n_prompts} in all")
        per = [items(e) for e in entries]
    for b, got in enumerate(per):
        if len(got) > limit:
            raise error(kind, f"prompt {b} has {len(got)} {kind} inputs; the most per prompt is {limit}")
    return per


def _packed_media(media, n_images: list[int], n_clips: list[int], rooms: tuple[int, int]) -> dict:
    """keras-hub's packed media arrays [B, items, ...], `rooms` items per prompt (its max_images_per_prompt,
    max_audio_clips_per_prompt), from a batch's media (in prompt order): each prompt's own first, then padding items (zero patches at position (-1, -1), as the tower reads
    padding; silent clips with an empty mask)."""
    out = {}
    for values_key, mask_key, values, mask, counts, room, fill_mask in (
            ("pixel_values", "pixel_position_ids", media.pixel_values, media.image_positions, n_images, rooms[0], -1),
            ("audio_mel", "audio_mel_mask", media.audio_features, media.audio_mask, n_clips, rooms[1], False)):
        if values is None:  # no prompt has one
            continue
        values, mask = np.array(values), np.array(mask)
        packed_values = np.zeros((len(counts), room) + values.shape[1:], values.dtype)
        packed_mask = np.full((len(counts), room) + mask.shape[1:], fill_mask, mask.dtype)
        start = 0
        for b, n in enumerate(counts):
            packed_values[b, :n], packed_mask[b, :n] = values[start:start + n], mask[start:start + n]
            start += n
        out[values_key], out[mask_key] = packed_values, packed_mask
    return out


class Gemma4CausalLM(GemmaCausalLM):
    """GemmaCausalLM on a Gemma 4 model (keras-hub's Gemma4CausalLM): text, and images and audio
    through a multimodal model's towers."""

    def __init__(self, backbone: GemmaBackbone, preprocessor: GemmaCausalLMPreprocessor | None = None):
        model = backbone.model
        self.multimodal = model if isinstance(model, gemma4_mm.Model) else None  # None: text only
        if self.multimodal is not None:
            backbone = GemmaBackbone.from_model(model.text_model())  # a `gemma4` folder: its language half
        if backbone.model.args.model_type != "gemma4_text":
            raise UnsupportedModelError(None, f"Gemma4CausalLM needs a Gemma 4 model, got "
                                              f"{backbone.model.args.model_type!r}")
        super().__init__(backbone, preprocessor)

    @classmethod
    def from_preset(cls, preset: str | os.PathLike, load_weights: bool = True, **settings) -> Gemma4CausalLM:
        """A keras-hub Gemma 4 preset name, `hf://org/repo`, `kaggle://...`, or a folder; `settings`
        as GemmaCausalLM.from_preset's (`dtype`, `preprocessor`, `sequence_length`).  A model with
        towers gets a Gemma4CausalLMPreprocessor that lays out its images and clips."""
        if not load_weights:
            raise MlxGemmaError("Gemma4CausalLM.from_preset loads the weights: the Gemma 4 shapes are not recorded "
                                "for load_weights=False")
        lm = super().from_preset(preset, True, **settings)
        own = type(lm.preprocessor) is GemmaCausalLMPreprocessor  # the preset's own, not one given
        if own and lm.multimodal is not None:
            p = lm.preprocessor
            lm.preprocessor = Gemma4CausalLMPreprocessor(p.tokenizer, lm.multimodal, p.sequence_length,
                                                         p.add_start_token, p.add_end_token)
        return lm

    def generate(self, inputs, max_length: int | None = None, stop_token_ids="auto", strip_prompt: bool = False):
        """Strings, {"prompts", "images", "audio"}, or (preprocessor=None) {"token_ids", "padding_mask"
        [, "pixel_values", "pixel_position_ids", "audio_mel", "audio_mel_mask"]}; returns the same form."""
        is_dict = isinstance(inputs, dict)
        if self.preprocessor is not None and is_dict and "prompts" in inputs:
            if inputs.get("images") is None and inputs.get("audio") is None:
                return super().generate(inputs["prompts"], max_length, stop_token_ids, strip_prompt)
            stops = self._stop_ids(stop_token_ids)
            self._check_towers()
            if not isinstance(self.preprocessor, Gemma4CausalLMPreprocessor):
                raise ImageError("images", "this preprocessor takes text only; give a Gemma4CausalLMPreprocessor")
            packed = self.preprocessor.generate_preprocess(inputs, sequence_length=max_length)
            single = packed["token_ids"].ndim == 1
            out = self._generate_media({k: v[None] for k, v in packed.items()} if single else packed, stops,
                                       strip_prompt)
            texts = self.preprocessor.generate_postprocess(out)
            return texts[0] if single else texts
        if self.preprocessor is None and is_dict and any(inputs.get(k) is not None for k in _PACKED_MEDIA):
            single = np.asarray(inputs["token_ids"]).ndim == 1
            batch = {k: np.asarray(v)[None] if single else np.asarray(v) for k, v in inputs.items()
                     if k in ("token_ids", "padding_mask", *_PACKED_MEDIA) and v is not None}
            out = self._generate_media(batch, self._stop_ids(stop_token_ids), strip_prompt)
            out.update({k: v for k, v in batch.items() if k in _PACKED_MEDIA})
            return {k: v[0] for k, v in out.items()} if single else out
        return super().generate(inputs, max_length, stop_token_ids, strip_prompt)

    def _check_towers(self) -> None:
        if self.multimodal is None:
            raise ImageError("images", "this Gemma 4 model has no vision or audio tower: it takes text only")

    def _generate_media(self, batch: dict, stops, strip: bool) -> dict:
        self._check_towers()
        ids, prompt_mask, lengths = check_packed(batch["token_ids"], batch["padding_mask"], self.backbone.vocabulary_size)
        rows = [self._row_media(batch, b, ids[b][prompt_mask[b]].tolist()) for b in range(ids.shape[0])]
        generated = fill(self.multimodal, ids, lengths, self.sampler, stops, images=rows, speculation=self.speculation)
        out = {"token_ids": generated, "padding_mask": output_mask(generated, prompt_mask, stops)}
        return strip_prompt(out, prompt_mask) if strip else out

    def _row_media(self, batch: dict, b: int, prompt: list[int]) -> dict | None:
        """Row b's model media inputs: its first k images (clips) for its k image (audio) blocks."""
        model, inputs = self.multimodal, {}
        for (values_key, mask_key), spec, error in ((("pixel_values", "pixel_position_ids"), model.image_input,
                                                     ImageError),
                                                    (("audio_mel", "audio_mel_mask"), model.audio_input, AudioError)):
            k = 0 if spec is None else len(image_spans(prompt, spec.token_id))
            if not k:
                continue
            if batch.get(values_key) is None or batch.get(mask_key) is None:
                raise error(values_key, f"row {b} holds {k} media blocks but no {values_key} / {mask_key} were given")
            values, mask = np.asarray(batch[values_key]), np.asarray(batch[mask_key])
            if values.ndim != 4 or mask.shape[:3] != values.shape[:3] or values.shape[1] < k:
                raise error(values_key, f"{values_key} {values.shape} and {mask_key} {mask.shape} must be "
                                        f"[batch, items, ...] with at least {k} items for row {b}")
            inputs[_PACKED_MEDIA[values_key]] = mx.array(values[b, :k].astype(np.float32))
            inputs[_PACKED_MEDIA[mask_key]] = mx.array(mask[b, :k].astype(
                np.int32 if values_key == "pixel_values" else bool))
        return inputs or None

    def _stop_ids(self, stop_token_ids) -> tuple[int, ...] | None:
        """"auto": `<eos>` and Gemma 4's turn / tool-response ends (see the module's text)."""
        if not (isinstance(stop_token_ids, str) and stop_token_ids == "auto" and self.preprocessor is not None):
            return super()._stop_ids(stop_token_ids)
        tok = self.preprocessor.tokenizer
        ends = (i for i in map(tok.piece_to_id, GEMMA4_STOP_PIECES) if i is not None)
        return tuple(dict.fromkeys([tok.end_token_id, *ends]))
