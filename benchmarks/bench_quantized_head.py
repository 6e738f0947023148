"""The quantized output head on the CPU: one product's time against the number of rows (tokens x batch).

Gemma 3 270M's tied embedding is its output head, 262,144 x 640: in a 4-bit model (group 64,
bf16 scales, as `benchmarks/models.py` converts it) the largest product of a decoding step, made
once per row being decoded, so what a server batching many clients, `n` choices or beams pays
per step.  `cpu_spread._quantized_product` makes it through MLX's quantized kernel in float32 for
up to `KERNEL_MAX_ROWS` rows and from weight blocks dequantized to bf16 past that; this script
times, for each row count, the path `cpu_spread` chooses ("auto"), each path forced ("kernel",
"dequantized"), and MLX's own `mx.quantized_matmul` on the bf16 input (the unspread product,
one core, bf16 arithmetic: slow, so only up to `--qmm-max-rows`).

`--baseline FILE` also times "auto" with another version of cpu_spread.py (e.g. the last
commit's, `git show HEAD:mlx_gemma/cpu_spread.py > /tmp/cpu_spread_old.py`), alternating with
this one, row count by row count, so both see the same machine.  Random weights: the time
depends on the shape only.  Medians of wall-clock seconds, or with `--cpu-time` of the
process's CPU seconds.

    python benchmarks/bench_quantized_head.py --rows 1 8 9 20 --reps 3
    python benchmarks/bench_quantized_head.py --baseline /tmp/cpu_spread_old.py --paths auto
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlx_gemma import cpu_spread

sys.path.insert(0, str(Path(__file__).parent))

import common  # noqa: E402

VOCAB, HIDDEN = 262_144, 640  # Gemma 3 270M's tied embedding
DEFAULT_ROWS = [1, 4, 8, 9, 16, 20, 32, 64, 128]


def load_baseline(path: Path):
    """Another cpu_spread.py loaded as a module of the package (its relative imports resolve)."""
    spec = importlib.util.spec_from_file_location("mlx_gemma._cpu_spread_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def head(bits: int, group_size: int) -> nn.QuantizedEmbedding:
    mx.random.seed(0)
    embedding = nn.QuantizedEmbedding(VOCAB, HIDDEN, group_size=group_size, bits=bits)
    embedding.set_dtype(mx.bfloat16)
    mx.eval(embedding.parameters())
    return embedding


def products(embedding, module) -> dict:
    """name -> function of x, each the head's product x @ W.T by one path."""
    layer = module._spread_copy(embedding)
    blocks = module._QuantizedBlocks(layer)
    w, s, b = embedding["weight"], embedding["scales"], embedding["biases"]
    return {
        "auto": layer.as_linear,
        "kernel": blocks.through_kernel,
        "dequantized": blocks.through_float_product,
        "mx.quantized_matmul": lambda x: mx.quantized_matmul(x, w, s, b, transpose=True, group_size=embedding.group_size,
                                                             bits=embedding.bits),
    }


def timed(fn, x, clock) -> float:
    start = clock()
    mx.eval(fn(x))
    return clock() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=DEFAULT_ROWS)
    parser.add_argument("--paths", nargs="+", default=["auto", "kernel", "dequantized", "mx.quantized_matmul"],
                        choices=["auto", "kernel", "dequantized", "mx.quantized_matmul"])
    parser.add_argument("--baseline", type=Path, help="another cpu_spread.py, timed as 'baseline auto'")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--cpu-time", action="store_true",
                        help="time the process's CPU seconds (all threads) rather than the wall clock: the work "
                             "each path does, less shaken by other processes on a shared machine")
    parser.add_argument("--qmm-max-rows", type=int, default=8, help="mx.quantized_matmul only up to this many rows")
    args = parser.parse_args(argv)

    clock = time.process_time if args.cpu_time else time.perf_counter
    embedding = head(args.bits, args.group_size)
    ours = products(embedding, cpu_spread)
    runners = {p: ours[p] for p in args.paths}
    if args.baseline:
        runners["baseline auto"] = products(embedding, load_baseline(args.baseline))["auto"]
    rows_out = [["rows"] + [f"{name} s" for name in runners]]
    payload = {}
    for rows in args.rows:
        x = mx.random.normal((rows, HIDDEN)).astype(mx.bfloat16)
        mx.eval(x)
        active = {n: f for n, f in runners.items() if n != "mx.quantized_matmul" or rows <= args.qmm_max_rows}
        for fn in active.values():  # warm-up: compiles the dequantizer, makes the streams
            timed(fn, x, clock)
        times = {n: [] for n in active}
        for _ in range(args.reps):  # alternating, so the machine's other work falls on every path alike
            for name, fn in active.items():
                times[name].append(timed(fn, x, clock))
        cells = []
        for name in runners:
            if name not in times:
                cells.append("")
                continue
            median = statistics.median(times[name])
            cells.append(f"{median:.3f} ({min(times[name]):.3f}-{max(times[name]):.3f})")
            payload[f"{name}@{rows}"] = median
        rows_out.append([str(rows)] + cells)
        print(" | ".join(rows_out[-1]), flush=True)
    print(f"{VOCAB}x{HIDDEN} {args.bits}-bit group {args.group_size}, bf16 input, {cpu_spread.cpu_threads()} threads, "
          f"KERNEL_MAX_ROWS={cpu_spread.KERNEL_MAX_ROWS}; median (range) of {args.reps}, "
          f"{'CPU' if args.cpu_time else 'wall-clock'} seconds per product")
    print(common.table(rows_out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
