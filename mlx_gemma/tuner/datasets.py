"""Fine-tuning data: JSON-lines files -> tokenized examples -> padded batches.

Each line of `train.jsonl` / `valid.jsonl` / `test.jsonl` is one example in
one of the formats people already have:

    {"text": "..."}                                   loss on every token
    {"prompt": "...", "completion": "..."}            prompt + completion, concatenated
    {"messages": [{"role": ..., "content": ...}, ...]} the Gemma chat template
    {"image": path, "prefix": ..., "suffix": ...}     PaliGemma: loss on the suffix only

With `mask_prompt` the loss covers only the completion (or the last model
turn of a conversation).  An example is (token ids, offset[, image path]):
the loss covers ids[offset:]; for PaliGemma the offset is also the length of
the bidirectional prefix.  Batches group examples of similar length (sorted),
are padded on the right, and come with per-target loss weights, so padding
and prompts cost nothing in the loss.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Iterator

import mlx.core as mx
import numpy as np

from ..errors import DatasetError, MlxGemmaError, TrainingError
from ..vision import preprocess_images, prompt_ids

SPLITS = ("train", "valid", "test")
MAX_LINE_BYTES = 64 << 20  # one example; a longer line is surely not a training example
PAD_TO = 32  # round batch lengths up so a compiled step sees few distinct shapes (as mlx-lm)


# Models the tuner cannot train yet, with why.  Its examples, batches and loss follow
# PaliGemma (image first, a bidirectional prefix); a Gemma 3 VLM lays images out in the text
# with causal attention around them, and its language half sits under other weight names
# (`model.language_model.*`) than the adapters a text run would save, so training it as
# PaliGemma would be silently wrong: it is refused instead (issue 19).
UNTRAINABLE = {
    "gemma3": "Gemma 3 with images (its image layout is not PaliGemma's, and adapters for its language "
              "half are not supported yet; a Gemma 3 text folder, model_type gemma3_text, trains)",
    # A loaded `gemma4` model has a vision or audio tower (a tower-less config loads as gemma4_text).
    "gemma4": "Gemma 4 with images or audio (its media layout is not PaliGemma's, and adapters for its language "
              "half are not supported yet; a Gemma 4 text folder, model_type gemma4_text, trains)",
    "shieldgemma2": "ShieldGemma 2 (an image classifier, not a causal LM to fine-tune here)",
    "embedding_gemma": "EmbeddingGemma (a sentence encoder: no next-token loss to train)",
}


def training_images(model) -> tuple[int, int] | None:
    """(image tokens per image, the `<image>` id) for PaliGemma, None for a text model;
    a model the tuner would treat wrongly is a TrainingError naming its model type."""
    model_type, spec = model.model_type, model.image_input
    if model_type in UNTRAINABLE or (spec is not None and spec.start_id is not None):
        what = UNTRAINABLE.get(model_type, UNTRAINABLE["gemma3"])
        raise TrainingError(f"model_type {model_type!r}: LoRA / fine-tuning does not support {what}")
    return None if spec is None else (spec.num_tokens, spec.token_id)


def _image_example(tokenizer, record, where: str, folder: Path, images) -> tuple[list[int], int, str]:
    """(ids, offset, image path) for PaliGemma: `[<image> x N] <bos> prefix "\\n"` then suffix <eos>."""
    if images is None:
        raise DatasetError(where, "an 'image' example needs a PaliGemma model (this one takes no images)")
    image, prefix, suffix = record.get("image"), record.get("prefix", ""), record.get("suffix")
    if not isinstance(image, str) or not isinstance(prefix, str) or not isinstance(suffix, str):
        raise DatasetError(where, "'image' (a path), 'prefix' and 'suffix' must be strings")
    path = folder / image  # relative paths are relative to the JSONL file
    try:
        found = path.is_file()
    except (OSError, ValueError) as e:  # a name too long for the file system, or holding a NUL
        raise DatasetError(where, f"'image' {image!r:.200} is not a usable path: {e}") from None
    if not found:
        raise DatasetError(where, f"no such image file {str(path)!r:.300}")
    num_image_tokens, image_token_id = images
    head = prompt_ids(tokenizer, prefix, num_image_tokens, image_token_id)
    return head + tokenizer.encode(suffix, add_bos=False, add_eos=True), len(head), str(path)


def _example(tokenizer, record, mask_prompt: bool, where: str, folder: Path, images=None) -> tuple:
    """(ids, offset[, image]) for one parsed JSON line; `where` is "file:line" for errors."""
    if not isinstance(record, dict):
        raise DatasetError(where, f"expected a JSON object, got {type(record).__name__}")
    if "image" in record:
        return _image_example(tokenizer, record, where, folder, images)
    if "messages" in record:
        messages = record["messages"]
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=True)
            offset = 0
            if mask_prompt:
                if messages[-1].get("role") not in ("model", "assistant"):
                    raise DatasetError(where, "with mask_prompt the last message must be the model's (assistant) turn")
                offset = _prompt_length(tokenizer, messages, ids)
        except DatasetError:
            raise
        except (MlxGemmaError, AttributeError, TypeError, IndexError) as e:
            raise DatasetError(where, f"bad messages: {e}") from None
        return ids, offset
    if "prompt" in record or "completion" in record:
        prompt, completion = record.get("prompt"), record.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise DatasetError(where, "'prompt' and 'completion' must both be strings")
        # Tokenized separately and concatenated, as keras-hub's preprocessor joins x and y.
        head = tokenizer.encode(prompt, add_bos=True)
        ids = head + tokenizer.encode(completion, add_bos=False, add_eos=True)
        return ids, len(head) if mask_prompt else 0
    if "text" in record:
        if not isinstance(record["text"], str):
            raise DatasetError(where, "'text' must be a string")
        return tokenizer.encode(record["text"], add_bos=True, add_eos=True), 0
    raise DatasetError(where, f"no 'text', 'prompt'/'completion' or 'messages' key (keys: {sorted(record)})")


def _prompt_length(tokenizer, messages: list, ids: list[int]) -> int:
    """Where the loss starts in a conversation's `ids`: the length of the generation prompt of the
    messages before the last, as far as it agrees with `ids`.

    Gemma 4's 26B / 31B generation prompt closes an empty thought channel that a rendered model turn
    does not hold (mlx_gemma/chat_template.py), so it is rendered without one; and consecutive
    assistant messages share a turn (no <turn|> between them), so there the prompt agrees with
    `ids` only up to the last message's text: the common prefix is the offset.
    """
    gemma4 = {"empty_thought": False} if tokenizer.chat_format == "gemma4" else {}
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True, **gemma4)
    n = 0
    while n < min(len(prompt), len(ids)) and prompt[n] == ids[n]:
        n += 1
    return n


def load_jsonl(path: str | os.PathLike, tokenizer, mask_prompt: bool = False,
               max_seq_length: int | None = None, images: tuple[int, int] | None = None) -> list[tuple]:
    """Tokenized examples of a JSONL file; long ones truncated to `max_seq_length` with a warning.

    `images`: (image tokens per image, the `<image>` id) of a PaliGemma model, for image examples.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, "no such data file")
    examples, truncated = [], 0
    with open(path, "rb") as f:
        # Read at most one line's cap at a time: a file without newlines must not be read whole.
        for n, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), start=1):
            where = f"{path}:{n}"
            if len(raw) > MAX_LINE_BYTES:
                raise DatasetError(where, f"line is over {MAX_LINE_BYTES} bytes")
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, or an integer of over 4300 digits
                raise DatasetError(where, f"not valid JSON: {e}") from None
            except RecursionError:
                raise DatasetError(where, "JSON nested too deeply") from None
            try:
                ids, offset, *image = _example(tokenizer, record, mask_prompt, where, path.parent, images)
            except DatasetError:
                raise
            except MlxGemmaError as e:  # the tokenizer's refusals (text that is not valid Unicode, ...)
                raise DatasetError(where, str(e)) from None
            if max_seq_length is not None and len(ids) > max_seq_length:
                ids, truncated = ids[:max_seq_length], truncated + 1
            if offset >= len(ids) - 1 and offset > 0:
                continue  # the prompt fills the whole budget: nothing left to learn from
            if len(ids) >= 2:
                examples.append((ids, offset, *image))
    if truncated:
        warnings.warn(f"{path}: {truncated} example(s) longer than max_seq_length={max_seq_length} "
                      "tokens were truncated", stacklevel=2)
    if not examples:
        raise DatasetError(path, "holds no usable example (empty, or every example is too short)")
    return examples


