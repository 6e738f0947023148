"""Gemma 2 past its sliding window: KV-cache memory and speed, mlx_gemma against mlx-lm.

Gemma 2 attends within 4096 tokens on every other layer.  mlx_gemma keeps a
rotating cache of the window for those layers (and gives the reference's
result); mlx-lm keeps every token on every layer (and attends globally, which
is not what the model was trained with).  On the 2B-shaped random-weight model
of `models.py`, with a prompt of `--prompt-length` tokens (default: 8192 minus
`--max-tokens`, so the sequence fills Gemma 2's 8192-token context, twice the
window), both run their decode loop (`generate_step`, greedy) on their own
cache; the report gives the KV cache's bytes after the run, the run's peak
memory above the weights, prefill and decode tokens/s, and ours / mlx-lm.

With float caches on both sides, ours can hold at most 0.75x of mlx-lm's at
8192 tokens: half the layers keep 4096 of the 8192.  `--kv-bits 8` also
quantizes ours (`mlx_gemma.cache`, from `--quantized-kv-start` tokens on); mlx-lm
stays in float there, since its Gemma 2 attention multiplies the cached keys as
one float array (`mlx_lm/models/gemma2.py`) and cannot take its quantized cache.

    python benchmarks/bench_long_context.py                      # 26 layers, as gemma-2-2b
    python benchmarks/bench_long_context.py --num-layers 2       # same widths, a CPU-sized run
    python benchmarks/bench_long_context.py --num-layers 2 --kv-bits 8
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).parent))

import common  # noqa: E402
import models  # noqa: E402
from bench_generate import eos_mask, prompt_ids  # noqa: E402


def runner(step_fn, make_cache, n_prompt: int):
    def body():
        cache = make_cache()
        tic, first, steps = time.perf_counter(), None, 0
        for _ in step_fn(cache):
            first = first or time.perf_counter()
            steps += 1
        end = time.perf_counter()
        kv = sum(c.nbytes for c in cache)
        return {"prefill_tps": n_prompt / (first - tic), "decode_tps": (steps - 1) / max(end - first, 1e-9),
                "kv_gb": kv / 1e9}

    return lambda: common.memory_run(body)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompt-length", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--num-layers", type=int, default=None)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--kv-bits", type=int, default=None, help="quantize our cache (mlx-lm's Gemma 2 cannot)")
    p.add_argument("--quantized-kv-start", type=int, default=5000)
    p.add_argument("--no-record", action="store_true")
    p.add_argument("--section", default=None, help="record under a section of this name in RESULTS.md")
    args = p.parse_args(argv)

    import mlx_lm
    from mlx_lm.generate import generate_step as their_step
    from mlx_lm.models.cache import make_prompt_cache

    import mlx_gemma
    from mlx_gemma.models.kv_cache import KVCacheOptions
    from mlx_gemma.generate import generate_step as our_step

    kv_options = KVCacheOptions(kv_bits=args.kv_bits, quantized_kv_start=args.quantized_kv_start)
    folder = models.gemma2_2b_random(None, args.num_layers)
    ours, tokenizer = mlx_gemma.load(folder)
    theirs, _ = mlx_lm.load(str(folder))
    ids = prompt_ids(tokenizer, args.prompt_length or ours.args.max_position_embeddings - args.max_tokens)
    mask = eos_mask(ours.args.vocab_size, tokenizer.eos_token_ids)
    ban = lambda tokens, logits: logits + mask  # noqa: E731
    runners = {
        "mlx_gemma": runner(lambda cache: our_step(ours, ids, cache=cache, max_tokens=args.max_tokens,
                                                   logits_processors=[ban]),
                            lambda: ours.make_cache(options=kv_options), len(ids)),
        "mlx-lm": runner(lambda cache: their_step(mx.array(ids), theirs, prompt_cache=cache,
                                                  max_tokens=args.max_tokens, logits_processors=[ban]),
                         lambda: make_prompt_cache(theirs), len(ids)),
    }
    series = common.alternate(runners, args.reps, warmup=0)
    weights = {"mlx_gemma": common.weight_bytes(ours) / 1e9, "mlx-lm": common.weight_bytes(theirs) / 1e9}
    rows = [["library", "KV cache GB", "peak above weights GB", "prefill tok/s", "decode tok/s"]]
    meds = {}
    for lib, s in series.items():
        meds[lib] = {k: s.median(k) for k in s.runs[0].metrics}
        rows.append([lib, f"{meds[lib]['kv_gb']:.3f}", f"{meds[lib]['peak_extra_gb']:.3f}",
                     f"{meds[lib]['prefill_tps']:.1f} ±{s.spread('prefill_tps'):.0%}",
                     f"{meds[lib]['decode_tps']:.2f} ±{s.spread('decode_tps'):.0%}"])
    r = {k: common.ratio(meds["mlx_gemma"][k], meds["mlx-lm"][k]) for k in meds["mlx_gemma"]}
    rows.append(["**ours / mlx-lm**", f"**{r['kv_gb']:.2f}x**", f"**{r['peak_extra_gb']:.2f}x**",
                 f"**{r['prefill_tps']:.2f}x**", f"**{r['decode_tps']:.2f}x**"])
    layers = ours.args.num_hidden_layers
    body = (f"Gemma 2 2B-shaped, random weights, {layers} layers (window 4096 on every other layer), "
            f"prompt {len(ids)} tokens + {args.max_tokens} greedy, weights {weights['mlx_gemma']:.2f} GB; "
            f"{args.reps} alternating repetitions.  KV cache: "
            + ("float in both." if args.kv_bits is None else
               f"ours {args.kv_bits}-bit from token {args.quantized_kv_start} on, mlx-lm's float "
               "(its Gemma 2 cannot take a quantized cache).")
            + "\n\n" + common.table(rows))
    payload = {"prompt_tokens": len(ids), "layers": layers, "kv_bits": args.kv_bits, "libraries": meds,
               "ratio_vs_mlx_lm": r}
    return common.finish("bench_long_context", argv, args.no_record, body, payload, args.section)


if __name__ == "__main__":
    sys.exit(main())
