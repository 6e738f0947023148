"""Run under `mlx.launch -n 2 --backend ring` by tests/test_distributed_tensor.py: tensor parallel against one process.

For each model (fixtures, in-memory variants, the quantized folders named on the command line) every
rank loads it twice: once whole (the single-process reference, run in this same process) and once
sharded with `shard_tensor_parallel`.  It records, per model, the largest logit difference of a
full-sequence batch call and of chunked prefill + cached greedy decoding past the sliding windows (the
logprobs of every step, fed the reference's tokens), whether the greedy tokens of both are equal, and
the parameter bytes this rank holds beside what the split should leave (replicated parts whole, the
split parts / N), and the (token, expert) pairs its expert banks ran (two MoE cases run each rank's own
pairs only, the others every pair).  Rank r writes <out>/rank<r>.json, and rank 0 each model's batch and its full-sequence
logits, one process's and the split model's (<out>/logits.npz: the test compares both to a float64
evaluation); the test asserts on them.

usage: tensor_parity.py OUT_DIR [NAME=QUANTIZED_FOLDER ...]
"""

from __future__ import annotations

import gc
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_gemma.cpu_spread import prepare_for_device
from mlx_gemma.distributed import tensor_parallel
from mlx_gemma.distributed.tensor_parallel import ExpertShardedExperts, shard_tensor_parallel
from mlx_gemma.generate import generate_step
from mlx_gemma.loading import build_model, load_config, load_model, load_model_from
from mlx_gemma.model_folder import load_weights_from_folder
from mlx_gemma.models import gemma4

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PROMPT_LENGTH, NEW_TOKENS, CHUNK = 9, 8, 4  # 17 positions: past every tiny model's window (5 or 6)
# Cases named so run every expert bank call on each rank's own pairs only (OWN_PAIRS_MIN = 1: the tiny
# batches have fewer pairs than the threshold), decoding steps included; the others run every pair.
OWN_PAIRS = "_own_pairs"


def one_kv_head_gemma3():
    """tiny_gemma3 with one KV head (as Gemma 3 1B): its first KV head's weights, built in memory."""
    folder = FIXTURES / "tiny_gemma3"
    config = {**load_config(folder), "num_key_value_heads": 1}
    weights = load_weights_from_folder(folder)
    rows = config["head_dim"]
    for name in list(weights):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            weights[name] = weights[name][:rows]

    def make():
        model = load_model_from(config, dict(weights), path=folder)
        mx.eval(model.parameters())
        return model

    return make


def quantized_moe_config() -> dict:
    """tiny_gemma4_moe's config made 64 wide (MLX quantizes in groups of 32 and up, which 48 does not divide)."""
    return {**load_config(FIXTURES / "tiny_gemma4_moe"), "hidden_size": 64, "intermediate_size": 64,
            "moe_intermediate_size": 32}


def quantized_moe():
    """A Gemma 4 MoE of quantized_moe_config(), random weights drawn alike on every rank (and in the test's
    process), every linear layer and expert bank quantized (4 bits, groups of 32): the quantized expert
    banks are split too."""
    config = quantized_moe_config()

    def make():
        mx.random.seed(3)
        model = build_model(config)
        nn.quantize(model, group_size=32, bits=4, class_predicate=lambda _, m: hasattr(m, "to_quantized"))
        model = prepare_for_device(model)
        mx.eval(model.parameters())
        return model

    return make


def cases(quantized: dict[str, str]):
    """(name, make, decode): every model gets a full-sequence call; those with decode also the chunked
    prefill and cached decoding (each step a round of all_sums: on a loaded 2-core machine, the slow part)."""
    for name, decode in (("gemma", False), ("gemma2", True), ("gemma3", False), ("gemma3_vlm", False),
                         ("gemma4_e2b", True), ("gemma4_31b", False), ("gemma4_moe", True)):
        yield name, lambda name=name: load_model(FIXTURES / f"tiny_{name}"), decode
    yield "gemma3_one_kv_head", one_kv_head_gemma3(), True
    yield "gemma4_moe_q4_in_memory", quantized_moe(), True
    yield "gemma4_moe" + OWN_PAIRS, lambda: load_model(FIXTURES / "tiny_gemma4_moe"), False
    yield "gemma4_moe_q4" + OWN_PAIRS, quantized_moe(), True
    for name, folder in quantized.items():
        yield name, lambda folder=folder: load_model(folder), True


