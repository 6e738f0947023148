"""KV-cache bytes per token of a Gemma 4 E2B-like model: mlx_gemma against mlx-lm's Gemma 4 cache.

E2B keeps keys and values for 15 of its 35 layers: the last 20 attend with those of the last
earlier layer of their kind (KV sharing), and 12 of the 15 are sliding-window layers that need
only the last 512 positions.  Both libraries prefill the same N-token prompt (1k, 4k and 16k by
default) into a fresh cache of their own (mlx_gemma: `model.make_cache()`, where a KV-shared
layer's entry holds nothing; mlx-lm 0.32: `make_prompt_cache`, one cache per layer that owns its
keys and values) and generate one greedy token.  The report gives the bytes the caches' arrays
hold per prompt token, the least the layout needs (each owning layer's keys and values for
min(N, its window) positions, at the cache's dtype), that least were every layer to hold its own
(no sharing: what a cache that stored shared layers twice would need at best), and ours / mlx-lm.

The model keeps all of E2B that sets the cache's size (35 layers in E2B's 4 sliding : 1 global
pattern, window 512, one key-value head of 256, 512 on global layers, the last 20 layers shared,
bf16) and by default narrows what does not (hidden width 256, MLP 512, one query head, per-layer
inputs 16), so that a 16k prompt prefills on a CPU; `--full-widths` keeps E2B's own widths.

    python benchmarks/bench_kv.py                              # N = 1024 4096 16384
    python benchmarks/bench_kv.py --lengths 64 --no-record     # a smoke run
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
from bench_generate import prompt_ids  # noqa: E402

# Widths that do not change what the cache holds: narrowed so a long prompt prefills on a CPU.
NARROW = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 1, "hidden_size_per_layer_input": 16}
BF16 = 2  # bytes per cached value: both libraries cache in the weights' dtype (bf16 here)


def least_bytes(config: dict, n: int, itemsize: int) -> int:
    """Keys + values of every layer that owns them, for min(n, window) positions (n on global layers)."""
    owning = config["num_hidden_layers"] - config["num_kv_shared_layers"]
    total = 0
    for kind in config["layer_types"][:owning]:
        global_ = kind == "full_attention"
        positions = n if global_ else min(n, config["sliding_window"])
        width = config["num_key_value_heads"] * (config["global_head_dim"] if global_ else config["head_dim"])
        total += 2 * positions * width * itemsize
    return total


def runner(steps, make_cache, n: int):
    """A run: prefill `n` tokens and decode one into a fresh cache; its bytes per prompt token."""
    def body():
        cache = make_cache()
        tic = time.perf_counter()
        for _ in steps(cache):
            pass
        mx.synchronize()
        held = sum(c.nbytes for c in cache)
        return {"kv_bytes_per_token": held / n, "kv_gb": held / 1e9, "seconds": time.perf_counter() - tic}

    return lambda: common.memory_run(body)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096, 16384])
    p.add_argument("--full-widths", action="store_true", help="E2B's own widths (slow: the full model's prefill)")
    p.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md alone")
    p.add_argument("--section", default=None, help="record under a section of this name in RESULTS.md")
    args = p.parse_args(argv)

    import mlx_lm
    from mlx_lm.generate import generate_step as their_step
    from mlx_lm.models.cache import make_prompt_cache

    import mlx_gemma
    from mlx_gemma.generate import generate_step as our_step

    config = models.gemma4_e2b_config(None, **({} if args.full_widths else NARROW))
    folder = models.gemma4_folder(config, "gemma-4-e2b-kv" + ("" if args.full_widths else "-narrow"), None)
    ours, tokenizer = mlx_gemma.load(folder)
    theirs, _ = mlx_lm.load(str(folder))
    rows = [["prompt tokens", "library", "KV bytes / token", "least needed / token", "least without sharing / token",
             "KV GB", "prefill s"]]
    payload = {"config": {k: config[k] for k in ("num_hidden_layers", "num_kv_shared_layers", "sliding_window",
                                                 "num_key_value_heads", "head_dim", "global_head_dim")}, "cases": []}
    for n in args.lengths:
        ids = prompt_ids(tokenizer, n)
        runners = {"mlx_gemma": runner(lambda c: our_step(ours, ids, cache=c, max_tokens=1), ours.make_cache, n),
                   "mlx-lm": runner(lambda c: their_step(mx.array(ids), theirs, prompt_cache=c, max_tokens=1),
                                    lambda: make_prompt_cache(theirs), n)}
        series = common.alternate(runners, reps=1, warmup=0)
        entry = {"prompt_tokens": len(ids), "libraries": {}}
        for lib, s in series.items():
            m = {k: s.median(k) for k in s.runs[0].metrics}
            m["least_bytes_per_token"] = least_bytes(config, len(ids), BF16) / len(ids)
            m["unshared_bytes_per_token"] = least_bytes({**config, "num_kv_shared_layers": 0}, len(ids), BF16) / len(ids)
            entry["libraries"][lib] = m
            rows.append([str(len(ids)), lib, f"{m['kv_bytes_per_token']:,.0f}", f"{m['least_bytes_per_token']:,.0f}",
                         f"{m['unshared_bytes_per_token']:,.0f}", f"{m['kv_gb']:.4f}", f"{m['seconds']:.1f}"])
        ours_m, theirs_m = entry["libraries"]["mlx_gemma"], entry["libraries"]["mlx-lm"]
        entry["ratio_vs_mlx_lm"] = common.ratio(ours_m["kv_bytes_per_token"], theirs_m["kv_bytes_per_token"])
        rows.append([str(len(ids)), "**ours / mlx-lm**", f"**{entry['ratio_vs_mlx_lm']:.2f}x**", "", "", "", ""])
        payload["cases"].append(entry)
        print(common.table(rows[:1] + rows[-3:]), flush=True)
    widths = "E2B's own widths" if args.full_widths else (
        "narrowed widths that leave the cache unchanged (" + ", ".join(f"{k} {v}" for k, v in NARROW.items()) + ")")
    body = (f"Gemma 4 E2B-like, random weights: {config['num_hidden_layers']} layers, the last "
            f"{config['num_kv_shared_layers']} KV-shared, window {config['sliding_window']}, one key-value head of "
            f"{config['head_dim']} ({config['global_head_dim']} on global layers), bf16; {widths}. Each library "
            "prefills the prompt into a fresh cache of its own and decodes one token; bytes are those its "
            "cache's arrays hold (buffers grow in steps of 256 positions in both).\n\n" + common.table(rows))
    return common.finish("bench_kv", argv, args.no_record, body, payload, args.section)


if __name__ == "__main__":
    sys.exit(main())
