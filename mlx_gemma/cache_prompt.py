"""Compute a prompt's KV cache once and save it, to start later generations from it (as mlx-lm's cache_prompt).

    python -m mlx_gemma.cache_prompt --model M --prompt "$(cat long_document.txt)" --prompt-cache-file doc.safetensors
    python -m mlx_gemma.generate --prompt-cache-file doc.safetensors --prompt "Summarize the text above."

With the chat template (the default for instruct models) the cache holds an
open user turn, `<bos><start_of_turn>user\\n{system}\\n\\n{prompt}`; generate's
prompt then continues that turn and closes it.  The file records the model
(unless it is the packaged default, used then too) and whether chat was on.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from .api import load
from .errors import GenerationError, MlxGemmaError
from .cli import add_cache_flags, error_line, kv_options_from
from .generate import looks_instruct
from .prompt_cache import PromptCache, open_turn_ids, save_prompt_cache


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_gemma.cache_prompt",
                                description="Save the KV cache of a prompt for python -m mlx_gemma.generate.")
    p.add_argument("--model", default=None, help="model folder or hub repo id (default: the packaged model)")
    p.add_argument("--prompt", "-p", required=True, help="the prompt to cache; '-' reads it from stdin")
    p.add_argument("--prompt-cache-file", required=True, help="the .safetensors file to write")
    p.add_argument("--system", "--system-prompt", dest="system", help="system prompt (needs the chat template)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="cache an open user turn of the chat template (default: on for instruct models)")
    add_cache_flags(p)
    p.add_argument("--prefill-step-size", type=int, default=None,
                   help="tokens fed to the model at a time (default: as generation, 2048 on a GPU, "
                        "512 for Gemma 2 there, 256 on a CPU)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
        if not prompt:
            raise GenerationError("the prompt is empty")
        model, tokenizer = load(args.model)
        folder = model.path
        chat = args.chat if args.chat is not None else looks_instruct(args.model, folder, tokenizer)
        if args.system and not chat:
            raise GenerationError("a system prompt needs the chat template (--chat)")
        ids = open_turn_ids(tokenizer, prompt, args.system) if chat else tokenizer.encode(prompt, add_bos=True)
        cache = PromptCache(model, kv_options_from(args))
        if args.prefill_step_size is not None and args.prefill_step_size < 1:
            raise GenerationError(f"--prefill-step-size must be >= 1, got {args.prefill_step_size}")
        tic = time.perf_counter()
        cache.extend(model, ids, args.prefill_step_size)
        seconds = time.perf_counter() - tic
        metadata = {"chat": "true" if chat else "false"}
        if args.model:
            metadata["model"] = args.model
        save_prompt_cache(args.prompt_cache_file, cache, metadata)
        print(f"cached {len(ids)} prompt tokens ({len(ids) / max(seconds, 1e-9):.1f} tokens-per-sec, "
              f"{sum(c.nbytes for c in cache.caches) / 1e6:.2f} MB) in {args.prompt_cache_file}", file=sys.stderr)
        return 0
    except MlxGemmaError as e:
        print(error_line(e), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
