"""Images, audio and video in chat messages: OpenAI's `image_url` and `input_audio` parts, and the
`video_url` part of vLLM's and mlx-vlm's servers, made model inputs.

An image or a video comes as a data URL (`data:image/png;base64,...`, `data:video/mp4;base64,...`),
always accepted, or as a local path (plain or `file://`) only when the server was started with
`--allow-media-dir DIR` (or its old name `--allow-image-dir`) and the path, symlinks resolved, lies
inside DIR.  Remote URLs are refused: the server fetches nothing.  A clip comes as `input_audio`
(base64 file bytes).  Videos go to Gemma 4 only, decoded with PyAV (the `video` extra; without it,
a 400 says so) and sampled as `generate(video=...)` samples them.  Decoded items are written to the request's own
temporary folder and read by mlx_gemma's loaders, with their caps on bytes, pixels and seconds
(`vision.load_image`, `audio.load_audio`); the model's inputs are then laid out as `generate` lays
them out (Gemma 3: `image_chat.chat_image_rows`; Gemma 4: `gemma4_prompts.media_rows`) and made
concrete here, so the scheduler's thread only runs the model on them.

PaliGemma takes no chat template: it answers one task prompt ("caption en", "detect car").  A chat
request's prompt is its last message, which must be a user message: its text parts joined by a
space (as mlx-vlm's server reads the last message for PaliGemma) and its image, one at most, laid out
as `generate(prompt, image=...)` lays them out (`[<image> x N] <bos> text "\n"`; without an image,
`<bos> text`).  Earlier messages are not part of the prompt.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

import mlx.core as mx

from ..errors import MlxGemmaError
from ..gemma4_prompts import media_rows
from ..image_chat import chat_image_rows
from ..vision import prompt_rows
from .api_errors import ApiError
from .served import ServedModel

NOT_YET = "not supported yet by this server"
MAX_MEDIA_ITEMS = 16  # images and clips per request
_AUDIO_TYPES = {"wav": ".wav", "mp3": ".mp3", "flac": ".flac", "ogg": ".ogg"}


class MediaParts:
    """A request's images and clips, collected part by part into its temporary `folder`."""

    def __init__(self, folder: Path, allow_dir: Path | None):
        self.folder, self.allow_dir = folder, allow_dir
        self.images: list[Path] = []
        self.clips: list[Path] = []
        self.videos: list[Path] = []

    def part(self, part, where: str) -> dict:
        """The chat template's part for one media part (`{"type": "image"}` / `{"type": "audio"}`)."""
        if len(self.images) + len(self.clips) + len(self.videos) >= MAX_MEDIA_ITEMS:
            raise ApiError(400, f"{where}: more than {MAX_MEDIA_ITEMS} images, clips and videos in one request",
                           where, "too_many_media")
        if part.type == "image_url":
            self.images.append(self._file(part.image_url.url, where, "image"))
            return {"type": "image"}
        if part.type == "video_url":
            self.videos.append(self._file(part.video_url.url, where, "video"))
            return {"type": "video"}
        if part.type == "input_audio":
            raw = _base64(part.input_audio.data, where)
            self.clips.append(self._write(raw, where, _AUDIO_TYPES[part.input_audio.format]))
            return {"type": "audio"}
        raise ApiError(400, f"{where}: {part.type} parts are {NOT_YET}", where, "unsupported_content")

    def _file(self, url: str, where: str, kind: str) -> Path:
        """An image's or a video's file: a data URL's bytes written here, or a local path under the folder."""
        code = f"invalid_{kind}_url"
        if url.startswith("data:"):
            head, comma, data = url.partition(",")
            if not comma or not head.endswith(";base64") or not head[5:].lower().startswith(f"{kind}/"):
                raise ApiError(400, f"{where}: a data URL must be data:{kind}/...;base64,<data>", where, code)
            return self._write(_base64(data, where), where, "")
        path = url[len("file://"):] if url.startswith("file://") else url
        if "://" in path or path.startswith("//"):
            raise ApiError(400, f"{where}: remote {kind} URLs are refused (this server fetches nothing); send a "
                                "data URL", where, code)
        return self._local(path, where, kind, code)

    def _local(self, path: str, where: str, kind: str, code: str) -> Path:
        if self.allow_dir is None:
            raise ApiError(400, f"{where}: local {kind} paths are refused unless the server is started with "
                                "--allow-media-dir (--allow-image-dir); send a data URL", where, code)
        root = self.allow_dir.resolve()
        try:
            resolved = (root / path).resolve()  # an absolute path replaces the root
        except (OSError, ValueError, RuntimeError):  # NUL bytes, symlink loops
            resolved = None
        if resolved is None or not resolved.is_relative_to(root) or not resolved.is_file():
            raise ApiError(400, f"{where}: no such {kind} file under the server's --allow-media-dir", where, code)
        return resolved

    def _write(self, raw: bytes, where: str, suffix: str) -> Path:
        path = self.folder / f"{where}{suffix}"  # named after the part, so a loader's message names it
        path.write_bytes(raw)
        return path


