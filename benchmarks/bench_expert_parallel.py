"""Expert parallel on one machine: does a rank that runs only its own (token, expert) pairs save time?

Under `--tensor-parallel` Gemma 4's expert bank is split by experts (distributed/tensor_parallel.py).
Before, every rank ran every pair, the other ranks' pairs on its expert 0 weighed by 0; now, from
`OWN_PAIRS_MIN` pairs per layer, it runs its own pairs only.  "Before" here is the same code with
`OWN_PAIRS_MIN` set past any pair count (the old way, op for op).  The model is 26B-A4B-shaped in its
bank (128 experts, top 8, hidden 2816, moe_intermediate 704) and tiny in height (`--layers`, default 1),
its attention 16 heads of 256 (8 KV heads; global layers 2 KV heads of 512, keys as values) and dense MLP
2112 wide, a 1024-token vocabulary (the head is not what is measured); random weights.

    python benchmarks/bench_expert_parallel.py sweep --dtype float32        # one rank's bank, by pairs
    python benchmarks/bench_expert_parallel.py prefill --tokens 256 --rounds 3

`sweep` times one rank's half of the bank (rank 0 of 2, in one process: the all_sum is over one rank)
on T tokens' pairs, both ways, alternating: where the own-pairs way starts to pay decides `OWN_PAIRS_MIN`.
`prefill` alternates one process, 2 ranks before and 2 ranks after (`mlx.launch -n 2 --backend ring` of
this script in worker mode), timing the engine's prefill of a random prompt (its default chunks).
On one machine both ranks share the cores: the figures compare the two ways, not a speed-up over one
process (several machines give that).
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
import mlx.nn as nn

from mlx_gemma.cpu_spread import prepare_for_device
from mlx_gemma.distributed import tensor_parallel
from mlx_gemma.distributed.tensor_parallel import ExpertShardedExperts, shard_tensor_parallel
from mlx_gemma.engine import prefill
from mlx_gemma.loading import build_model
from mlx_gemma.models.moe import ExpertLinear, QuantizedExpertLinear, Router

EXPERTS, TOP_K, HIDDEN, MOE_INTERMEDIATE = 128, 8, 2816, 704
NEVER = 1 << 62  # OWN_PAIRS_MIN past any pair count: every rank runs every pair (the way before)
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16}


def config(layers: int) -> dict:
    """A Gemma 4 text config with 26B-A4B's bank and `layers` layers (sliding, the last global)."""
    return {
        "model_type": "gemma4_text", "hidden_size": HIDDEN, "intermediate_size": 2112, "num_hidden_layers": layers,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "global_head_dim": 512,
        "num_global_key_value_heads": 2, "attention_k_eq_v": True, "sliding_window": 1024, "vocab_size": 1024,
        "hidden_size_per_layer_input": 0, "enable_moe_block": True, "num_experts": EXPERTS,
        "top_k_experts": TOP_K, "moe_intermediate_size": MOE_INTERMEDIATE, "final_logit_softcapping": 30.0,
        "layer_types": ["sliding_attention"] * (layers - 1) + ["full_attention"],
        "rope_parameters": {"full_attention": {"rope_type": "proportional", "rope_theta": 1e6,
                                               "partial_rotary_factor": 0.25},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
    }


def random_bank(shape: tuple, dtype, bits: int, key: int) -> dict[str, mx.array]:
    """A bank's leaves (weight, or packed weight, scales, biases), drawn one expert at a time so that no
    float32 copy of the whole bank is ever held."""
    pieces = []
    for e in range(shape[0]):
        w = mx.random.normal(shape[1:], key=mx.random.key(key * 1000 + e)) * shape[-1] ** -0.5
        if bits:
            pieces.append(mx.quantize(w.astype(dtype)[None], 64, bits))
        else:
            pieces.append((w.astype(dtype)[None],))
        mx.eval(pieces[-1])
    leaves = [mx.concatenate([p[i] for p in pieces]) for i in range(len(pieces[0]))]
    mx.eval(leaves)
    return dict(zip(("weight", "scales", "biases"), leaves))


def placeholder(experts: int, rows: int, columns: int, dtype, bits: int):
    """An expert projection of the bank's shape whose leaves are broadcast views (no memory): sharding
    copies out one rank's share of them, which random_bank then overwrites."""
    if not bits:
        layer = ExpertLinear(1, 1, 1)
        layer.weight = mx.broadcast_to(mx.zeros((1, 1, 1), dtype), (experts, rows, columns))
        return layer
    view = lambda width, t: mx.broadcast_to(mx.zeros((1, 1, 1), t), (experts, rows, width))  # noqa: E731
    return QuantizedExpertLinear(view(columns * bits // 32, mx.uint32), view(columns // 64, dtype),
                                 view(columns // 64, dtype), 64, bits)


def fill(experts, dtype, bits: int, seed: int) -> None:
    """This rank's experts get random weights of their own (each rank draws its experts' own)."""
    first = getattr(experts, "first", 0)
    for j, name in enumerate(("gate_up_proj", "down_proj")):
        proj = experts[name]
        local = proj.weight.shape[0]
        rows = proj.weight.shape[1]
        columns = proj.scales.shape[-1] * 64 if bits else proj.weight.shape[2]
        leaves = random_bank((local, rows, columns), dtype, bits, seed * 100 + j * 10 + first)
        for leaf, value in leaves.items():
            proj[leaf] = value


def build(layers: int, dtype, bits: int, group=None):
    """The benchmark's model, this rank's share when `group` has several ranks."""
    model = build_model(config(layers))
    for layer in model.layers:
        layer.experts.gate_up_proj = placeholder(EXPERTS, 2 * MOE_INTERMEDIATE, HIDDEN, dtype, bits)
        layer.experts.down_proj = placeholder(EXPERTS, HIDDEN, MOE_INTERMEDIATE, dtype, bits)
    model.set_dtype(dtype)
    if bits:
        nn.quantize(model, group_size=64, bits=bits, class_predicate=lambda _, m: isinstance(m, nn.Linear))
    model = prepare_for_device(model)  # as loading does (the CPU fast path's spread products)
    if group is not None and group.size() > 1:
        shard_tensor_parallel(model, group)
    for i, layer in enumerate(model.layers):
        fill(layer.experts, dtype, bits, i)
    mx.eval(model.parameters())
    return model


def prefill_seconds(model, tokens: int) -> float:
    """The engine's prefill of a random prompt, every chunk's hidden states computed: as if more layers
    followed (the engine itself computes, of a chunk before the last, only what the caches need)."""
    ids = mx.random.randint(3, 1024, (1, tokens), key=mx.random.key(0))
    cache = model.make_cache()
    start = time.perf_counter()
    mx.eval(prefill(model, ids, cache, keep_hidden=True))
    return time.perf_counter() - start


def worker(args) -> None:
    group = mx.distributed.init()
    tensor_parallel.OWN_PAIRS_MIN = args.own_pairs_min
    model = build(args.layers, DTYPES[args.dtype], args.bits, group)
    prefill_seconds(model, min(args.tokens, 32))  # warm up
    seconds = [prefill_seconds(model, args.tokens) for _ in range(args.reps)]
    if group.rank() == 0:
        with open(args.out, "w") as f:
            json.dump({"seconds": statistics.median(seconds), "runs": seconds}, f)


def launch(args, own_pairs_min: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        launcher = shutil.which("mlx.launch", path=os.path.dirname(sys.executable)) or "mlx.launch"
        cmd = [launcher, "-n", "2", "--backend", "ring", sys.executable, os.path.abspath(__file__), "worker",
               "--out", out, "--own-pairs-min", str(own_pairs_min), "--tokens", str(args.tokens),
               "--layers", str(args.layers), "--dtype", args.dtype, "--bits", str(args.bits),
               "--reps", str(args.reps)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if not os.path.exists(out):  # mlx.launch 0.32 exits 0 even when a rank fails
            sys.exit(f"the 2-rank run failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        with open(out) as f:
            return json.load(f)["seconds"]


def run_prefill(args) -> None:
    dtype = DTYPES[args.dtype]
    runs = {"1 process": [], "2 ranks, every pair (before)": [], "2 ranks, own pairs (after)": []}
    for _ in range(args.rounds):
        model = build(args.layers, dtype, args.bits)
        prefill_seconds(model, min(args.tokens, 32))
        runs["1 process"].append(statistics.median(prefill_seconds(model, args.tokens) for _ in range(args.reps)))
        del model
        mx.clear_cache()
        runs["2 ranks, every pair (before)"].append(launch(args, NEVER))
        runs["2 ranks, own pairs (after)"].append(launch(args, tensor_parallel.OWN_PAIRS_MIN))
    kind = f"{args.bits}-bit" if args.bits else args.dtype
    print(f"prefill of {args.tokens} tokens, {args.layers} layer(s), {kind}, {args.rounds} rounds, CPU")
    for name, values in runs.items():
        print(f"{name:30s}: {statistics.median(values):7.2f} s (runs {', '.join(f'{v:.2f}' for v in values)})")
    before, after = (statistics.median(runs[k]) for k in list(runs)[1:])
    print(f"after / before: {after / before:.2f}x")
    print(json.dumps({k: v for k, v in runs.items()}))


def run_sweep(args) -> None:
    """One rank's half of the bank (rank 0 of 2), timed on T tokens' pairs, both ways, alternating."""
    dtype = DTYPES[args.dtype]
    group = mx.distributed.init()  # one rank: its all_sum returns its input
    experts = ExpertShardedExperts.__new__(ExpertShardedExperts)
    nn.Module.__init__(experts)
    experts.act = build_model(config(1)).layers[0].experts.act
    experts.gate_up_proj = placeholder(EXPERTS // 2, 2 * MOE_INTERMEDIATE, HIDDEN, dtype, args.bits)
    experts.down_proj = placeholder(EXPERTS // 2, HIDDEN, MOE_INTERMEDIATE, dtype, args.bits)
    experts.group, experts.first = group, 0
    fill(experts, dtype, args.bits, 0)
    router = Router(HIDDEN, EXPERTS, TOP_K, 1e-6)
    print(f"one rank's bank (64 of 128 experts), {f'{args.bits}-bit' if args.bits else args.dtype}, CPU; "
          f"median of {args.reps} ms per call")
    print("pairs  own  every pair  own pairs  own/every")
    for tokens in args.tokens_list:
        x = mx.random.normal((tokens, HIDDEN), key=mx.random.key(tokens)).astype(dtype)
        weights, indices = router(x)
        mx.eval(x, weights, indices)
        own = int((indices < EXPERTS // 2).sum().item())
        times = {NEVER: [], 0: []}
        for rep in range(args.reps + 1):
            for threshold in times:
                tensor_parallel.OWN_PAIRS_MIN = threshold
                start = time.perf_counter()
                mx.eval(experts(x, indices, weights))
                if rep:  # the first round warms up
                    times[threshold].append(time.perf_counter() - start)
        every, mine = (statistics.median(times[t]) * 1e3 for t in (NEVER, 0))
        print(f"{tokens * TOP_K:5d}  {own:4d}  {every:10.1f}  {mine:9.1f}  {mine / every:9.2f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=["sweep", "prefill", "worker"])
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--bits", type=int, default=0, help="quantize the model (4: the expert banks run gather_qmm)")
    p.add_argument("--tokens", type=int, default=256, help="prefill: prompt length")
    p.add_argument("--tokens-list", type=lambda s: [int(t) for t in s.split(",")], default=[1, 2, 4, 8, 16, 32, 64],
                   help="sweep: token counts (pairs = 8 x tokens)")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--own-pairs-min", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    {"sweep": run_sweep, "prefill": run_prefill, "worker": worker}[args.mode](args)


if __name__ == "__main__":
    main()