def kv_heads_below(model, n: int) -> set[int]:
    """Layers whose KV heads are fewer than the ranks: their k/v projections are replicated whole."""
    return {i for i, layer in enumerate(model.layers) if layer.self_attn.n_kv_heads < n}


def expected_bytes(whole, n: int) -> tuple[int, int, int]:
    """(replicated bytes, bytes of the split parts, bytes this rank should hold) of the whole model: the
    decoder blocks' q/k/v/o, gate/up/down and expert banks are split (k/v replicated where the KV heads are
    fewer than the ranks), everything else (embeddings, norms, towers, router, per-layer inputs) is whole."""
    split = 0
    for layer in whole.layers:
        names = ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "experts"]
        if layer.self_attn.n_kv_heads >= n:
            names += ["self_attn.k_proj", "self_attn.v_proj"]
        modules = dict(layer.named_modules())
        split += sum(parameter_bytes(modules[name]) for name in names if name in modules)
    total = parameter_bytes(whole)
    return total - split, split, total - split + split // n


def parameter_bytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def decode(model, ids: mx.array) -> tuple[list[list[int]], list[mx.array]]:
    """Greedy tokens and the logprobs of each step: chunked prefill, then cached decoding."""
    tokens, logprobs = [], []
    for step_ids, lp in generate_step(model, ids, prefill_step_size=CHUNK, max_tokens=NEW_TOKENS):
        tokens.append(step_ids)
        logprobs.append(lp)
    return tokens, logprobs


class AllSumCount:
    """Counts the all_sums (and the bytes handed to them) while it is entered: the module calls
    mx.distributed.all_sum by attribute, so the counting function stands in for it."""

    def __enter__(self):
        self.calls, self.bytes, self.original = 0, 0, mx.distributed.all_sum
        mx.distributed.all_sum = self.count
        return self

    def count(self, x, *args, **kwargs):
        self.calls, self.bytes = self.calls + 1, self.bytes + x.nbytes
        return self.original(x, *args, **kwargs)

    def __exit__(self, *exc):
        mx.distributed.all_sum = self.original


@contextmanager
def pairs_for(name: str):
    """While entered: the expert banks run each rank's own pairs only if `name` says so (else every pair)."""
    saved = tensor_parallel.OWN_PAIRS_MIN
    tensor_parallel.OWN_PAIRS_MIN = 1 if name.endswith(OWN_PAIRS) else 1 << 62
    try:
        yield
    finally:
        tensor_parallel.OWN_PAIRS_MIN = saved


class PairCount:
    """Counts the (token, expert) pairs the sharded expert banks run their MLP on while it is entered."""

    def __enter__(self):
        self.pairs, self.original = 0, ExpertShardedExperts.__dict__.get("_mlp")  # None: inherited (Experts')
        counter, run = self, ExpertShardedExperts._mlp

        def counting(bank, rows, idx, sorted_indices):
            counter.pairs += idx.size
            return run(bank, rows, idx, sorted_indices)

        ExpertShardedExperts._mlp = counting
        return self

    def __exit__(self, *exc):
        if self.original is None:
            del ExpertShardedExperts._mlp
        else:
            ExpertShardedExperts._mlp = self.original


def one_step_traffic(model, ids: mx.array) -> tuple[int, int]:
    """(all_sums, bytes all_sum'ed) for one cached decoding step of the batch, after its prompt."""
    cache = model.make_cache()
    mx.eval(model(ids, cache=cache))
    with AllSumCount() as counted:
        mx.eval(model(ids[:, -1:], cache=cache))
    return counted.calls, counted.bytes


class _Rank:
    """A stand-in group for shard_tensor_parallel: rank r of n (nothing is communicated while sharding)."""

    def __init__(self, r: int, n: int):
        self.r, self.n = r, n

    def size(self) -> int:
        return self.n

    def rank(self) -> int:
        return self.r


class _Added(nn.Module):
    """Every rank's share of a row-split layer (or expert bank), each given its part of the input, added."""

    def __init__(self, shares: list, columns: bool):
        super().__init__()
        self.shares, self.columns = shares, columns

    def __call__(self, x: mx.array, *rest) -> mx.array:
        if not self.columns:  # the expert banks: every rank sees the whole input
            parts = [share(x, *rest) for share in self.shares]
        else:
            w = x.shape[-1] // len(self.shares)
            parts = [share(x[..., i * w:(i + 1) * w]) for i, share in enumerate(self.shares)]
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        return total


