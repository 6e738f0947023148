"""Stream a completion token by token (the mlx-lm style API).

    python examples/generate_stream.py
    python examples/generate_stream.py --model google/gemma-2-2b-it --prompt "Why is the sky blue?"

Without --model it uses the packaged Gemma 3 270M (converted once into the cache).
The text goes to stdout as it is generated; the statistics go to stderr.
"""

import argparse
import sys

import mlx_gemma
from mlx_gemma.generate import format_stats, stream_generate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder or hub repo id (default: the packaged model)")
    p.add_argument("--prompt", default="The three primary colours are")
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args()

    model, tokenizer = mlx_gemma.load(args.model)
    last = None
    for last in stream_generate(model, tokenizer, args.prompt, max_tokens=args.max_tokens):
        print(last.text, end="", flush=True)  # each response carries the text its token adds
    print()
    if last is not None:
        print(format_stats(last), f"\nfinish reason: {last.finish_reason}", file=sys.stderr)


if __name__ == "__main__":
    main()
