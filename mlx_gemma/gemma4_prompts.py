"""Gemma 4 prompts with images, videos and audio, laid out as transformers 5.25's Gemma4Processor lays them out.

The processor replaces each `<|image|>` of the prompt text with `<|image>`, one `<|image|>` per soft
token of that image (its own count: mlx_gemma.gemma4_images) and `<image|>`, and each `<|audio|>`
with `<|audio>`, one `<|audio|>` per 40 ms soft token (mlx_gemma.audio.num_soft_tokens) and
`<audio|>`, then tokenizes the string with `<bos>`, splitting at special tokens.  The chat template
renders an image part as `<|image|>` and an audio part as `<|audio|>` (mlx_gemma.chat_template), which
the same blocks replace.  A `<|video|>` (a chat's video part) becomes, per sampled frame, "mm:ss "
and an image-like block (mlx_gemma.gemma4_video); the frames go to the model as images, in prompt
order among the images (the model treats both alike: see gemma4_video).

- `media_settings` / `video_settings`: the image processor's, feature extractor's and video
  processor's settings of a loaded model (its folder's `processor_config.json`, else the
  processors' defaults with the tower's patch sizes).
- `Gemma4Media`: a prompt batch's images and clips, preprocessed: the model's inputs, each item's
  soft-token count, and a digest per item (a prompt cache tells media apart by them).
- `media_rows`: prompts (strings, chat messages or token ids) + their media -> token ids per prompt
  and the `Gemma4Media`, the images and video frames of all prompts in order, then the clips.  With
  `tools` / `tool_choice`, a chat is rendered by `tool_calls.render_chat` (the text path's renderer:
  declarations in the system turn, earlier calls and their results), the media blocks spliced in
  where its placeholders are, as Gemma4Processor expands the template's rendering with tools.

A prompt string without markers gets its images, then its videos, then its clips, first (as the chat template places
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
from .gemma4_images import ImageSettings, pad_patches, preprocess_images
from .gemma4_video import VIDEO_TOKEN, Gemma4Video, VideoSettings, load_video, video_block
from .prompts import prompt_ids
from .tool_calls import render_chat

IMAGE_MARKER, AUDIO_MARKER, VIDEO_MARKER = "<|image|>", "<|audio|>", VIDEO_TOKEN
# The markers and the content-part type each stands for.
_KINDS = {IMAGE_MARKER: "image", AUDIO_MARKER: "audio", VIDEO_MARKER: "video"}
_MARKERS = tuple(_KINDS)
# processor_config.json is small; a larger one is no processor file.
_PROCESSOR_FILE_LIMIT = 1 << 20


def media_settings(model) -> tuple[ImageSettings, LogMelSettings]:
    """The image and audio preprocessing of `model`: its folder's processor_config.json entries
    ("image_processor", "feature_extractor") where present, else the processors' defaults, with
    the vision tower's patch and pooling sizes."""
    config, path = _processor_config(model)
    image, audio = config.get("image_processor") or {}, config.get("feature_extractor") or {}
    return ImageSettings.from_dict(_tower_sizes(model, image), path), LogMelSettings.from_dict(audio, path)


def video_settings(model) -> VideoSettings:
    """The video preprocessing of `model`: processor_config.json's "video_processor" entry, else
    Gemma4VideoProcessor's defaults (32 frames, 70 soft tokens each) with the tower's patch sizes."""
    config, path = _processor_config(model)
    return VideoSettings.from_dict(_tower_sizes(model, config.get("video_processor") or {}), path)


def _tower_sizes(model, entry: dict) -> dict:
    vision = model.args.vision
    if vision is None or not isinstance(entry, dict):
        return entry
    return {"patch_size": vision.patch_size, "pooling_kernel_size": vision.pooling_kernel_size, **entry}


