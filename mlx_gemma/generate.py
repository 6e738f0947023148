"""Text generation: streaming and batched generation, and the CLI.

`generate_step` runs the engine (engine.py: chunked prefill, then one token per
step with the KV cache, the next step queued while the host handles the current
one) with the sampling policy.  `stream_generate` turns its ids into
`GenerationResponse`s (text segments, stop handling, speed); `generate` returns
the text; `batch_generate` runs several prompts at once.

    python -m mlx_gemma.generate --model google/gemma-3-270m-it --prompt "Hello"
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import mlx.core as mx

from .api import load
from .arguments import integer_arg
from .models.batch_rows import with_slack
from .models.kv_cache import KVCacheOptions
from .cli import add_cache_flags, add_sampling_flags, console, error_line, kv_options_from, sampling_from
from .distributed.cli import add_distributed_flags, distributed_from, rank_console, running
from .engine import SampleStep, prefill, run, token_budget
from .errors import GenerationError, MlxGemmaError
from .gemma4_prompts import Gemma4Media, media_rows
from .prompt_cache import continuation_ids, load_prompt_cache
from .image_chat import chat_image_rows
from .prompts import RowText, prompt_ids, stop_settings
from .proposers import Speculation
from .responses import GenerationResponse, format_stats, responses_of
from .speculative import SpeculativeStats, SpeculativeStep, one_token_at_a_time
from .vision import prompt_rows

DEFAULT_PROMPT = "hello"  # as mlx-lm's CLI


# ----- the decode loop ------------------------------------------------------------------


def generate_step(model, prompt_ids, cache=None, sampler=None, logits_processors=None,
                  prefill_step_size: int | None = None, max_tokens: int = 256, *, left_padding=None,
                  cached_ids=None, pixel_values=None, media: dict | None = None,
                  kv_options: KVCacheOptions | None = None, proposer=None, num_draft_tokens: int = 3,
                  draft_stats: SpeculativeStats | None = None, **kv_fields) -> Iterator[tuple[list[int], mx.array]]:
    """Generate from `prompt_ids` [B, T] (or [T]); yields per step (ids: list of B ints, logprobs [B, V]).

    `cache` is `model.make_cache(...)` (made here, with `left_padding` and
    `kv_options` -- a `KVCacheOptions`, or its fields as keywords: max_kv_size, kv_bits,
    kv_group_size, quantized_kv_start -- when None; a cache already holding tokens continues from
    them, and `cached_ids` [B, offset] tells the logits processors which).
    `left_padding[b]` counts row b's leading pad slots, which the logits processors
    then ignore.  Stops after `max_tokens` steps or at the context length.  A NaN
    in a row's logits raises GenerationError.  Settings are checked when called.
    `pixel_values` [B, H, W, 3] go with the prompt's `<image>` tokens (PaliGemma); `media`, the
    model's other inputs for the prompt (Gemma 4: `gemma4_prompts.Gemma4Media.inputs()`).
    A `proposer` (proposers.py; one prompt only) makes it speculative: up to `num_draft_tokens`
    proposals checked per forward pass, still one token per item, counted in `draft_stats`.
    """
    ids = prompt_ids if isinstance(prompt_ids, mx.array) else mx.array(prompt_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise GenerationError(f"prompt_ids must be a non-empty [B, T] array of token ids, got shape {ids.shape}")
    if prefill_step_size is not None:
        integer_arg("prefill_step_size", prefill_step_size, 1, error=GenerationError)
    pad = None if left_padding is None else mx.array(left_padding, mx.int32)
    options = KVCacheOptions.of(kv_options, **kv_fields)
    if proposer is not None:
        if ids.shape[0] != 1:
            raise GenerationError(f"speculative decoding runs one prompt at a time, got a batch of {ids.shape[0]}")
        integer_arg("num_draft_tokens", num_draft_tokens, 1, error=GenerationError)
    if cache is None:
        cache = model.make_cache(pad, options)
        if proposer is not None:  # sliding windows keep k more slots, to go back k tokens after wrapping
            cache = with_slack(cache, num_draft_tokens)
    elif options != KVCacheOptions():
        raise GenerationError("cache options (max_kv_size, kv_bits, ...) go to the cache when it is made")
    budget = token_budget(model, cache[0].offset + ids.shape[1], max_tokens)
    inputs = {**({} if pixel_values is None else {"pixel_values": pixel_values}), **(media or {})}
    speculative = None if proposer is None else (proposer, num_draft_tokens, draft_stats)
    return _decode(model, ids.astype(mx.int32), cache, sampler, list(logits_processors or []),
                   prefill_step_size, budget, pad, cached_ids, inputs, speculative)


def _decode(model, ids, cache, sampler, processors, step_size, budget, pad, cached_ids, inputs, speculative):
    """The generator behind `generate_step` (its checks run before the first `next`)."""
    if budget == 0:
        return
    history = None  # what the processors see: prompt then generated ids, pads as -1
    if processors:
        history = ids if pad is None else mx.where(mx.arange(ids.shape[1])[None] < pad[:, None], -1, ids)
        if cached_ids is not None:
            history = mx.concatenate([mx.array(cached_ids, mx.int32).reshape(ids.shape[0], -1), history], axis=1)
    if inputs and model.image_input is None and not model.prefix_lm:
        # Audio on a Gemma 4 without a vision tower: the engine keeps only image blocks whole and
        # hands the media to the first chunk, so the prompt goes in one call (every clip in it).
        step_size = ids.shape[1]
    hidden = prefill(model, ids, cache, step_size, **inputs)
    if speculative is None:
        yield from run(SampleStep(model, cache, sampler, processors, history), hidden, budget)
        return
    proposer, k, stats = speculative
    tokens = (list(cached_ids[0]) if cached_ids is not None else []) + ids[0].tolist()
    policy = SpeculativeStep(model, cache, proposer, tokens, budget, k, sampler, processors, history, stats=stats)
    yield from one_token_at_a_time(run(policy, hidden, budget), budget)


# ----- streaming, full and batched generation ------------------------------------------


def stream_generate(model, tokenizer, prompt, max_tokens: int = 256, sampler=None, logits_processors=None,
                    stop_strings: str | Iterable[str] | None = None, stop_token_ids: Iterable[int] | None = None,
                    chat: bool | None = None, system: str | None = None, prefill_step_size: int | None = None,
                    skip_special_tokens: bool = False, prompt_cache=None, image=None, pan_and_scan=None,
                    audio=None, enable_thinking: bool = False, kv_options: KVCacheOptions | None = None,
                    video=None, draft_model=None, num_draft_tokens: int | None = None,
                    prompt_lookup: int | None = None, **kv_fields) -> Iterator[GenerationResponse]:
    """Generate from one prompt, yielding a `GenerationResponse` per token.

    `prompt`: a string (encoded with <bos>), token ids, or chat messages (see
    `prompt_ids` for `chat` and `system`).  Stops at the tokenizer's eos ids
    (generation_config.json's) and `stop_token_ids` (the stop id itself adds no
    text), at any of `stop_strings` (never emitted, even across tokens), after
    `max_tokens`, or when the sequence fills the context.  `max_tokens=0` yields
    nothing.  Bad settings raise GenerationError here, before iteration.

    `prompt_cache` (a `PromptCache`): reuse the longest prefix of the prompt it
    already holds, feed only the rest (`prompt_tokens` counts those), and leave
    it holding prompt + generated tokens.  Without one, `kv_options` (a
    `KVCacheOptions`, or its fields as keywords: max_kv_size, kv_bits,
    kv_group_size, quantized_kv_start) shape the cache made for this call.

    `image`: a path, PIL image or array; the prompt is then laid out as `[<image> x N] <bos>
    prompt "\n"` (PaliGemma), or, for a Gemma 3 vision-language model, also a list of images,
    each at one `<start_of_image>` of the prompt (or all first when it has none; see `mlx_gemma.vision`).
    Gemma 3 also takes images with the chat template (`chat`, `system`, messages with
    `{"type": "image"}` parts, one image each, in order; see `mlx_gemma.image_chat`), with token ids
    that already hold the image blocks, and with a `prompt_cache` (a cached image is reused only
    if it is the same image).  `pan_and_scan` (Gemma 3; off by default; with a prompt cache too): True or a
    `mlx_gemma.pan_and_scan.PanAndScan` adds crops of wide and tall images, as transformers'
    `do_pan_and_scan`.

    Gemma 4 (a `gemma4` folder with its towers): `image` (one or a list) and `audio` (a WAV/FLAC
    path, bytes or 16 kHz samples; one or a list) go at the prompt's `<|image|>` / `<|audio|>`
    markers, or first when it has none, or at the chat messages' `{"type": "image"}` /
    `{"type": "audio"}` parts, each image with its own number of soft tokens, as Gemma4Processor lays
    them out (see `mlx_gemma.gemma4_prompts`); with a `prompt_cache`, an image or clip already cached
    is reused only if it is the same.  `enable_thinking` turns on Gemma 4's thinking mode in the chat
    template.  `video` (Gemma 4; one or a list: a file path, decoded with PyAV, or uint8 frames
    [T, H, W, 3]) goes at `<|video|>` markers or `{"type": "video"}` parts (else after the images), as
    sampled frames with their "mm:ss" times (see `mlx_gemma.gemma4_video`).

    Speculative decoding (`mlx_gemma.speculative`; exact, greedy or sampled): `draft_model`
    (a model with this vocabulary, or `load`'s pair) or `prompt_lookup=N` (n-grams up to N) proposes up to
    `num_draft_tokens` (3) per step; responses count `draft_accepted` / `draft_proposed`.  With a
    `prompt_cache`, its sliding windows get that much slack (`PromptCache.make_room`), it ends holding
    exactly the tokens kept, and a draft model's caches stay paired with it from call to call.
    """
    request = _Request.checked(model, tokenizer, max_tokens, sampler, logits_processors, stop_strings,
                               stop_token_ids, skip_special_tokens, prefill_step_size, kv_options, kv_fields,
                               Speculation.of(draft_model, num_draft_tokens, prompt_lookup))
    rows_ids, pixels = _encode(model, tokenizer, [prompt], chat, system, None if image is None else [image],
                               prompt_cache is not None, pan_and_scan, None if audio is None else [audio],
                               enable_thinking, None if video is None else [video])
    if prompt_cache is not None:
        if request.kv != KVCacheOptions():
            raise GenerationError("KV-cache options go to the PromptCache when it is made, not to each call")
        return _only_row(_start_cached(model, tokenizer, rows_ids[0], request, prompt_cache, pixels))
    return _only_row(_start(model, tokenizer, rows_ids, request, pixels))


def _only_row(batch) -> Iterator[GenerationResponse]:
    try:
        for responses in batch:
            yield responses[0]
    finally:
        batch.close()  # at once, so a prompt cache records its tokens before the next call


def stream_batch_generate(model, tokenizer, prompts: Sequence, max_tokens: int = 256, sampler=None,
                          logits_processors=None, stop_strings=None, stop_token_ids=None, chat: bool | None = None,
                          system: str | None = None, prefill_step_size: int | None = None, skip_special_tokens: bool = False,
                          image=None, pan_and_scan=None, audio=None, enable_thinking: bool = False,
                          kv_options: KVCacheOptions | None = None, video=None,
                          **kv_fields) -> Iterator[list[GenerationResponse | None]]:
    """Generate from several prompts at once; yields per step a list with one entry per prompt.

    Arguments as `stream_generate`'s.  Prompts are left-padded to the longest;
    each row stops on its own (its entry is None in the steps after its last
    response), and the loop ends when all have.  Under greedy decoding each
    row's tokens equal that prompt's alone.  The context limit applies to the
    padded length.  Speeds are batch-wide (all rows' tokens per second).
    `image`: one image for every prompt, or a list with one per prompt (Gemma 3: an entry may
    be a list of images for that prompt).  `audio` likewise (Gemma 4: a list with one entry per prompt,
    each None, a clip or a list of clips; a single clip goes with every prompt); `video` as `audio`.
    """
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise GenerationError("prompts must be a non-empty list of prompts")
    request = _Request.checked(model, tokenizer, max_tokens, sampler, logits_processors, stop_strings,
                               stop_token_ids, skip_special_tokens, prefill_step_size, kv_options, kv_fields)
    images = image if image is None or isinstance(image, (list, tuple)) else [image] * len(prompts)
    clips = audio if audio is None or isinstance(audio, (list, tuple)) else [audio] * len(prompts)
    videos = video if video is None or isinstance(video, (list, tuple)) else [video] * len(prompts)
    rows_ids, pixels = _encode(model, tokenizer, prompts, chat, system, images, False, pan_and_scan, clips,
                               enable_thinking, videos)
    return _start(model, tokenizer, rows_ids, request, pixels)


@dataclass(frozen=True)
class _Request:
    """What one generation call asks of the engine, checked once before anything runs."""

    max_tokens: int
    sampler: Any  # None: greedy
    processors: list
    stop_ids: frozenset  # the tokenizer's eos ids and the caller's stop ids
    stop_strings: tuple
    skip_special_tokens: bool
    prefill_step_size: int | None  # None: the device's default
    kv: KVCacheOptions
    speculation: Speculation | None = None  # None: one token per forward pass

    @classmethod
    def checked(cls, model, tokenizer, max_tokens, sampler, processors, stop_strings, stop_token_ids,
                skip_special_tokens, prefill_step_size, kv_options, kv_fields, speculation=None) -> _Request:
        integer_arg("max_tokens", max_tokens, 0, error=GenerationError)
        if prefill_step_size is not None:
            integer_arg("prefill_step_size", prefill_step_size, 1, error=GenerationError)
        stop_ids, stops = stop_settings(model, tokenizer, stop_strings, stop_token_ids)
        kv = KVCacheOptions.of(kv_options, **kv_fields)
        return cls(max_tokens, sampler, list(processors or []), stop_ids, stops, skip_special_tokens,
                   prefill_step_size, kv, speculation)

    def rows(self, tokenizer, n: int) -> list[RowText]:
        return [RowText(tokenizer, self.stop_ids, self.stop_strings, self.skip_special_tokens) for _ in range(n)]


def _encode(model, tokenizer, prompts, chat, system, images, cached: bool, pan_and_scan=None, clips=None,
            enable_thinking: bool = False, videos=None) -> tuple[list[list[int]], Any]:
    """Each prompt's token ids, and the pixels of its images (PaliGemma, Gemma 3), a Gemma4Media
    (Gemma 4's images and clips, or any prompt with audio or thinking) or None."""
    spec = model.image_input
    gemma4 = spec is not None and spec.variable
    if clips is not None or videos is not None or enable_thinking or (gemma4 and images is not None):
        if pan_and_scan:
            raise GenerationError("pan & scan is Gemma 3's (its processor's); Gemma 4 sizes each image itself")
        none = [None] * len(prompts)
        return media_rows(model, tokenizer, prompts, images or none, clips or none, chat, system, enable_thinking,
                          videos or none)
    if images is None:
        return [prompt_ids(tokenizer, p, chat, system, model.args.vocab_size) for p in prompts], None
    if spec is not None and spec.start_id is not None and (chat or system or cached or not all(
            isinstance(p, str) for p in prompts)):  # Gemma 3: the chat template, token ids, a cache
        return chat_image_rows(model, tokenizer, prompts, images, chat, system, pan_and_scan)
    if spec is not None and (chat or system or cached):
        raise GenerationError("PaliGemma's image prompts take no chat template, system prompt or prompt cache")
    return prompt_rows(model, tokenizer, prompts, images, pan_and_scan=pan_and_scan)


def _start(model, tokenizer, rows_ids, request: _Request, pixel_values=None):
    """The (not yet started) response generator of a batch of prompts, left-padded to the longest."""
    T = max(len(r) for r in rows_ids)
    pads = [T - len(r) for r in rows_ids]
    filler = tokenizer.pad_id if tokenizer.pad_id >= 0 else 0  # masked out; any valid id would do
    media = pixel_values.inputs() if isinstance(pixel_values, Gemma4Media) else None
    spec, stats, proposer = request.speculation, SpeculativeStats(), None
    if spec is not None:
        proposer = spec.proposer(tokenizer, request.sampler, model.args.vocab_size)
    steps = generate_step(model, mx.array([[filler] * p + r for p, r in zip(pads, rows_ids)]), sampler=request.sampler,
                          logits_processors=request.processors, prefill_step_size=request.prefill_step_size,
                          max_tokens=request.max_tokens, left_padding=pads if any(pads) else None,
                          pixel_values=None if media is not None else pixel_values, media=media,
                          kv_options=request.kv, proposer=proposer, draft_stats=stats,
                          num_draft_tokens=spec.num_draft_tokens if spec is not None else 3)
    return responses_of(steps, request.rows(tokenizer, len(rows_ids)), [len(r) for r in rows_ids],
                     token_budget(model, T, request.max_tokens), stats if spec is not None else None)


def _start_cached(model, tokenizer, ids, request: _Request, prompt_cache, pixels=None):
    """As `_start` for one prompt, continuing what `prompt_cache` holds and recording what is added;
    with `pixels` (Gemma 3), only the images the cache does not hold go through the vision tower."""
    prompt_cache.check(model)
    budget = token_budget(model, len(ids), request.max_tokens)  # before the cache is touched
    media = None
    spec, stats, proposer = request.speculation, SpeculativeStats(), None
    if spec is not None:  # the windows' slack first: a rollback after a wrap needs it
        prompt_cache.make_room(spec.num_draft_tokens)
    if isinstance(pixels, Gemma4Media) or model.audio_input is not None or (
            model.image_input is not None and model.image_input.variable):  # Gemma 4: images and clips by digest
        feed, fed = prompt_cache.prepare_media(ids, pixels or Gemma4Media(), model.image_input, model.audio_input)
        media, pixels = fed.inputs(), None
    elif model.image_input is None or model.image_input.start_id is None:
        feed = prompt_cache.prepare(ids)
    else:
        feed, pixels = prompt_cache.prepare(ids, pixels, model.image_input.token_id)
    if spec is not None:
        proposer = (spec.proposer(tokenizer, request.sampler, model.args.vocab_size) if spec.draft_model is None
                    else prompt_cache.paired_draft(spec, tokenizer, request.sampler, model.args.vocab_size, ids))
    steps = generate_step(model, feed, cache=prompt_cache.caches, sampler=request.sampler,
                          logits_processors=request.processors, prefill_step_size=request.prefill_step_size,
                          max_tokens=request.max_tokens, pixel_values=pixels, media=media,
                          cached_ids=[prompt_cache.tokens] if prompt_cache.tokens else None, proposer=proposer,
                          draft_stats=stats, num_draft_tokens=spec.num_draft_tokens if spec is not None else 3)
    return prompt_cache.recorded(responses_of(steps, request.rows(tokenizer, 1), [len(feed)], budget,
                                              stats if spec is not None else None), ids)


def generate(model, tokenizer, prompt, verbose: bool = False, **kwargs) -> str:
    """The generated text (see `stream_generate` for the arguments); `verbose` prints it as it comes, then stats."""
    parts, last = [], None
    if verbose:
        print("=" * 10)
    for last in stream_generate(model, tokenizer, prompt, **kwargs):
        parts.append(last.text)
        if verbose:
            print(last.text, end="", flush=True)
    if verbose:
        print("\n" + "=" * 10)
        print(format_stats(last) if last is not None else "No text generated for this prompt")
    return "".join(parts)


def batch_generate(model, tokenizer, prompts: Sequence, max_tokens: int = 256, verbose: bool = False,
                   **kwargs) -> list[str]:
    """The generated text of each prompt (see `stream_batch_generate`)."""
    texts = [[] for _ in prompts]
    last = None
    for responses in stream_batch_generate(model, tokenizer, prompts, max_tokens, **kwargs):
        for b, r in enumerate(responses):
            if r is not None:
                texts[b].append(r.text)
                last = r
    if verbose and last is not None:
        print(f"[batch_generate] {len(prompts)} prompts; prompt: {last.prompt_tps:.3f} tokens-per-sec, "
              f"generation: {last.generation_tps:.3f} tokens-per-sec, peak memory: {last.peak_memory:.3f} GB")
    return ["".join(t) for t in texts]


# ----- command line --------------------------------------------------------------------

# "-it" / "instruct" in a folder or repo name marks an instruction-tuned checkpoint.
_INSTRUCT_NAME = re.compile(r"instruct|(?:^|[-_.])it(?:$|[-_.])", re.IGNORECASE)


def looks_instruct(model_arg: str | None, folder, tokenizer=None) -> bool:
    """Whether to use the chat template when the user did not say (--chat / --no-chat).

    Yes if the --model argument or the folder's last three path parts (a hub
    snapshot sits in models--org--name/snapshots/<hash>) name an instruct model
    ("-it", "instruct").  Stop ids cannot tell: Google's Gemma 3 base
    checkpoints also stop on <end_of_turn>.
    """
    names = ([str(model_arg)] if model_arg else []) + (list(Path(folder).parts[-3:]) if folder else [])
    return any(_INSTRUCT_NAME.search(name) for name in names)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_gemma.generate",
                                description="Generate text with a Gemma model (flags follow mlx_lm.generate).")
    p.add_argument("--model", default=None, help="model folder or hub repo id (default: the packaged model)")
    p.add_argument("--adapter-path", help="LoRA adapter folder (adapters.safetensors + adapter_config.json) to apply")
    p.add_argument("--prompt", "-p", default=DEFAULT_PROMPT, help="the prompt; '-' reads it from stdin")
    add_sampling_flags(p)
    p.add_argument("--system", "--system-prompt", dest="system", help="system prompt (needs the chat template)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap the prompt in the chat template (default: on for instruct models, "
                        "i.e. '-it'/'instruct' in the name or a generation config stopping on <end_of_turn>)")
    p.add_argument("--ignore-chat-template", dest="chat", action="store_false", help="same as --no-chat")
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop at this text, not printed (repeatable)")
    p.add_argument("--image", action="append", metavar="PATH",
                   help="an image for the prompt (repeatable): PaliGemma answers once per image (-p 'caption en'); "
                        "Gemma 3 takes them all in one prompt, at its <start_of_image> markers or first, "
                        "in the chat template's user turn with --chat (the default for instruct models)")
    p.add_argument("--audio", action="append", metavar="PATH",
                   help="Gemma 4 (E2B / E4B): an audio clip (WAV, FLAC, OGG) for the prompt (repeatable), at its "
                        "<|audio|> markers or first, or in the chat template's user turn")
    p.add_argument("--video", action="append", metavar="PATH",
                   help="Gemma 4: a video file (needs PyAV: pip install 'mlx_gemma[video]'; repeatable), its sampled "
                        "frames at the prompt's <|video|> markers or after the images")
    p.add_argument("--enable-thinking", action="store_true",
                   help="Gemma 4: turn on its thinking mode in the chat template")
    p.add_argument("--pan-and-scan", action="store_true",
                   help="Gemma 3: also give the model crops of wide or tall images (transformers' do_pan_and_scan)")
    add_cache_flags(p)
    p.add_argument("--prompt-cache-file", help="start from a prompt cache written by python -m mlx_gemma.cache_prompt; "
                                               "the prompt continues the cached text")
    add_speculation_flags(p)
    p.add_argument("--verbose", action="store_true", help="also print settings and the finish reason to stderr")
    add_distributed_flags(p)
    return p


def add_speculation_flags(p: argparse.ArgumentParser) -> None:
    """--draft-model, --num-draft-tokens, --prompt-lookup (generate's and chat's command lines)."""
    p.add_argument("--draft-model", help="speculative decoding: a smaller model folder or hub id with the same vocabulary")
    p.add_argument("--num-draft-tokens", type=int, default=None, help="most tokens proposed per step (default 3)")
    p.add_argument("--prompt-lookup", type=int, default=None, metavar="N",
                   help="speculative decoding without a draft: propose what followed the last N-gram in the text")


def speculation_from(args) -> dict:
    """The speculative-decoding keywords of `stream_generate` from the flags (loading a draft model)."""
    return dict(draft_model=load(args.draft_model) if args.draft_model else None,
                num_draft_tokens=args.num_draft_tokens, prompt_lookup=args.prompt_lookup)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out, err = console()
    last, wrote = None, False
    try:
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
        sampling = sampling_from(args)
        sampler, processors = sampling.sampler(), sampling.processors()
        kv_options, prompt_cache, model_arg = kv_options_from(args), None, args.model
        ranks = distributed_from(args)  # --pipeline / --tensor-parallel: group= and strategy= for load
        if args.prompt_cache_file:
            if kv_options != KVCacheOptions() or args.system:
                raise GenerationError("--prompt-cache-file: the cache options and the system prompt were fixed "
                                      "when the cache was made (python -m mlx_gemma.cache_prompt)")
            prompt_cache = load_prompt_cache(args.prompt_cache_file)
            model_arg = args.model or prompt_cache.metadata.get("model")
        model, tokenizer = load(model_arg, adapter_path=args.adapter_path, **ranks)
        speculation = speculation_from(args)
        out, err = rank_console(ranks, out, err)
        folder = model.path
        gemma3_images = model.image_input is not None and model.image_input.start_id is not None
        chat = args.chat if args.chat is not None else (
            (not args.image or gemma3_images) and looks_instruct(model_arg, folder, tokenizer))
        if prompt_cache is not None:
            prompt_cache.check(model)
            chat = args.chat if args.chat is not None else prompt_cache.metadata.get("chat") == "true"
        if args.verbose:
            print(f"model: {folder}\nchat template: {'on' if chat else 'off'}"
                  f"{' (auto)' if args.chat is None else ''}", file=err)
        if prompt_cache is not None:  # the cached ids, then the prompt (and the turn's end, in chat)
            prompt, chat = prompt_cache.tokens + continuation_ids(tokenizer, prompt, chat), None
        images = args.image or [None]
        if args.image and gemma3_images:
            images = [args.image]  # Gemma 3: every image in the one prompt
        for image in images:
            if len(images) > 1:
                print(f"[{image}]", file=out, flush=True)
            with running(ranks, "generating"):
                for last in stream_generate(model, tokenizer, prompt, max_tokens=args.max_tokens, sampler=sampler,
                                            logits_processors=processors, stop_strings=args.stop, chat=chat,
                                            system=args.system, prompt_cache=prompt_cache, image=image,
                                            pan_and_scan=args.pan_and_scan or None, audio=args.audio,
                                            video=args.video, enable_thinking=args.enable_thinking, **speculation,
                                            kv_options=None if prompt_cache is not None else kv_options):
                    if last.text:
                        print(last.text, end="", file=out, flush=True)
                        wrote = True
            print(file=out, flush=True)
        if last is not None:
            print("=" * 10 + "\n" + format_stats(last), file=err)
            if args.verbose:
                print(f"finish reason: {last.finish_reason}", file=err)
        return 0
    except MlxGemmaError as e:
        print(error_line(e), file=err)
        return 2
    except KeyboardInterrupt:
        print(file=out, end="\n" if wrote else "", flush=True)
        done = f" after {last.generation_tokens} tokens" if last is not None else ""
        print(f"interrupted{done}", file=err)
        return 130
    except BrokenPipeError:  # e.g. piped into `head`: nothing left to write to
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
