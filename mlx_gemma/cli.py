"""What the command lines share: error and Ctrl-C handling, and the sampling and KV-cache flags.

`run_command` gives every command the same exits (0 done, 2 with one error
line, 130 on Ctrl-C).  Each `add_*_flags` adds its flags to a parser; the
matching `*_from(args)` turns the parsed flags into what the Python API takes.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from .models.kv_cache import DEFAULT_QUANTIZED_KV_START, KVCacheOptions
from .errors import MlxGemmaError
from .samplers import SamplingSettings

def console() -> tuple:
    """(stdout, stderr) for streamed text: a terminal that cannot show a character gets "?", not a crash."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")
    return sys.stdout, sys.stderr


def error_line(e: Exception) -> str:
    """An error as the one line the command lines print, whatever its message holds."""
    return f"error: {' '.join(str(e).split())}"


def run_command(action: Callable[[], object], interrupted: str) -> int:
    """Run a command's work: 0 when it is done, 2 after one error line for our typed
    errors, 130 after "interrupted: <interrupted>" on Ctrl-C."""
    try:
        action()
    except MlxGemmaError as e:
        print(error_line(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {interrupted}", file=sys.stderr)
        return 130
    return 0


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """--max-tokens and the sampler flags (as mlx_lm.generate's)."""
    p.add_argument("--max-tokens", "-m", type=int, default=256, help="most tokens to generate")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the best one's (0 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--repetition-penalty", type=float, default=None, help="HF repetition penalty (1 = off)")


def sampling_from(args) -> SamplingSettings:
    """The `SamplingSettings` of the flags of `add_sampling_flags` (checked here, once)."""
    return SamplingSettings(args.temp, args.top_k, args.top_p, args.min_p, args.seed,
                            repetition_penalty=args.repetition_penalty)


def add_cache_flags(p: argparse.ArgumentParser) -> None:
    """The KV-cache flags (the fields of `KVCacheOptions`)."""
    p.add_argument("--max-kv-size", type=int, default=None,
                   help="cap every layer's KV cache at this many tokens (approximate beyond it)")
    p.add_argument("--kv-bits", type=int, default=None, help="quantize the KV cache to this many bits")
    p.add_argument("--kv-group-size", type=int, default=64, help="values per scale in the quantized KV cache")
    p.add_argument("--quantized-kv-start", type=int, default=DEFAULT_QUANTIZED_KV_START,
                   help="quantize the KV cache once it holds this many tokens")


def kv_options_from(args) -> KVCacheOptions:
    """The `KVCacheOptions` of the flags of `add_cache_flags` (checked here, once)."""
    return KVCacheOptions(args.max_kv_size, args.kv_bits, args.kv_group_size, args.quantized_kv_start)
