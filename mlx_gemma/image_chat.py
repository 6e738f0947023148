"""Chat with images (Gemma 3): the chat template's image parts laid out as transformers'
Gemma3Processor lays them out, and what a prompt cache needs to know of the images it holds.

transformers renders Gemma 3's chat template (an image part becomes `<start_of_image>`), then its
processor replaces each `<start_of_image>` with `"\\n\\n<start_of_image>"`, the soft tokens and
`"<end_of_image>\\n\\n"` and tokenizes the whole string; `image_block` is that replacement, which
`GemmaTokenizer.apply_chat_template(..., image_block=...)` splices in before tokenizing (the
`"\\n\\n"` runs join the text around them, as in the processor's string).  With `tools` / `tool_choice`
the chat is rendered by `tool_calls.render_chat` (the text path's renderer: Google's prompted format,
declarations folded into the first user turn) and the blocks spliced into that rendering the same way.

The soft tokens of every image are the same id, so token ids alone cannot tell two images
apart: `image_spans` finds each image's block in the ids and `image_digests` names its pixels,
and a prompt cache reuses a cached image only where the digest is the same.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from .errors import GenerationError, ImageError
from .pan_and_scan import pan_and_scan_settings
from .prompts import prompt_ids
from .tool_calls import render_chat
from .vision import gemma3_prompt_ids, image_segments, preprocess_images, text_between_images, with_crops


def image_block(spec) -> list:
    """Gemma3Processor's expansion of one `<start_of_image>`: text and ids, as the tokenizer's segments."""
    return ["\n\n", spec.start_id, *[spec.token_id] * spec.num_tokens, spec.end_id, "\n\n"]


def user_content(text: str, n_images: int, marker: str) -> str | list[dict]:
    """A user turn's content: `text` alone, or image parts at each `marker` (`<start_of_image>`) in
    it, or, without markers, the images first (as Gemma 3's examples place them), then the text."""
    if not n_images:
        return text
    parts = text_between_images(text, marker, n_images)
    content: list[dict] = []
    for i, piece in enumerate(parts):
        if piece:
            content.append({"type": "text", "text": piece})
        if i < n_images:
            content.append({"type": "image"})
    return content


def count_image_parts(messages) -> int:
    """How many `{"type": "image"}` parts chat messages hold."""
    return sum(1 for m in messages if isinstance(m, dict) and isinstance(m.get("content"), Sequence)
               and not isinstance(m["content"], str)
               for part in m["content"] if isinstance(part, dict) and part.get("type") == "image")


def image_spans(ids: Sequence[int], token_id: int) -> list[tuple[int, int]]:
    """(start, end) of each run of image soft tokens in `ids`, in order."""
    spans, start = [], None
    for i, t in enumerate(list(ids) + [None]):
        if t == token_id and start is None:
            start = i
        elif t != token_id and start is not None:
            spans.append((start, i))
            start = None
    return spans


def image_digests(pixel_values: mx.array | None) -> list[str]:
    """A name for each image's pixels [N, H, W, 3]: equal only for the same preprocessed image."""
    if pixel_values is None:
        return []
    array = np.array(pixel_values.astype(mx.float32))
    return [hashlib.sha256(image.tobytes()).hexdigest() for image in array]


def chat_image_rows(model, tokenizer, prompts, images, chat, system, pan_and_scan=None, tools=None,
                    tool_choice=None) -> tuple[list[list[int]], mx.array]:
    """(token ids per prompt, pixel values [N, H, W, 3]) of Gemma 3 prompts with images: strings
    (with the chat template when `chat`), chat messages with image parts, or token ids that already
    hold the image blocks.  `images` has one entry per prompt: an image or a list of them, in order;
    with `pan_and_scan`, each is followed by its crops (not for token ids: see `mlx_gemma.pan_and_scan`).
    `tools` (OpenAI function tools) and `tool_choice`, when either is given, render each chat as
    `render_chat` does (`tools=[]`: earlier calls and results, nothing declared); they need the chat
    template, and the images must be in user turns (the prompted format's results are text)."""
    spec = model.image_input
    if len(images) != len(prompts):
        raise ImageError("image", f"{len(images)} image entries for {len(prompts)} prompts; give one per prompt")
    per_prompt = [list(im) if isinstance(im, (list, tuple)) else [im] for im in images]
    flat, n_crops = with_crops([im for ims in per_prompt for im in ims], pan_and_scan_settings(pan_and_scan))
    rows, seen = [], 0
    for p, ims in zip(prompts, per_prompt):
        rows.append(_row(model, tokenizer, p, len(ims), chat, system, n_crops[seen:seen + len(ims)],
                         (tools, tool_choice)))
        seen += len(ims)
    # Bilinear: Gemma3ImageProcessor's resample.
    return rows, preprocess_images(flat, spec.image_size, "bilinear")


def _row(model, tokenizer, prompt, n_images: int, chat, system, crops: list[int],
         tools: tuple = (None, None)) -> list[int]:
    spec = model.image_input
    marker = tokenizer.id_to_piece(spec.start_id)
    with_tools = tools != (None, None)
    if isinstance(prompt, str) and not chat:
        if system or with_tools:
            raise GenerationError("a system prompt or tools need the chat template (chat=True / --chat)")
        return gemma3_prompt_ids(tokenizer, prompt, n_images, spec, crops)
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": user_content(prompt, n_images, marker)}]
    elif isinstance(prompt, Sequence) and prompt and all(isinstance(m, dict) for m in prompt):
        if chat is False:
            raise GenerationError("chat messages need the chat template, but chat=False was asked for")
        messages = list(prompt)
        if count_image_parts(messages) != n_images:
            raise ImageError("image", f"the messages hold {count_image_parts(messages)} image parts for "
                                      f"{n_images} image(s); give one image per part")
    elif with_tools:
        raise GenerationError("tools are declared by rendering the chat: give chat messages or text, not token ids")
    else:  # token ids, image blocks included
        if any(crops):
            raise ImageError("pan_and_scan", "pan & scan lays out the prompt's text; token ids come as given")
        ids = prompt_ids(tokenizer, prompt, chat, system, model.args.vocab_size)
        if len(image_spans(ids, spec.token_id)) != n_images:
            raise ImageError("image", f"the prompt's ids hold {len(image_spans(ids, spec.token_id))} image blocks "
                                      f"for {n_images} image(s)")
        return ids
    if system:
        if messages[0].get("role") == "system":
            raise GenerationError("system given twice: as an argument and as the first message")
        messages.insert(0, {"role": "system", "content": system})
    blocks = [image_segments(spec, n) for n in crops] if any(crops) else image_block(spec)
    if not with_tools:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, image_block=blocks)
    ids = render_chat(tokenizer, messages, *tools, add_generation_prompt=True, tokenize=True, image_block=blocks)
    # The prompted format writes tool results (and a system prompt beside tools) as text: an image
    # there would silently leave the prompt, and the pixels without their place.
    wanted = sum(b.count(spec.start_id) for b in blocks) if any(crops) else n_images
    if ids.count(spec.start_id) != wanted:
        raise ImageError("image", f"the messages hold {n_images} image parts, but Gemma 3's prompted tool format "
                                  "keeps only those of user messages (its tool results and system prompt are text)")
    return ids