def load_datasets(folder: str | os.PathLike, tokenizer, splits=SPLITS, mask_prompt: bool = False,
                  max_seq_length: int | None = None, images: tuple[int, int] | None = None) -> dict[str, list]:
    """{split: examples} for the `<split>.jsonl` files of `folder` that exist among `splits`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(folder, "no such data folder (expected train.jsonl, valid.jsonl, test.jsonl)")
    return {s: load_jsonl(folder / f"{s}.jsonl", tokenizer, mask_prompt, max_seq_length, images)
            for s in splits if (folder / f"{s}.jsonl").exists()}


def make_batch(examples, pad_id: int = 0, pad_to: int = PAD_TO, image_size: int | None = None):
    """Right-padded (inputs [B, T], targets [B, T], weights [B, T] float32) for next-token loss,
    plus (pixel values [B, H, W, 3], prefix lengths [B]) for image examples.

    Target j is token j + 1; its weight is 1 when that token is real and at or
    past the example's offset, else 0.
    """
    longest = max(len(example[0]) for example in examples) - 1
    T = max(pad_to * ((longest + pad_to - 1) // pad_to), 1) if pad_to else longest
    tokens = np.full((len(examples), T + 1), pad_id, dtype=np.int32)
    weights = np.zeros((len(examples), T), dtype=np.float32)
    for row, (ids, offset, *_) in enumerate(examples):
        tokens[row, :len(ids)] = ids
        weights[row, max(offset, 1) - 1:len(ids) - 1] = 1.0
    batch = (mx.array(tokens[:, :-1]), mx.array(tokens[:, 1:]), mx.array(weights))
    if len(examples[0]) == 3:  # PaliGemma: images are read when their batch comes up
        if image_size is None:
            raise DatasetError(examples[0][2], "image examples need the model's image size")
        pixels = preprocess_images([image for _, _, image in examples], image_size)
        batch += (pixels, mx.array([offset for _, offset, _ in examples], dtype=mx.int32))
    return batch


def iterate_batches(examples, batch_size: int, *, loop: bool = False, seed: int = 0, shuffle: bool = True,
                    pad_id: int = 0, rank: int = 0, world: int = 1,
                    image_size: int | None = None) -> Iterator[tuple[mx.array, ...]]:
    """Padded batches of examples of similar length; with `loop`, forever (reshuffled each pass).

    With `world` > 1 each rank takes its own share of every batch (data parallel).
    """
    if batch_size < 1:
        raise MlxGemmaError(f"batch_size must be positive, got {batch_size}")
    if len(examples) < batch_size:
        raise DatasetError(None, f"the dataset has {len(examples)} examples, fewer than batch_size={batch_size}")
    if batch_size % world:
        raise MlxGemmaError(f"batch_size={batch_size} must be a multiple of the number of processes ({world})")
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    batches = [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    rng = np.random.default_rng(seed)
    share = batch_size // world
    while True:
        for b in (rng.permutation(len(batches)) if shuffle else range(len(batches))):
            rows = batches[b][rank * share:(rank + 1) * share]
            yield make_batch([examples[i] for i in rows], pad_id, image_size=image_size)
        if not loop:
            return
