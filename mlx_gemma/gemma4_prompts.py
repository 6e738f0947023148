"""Gemma 4 prompts with images and audio, laid out as transformers 5.25's Gemma4Processor lays them out.

The processor replaces each `<|image|>` of the prompt text with `<|image>`, one `<|image|>` per soft
token of that image (its own count: mlx_gemma.gemma4_images) and `<image|>`, and each `<|audio|>`
with `<|audio>`, one `<|audio|>` per 40 ms soft token (mlx_gemma.audio.num_soft_tokens) and
`<audio|>`, then tokenizes the string with `<bos>`, splitting at special tokens.  The chat template
renders an image part as `<|image|>` and an audio part as `<|audio|>` (mlx_gemma.chat_template), which
the same blocks replace.

- `media_settings`: the image processor's and feature extractor's settings of a loaded model
  (its folder's `processor_config.json`, else the processor's defaults with the tower's patch sizes).
- `Gemma4Media`: a prompt batch's images and clips, preprocessed: the model's inputs, each item's
  soft-token count, and a digest per item (a prompt cache tells media apart by them).
- `media_rows`: prompts (strings, chat messages or token ids) + their media -> token ids per prompt
  and the `Gemma4Media`, the images of all prompts in order, then the clips.

A prompt string without markers gets its images, then its clips, first (as the chat template places
media parts before the text), each block followed by nothing: the text then follows directly.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .audio import LogMelSettings, clip_features, num_soft_tokens
from .errors import AudioError, ConfigError, GenerationError, ImageError
from .gemma4_images import ImageSettings, preprocess_images
from .prompts import prompt_ids

IMAGE_MARKER, AUDIO_MARKER = "<|image|>", "<|audio|>"
# processor_config.json is small; a larger one is no processor file.
_PROCESSOR_FILE_LIMIT = 1 << 20


def media_settings(model) -> tuple[ImageSettings, LogMelSettings]:
    """The image and audio preprocessing of `model`: its folder's processor_config.json entries
    ("image_processor", "feature_extractor") where present, else the processors' defaults, with
    the vision tower's patch and pooling sizes."""
    vision = model.args.vision
    image, audio = {}, {}
    path = None if model.path is None else Path(model.path) / "processor_config.json"
    if path is not None and path.is_file():
        if path.stat().st_size > _PROCESSOR_FILE_LIMIT:
            raise ConfigError(path, "processor_config.json is larger than 1 MiB")
        try:
            config = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(path, f"not JSON: {e}") from None
        if not isinstance(config, dict):
            raise ConfigError(path, "processor_config.json must hold an object")
        image, audio = config.get("image_processor") or {}, config.get("feature_extractor") or {}
    if vision is not None:
        image = {"patch_size": vision.patch_size, "pooling_kernel_size": vision.pooling_kernel_size, **image}
    return ImageSettings.from_dict(image, path), LogMelSettings.from_dict(audio, path)


@dataclass
class Gemma4Media:
    """A batch's images and clips, preprocessed, in prompt order (the model's `embed` inputs)."""

    pixel_values: mx.array | None = None  # [N, P, 3 p^2] in [0, 1]
    image_positions: mx.array | None = None  # [N, P, 2]
    image_tokens: tuple[int, ...] = ()  # soft tokens of each image
    audio_features: mx.array | None = None  # [M, T, mels]
    audio_mask: mx.array | None = None  # [M, T]
    audio_tokens: tuple[int, ...] = ()  # soft tokens of each clip

    def inputs(self) -> dict:
        """The model keywords for these media (only those present)."""
        keys = ("pixel_values", "image_positions", "audio_features", "audio_mask")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}

    def digests(self) -> list[str]:
        """A name per item, images then clips: equal only for the same preprocessed input."""
        out = []
        for kind, arrays in (("image", (self.pixel_values, self.image_positions)),
                             ("audio", (self.audio_features, self.audio_mask))):
            if arrays[0] is None:
                continue
            for item in zip(*(np.array(a.astype(mx.float32)) for a in arrays)):
                out.append(kind + ":" + hashlib.sha256(b"".join(x.tobytes() for x in item)).hexdigest())
        return out

    def select(self, images: list[int], clips: list[int]) -> Gemma4Media:
        """The media of these image and clip indices only (what a prompt cache does not hold)."""
        pick = lambda a, rows: None if a is None or not rows else a[mx.array(rows)]  # noqa: E731
        return Gemma4Media(pick(self.pixel_values, images), pick(self.image_positions, images),
                           tuple(self.image_tokens[i] for i in images), pick(self.audio_features, clips),
                           pick(self.audio_mask, clips), tuple(self.audio_tokens[i] for i in clips))


