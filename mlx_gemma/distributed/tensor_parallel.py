"""Tensor parallel Gemma on mx.distributed: every rank holds a slice of every block (and, for
Gemma 4's mixture of experts, a share of the experts).

What each rank keeps of a decoder block (Megatron-style splits; `N` ranks, rank `r`):
- attention by heads: the query heads [r*H/N, (r+1)*H/N) (q_proj's rows), their KV heads (k_proj's and
  v_proj's rows) and the matching input columns of o_proj.  Each rank attends with its own heads and
  o_proj's partial products are summed over the ranks (one all_sum).  With fewer KV heads than ranks
  (Gemma 1 2B and Gemma 3 1B have one), a KV head is kept by every rank whose query heads read it: the
  ranks' query heads are contiguous, so each rank's heads all fall in one KV group (N must be a
  multiple of the KV heads), and that head is replicated on those N / kv ranks.  q/k norms act per
  head and Gemma 2's attention soft-cap per score, so both run unchanged on a rank's heads.
- the gated MLP by columns then rows: gate and up keep the rows [r*I/N, (r+1)*I/N), down_proj those
  input columns; down's partial products are summed (one all_sum).
- Gemma 4's expert bank (26B-A4B) by experts (expert parallel): rank r keeps the experts
  [r*E/N, (r+1)*E/N).  The router runs whole on every rank (it is small, and every rank then routes
  alike); a rank's sum holds only its experts' contributions (the pairs with other experts weigh 0),
  and the ranks' sums are summed (one all_sum).  From `OWN_PAIRS_MIN` (token, expert) pairs in a call
  (prefill) a rank runs the expert MLP on its own pairs only, about 1/N of them, so the experts'
  arithmetic is divided as well as their memory.  That takes one host read per layer (how many pairs
  are its own: MLX shapes are fixed when the graph is built), which also makes the last layer's
  attention output be computed for a prompt chunk whose hidden states nothing reads (the engine
  keeps only the caches of a chunk before the last).  Below it (decoding) a rank runs every pair,
  the others' on its expert 0 weighed by 0, and reads nothing: a decode step stays pipelined.
  Either way a rank's sum is bit for bit the same on the CPU, where MLX multiplies pair by pair
  (tests/test_distributed_tensor.py; no GPU was at hand to check its sorted kernels).
Replicated on every rank (say so: they are not divided): the token embedding and the tied (or
separate) LM head, whose final soft-cap then acts on the full logits as in one process; the norms;
Gemma 4's per-layer input tables and gates; the MoE router; the vision / audio towers of the
multimodal models (each rank runs them).  The residual stream is whole on every rank between blocks.

Per block and token: two all_sums of one hidden vector (three with MoE), in the activation dtype.
Each row-split layer adds its partial products, rounded to the activation dtype, across the ranks, so
the sums differ from one process's by float rounding only (fp32: ~1e-7 relative).  Checked with 2 ranks
on every test run (fp32, 12 tiny models, two of them MoE running only their own pairs): the split model's
logits equal, bit for bit, one process's with o_proj, down_proj and the expert bank each computed as the
ranks' partial products added, all else whole; so no norm, soft-cap, router or per-layer input sees a
partial sum.  Most models stay within 1e-5 of one process.  Tiny E2B (2.9e-5 on full logits, 3.6e-5 on decoding logprobs) and the 4-bit MoE (1.5e-5 on
decoding) amplify rounding (E2B's relative difference grows 60-fold over its 6 layers), and there one
process is itself as far from a float64 evaluation of the same weights (transformers): one process's fp32
logits 2.5e-5 / 2.1e-5 from it, the split model's 5.4e-5 / 2.0e-5, transformers' own fp32 1.9e-5 to 3.7e-5
/ 1.4e-5 to 1.6e-5 (by CPU); on the mean error over all logits, 2.0e-6 / 1.4e-6 against one process's
1.6e-6 / 1.5e-6.
(A relative bound would not help: E2B's logits are at most 0.6.)  The split's error is fp32's own size;
tests/test_distributed_tensor.py holds these two to 5e-5 and checks the float64 comparison.  In bf16 the
split adds one bf16 rounding per split layer, as any tensor-parallel run does: measured on tiny Gemma 3 / Gemma 4 MoE,
the split model's bf16 logits were as far from one process's bf16 logits (0.16 / 0.05) as those are from
its fp32 logits (0.14 / 0.04), so greedy tokens may part where two logits are within bf16 rounding.

Layers keep their classes' numerics (the CPU fast path's spread products included) and their parameter
names: q/k/v/gate/up are sliced in place (a column-split product needs no communication), and o_proj /
down_proj become the `RowSharded*` subclass of their own class, which sums its product over the ranks.
Only a bias of a row-split layer is kept whole, on rank 0 (the others hold zeros), so it is added once.
Inference only: a tensor-parallel model is not trained (data-parallel LoRA is the tuner's way).

Gemma 4 notes: global layers' own head dim and KV-head count (`attention_k_eq_v`: values are the keys'
projection, so slicing k_proj slices both) are split per layer; KV-shared layers attend with their
source layer's keys and values, which are that rank's KV heads already; the double-wide MLP of shared
layers is split as any MLP.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..arguments import is_integer
from ..cpu_spread import SpreadLinear, SpreadQuantizedLinear
from ..errors import DistributedError
from ..loading import is_encoder_config, model_args
from ..models import DRAFTERS, gemma4, gemma4_mm, gemma3_vlm, paligemma
from ..models.moe import Experts, QuantizedExpertLinear

# A LoRA layer's low-rank product would see one rank's slice of its input and be added on every rank.
_NO_ADAPTERS = "fuse the adapters into the model first (python -m mlx_gemma.fuse); a split model takes none"
# MLX's default quantization group size, when a folder's `quantization` names none (nn.quantize).
DEFAULT_GROUP_SIZE = 64
DEFAULT_BITS = 4
# From this many (token, expert) pairs in one call a rank of an expert-split bank runs only its own pairs,
# after one host read of their count; below it, every pair and no read.  Measured on a 26B-A4B-shaped
# bank (one rank's 64 of 128 experts, top 8; benchmarks/bench_expert_parallel.py sweep, 2-core CPU):
# MLX's CPU gather_mm costs the same per pair whichever expert, so the own pairs took 0.3x-0.8x the time
# of every pair already at 8 pairs (float32, bf16, 4-bit); the read cost nothing measurable.  So the line
# is drawn by what must not read the host, decoding: 256 pairs is one CPU prefill chunk (32 rows, top 8),
# and a decode step of fewer rows (a server batch of 8: 64 pairs) runs every pair without a read.
OWN_PAIRS_MIN = 256


class _SumsOverRanks:
    """The layer's own product on this rank's input columns, summed over the ranks of `group`."""

    group: mx.distributed.Group

    def __call__(self, x: mx.array) -> mx.array:
        return mx.distributed.all_sum(super().__call__(x), group=self.group)


class RowShardedLinear(_SumsOverRanks, nn.Linear):
    """nn.Linear holding a slice of the input columns; the ranks' products are summed."""