def partials_added(make, n: int, ids: mx.array) -> mx.array:
    """One process's logits with o_proj, down_proj and the expert bank of every block computed as the n ranks'
    partial products added (each rank's share from shard_tensor_parallel, its all_sum left out), everything
    else the whole model's: the split model's logits if nothing but that summation differs."""
    whole, shares = make(), [make() for _ in range(n)]
    for r, share in enumerate(shares):
        shard_tensor_parallel(share, _Rank(r, n))
    for i, layer in enumerate(whole.layers):
        layer.self_attn.o_proj = _Added([s.layers[i].self_attn.o_proj for s in shares], True)
        layer.mlp.down_proj = _Added([s.layers[i].mlp.down_proj for s in shares], True)
        if isinstance(layer, gemma4.DecoderLayer) and layer.moe:
            layer.experts = _Added([s.layers[i].experts for s in shares], False)
    all_sum = mx.distributed.all_sum
    mx.distributed.all_sum = lambda x, *args, **kwargs: x  # a rank's own partial product
    try:
        out = whole(ids)
        mx.eval(out)
    finally:
        mx.distributed.all_sum = all_sum
    return out


def compare(name: str, make, decoding: bool, group, logits_out: dict) -> dict:
    n = group.size()
    whole = make()
    vocab = whole.args.vocab_size
    ids = mx.random.randint(3, vocab, (2, PROMPT_LENGTH), key=mx.random.key(7))  # the same on every rank
    before = mx.get_active_memory()
    sharded = make()
    loaded = mx.get_active_memory() - before
    shard_tensor_parallel(sharded, group)
    gc.collect()
    held = mx.get_active_memory() - before

    logits = whole(ids)
    with PairCount() as counted:
        split_logits = sharded(ids)
    full_diff = mx.abs(split_logits - logits).max().item()
    logits_out.update({f"{name}/ids": np.array(ids), f"{name}/one": np.array(logits),
                       f"{name}/split": np.array(split_logits)})
    calls, sent = one_step_traffic(sharded, ids)
    tokens = ref_tokens = step_diff = None
    if decoding:
        ref_tokens, ref_logprobs = decode(whole, ids)
        tokens, logprobs = decode(sharded, ids)
        step_diff = max(mx.abs(a - b).max().item() for a, b in zip(logprobs, ref_logprobs))
    replicated, split, expected = expected_bytes(whole, n)
    return {
        "name": name, "full_logits_diff": full_diff, "decode_logprobs_diff": step_diff,
        "tokens_equal": tokens == ref_tokens, "steps": len(tokens or ()), "whole_bytes": parameter_bytes(whole),
        "replicated_bytes": replicated, "split_bytes": split, "expected_bytes": expected,
        "held_bytes": parameter_bytes(sharded), "active_bytes_after_load": loaded, "active_bytes_held": held,
        "kv_replicated_layers": sorted(kv_heads_below(whole, n)),
        "step_all_sums": calls, "step_bytes_per_row": sent // ids.shape[0], "layers": len(whole.layers),
        "hidden_size": whole.args.hidden_size, "activation_bytes": logits.dtype.size,
        "moe": isinstance(whole.layers[0], gemma4.DecoderLayer) and whole.layers[0].moe,
        "pairs_run": counted.pairs, "top_k": getattr(whole.args, "top_k_experts", None),
    }


def main() -> None:
    out = Path(sys.argv[1])
    quantized = dict(arg.split("=", 1) for arg in sys.argv[2:])
    group = mx.distributed.init()
    results, logits = [], {}
    for name, make, decoding in cases(quantized):
        with pairs_for(name):
            results.append(compare(name, make, decoding, group, logits))
        print(f"rank {group.rank()}: {name} done", flush=True)
    # after every memory measurement (the extra models it builds would move the later ones' baselines)
    for result, (name, make, _) in zip(results, cases(quantized)):
        with pairs_for(name):
            added = partials_added(make, group.size(), mx.array(logits[f"{name}/ids"]))
        result["partials_added_diff"] = float(np.abs(np.array(added) - logits[f"{name}/split"]).max())
    (out / f"rank{group.rank()}.json").write_text(json.dumps(results, indent=1))
    if group.rank() == 0:
        np.savez(out / "logits.npz", **logits)


if __name__ == "__main__":
    main()