def preprocess_media(model, images: list, clips: list) -> Gemma4Media:
    """Images (paths, PIL images, arrays) and clips (paths, sample arrays at 16 kHz) -> `Gemma4Media`;
    typed errors for media the model has no tower for."""
    if clips and model.audio_input is None:
        raise AudioError("audio", f"this {model.model_type} model has no audio tower: it takes no audio")
    if images and model.image_input is None:
        raise ImageError("image", f"this {model.model_type} model has no vision tower: it takes no images")
    if images and not model.image_input.variable:  # PaliGemma, Gemma 3: generate's own image paths
        raise ImageError("image", f"a {model.model_type} model takes its images without audio or thinking")
    image_settings, audio_settings = media_settings(model)
    media = Gemma4Media()
    if images:
        pre = preprocess_images(images, image_settings)
        media.pixel_values, media.image_positions = pre.pixel_values, pre.position_ids
        media.image_tokens = tuple(pre.num_soft_tokens)
    if clips:
        features, mask = clip_features(clips, audio_settings)
        media.audio_features, media.audio_mask = mx.array(features), mx.array(mask)
        media.audio_tokens = tuple(num_soft_tokens(m) for m in mask)
    return media


def blocks_of(model, media: Gemma4Media) -> tuple[list[list[int]], list[list[int]]]:
    """The ids each image and each clip takes in a prompt: start, placeholders, end."""
    image, audio = model.image_input, model.audio_input
    images = [[image.start_id, *[image.token_id] * n, image.end_id] for n in media.image_tokens]
    clips = [[audio.start_id, *[audio.token_id] * n, audio.end_id] for n in media.audio_tokens]
    return images, clips


def plain_ids(tokenizer, prompt: str, image_blocks: list, audio_blocks: list) -> list[int]:
    """`<bos>` and `prompt` with its i-th `<|image|>` (`<|audio|>`) replaced by the i-th image's
    (clip's) block, the text between tokenized run by run with special tokens parsed, as the
    processor's tokenizer splits at them; without markers, the images and then the clips come first."""
    marks = prompt.count(IMAGE_MARKER) + prompt.count(AUDIO_MARKER)
    if not marks:
        prompt = IMAGE_MARKER * len(image_blocks) + AUDIO_MARKER * len(audio_blocks) + prompt
    for marker, blocks, error in ((IMAGE_MARKER, image_blocks, ImageError), (AUDIO_MARKER, audio_blocks, AudioError)):
        if prompt.count(marker) != len(blocks):
            raise error("image" if error is ImageError else "audio",
                        f"the prompt holds {prompt.count(marker)} {marker} markers for {len(blocks)} "
                        f"{'image(s)' if error is ImageError else 'clip(s)'}; give one per marker (or no markers)")
    images, clips = iter(image_blocks), iter(audio_blocks)
    segments: list = []
    for piece in _split_markers(prompt):
        if piece == IMAGE_MARKER:
            segments += next(images)
        elif piece == AUDIO_MARKER:
            segments += next(clips)
        elif piece:
            segments.append(piece)
    ids = [tokenizer.bos_id]
    for is_text, run in itertools.groupby(segments, key=lambda s: isinstance(s, str)):
        ids += tokenizer.encode("".join(run), add_bos=False, parse_special=True) if is_text else list(run)
    return ids


def _split_markers(text: str) -> list[str]:
    """`text` cut at the media markers, the markers kept as pieces of their own."""
    out, rest = [], text
    while rest:
        at = [(rest.find(m), m) for m in (IMAGE_MARKER, AUDIO_MARKER) if m in rest]
        if not at:
            out.append(rest)
            break
        i, marker = min(at)
        out += [rest[:i], marker]
        rest = rest[i + len(marker):]
    return out