class RowShardedSpreadLinear(_SumsOverRanks, SpreadLinear):
    """cpu_spread.SpreadLinear holding a slice of the input columns; the ranks' products are summed."""


class RowShardedQuantizedLinear(_SumsOverRanks, nn.QuantizedLinear):
    """nn.QuantizedLinear holding a slice of the input columns (whole quantization groups); summed."""


class RowShardedSpreadQuantizedLinear(_SumsOverRanks, SpreadQuantizedLinear):
    """cpu_spread.SpreadQuantizedLinear holding a slice of the input columns; summed over the ranks."""


_ROW_SHARDED = {nn.Linear: RowShardedLinear, SpreadLinear: RowShardedSpreadLinear,
                nn.QuantizedLinear: RowShardedQuantizedLinear,
                SpreadQuantizedLinear: RowShardedSpreadQuantizedLinear}


class ExpertShardedExperts(Experts):
    """moe.Experts holding the experts [first, first + local) of the bank; each token's pairs with other
    experts weigh 0 here, and the ranks' weighted sums are summed (expert parallel).  From OWN_PAIRS_MIN
    pairs only this rank's pairs run through the expert MLP; the others' outputs are zeros."""

    group: mx.distributed.Group
    first: int  # the bank index of this rank's first expert

    def __call__(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        local = self.gate_up_proj.weight.shape[0]
        shifted = indices.astype(mx.int32) - self.first
        mine = (shifted >= 0) & (shifted < local)
        indices = mx.where(mine, shifted, local).astype(mx.uint32)  # `local`: an expert another rank holds
        weights = mx.where(mine, weights, mx.zeros_like(weights))
        return mx.distributed.all_sum(super().__call__(x, indices, weights), group=self.group)

    def _pair_outputs(self, x: mx.array, indices: mx.array) -> mx.array:
        local = self.gate_up_proj.weight.shape[0]
        if indices.size < OWN_PAIRS_MIN:  # other ranks' pairs run on expert 0, weighed by 0: no host sync
            return super()._pair_outputs(x, mx.where(indices < local, indices, 0))
        # Each own pair's row is the same product as when every pair ran (MLX multiplies pair by pair on the
        # CPU), and an other rank's pair gives 0 (not 0 x expert 0's output): the weighted sum is unchanged.
        k, flat = indices.shape[1], indices.flatten()
        order = mx.argsort(flat)  # this rank's pairs first, by expert (as the sorted path wants); others last
        count = (flat < local).sum().item()  # the host read: the one shape the routing decides
        own = order[:count]
        y = self._mlp(x[own // k][:, None, :], flat[own], self.sorts(count))  # [count, 1, H]
        y = mx.concatenate([y, mx.zeros((1, *y.shape[1:]), y.dtype)])  # other ranks' pairs read this zero row
        return y[mx.minimum(mx.argsort(order), count)]  # back in pair order: [N*K, 1, H]


@dataclass(frozen=True)
class _Block:
    """What a split must divide in one decoder block."""

    index: int
    heads: int  # query heads
    kv_heads: int  # key/value heads (of its source layer, for a KV-shared one)
    head_dim: int
    intermediate: int  # the dense MLP's inner width
    experts: int | None  # the MoE bank's size; None: no MoE


def check_tensor_parallel(config: dict, size: int, path=None) -> None:
    """Refuse, before anything is loaded, a tensor-parallel split of `config` (a config.json dict) over
    `size` ranks that does not divide the heads, the MLP widths or the experts (DistributedError naming
    the field and the numbers).  A bad config is the loader's ConfigError, naming `path`."""
    if not is_integer(size) or size < 1:
        raise DistributedError(f"tensor parallel needs a positive whole number of ranks, got {size!r:.40}")
    if is_encoder_config(config) or config.get("model_type") in DRAFTERS:
        raise DistributedError(f"{config.get('model_type')!r:.40} is not a causal LM with decoder blocks: "
                               "tensor parallel splits Gemma's text decoders only")
    args = model_args(config, path)
    if isinstance(args, (paligemma.ModelArgs, gemma3_vlm.ModelArgs, gemma4_mm.ModelArgs)):
        args = args.text  # the language half is split; the towers are replicated
    blocks = _blocks_from_args(args)
    _raise_problems(_divisibility(blocks, size) + _quantization_problems(config, blocks, size))


def _blocks_from_args(args) -> list[_Block]:
    if isinstance(args, gemma4.ModelArgs):
        sources = args.kv_sources()
        experts = args.num_experts if args.enable_moe_block else None
        out = []
        for i in range(args.num_hidden_layers):
            kv, dim = args.layer_shape(i if sources[i] is None else sources[i])
            wide = 2 if args.use_double_wide_mlp and sources[i] is not None else 1
            out.append(_Block(i, args.num_attention_heads, kv, dim, args.intermediate_size * wide, experts))
        return out
    return [_Block(i, args.num_attention_heads, args.num_key_value_heads, args.head_dim, args.intermediate_size,
                   None) for i in range(args.num_hidden_layers)]


def _divisibility(blocks: list[_Block], n: int) -> list[str]:
    """Every reason the blocks cannot be split over n ranks (the first block that fails, per field)."""
    problems, seen = [], set()

    def once(field: str, text: str) -> None:
        if field not in seen:
            seen.add(field)
            problems.append(text)

    for b in blocks:
        where = f"layer {b.index}: "
        if b.heads % n:
            once("heads", f"{where}num_attention_heads ({b.heads}) is not divisible by {n} ranks")
        if b.kv_heads % n and n % b.kv_heads:
            once("kv", f"{where}num_key_value_heads ({b.kv_heads}) and {n} ranks: neither divides the other "
                       "(KV heads are split, or replicated when fewer than the ranks)")
        if b.intermediate % n:
            once("mlp", f"{where}intermediate_size ({b.intermediate}) is not divisible by {n} ranks")
        if b.experts is not None and b.experts % n:
            once("experts", f"{where}num_experts ({b.experts}) is not divisible by {n} ranks")
    return problems


def _quantization_problems(config: dict, blocks: list[_Block], n: int) -> list[str]:
    """A quantized folder's row-split layers (o_proj, down_proj) must split along whole quantization
    groups and whole packed words: each rank's input columns a multiple of group_size and of 32 / bits."""
    key = "quantization" if config.get("quantization") else "quantization_config"
    q = config.get(key)
    if not isinstance(q, dict) or not q:
        return []
    by_layer = {b.index: b for b in blocks}
    checks = [(f"{key}", q, blocks)]
    for name, override in q.items():  # per-layer settings, by module path
        found = re.search(r"layers\.(\d+)\.", name)
        if isinstance(override, dict) and found and int(found.group(1)) in by_layer \
                and name.endswith(("o_proj", "down_proj")):
            checks.append((f"{key}.{name}", override, [by_layer[int(found.group(1))]]))
    problems = []
    for label, settings, which in checks:
        group = settings.get("group_size", DEFAULT_GROUP_SIZE)
        bits = settings.get("bits", DEFAULT_BITS)
        for b in which:
            for layer, columns in (("o_proj", b.heads * b.head_dim), ("down_proj", b.intermediate)):
                if label.endswith(("o_proj", "down_proj")) and not label.endswith(layer):
                    continue
                share = columns // n
                if columns % n == 0 and _misaligned(share, group, bits):
                    problems.append(f"{label}: group_size {group} ({bits} bits) does not split layer {b.index}'s "
                                    f"{layer}, whose {columns} input columns give {share} per rank over {n} ranks")
                    break
            else:
                continue
            break
    return problems


def _misaligned(columns: int, group_size, bits) -> bool:
    if not (is_integer(group_size) and is_integer(bits)) or group_size < 1 or bits < 1:
        return False  # the loader refuses such settings with its own error
    return columns % group_size != 0 or (columns * bits) % 32 != 0


def _raise_problems(problems: list[str]) -> None:
    if problems:
        raise DistributedError("the model cannot be split for tensor parallel: " + "; ".join(problems))


def shard_tensor_parallel(model: nn.Module, group: mx.distributed.Group) -> None:
    """Keep, in place, this rank's share of every decoder block of a loaded model (see the module
    docstring); replicated parts are left whole.  Everything is checked before anything changes: a
    split that does not fit, adapters already applied or a model sharded twice is a DistributedError."""
    n, rank = group.size(), group.rank()
    if n == 1:
        return
    _raise_problems([p for i, layer in enumerate(model.layers) for p in _layer_problems(i, layer)])
    blocks = [_block_of(i, layer) for i, layer in enumerate(model.layers)]
    problems = _divisibility(blocks, n)
    for b, layer in zip(blocks, model.layers):
        problems += _quantized_split_problems(f"layer {b.index}: self_attn.o_proj", layer.self_attn.o_proj, n)
        problems += _quantized_split_problems(f"layer {b.index}: mlp.down_proj", layer.mlp.down_proj, n)
    _raise_problems(problems)
    for b, layer in zip(blocks, model.layers):
        _shard_attention(layer.self_attn, b, n, rank, group)
        _shard_mlp(layer.mlp, n, rank, group)
        if b.experts is not None:
            _shard_experts(layer.experts, n, rank, group)


def _layer_problems(i: int, layer) -> list[str]:
    """A block's projections must be plain or quantized linear layers, not yet split."""
    problems = []
    for module, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                          (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
        for name in names:
            if name not in module:
                continue  # a KV-shared layer has no k/v; with attention_k_eq_v a global one has no v_proj
            where = f"layer {i}: {'self_attn' if module is layer.self_attn else 'mlp'}.{name}"
            if isinstance(module[name], _SumsOverRanks):
                return [f"{where} is split already: a model is sharded once"]
            if type(module[name]) not in _ROW_SHARDED:
                problems.append(f"{where} is a {type(module[name]).__name__}, not a plain (or quantized) linear "
                                f"layer: {_NO_ADAPTERS}")
    return problems


def _block_of(i: int, layer) -> _Block:
    attn = layer.self_attn
    experts = None
    if isinstance(layer, gemma4.DecoderLayer) and layer.moe:
        experts = layer.experts.gate_up_proj.weight.shape[0]
    return _Block(i, attn.n_heads, attn.n_kv_heads, attn.head_dim, _in_dims(layer.mlp.down_proj), experts)


def _in_dims(layer) -> int:
    if isinstance(layer, nn.QuantizedLinear):
        return layer.scales.shape[-1] * layer.group_size
    return layer.weight.shape[-1]


def _quantized_split_problems(where: str, layer, n: int) -> list[str]:
    columns = _in_dims(layer)
    if isinstance(layer, nn.QuantizedLinear) and columns % n == 0 \
            and _misaligned(columns // n, layer.group_size, layer.bits):
        return [f"{where}: its {columns} input columns give {columns // n} per rank, not whole quantization "
                f"groups of {layer.group_size} ({layer.bits} bits)"]
    return []


def _cut(a: mx.array, axis: int, start: int, stop: int) -> mx.array:
    """[start, stop) along `axis`, copied into a buffer of its own, so the whole tensor's is freed once the
    layer lets go of it.  A slice is a view of the whole buffer, which mx.contiguous keeps for a row slice
    (MLX 0.32), and an op evaluated once `a` has no other owner may write into `a`'s buffer (donation): so the
    copy (times 1, exact in every dtype) is evaluated here, while the layer still holds `a`."""
    index = [slice(None)] * a.ndim
    index[axis] = slice(start, stop)
    copy = a[tuple(index)] * 1
    mx.eval(copy)
    return copy


def _keep_rows(layer, start: int, stop: int) -> None:
    """Keep the output rows [start, stop) of a linear layer (weight, quantization scales and biases, bias)."""
    for name, value in layer.parameters().items():
        layer[name] = _cut(value, 0, start, stop)


def _keep_columns(layer, n: int, rank: int, group) -> None:
    """Keep this rank's input columns of a linear layer and make it sum its product over the ranks."""
    columns = _in_dims(layer)
    share = columns // n
    for name, value in layer.parameters().items():
        if name == "bias":  # added once, after the sum
            layer[name] = value if rank == 0 else mx.zeros_like(value)
            continue
        per = value.shape[-1] / columns  # packed words per column (quantized weight), groups per column, or 1
        layer[name] = _cut(value, -1, round(rank * share * per), round((rank + 1) * share * per))
    layer.__class__ = _ROW_SHARDED[type(layer)]
    layer.group = group


def _shard_attention(attn, b: _Block, n: int, rank: int, group) -> None:
    heads = b.heads // n
    _keep_rows(attn.q_proj, rank * heads * b.head_dim, (rank + 1) * heads * b.head_dim)
    kv = max(b.kv_heads // n, 1)
    first_kv = rank * b.kv_heads // n  # with fewer KV heads than ranks: the one this rank's query heads read
    for name in ("k_proj", "v_proj"):
        if name in attn:  # a KV-shared layer has neither; with attention_k_eq_v a global layer has no v_proj
            _keep_rows(attn[name], first_kv * b.head_dim, (first_kv + kv) * b.head_dim)
    _keep_columns(attn.o_proj, n, rank, group)
    attn.n_heads, attn.n_kv_heads = heads, kv


def _shard_mlp(mlp, n: int, rank: int, group) -> None:
    share = _in_dims(mlp.down_proj) // n
    for name in ("gate_proj", "up_proj"):
        _keep_rows(mlp[name], rank * share, (rank + 1) * share)
    _keep_columns(mlp.down_proj, n, rank, group)


def _shard_experts(experts: Experts, n: int, rank: int, group) -> None:
    share = experts.gate_up_proj.weight.shape[0] // n
    for proj in (experts.gate_up_proj, experts.down_proj):
        leaves = ("weight", "scales", "biases") if isinstance(proj, QuantizedExpertLinear) else ("weight",)
        for name in leaves:
            if name in proj:
                proj[name] = _cut(proj[name], 0, rank * share, (rank + 1) * share)
    experts.__class__ = ExpertShardedExperts
    experts.group, experts.first = group, rank * share