def _base64(data: str, where: str) -> bytes:
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{where}: the data is not valid base64", where, "invalid_base64") from None
    if not raw:
        raise ApiError(400, f"{where}: the data is empty", where, "invalid_base64")
    return raw


def media_prompt(served: ServedModel, messages: list[dict], media: MediaParts, thinking: bool,
                 folder: Path, **tools) -> tuple[list[int], dict]:
    """(prompt ids, the model's prompt inputs, evaluated) for chat messages holding media parts;
    `tools` (tools=, tool_choice=) go to the builders, which then render as `tool_calls.render_chat`."""
    model, tokenizer = served.model, served.tokenizer
    spec = model.image_input
    if media.clips and model.audio_input is None:
        raise ApiError(400, f"the model `{served.name}` takes no audio", "messages", "unsupported_content")
    if media.images and spec is None:
        raise ApiError(400, f"the model `{served.name}` takes no images", "messages", "unsupported_content")
    if media.videos and (spec is None or not spec.variable):
        raise ApiError(400, f"the model `{served.name}` takes no video (Gemma 4 does)", "messages",
                       "unsupported_content")
    try:
        if (spec is not None and spec.variable) or model.audio_input is not None:  # Gemma 4
            rows, found = media_rows(model, tokenizer, [messages], [media.images], [media.clips], chat=True,
                                     enable_thinking=thinking, videos=[[str(v) for v in media.videos]], **tools)
            inputs = found.inputs()
        else:  # Gemma 3: images at its chat template's image parts, as transformers' processor lays them out
            if thinking:
                raise ApiError(400, "enable_thinking: Gemma 1-3 have no thinking mode (Gemma 4 has)",
                               "chat_template_kwargs", "invalid_value")
            rows, pixels = chat_image_rows(model, tokenizer, [messages], [media.images], chat=True, system=None,
                                           **tools)
            inputs = {"pixel_values": pixels}
        mx.eval(list(inputs.values()))  # concrete before another thread's graph uses them
    except MlxGemmaError as e:  # no server paths in the answer
        raise ApiError(400, _no_paths(str(e), media, folder), "messages", "invalid_media") from None
    return rows[0], inputs


def prefix_lm_prompt(served: ServedModel, messages: list[dict], media: MediaParts, thinking: bool,
                     folder: Path) -> tuple[list[int], dict | None]:
    """(prompt ids, the model's inputs or None) of a chat for PaliGemma (see the module docstring)."""
    last = messages[-1]
    if last["role"] != "user":
        raise ApiError(400, "PaliGemma takes no chat template: its prompt is the last message, which must be a "
                            "user message", "messages", "invalid_messages")
    if thinking:
        raise ApiError(400, "enable_thinking: PaliGemma has no thinking mode", "chat_template_kwargs", "invalid_value")
    if media.clips or media.videos:
        raise ApiError(400, f"the model `{served.name}` takes no audio or video", "messages", "unsupported_content")
    content = last["content"] if isinstance(last["content"], list) else [{"type": "text", "text": last["content"]}]
    text = " ".join(p["text"] for p in content if p["type"] == "text").strip()
    n = sum(p["type"] == "image" for p in content)  # the last message's images are the last collected
    if n > 1:
        raise ApiError(400, "PaliGemma takes one image per prompt", "messages", "too_many_media")
    if not text:
        raise ApiError(400, "PaliGemma's prompt (the last message's text) is empty", "messages", "invalid_messages")
    if not n:
        return served.tokenizer.encode(text, add_bos=True), None
    try:
        rows, pixels = prompt_rows(served.model, served.tokenizer, [text], [str(media.images[-1])])
        mx.eval(pixels)  # concrete before another thread's graph uses them
    except MlxGemmaError as e:
        raise ApiError(400, _no_paths(str(e), media, folder), "messages", "invalid_media") from None
    return rows[0], {"pixel_values": pixels}


def _no_paths(message: str, media: MediaParts, folder: Path) -> str:
    """A loader's message without the server's folders in it."""
    message = message.replace(f"{folder}{os.sep}", "")
    if media.allow_dir is not None:
        message = message.replace(f"{media.allow_dir.resolve()}{os.sep}", "")
    return message