def user_content(text: str) -> str | list[dict]:
    """A user turn's content: `text`, with an image part at each `<|image|>` and an audio part at
    each `<|audio|>` in it."""
    if IMAGE_MARKER not in text and AUDIO_MARKER not in text:
        return text
    parts = []
    for piece in _split_markers(text):
        if piece in (IMAGE_MARKER, AUDIO_MARKER):
            parts.append({"type": "image" if piece == IMAGE_MARKER else "audio"})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def count_parts(messages, kind: str) -> int:
    """How many `{"type": kind}` parts chat messages hold."""
    return sum(1 for m in messages if isinstance(m, dict) and isinstance(m.get("content"), Sequence)
               and not isinstance(m["content"], str)
               for part in m["content"] if isinstance(part, dict) and part.get("type") == kind)


def media_rows(model, tokenizer, prompts: Sequence, images: Sequence, clips: Sequence, chat=None, system=None,
               enable_thinking: bool = False) -> tuple[list[list[int]], Gemma4Media]:
    """(token ids per prompt, their media) for Gemma 4: `images[b]` / `clips[b]` are prompt b's, each
    None, one item or a list, in the order of the prompt's markers (or parts).  A prompt is a string
    (with the chat template when `chat`), chat messages with `{"type": "image"}` / `{"type": "audio"}`
    parts, or token ids that already hold the media blocks."""
    if len(images) != len(prompts) or len(clips) != len(prompts):
        raise GenerationError(f"{len(images)} image entries and {len(clips)} audio entries for {len(prompts)} "
                              "prompts; give one entry (None, an item or a list) per prompt")
    per_image = [_items(im) for im in images]
    per_clip = [_items(c) for c in clips]
    media = preprocess_media(model, [x for xs in per_image for x in xs], [x for xs in per_clip for x in xs])
    image_blocks, audio_blocks = blocks_of(model, media) if media.inputs() else ([], [])
    rows, i, a = [], 0, 0
    for prompt, ims, cls in zip(prompts, per_image, per_clip):
        own_images, own_clips = image_blocks[i:i + len(ims)], audio_blocks[a:a + len(cls)]
        rows.append(_row(model, tokenizer, prompt, own_images, own_clips, chat, system, enable_thinking))
        i, a = i + len(ims), a + len(cls)
    return rows, media


def _items(entry) -> list:
    return [] if entry is None else list(entry) if isinstance(entry, (list, tuple)) else [entry]


def _row(model, tokenizer, prompt, image_blocks, audio_blocks, chat, system, enable_thinking) -> list[int]:
    if isinstance(prompt, str) and not chat:
        if system or enable_thinking:
            raise GenerationError("a system prompt or thinking needs the chat template (chat=True / --chat)")
        return plain_ids(tokenizer, prompt, image_blocks, audio_blocks)
    if isinstance(prompt, str):
        text = prompt
        if IMAGE_MARKER not in text and AUDIO_MARKER not in text:  # media first, as in Gemma 4's examples
            text = IMAGE_MARKER * len(image_blocks) + AUDIO_MARKER * len(audio_blocks) + text
        messages = [{"role": "user", "content": user_content(text)}]
    elif isinstance(prompt, Sequence) and prompt and all(isinstance(m, dict) for m in prompt):
        if chat is False:
            raise GenerationError("chat messages need the chat template, but chat=False was asked for")
        messages = list(prompt)
    else:  # token ids, media blocks included: the model checks their counts against the media
        return prompt_ids(tokenizer, prompt, chat, system, model.args.vocab_size)
    for kind, blocks, error in (("image", image_blocks, ImageError), ("audio", audio_blocks, AudioError)):
        if count_parts(messages, kind) != len(blocks):
            raise error(kind, f"the prompt holds {count_parts(messages, kind)} {kind} parts for {len(blocks)} "
                              f"{kind} input(s); give one per part")
    if system:
        if messages[0].get("role") == "system":
            raise GenerationError("system given twice: as an argument and as the first message")
        messages.insert(0, {"role": "system", "content": system})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                         image_block=image_blocks or None, audio_block=audio_blocks or None,
                                         enable_thinking=enable_thinking)
