"""Text generation: the decode loop, streaming and batched generation, and the CLI.

`generate_step` is the one decode loop everything else uses: chunked prefill,
then one token per step with the KV cache, the next step queued on the device
(`mx.async_eval`) while the host handles the current token.  `stream_generate`
turns its ids into `GenerationResponse`s (text segments, stop handling, speed);
`generate` returns the text; `batch_generate` runs several prompts at once.

    python -m mlx_gemma.generate --model google/gemma-3-270m-it --prompt "Hello"
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .cache import check_kv_options
from .errors import GenerationError, MlxGemmaError
from .cli import add_cache_flags, add_sampling_flags, console, error_line, kv_options_from, sampling_from
from .prompts import RowText, prompt_ids, stop_settings
from .samplers import apply_processors, greedy

DEFAULT_PROMPT = "hello"  # as mlx-lm's CLI
# Prompt tokens per forward call during prefill (mlx-lm's default), counted across the
# batch: B rows take PREFILL_STEP_SIZE // B positions per call, so a batch's prefill holds
# the activations one prompt's does (mlx-lm takes 2048 positions of every row).  Larger
# chunks keep a GPU busy; each chunk's activations are what prefill memory scales with,
# and only the last position of the last chunk goes through the vocabulary-sized head.
PREFILL_STEP_SIZE = 2048
# Soft-capped attention (Gemma 2) cannot use the fused kernel: it spells out float32
# scores [heads, chunk, keys], so its chunks are smaller (measured on a 5000-token Gemma 2
# prompt: 2048-token chunks peaked at 1.8x mlx-lm's memory, 512-token ones at 0.54x).
SOFTCAP_PREFILL_STEP_SIZE = 512
# A CPU gains nothing from long chunks, and short ones keep each product's activations
# small (in cache, and little to allocate ahead of the work: MLX's CPU backend allocates
# an operation's output when it queues it).  Measured on a 2-core x86 CPU, medians of 3,
# prefill time and peak above the weights by rows per chunk (positions x batch):
#   Gemma 3 270M bf16, 1023-token prompt: 2048 rows 48-55 s, 77 MB; 256: 39 s, 28 MB;
#     64: 43 s, 18 MB; 32: 38 s, 18 MB; 16: 38 s, 18 MB (the cache is most of it);
#   Gemma 2 2B-shaped (2 layers) bf16, 128 tokens: 128 rows 5.5 s, 24 MB; 64: 4.4 s, 13 MB;
#     32: 3.6 s, 8 MB; 16: 3.4 s, 6 MB; 8: 3.7 s, 5 MB;
#   the same, 4 prompts of 128: 256 rows 16.7 s, 51 MB; 64: 11.8 s, 24 MB; 32: 12.0 s, 19 MB.
CPU_PREFILL_STEP_SIZE = 32
# Quantized weights are dequantized once per chunk on the CPU (see cpu_spread), so longer
# chunks pay off there: Gemma 3 270M 4-bit, 128 tokens, medians of 6: 64 rows 5.3 s, 32 rows
# 6.2 s (of 3: 256 rows 4.7 s, 7 MB above the weights, against 6 MB at 64 and 32).
CPU_QUANTIZED_PREFILL_STEP_SIZE = 256
_CLEAR_CACHE_EVERY = 256  # decode steps between returns of freed buffers to the allocator


@dataclass
class GenerationResponse:
    """One generated token and what it adds.

    `text` may be "" (an unfinished UTF-8 character, or text held back because it
    could begin a stop string).  `logprobs` is the step's log-softmax [V] after the
    logits processors.  `prompt_tokens` counts the prompt tokens fed (with a prompt
    cache, those it did not already hold).  Speeds are tokens/s: `prompt_tps` over
    the prefill (up to the first token), `generation_tps` since the first token.  `peak_memory` is in
    GB.  `finish_reason` is None until the last response: "stop" (a stop id or
    string) or "length" (max_tokens or the context length).
    """

    text: str
    token: int
    logprobs: mx.array
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    finish_reason: str | None = None


_streams: dict[str, mx.Stream] = {}


def generation_stream() -> mx.Stream:
    """A stream of its own for generation on the current default device (made once per device)."""
    device = mx.default_device()
    if repr(device) not in _streams:
        _streams[repr(device)] = mx.new_stream(device)
    return _streams[repr(device)]


# ----- the decode loop ------------------------------------------------------------------


def _positive_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise GenerationError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def token_budget(model, prompt_length: int, max_tokens: int) -> int:
    """How many tokens may follow a prompt: max_tokens, or fewer at the context length.

    The whole sequence (prompt + generated) must fit the model's
    `max_position_embeddings`, so that it can be fed back in a later turn.
    """
    _positive_int("max_tokens", max_tokens, 0)
    context = model.args.max_position_embeddings
    if prompt_length >= context:
        raise GenerationError(
            f"the prompt is {prompt_length} tokens, but the model's context length is {context}: "
            "shorten the prompt")
    return min(max_tokens, context - prompt_length)


def default_prefill_step(model, rows: int = 1) -> int:
    """Prompt positions per forward call for a batch of `rows` when the caller does not say."""
    if mx.default_device() == mx.cpu:
        quantized = isinstance(model, nn.Module) and any(
            isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
        return max(1, (CPU_QUANTIZED_PREFILL_STEP_SIZE if quantized else CPU_PREFILL_STEP_SIZE) // rows)
    softcapped = getattr(model.args, "attn_logit_softcapping", None) is not None
    return max(1, (SOFTCAP_PREFILL_STEP_SIZE if softcapped else PREFILL_STEP_SIZE) // rows)


def generate_step(model, prompt_ids, cache=None, sampler=None, logits_processors=None,
                  prefill_step_size: int | None = None, max_tokens: int = 256, *, left_padding=None,
                  cached_ids=None, pixel_values=None, **kv_options) -> Iterator[tuple[list[int], mx.array]]:
    """Generate from `prompt_ids` [B, T] (or [T]); yields per step (ids: list of B ints, logprobs [B, V]).

    `cache` is `model.make_cache(...)` (made here, with `left_padding` and
    `kv_options` -- max_kv_size, kv_bits, kv_group_size, quantized_kv_start, see
    `mlx_gemma.cache` -- when None; a cache already holding tokens continues from
    them, and `cached_ids` [B, offset] tells the logits processors which).
    `left_padding[b]` counts row b's leading pad slots, which the logits processors
    then ignore.  Stops after `max_tokens` steps or at the context length.  A NaN
    in a row's logits raises GenerationError.  Settings are checked when called.
    `pixel_values` [B, H, W, 3] go with the prompt's `<image>` tokens (PaliGemma).
    """
    ids = prompt_ids if isinstance(prompt_ids, mx.array) else mx.array(prompt_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise GenerationError(f"prompt_ids must be a non-empty [B, T] array of token ids, got shape {ids.shape}")
    if prefill_step_size is None:
        prefill_step_size = default_prefill_step(model, ids.shape[0])
    _positive_int("prefill_step_size", prefill_step_size, 1)
    if getattr(model, "prefix_lm", False):  # the prompt attends both ways: prefill it in one call
        prefill_step_size = max(prefill_step_size, ids.shape[1])
    pad = None if left_padding is None else mx.array(left_padding, mx.int32)
    if cache is None:
        if kv_options:
            kv_options = check_kv_options(getattr(model.args, "head_dim", None), **kv_options)
        cache = model.make_cache(left_padding=pad, **kv_options)
    elif kv_options:
        raise GenerationError("cache options (max_kv_size, kv_bits, ...) go to the cache when it is made")
    budget = token_budget(model, cache[0].offset + ids.shape[1], max_tokens)
    return _decode(model, ids.astype(mx.int32), cache, sampler or greedy, list(logits_processors or []),
                   prefill_step_size, budget, pad, cached_ids, pixel_values)


def _decode(model, ids, cache, sampler, processors, step_size, budget, pad, cached_ids, pixel_values=None):
    if budget == 0:
        return
    stream = generation_stream()
    history = None  # what the processors see: prompt then generated ids, pads as -1
    if processors:
        history = ids if pad is None else mx.where(mx.arange(ids.shape[1])[None] < pad[:, None], -1, ids)
        if cached_ids is not None:
            history = mx.concatenate([mx.array(cached_ids, mx.int32).reshape(ids.shape[0], -1), history], axis=1)

    def forward(y, fed_back: bool, **images):
        nonlocal history
        hidden = model.model(y, cache=cache, **images)
        logits = model.logits(hidden[:, -1, :]).astype(mx.float32)  # the head on the last position only
        if processors:
            if fed_back:
                history = mx.concatenate([history, y], axis=1)
            logits = apply_processors(processors, history, logits)
        lse = mx.logsumexp(logits, axis=-1)  # [B]
        logprobs = logits - lse[:, None]
        # Greedy needs only the argmax, which subtracting lse does not move; the log-softmax
        # then stays lazy and is made only if the caller reads it: a vocabulary-sized float32
        # array less per step (1 MB for Gemma 3's 262144 tokens).
        token = (mx.argmax(logits, axis=-1) if sampler is greedy else sampler(logprobs)).astype(mx.int32)
        # A NaN anywhere in a row, or a row with no finite logit, leaves its logsumexp
        # non-finite; the check rides along in the one array the host reads (-1 marks the row).
        return token, mx.where(mx.isfinite(lse), token, -1), logprobs

    with mx.stream(stream):
        while ids.shape[1] > step_size:
            model.model(ids[:, :step_size], cache=cache)
            mx.eval([c.state for c in cache])  # bound the graph: one chunk at a time
            ids = ids[:, step_size:]
        pending = forward(ids, fed_back=False, **({} if pixel_values is None else {"pixel_values": pixel_values}))
    mx.async_eval(*pending[:2])

    n = 0
    while True:
        token, checked, logprobs = pending
        if n + 1 < budget:  # queue step n+1 before waiting for token n
            with mx.stream(stream):
                pending = forward(token[:, None], fed_back=True)
            mx.async_eval(*pending[:2])
        values = checked.tolist()  # the loop's one host synchronisation
        if min(values) < 0:
            rows = [b for b, v in enumerate(values) if v < 0]
            raise GenerationError(f"the logits at generated token {n + 1} (batch rows {rows}) hold a NaN or no finite "
                                  "value; the weights, the dtype (try float32 or bfloat16) or a logits processor "
                                  "are at fault")
        yield values, logprobs
        n += 1
        if n == budget:
            return
        if n % _CLEAR_CACHE_EVERY == 0:
            mx.clear_cache()


# ----- streaming, full and batched generation ------------------------------------------


def stream_generate(model, tokenizer, prompt, max_tokens: int = 256, sampler=None, logits_processors=None,
                    stop_strings: str | Iterable[str] | None = None, stop_token_ids: Iterable[int] | None = None,
                    chat: bool | None = None, system: str | None = None, prefill_step_size: int | None = None,
                    skip_special_tokens: bool = False, prompt_cache=None, image=None, **kv_options,
                    ) -> Iterator[GenerationResponse]:
    """Generate from one prompt, yielding a `GenerationResponse` per token.

    `prompt`: a string (encoded with <bos>), token ids, or chat messages (see
    `prompt_ids` for `chat` and `system`).  Stops at the tokenizer's eos ids
    (generation_config.json's) and `stop_token_ids` (the stop id itself adds no
    text), at any of `stop_strings` (never emitted, even across tokens), after
    `max_tokens`, or when the sequence fills the context.  `max_tokens=0` yields
    nothing.  Bad settings raise GenerationError here, before iteration.

    `prompt_cache` (a `PromptCache`): reuse the longest prefix of the prompt it
    already holds, feed only the rest (`prompt_tokens` counts those), and leave
    it holding prompt + generated tokens.  Without one, `kv_options`
    (max_kv_size, kv_bits, kv_group_size, quantized_kv_start; see
    `mlx_gemma.cache`) shape the cache made for this call.

    `image` (PaliGemma): a path, PIL image or array; the prompt is then laid out as
    `[<image> x N] <bos> prompt "\n"` (see `mlx_gemma.vision`).
    """
    batch = _start(model, tokenizer, [prompt], max_tokens, sampler, logits_processors, stop_strings,
                   stop_token_ids, chat, system, prefill_step_size, skip_special_tokens, kv_options, prompt_cache,
                   [image] if image is not None else None)
    return _only_row(batch)


def _only_row(batch) -> Iterator[GenerationResponse]:
    try:
        for responses in batch:
            yield responses[0]
    finally:
        batch.close()  # at once, so a prompt cache records its tokens before the next call


def stream_batch_generate(model, tokenizer, prompts: Sequence, max_tokens: int = 256, sampler=None,
                          logits_processors=None, stop_strings=None, stop_token_ids=None, chat: bool | None = None,
                          system: str | None = None, prefill_step_size: int | None = None, skip_special_tokens: bool = False,
                          image=None, **kv_options) -> Iterator[list[GenerationResponse | None]]:
    """Generate from several prompts at once; yields per step a list with one entry per prompt.

    Arguments as `stream_generate`'s.  Prompts are left-padded to the longest;
    each row stops on its own (its entry is None in the steps after its last
    response), and the loop ends when all have.  Under greedy decoding each
    row's tokens equal that prompt's alone.  The context limit applies to the
    padded length.  Speeds are batch-wide (all rows' tokens per second).
    `image` (PaliGemma): one image for every prompt, or a list with one per prompt.
    """
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise GenerationError("prompts must be a non-empty list of prompts")
    return _start(model, tokenizer, prompts, max_tokens, sampler, logits_processors, stop_strings,
                  stop_token_ids, chat, system, prefill_step_size, skip_special_tokens, kv_options, None,
                  image if image is None or isinstance(image, (list, tuple)) else [image] * len(prompts))


def _start(model, tokenizer, prompts, max_tokens, sampler, logits_processors, stop_strings, stop_token_ids,
           chat, system, prefill_step_size, skip_special_tokens, kv_options, prompt_cache=None, images=None):
    """Check everything, then return the (not yet started) response generator."""
    pixel_values = None
    if images is None:
        rows_ids = [prompt_ids(tokenizer, p, chat, system, model.args.vocab_size) for p in prompts]
    else:
        from .vision import prompt_rows

        if chat or system or prompt_cache is not None:
            raise GenerationError("image prompts are PaliGemma task prompts: no chat template, "
                                  "system prompt or prompt cache")
        rows_ids, pixel_values = prompt_rows(model, tokenizer, prompts, images)
    stop_ids, stops = stop_settings(model, tokenizer, stop_strings, stop_token_ids)
    rows = [RowText(tokenizer, stop_ids, stops, skip_special_tokens) for _ in rows_ids]
    if prompt_cache is not None:
        prompt_cache.check(model)
        ids = rows_ids[0]
        budget = token_budget(model, len(ids), max_tokens)  # before the cache is touched
        feed = prompt_cache.prepare(ids)
        steps = generate_step(model, feed, cache=prompt_cache.caches, sampler=sampler,
                              logits_processors=logits_processors, prefill_step_size=prefill_step_size,
                              max_tokens=max_tokens, cached_ids=[prompt_cache.tokens] if prompt_cache.tokens else None,
                              **kv_options)
        return prompt_cache.recorded(_responses(steps, rows, [len(feed)], budget), ids)
    T = max(len(r) for r in rows_ids)
    pads = [T - len(r) for r in rows_ids]
    filler = tokenizer.pad_id if tokenizer.pad_id >= 0 else 0  # masked out; any valid id would do
    steps = generate_step(model, mx.array([[filler] * p + r for p, r in zip(pads, rows_ids)]), sampler=sampler,
                          logits_processors=logits_processors, prefill_step_size=prefill_step_size,
                          max_tokens=max_tokens, left_padding=pads if any(pads) else None,
                          pixel_values=pixel_values, **kv_options)
    return _responses(steps, rows, [len(r) for r in rows_ids], token_budget(model, T, max_tokens))


def _responses(steps, rows, n_prompts, budget) -> Iterator[list[GenerationResponse | None]]:
    tic = time.perf_counter()
    prompt_tps, produced = 0.0, 0
    active = [True] * len(rows)
    try:
        for n, (tokens, logprobs) in enumerate(steps, start=1):
            if n == 1:  # the prefill ends when the first token is known
                now = time.perf_counter()
                tic, prompt_tps = now, sum(n_prompts) / max(now - tic, 1e-9)
            produced += sum(active)
            tps, memory = produced / max(time.perf_counter() - tic, 1e-9), mx.get_peak_memory() / 1e9
            out: list[GenerationResponse | None] = []
            for b, row in enumerate(rows):
                if not active[b]:
                    out.append(None)
                    continue
                text, finish = row.add(tokens[b])
                if finish is None and n == budget:
                    tail, finish = row.finish()
                    text, finish = text + tail, finish or "length"
                active[b] = finish is None
                out.append(GenerationResponse(text, tokens[b], logprobs[b], n_prompts[b], prompt_tps, n, tps,
                                              memory, finish))
            yield out
            if not any(active):
                return
    finally:
        steps.close()  # stop the decode loop (and its queued step) with us


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


def format_stats(r: GenerationResponse) -> str:
    return (f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.3f} tokens-per-sec\n"
            f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec\n"
            f"Peak memory: {r.peak_memory:.3f} GB")


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
                   help="PaliGemma: an image for the prompt, e.g. -p 'caption en' (repeatable: one answer per image)")
    add_cache_flags(p)
    p.add_argument("--prompt-cache-file", help="start from a prompt cache written by python -m mlx_gemma.cache_prompt; "
                                               "the prompt continues the cached text")
    p.add_argument("--verbose", action="store_true", help="also print settings and the finish reason to stderr")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out, err = console()
    last, wrote = None, False
    try:
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
        sampler, processors = sampling_from(args)
        from .loading import load
        from .prompt_cache import continuation_ids, load_prompt_cache

        kv_options, prompt_cache, model_arg = kv_options_from(args), None, args.model
        if args.prompt_cache_file:
            if kv_options or args.system:
                raise GenerationError("--prompt-cache-file: the cache options and the system prompt were fixed "
                                      "when the cache was made (python -m mlx_gemma.cache_prompt)")
            prompt_cache = load_prompt_cache(args.prompt_cache_file)
            model_arg = args.model or prompt_cache.metadata.get("model")
        model, tokenizer = load(model_arg, adapter_path=args.adapter_path)
        folder = getattr(model, "path", None)
        chat = args.chat if args.chat is not None else (not args.image and looks_instruct(model_arg, folder, tokenizer))
        if prompt_cache is not None:
            prompt_cache.check(model)
            chat = args.chat if args.chat is not None else prompt_cache.metadata.get("chat") == "true"
        if args.verbose:
            print(f"model: {folder}\nchat template: {'on' if chat else 'off'}"
                  f"{' (auto)' if args.chat is None else ''}", file=err)
        if prompt_cache is not None:  # the cached ids, then the prompt (and the turn's end, in chat)
            prompt, chat = prompt_cache.tokens + continuation_ids(tokenizer, prompt, chat), None
        images = args.image or [None]
        for image in images:
            if len(images) > 1:
                print(f"[{image}]", file=out, flush=True)
            for last in stream_generate(model, tokenizer, prompt, max_tokens=args.max_tokens, sampler=sampler,
                                        logits_processors=processors, stop_strings=args.stop, chat=chat,
                                        system=args.system, prompt_cache=prompt_cache, image=image, **kv_options):
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