def _processor_config(model) -> tuple[dict, Path | None]:
    """(the folder's processor_config.json, its path); ({}, path) when it has none."""
    path = None if model.path is None else Path(model.path) / "processor_config.json"
    config: dict = {}
    if path is not None and path.is_file():
        if path.stat().st_size > _PROCESSOR_FILE_LIMIT:
            raise ConfigError(path, "processor_config.json is larger than 1 MiB")
        try:
            config = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(path, f"not JSON: {e}") from None
        if not isinstance(config, dict):
            raise ConfigError(path, "processor_config.json must hold an object")
    return config, path


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


def plain_ids(tokenizer, prompt: str, image_blocks: list, audio_blocks: list, video_blocks: Sequence = ()) -> list[int]:
    """`<bos>` and `prompt` with its i-th `<|image|>` (`<|audio|>`, `<|video|>`) replaced by the i-th
    image's (clip's, video's) block, the text between tokenized run by run with special tokens parsed,
    as the processor's tokenizer splits at them (a video block's "mm:ss " text joins its neighbours);
    without markers, the images, then the videos, then the clips come first."""
    if not any(m in prompt for m in _MARKERS):
        prompt = IMAGE_MARKER * len(image_blocks) + VIDEO_MARKER * len(video_blocks) + AUDIO_MARKER * len(audio_blocks) + prompt
    blocks = {IMAGE_MARKER: image_blocks, VIDEO_MARKER: video_blocks, AUDIO_MARKER: audio_blocks}
    for marker, items in blocks.items():
        if prompt.count(marker) != len(items):
            kind = _KINDS[marker]
            raise (AudioError if kind == "audio" else ImageError)(
                kind, f"the prompt holds {prompt.count(marker)} {marker} markers for {len(items)} {kind} input(s); "
                      "give one per marker (or no markers)")
    pending = {m: iter(items) for m, items in blocks.items()}
    segments: list = []
    for piece in _split_markers(prompt):
        if piece in pending:
            segments += next(pending[piece])
        elif piece:
            segments.append(piece)
    ids = [tokenizer.bos_id]
    for is_text, run in itertools.groupby(segments, key=lambda s: isinstance(s, str)):
        ids += tokenizer.encode("".join(run), add_bos=False, parse_special=True) if is_text else list(run)
    return ids


def _split_markers(text: str, markers: tuple[str, ...] = _MARKERS) -> list[str]:
    """`text` cut at the media markers, the markers kept as pieces of their own."""
    out, rest = [], text
    while rest:
        at = [(rest.find(m), m) for m in markers if m in rest]
        if not at:
            out.append(rest)
            break
        i, marker = min(at)
        out += [rest[:i], marker]
        rest = rest[i + len(marker):]
    return out


def user_content(text: str, markers: tuple[str, ...] = (IMAGE_MARKER, AUDIO_MARKER)) -> str | list[dict]:
    """A user turn's content: `text`, with an image part at each `<|image|>` and an audio part at
    each `<|audio|>` in it (and a video part at each `<|video|>`, when `markers` holds it)."""
    if not any(m in text for m in markers):
        return text
    parts = []
    for piece in _split_markers(text, markers):
        if piece in markers:
            parts.append({"type": _KINDS[piece]})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def count_parts(messages, kind: str) -> int:
    """How many `{"type": kind}` parts chat messages hold."""
    return sum(1 for part in _parts(messages) if part.get("type") == kind)


def _parts(messages) -> list[dict]:
    """The content parts (dicts) of chat messages, in order."""
    return [part for m in messages if isinstance(m, dict) and isinstance(m.get("content"), Sequence)
            and not isinstance(m["content"], str) for part in m["content"] if isinstance(part, dict)]


