"""A multi-turn chat loop on `mlx_gemma.chat.ChatSession`.

    python examples/chat.py
    python examples/chat.py --model google/gemma-2-2b-it --system "Answer in one sentence."

Type a message and press Enter; an empty line or Ctrl-D ends the chat.  The
session keeps the conversation's keys and values, so each turn prefills only
its own new tokens.  (`python -m mlx_gemma.chat` is the full-featured version.)
"""

import argparse
import sys

import mlx_gemma
from mlx_gemma.chat import ChatSession


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder or hub repo id (default: the packaged model)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-tokens", type=int, default=128, help="longest reply, in tokens")
    args = p.parse_args()

    model, tokenizer = mlx_gemma.load(args.model)
    session = ChatSession(model, tokenizer, system=args.system, max_tokens=args.max_tokens)
    while True:
        print(">> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line.strip():  # Ctrl-D gives "", Enter on its own "\n"
            break
        for response in session.send(line.strip()):
            print(response.text, end="", flush=True)
        print()
    print(f"({len(session.history)} tokens in the conversation)")


if __name__ == "__main__":
    main()
