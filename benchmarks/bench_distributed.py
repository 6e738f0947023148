"""Pipeline parallel on one machine: 2 ranks against 1, decode tokens/s and the bytes sent per token.

On one machine both ranks share the same cores and memory, so this measures the pipeline's
overhead (the hand-offs, the shared logits, two processes' scheduling), never a speed-up: on
several Macs a pipeline buys memory, not speed (docs/distributed.md).  Runs alternate: one
process, then `mlx.launch -n 2 --backend ring` of this script in worker mode, `--rounds` times;
the report gives medians and the 2-rank / 1-rank ratio.

    python benchmarks/bench_distributed.py                      # the packaged Gemma 3 270M
    python benchmarks/bench_distributed.py --model path/to/folder --max-tokens 64 --rounds 3

Bytes sent per token are computed from the messages' shapes on rank 0: the hidden state handed
to the next rank ([1, 1, width] in the activations' dtype) plus its part of the logits' all_sum
(a ring all_sum over n ranks sends 2(n-1)/n of the array per rank).

The 2-rank run also times, on its own, the failure meeting the server across ranks holds at the start
of every step (distributed/failures.py: one all_sum of 1 + n int32 words when nothing failed), against
a decode step: what that meeting adds per token when serving.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import mlx.core as mx

import mlx_gemma
from mlx_gemma.distributed.failures import SharedFailures

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_generate import eos_mask  # noqa: E402

PROMPT = "The history of astronomy is the story of people looking up and asking what the lights in the sky are."


def decode_rate(model, tokenizer, max_tokens: int) -> float:
    """Decode tokens/s (tokens after the first, per second), greedy, every run the full length."""
    mask = eos_mask(model.args.vocab_size, tokenizer.eos_token_ids)  # every run makes max_tokens tokens
    times = []
    for _ in mlx_gemma.stream_generate(model, tokenizer, PROMPT, max_tokens=max_tokens,
                                       logits_processors=[lambda tokens, logits: logits + mask]):
        times.append(time.perf_counter())
    return (len(times) - 1) / (times[-1] - times[0])


def bytes_per_token(model) -> int:
    stage, n = model.stage, model.group.size()
    itemsize = stage.dtype.size
    hand_off = 0 if stage.last else stage.message_width() * itemsize
    logits = model.args.vocab_size * model.logits_dtype.size * 2 * (n - 1) // n
    return hand_off + logits


def meeting_seconds(group, calls: int = 200) -> float:
    """Median seconds of one step's failure meeting with nothing reported (each rank times its own)."""
    meetings, times = SharedFailures(group), []
    for _ in range(calls):
        start = time.perf_counter()
        meetings._share(b"")
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(args) -> None:
    group = mx.distributed.init()
    model, tokenizer = mlx_gemma.load(args.model, group=group, strategy="pipeline")
    decode_rate(model, tokenizer, 4)  # warm up
    rate = decode_rate(model, tokenizer, args.max_tokens)
    meeting = meeting_seconds(group)
    if group.rank() == 0:
        with open(args.out, "w") as f:
            json.dump({"tok_s": rate, "bytes_per_token": bytes_per_token(model), "meeting_s": meeting,
                       "layers": [model.stage.start, model.stage.end]}, f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model folder or hub id (default: the packaged Gemma 3 270M)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    model, tokenizer = mlx_gemma.load(args.model)
    decode_rate(model, tokenizer, 4)
    single, double, meetings, info = [], [], [], {}
    for _ in range(args.rounds):
        single.append(decode_rate(model, tokenizer, args.max_tokens))
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "out.json")
            launcher = shutil.which("mlx.launch", path=os.path.dirname(sys.executable)) or "mlx.launch"
            cmd = [launcher, "-n", "2", "--backend", "ring", sys.executable, __file__,
                   "--worker", "--out", out, "--max-tokens", str(args.max_tokens)]
            if args.model:
                cmd += ["--model", args.model]
            subprocess.run(cmd, check=True)
            with open(out) as f:
                info = json.load(f)
            double.append(info["tok_s"])
            meetings.append(info["meeting_s"])
    one, two = statistics.median(single), statistics.median(double)
    print(f"model: {args.model or 'packaged Gemma 3 270M'}; {args.max_tokens} tokens, {args.rounds} rounds, CPU")
    print(f"1 process : {one:8.1f} tok/s decode (runs {', '.join(f'{x:.1f}' for x in single)})")
    print(f"2 ranks   : {two:8.1f} tok/s decode (runs {', '.join(f'{x:.1f}' for x in double)}); "
          f"rank 0 holds layers {info['layers'][0]}-{info['layers'][1] - 1}")
    print(f"2 ranks / 1 process: {two / one:.2f}x (overhead on one machine, not a speed-up)")
    print(f"bytes sent per token by rank 0: {info['bytes_per_token']:,} (hidden hand-off + its share of the "
          "logits' all_sum)")
    meeting = statistics.median(meetings)
    print(f"the server's failure meeting, alone: {meeting * 1e6:.0f} us a step (runs "
          f"{', '.join(f'{x * 1e6:.0f}' for x in meetings)}), {meeting * two:.1%} of a 2-rank decode step")


if __name__ == "__main__":
    main()