def media_rows(model, tokenizer, prompts: Sequence, images: Sequence, clips: Sequence, chat=None, system=None,
               enable_thinking: bool = False, videos: Sequence | None = None, tools: Sequence | None = None,
               tool_choice=None) -> tuple[list[list[int]], Gemma4Media]:
    """(token ids per prompt, their media) for Gemma 4: `images[b]` / `clips[b]` / `videos[b]` are prompt
    b's, each None, one item or a list, in the order of the prompt's markers (or parts).  A prompt is a
    string (with the chat template when `chat`), chat messages with `{"type": "image"}` / `{"type":
    "audio"}` / `{"type": "video"}` parts, or token ids that already hold the media blocks (no videos).
    A video is a path (decoded with PyAV) or uint8 frames [T, H, W, 3] (24 fps assumed).  `tools` (OpenAI
    function tools) and `tool_choice`, when either is given, render each chat as `render_chat` does
    (`tools=[]`: earlier calls and results, nothing declared); they need the chat template."""
    videos = [None] * len(prompts) if videos is None else videos
    if not len(images) == len(clips) == len(videos) == len(prompts):
        raise GenerationError(f"{len(images)} image, {len(clips)} audio and {len(videos)} video entries for "
                              f"{len(prompts)} prompts; give one entry (None, an item or a list) per prompt")
    per_image, per_clip = [_items(im) for im in images], [_items(c) for c in clips]
    per_video = _load_videos(model, [_items(v) for v in videos])
    media = preprocess_media(model, [x for xs in per_image for x in xs], [x for xs in per_clip for x in xs])
    image_blocks, audio_blocks = blocks_of(model, media) if media.inputs() else ([], [])
    if any(per_video):
        orders = [_visual_order(p, len(ims), len(vs)) for p, ims, vs in zip(prompts, per_image, per_video)]
        media = _with_frames(media, orders, per_video)
    rows, i, a = [], 0, 0
    for prompt, ims, cls, vids in zip(prompts, per_image, per_clip, per_video):
        own_images, own_clips = image_blocks[i:i + len(ims)], audio_blocks[a:a + len(cls)]
        spec = model.image_input
        own_videos = [video_block(v.num_soft_tokens, v.timestamps, spec.start_id, spec.token_id, spec.end_id)
                      for v in vids]
        rows.append(_row(model, tokenizer, prompt, own_images, own_clips, chat, system, enable_thinking, own_videos,
                         (tools, tool_choice)))
        i, a = i + len(ims), a + len(cls)
    return rows, media


def _items(entry) -> list:
    return [] if entry is None else list(entry) if isinstance(entry, (list, tuple)) else [entry]


def _load_videos(model, per_video: list[list]) -> list[list[Gemma4Video]]:
    """Each prompt's videos, decoded and preprocessed (typed errors for a model without a vision tower)."""
    if not any(per_video):
        return [[] for _ in per_video]
    spec = model.image_input
    if spec is None:
        raise ImageError("video", f"this {model.model_type} model has no vision tower: it takes no video")
    if not spec.variable:
        raise ImageError("video", f"a {model.model_type} model takes no video (Gemma 4 does)")
    settings = video_settings(model)
    return [[load_video(v, settings, name=f"videos[{b}][{j}]") for j, v in enumerate(vs)]
            for b, vs in enumerate(per_video)]


def _visual_order(prompt, n_images: int, n_videos: int) -> list[str]:
    """"image" / "video" for each of a prompt's images and videos, in the order its markers (or chat
    parts) place them; images then videos when it has none or their counts differ (an error later)."""
    if isinstance(prompt, str):
        kinds = [_KINDS[p] for p in _split_markers(prompt) if p in (IMAGE_MARKER, VIDEO_MARKER)]
    elif isinstance(prompt, Sequence) and all(isinstance(m, dict) for m in prompt):
        kinds = [{"image_url": "image"}.get(t, t) for t in (p.get("type") for p in _parts(prompt))
                 if t in ("image", "image_url", "video")]
    else:
        kinds = []
    if kinds.count("image") != n_images or kinds.count("video") != n_videos:
        kinds = ["image"] * n_images + ["video"] * n_videos
    return kinds


def _with_frames(media: Gemma4Media, orders: list[list[str]], videos: list[list[Gemma4Video]]) -> Gemma4Media:
    """`media` with every video's frames among its images, in prompt order, all padded to the longest
    patch count (padding patches, position -1, change no soft token: the tower masks them)."""
    images = [] if media.pixel_values is None else list(zip(np.array(media.pixel_values),
                                                            np.array(media.image_positions), media.image_tokens))
    rows, n = [], 0
    for order, own in zip(orders, videos):
        pending = iter(own)
        for kind in order:
            if kind == "image":
                rows.append(images[n])
                n += 1
            else:
                video = next(pending)
                rows += zip(np.array(video.pixel_values), np.array(video.position_ids),
                            [video.num_soft_tokens] * video.pixel_values.shape[0])
    longest = max(len(p) for p, _, _ in rows)
    padded = [pad_patches(p, q, longest) for p, q, _ in rows]
    return Gemma4Media(mx.array(np.stack([p for p, _ in padded])), mx.array(np.stack([q for _, q in padded])),
                       tuple(t for _, _, t in rows), media.audio_features, media.audio_mask, media.audio_tokens)


def _row(model, tokenizer, prompt, image_blocks, audio_blocks, chat, system, enable_thinking,
         video_blocks=(), tools: tuple = (None, None)) -> list[int]:
    with_tools = tools != (None, None)
    if isinstance(prompt, str) and not chat:
        if system or enable_thinking or with_tools:
            raise GenerationError("a system prompt, thinking or tools need the chat template (chat=True / --chat)")
        return plain_ids(tokenizer, prompt, image_blocks, audio_blocks, video_blocks)
    if isinstance(prompt, str):
        text = prompt
        if not any(m in text for m in _MARKERS):  # media first, as in Gemma 4's examples
            text = (IMAGE_MARKER * len(image_blocks) + VIDEO_MARKER * len(video_blocks)
                    + AUDIO_MARKER * len(audio_blocks) + text)
        messages = [{"role": "user", "content": user_content(text, _MARKERS)}]
    elif isinstance(prompt, Sequence) and prompt and all(isinstance(m, dict) for m in prompt):
        if chat is False:
            raise GenerationError("chat messages need the chat template, but chat=False was asked for")
        messages = list(prompt)
    elif video_blocks:
        raise GenerationError("a video needs a text prompt or chat messages (its frame times are text), not token ids")
    elif with_tools:
        raise GenerationError("tools are declared by rendering the chat: give chat messages or text, not token ids")
    else:  # token ids, media blocks included: the model checks their counts against the media
        return prompt_ids(tokenizer, prompt, chat, system, model.args.vocab_size)
    for kind, blocks, error in (("image", image_blocks, ImageError), ("audio", audio_blocks, AudioError),
                                ("video", video_blocks, ImageError)):
        if count_parts(messages, kind) != len(blocks):
            raise error(kind, f"the prompt holds {count_parts(messages, kind)} {kind} parts for {len(blocks)} "
                              f"{kind} input(s); give one per part")
    if system:
        if messages[0].get("role") == "system":
            raise GenerationError("system given twice: as an argument and as the first message")
        messages.insert(0, {"role": "system", "content": system})
    if video_blocks:
        messages, image_blocks = _videos_as_images(messages, image_blocks, video_blocks)
    rendering = dict(add_generation_prompt=True, tokenize=True, image_block=image_blocks or None,
                     audio_block=audio_blocks or None, enable_thinking=enable_thinking)
    if with_tools:  # the text path's renderer: the blocks replace the placeholders of its rendering
        return render_chat(tokenizer, messages, *tools, **rendering)
    return tokenizer.apply_chat_template(messages, **rendering)


def _videos_as_images(messages: list, image_blocks: list, video_blocks: list) -> tuple[list, list]:
    """Chat messages with each video part made an image part, and the blocks those parts take, in
    order: the chat template renders both as one placeholder, which each one's block replaces."""
    images, videos, blocks, out = iter(image_blocks), iter(video_blocks), [], []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str) or not isinstance(content, Sequence):
            out.append(m)
            continue
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("image", "image_url"):
                blocks.append(next(images))
            elif kind == "video":
                blocks.append(next(videos))
                part = {"type": "image"}
            parts.append(part)
        out.append({**m, "content": parts})
    return out, blocks
