"""Tensor parallel (and expert parallel) Gemma on mx.distributed, against one process.

The reference is the same model run whole in one process (the issue's check; that run is itself checked
against transformers in test_models.py / test_gemma4.py).  One `mlx.launch -n 2 --backend ring` on localhost
runs tests/distributed_scripts/tensor_parity.py over tiny Gemma 1/2/3 (one with a single KV head), the
Gemma 3 vision model's language half, Gemma 4 E2B-shaped (per-layer inputs, shared KV, double-wide MLP,
one KV head), 31B-shaped (attention_k_eq_v, global head dims) and MoE, a quantized MoE with quantized
expert banks (both MoE also with each rank running only its own experts' pairs), and a quantized folder
written by our converter; the tests below read what each rank wrote.
Each decoding step is a round of all_sums between the two processes; on a loaded 2-core machine one
all_sum was measured at ~0.1 s (5 ms when the machine is idle), hence the few decoded tokens and the
generous timeout.  The refusals need no launch: a stub group says how many ranks there are.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_gemma.convert import convert
from mlx_gemma.distributed import tensor_parallel
from mlx_gemma.distributed.tensor_parallel import ExpertShardedExperts, check_tensor_parallel, shard_tensor_parallel
from mlx_gemma.errors import DistributedError
from mlx_gemma.loading import load_config, load_model
from mlx_gemma.models.moe import Experts, Router
from mlx_gemma.tuner.lora import enable_lora

from conftest import FIXTURES, TESTS

SCRIPTS = TESTS / "distributed_scripts"
LAUNCH_TIMEOUT = 900  # seconds; ~1 min on an idle machine, several when other jobs share its 2 cores
# fp32 logits of the split model against the whole one: 1e-5, as the issue asks, for every model but two.
# For tiny Gemma 4 E2B and the random quantized MoE the split model differs from one process by up to
# 2.9e-5 / 6.7e-6 (full logits), 3.6e-5 / 1.5e-5 (decoding logprobs), measured, and that is fp32 rounding: the split
# model's logits are exactly (bit for bit) one process's with o_proj / down_proj / the expert bank each
# computed as the two ranks' partial products added (test_the_split_differs_..._order_only), and these two
# models amplify rounding: their one-process fp32 logits are themselves 2.5e-5 / 2.1e-5 from a float64
# evaluation (transformers' fp32: 1.9e-5 to 3.7e-5 / 1.4e-5 to 1.6e-5, with the CPU).
# test_the_split_is_as_close_to_float64_as_one_process checks that on every run, on the mean error.
TOLERANCE = 1e-5
PROMPT_ROWS = 2 * 9  # tensor_parity.py's batch: 2 prompts of PROMPT_LENGTH 9
LOOSER = {"gemma4_e2b": 5e-5, "gemma4_moe_q4_in_memory": 5e-5, "gemma4_moe_q4_own_pairs": 5e-5}


def launcher() -> str:
    """MLX's launcher, beside this interpreter (or on PATH)."""
    beside = Path(sys.executable).parent / "mlx.launch"
    found = str(beside) if beside.exists() else shutil.which("mlx.launch")
    if found is None:
        pytest.skip("mlx.launch (MLX's launcher) is not installed")
    return found


def free_ports(count: int = 2) -> int:
    """A first port such that it and the next count - 1 are free now (the ring backend takes one per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        if first + count > 65535:
            continue
        try:
            held = []
            for p in range(first, first + count):
                t = socket.socket()
                held.append(t)
                t.bind(("127.0.0.1", p))
            return first
        except OSError:
            continue
        finally:
            for t in held:
                t.close()
    raise RuntimeError("no free ports")


def launch(script: Path, *args: str, ranks: int = 2, timeout: int = LAUNCH_TIMEOUT) -> subprocess.CompletedProcess:
    """`mlx.launch -n ranks --backend ring` on localhost running `script args`; fails the test on a non-zero exit."""
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent)}
    cmd = [launcher(), "-n", str(ranks), "--backend", "ring", "--starting-port", str(free_ports(ranks)),
           sys.executable, str(script), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Per rank, per model: what tensor_parity.py measured."""
    tmp = tmp_path_factory.mktemp("tensor_parallel")
    folder = convert(FIXTURES / "tiny_gemma3", mlx_path=tmp / "gemma3_q4", quantize=True, q_bits=4,
                     q_group_size=32, progress=False)
    launch(SCRIPTS / "tensor_parity.py", str(tmp), f"gemma3_q4_folder={folder}")
    out = [{r["name"]: r for r in json.loads((tmp / f"rank{i}.json").read_text())} for i in range(2)]
    with np.load(tmp / "logits.npz") as logits:  # rank 0's batches and logits, by model
        out[0]["logits"] = dict(logits)
    return out


EXPECTED = ["gemma", "gemma2", "gemma3", "gemma3_vlm", "gemma4_e2b", "gemma4_31b", "gemma4_moe",
            "gemma3_one_kv_head", "gemma4_moe_q4_in_memory", "gemma4_moe_own_pairs", "gemma4_moe_q4_own_pairs",
            "gemma3_q4_folder"]


def test_every_model_ran_on_both_ranks(ranks):
    assert [[n for n in r if n != "logits"] for r in ranks] == [EXPECTED, EXPECTED]


def test_logits_equal_one_process(ranks):
    """A full-sequence batch call: the split model's logits are the whole model's, on every rank."""
    for rank in ranks:
        for name in EXPECTED:
            r = rank[name]
            assert r["full_logits_diff"] <= LOOSER.get(name, TOLERANCE), (name, r["full_logits_diff"])


def test_the_split_differs_from_one_process_by_summation_order_only(ranks):
    """The split model's logits, on every rank, are exactly one process's computed with each row-split
    layer (o_proj, down_proj) and expert bank as the ranks' partial products added, all else whole: no norm,
    soft-cap, router or per-layer input sees a partial sum, and the all_sum adds in the activation dtype."""
    for rank in ranks:
        for name in EXPECTED:
            assert rank[name]["partials_added_diff"] == 0, (name, rank[name]["partials_added_diff"])


def test_chunked_prefill_and_cached_decoding_past_the_window_equal_one_process(ranks):
    """Prefill in chunks of 4, then decoding to 17 positions (every tiny model's window is 5 or 6, so the
    rotating caches wrap): each step's logprobs within tolerance, the greedy tokens equal."""
    decoded = ["gemma2", "gemma4_e2b", "gemma4_moe", "gemma3_one_kv_head", "gemma4_moe_q4_in_memory",
               "gemma4_moe_q4_own_pairs", "gemma3_q4_folder"]
    for rank in ranks:
        for name in decoded:
            r = rank[name]
            assert r["steps"] == 8 and r["tokens_equal"], name
            assert r["decode_logprobs_diff"] <= LOOSER.get(name, TOLERANCE), (name, r["decode_logprobs_diff"])


def test_kv_heads_fewer_than_ranks_are_replicated(ranks):
    """Gemma 1 2B-shaped (1 KV head), Gemma 3 1B-shaped (1 KV head), E2B-shaped (1 KV head) and the global
    layers of the 31B / MoE shapes (1 KV head there) keep their K/V projections whole."""
    r = ranks[0]
    assert r["gemma"]["kv_replicated_layers"] == [0, 1, 2]
    assert r["gemma3_one_kv_head"]["kv_replicated_layers"] == list(range(6))
    assert r["gemma4_31b"]["kv_replicated_layers"] == r["gemma4_moe"]["kv_replicated_layers"] == [2, 5]
    assert r["gemma3"]["kv_replicated_layers"] == []


def test_each_rank_holds_its_share_of_the_weights(ranks):
    """Parameter bytes per rank = replicated parts + split parts / 2, exactly (tolerance 0.1%), and the
    process's MLX memory after sharding (active bytes, measured) beyond them at most 16 KiB over what the
    same model holds beyond its parameters when loaded whole (constants its build makes: 0-131 KB on
    these tiny shapes, the most for Gemma 4; measured): the whole tensors are freed, not kept as views."""
    for rank in ranks:
        for name in EXPECTED:
            r = rank[name]
            assert r["split_bytes"] > r["whole_bytes"] / 3, name  # the split is most of each model
            assert abs(r["held_bytes"] - r["expected_bytes"]) <= 1e-3 * r["expected_bytes"], name
            assert r["held_bytes"] < 0.8 * r["whole_bytes"], name
            if name != "gemma3_one_kv_head":  # built from arrays already in memory: its load adds nothing
                beyond_whole = max(r["active_bytes_after_load"] - r["whole_bytes"], 0)
                beyond_split = r["active_bytes_held"] - r["held_bytes"]
                assert beyond_split >= -0.05 * r["held_bytes"], name  # the split is held, not lost
                assert beyond_split <= beyond_whole + 16384, (name, beyond_split, beyond_whole)


def test_one_all_sum_per_attention_per_mlp_and_per_expert_bank(ranks):
    """What a decoding step sends: per block, one all_sum of one hidden vector per token after attention and
    one after the MLP (and one after the experts with MoE), in the activation dtype; counted on the calls."""
    for name in EXPECTED:
        r = ranks[0][name]
        per_block = 3 if r["moe"] else 2
        assert r["step_all_sums"] == per_block * r["layers"], name
        assert r["step_bytes_per_row"] == per_block * r["layers"] * r["hidden_size"] * r["activation_bytes"], name


def test_with_own_pairs_the_ranks_divide_the_experts_arithmetic(ranks):
    """The expert MLP's pairs in the full-sequence call (18 tokens, top 2, 6 layers), counted on each rank: the
    every-pair cases run all of them on both ranks; the own-pairs cases (float and 4-bit banks, gather_mm and
    gather_qmm) run each pair on one rank only, which the exactness and decoding tests above check too."""
    for name in EXPECTED:
        if not ranks[0][name]["moe"]:
            continue
        r0, r1 = ranks[0][name], ranks[1][name]
        total = PROMPT_ROWS * r0["top_k"] * r0["layers"]
        if name.endswith("_own_pairs"):
            assert r0["pairs_run"] + r1["pairs_run"] == total and 0 < r0["pairs_run"] < total, name
        else:
            assert r0["pairs_run"] == r1["pairs_run"] == total, name


def _script(name: str):
    """A module of tests/distributed_scripts (imported for the model it builds)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _transformers_logits(name: str, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """transformers' Gemma4ForCausalLM logits of model `name`'s weights, in float64 and in float32: tiny
    E2B from its fixture folder; the quantized MoE with its weights dequantized (exact in float64)."""
    import torch  # heavy optional dependency (the reference)
    import transformers

    if name == "gemma4_e2b":
        model = transformers.Gemma4ForCausalLM.from_pretrained(FIXTURES / "tiny_gemma4_e2b", dtype=torch.float64,
                                                               attn_implementation="eager")
    else:
        parity = _script("tensor_parity")
        weights = {}
        mlx_model = parity.quantized_moe()()  # seeded: the weights the ranks drew
        modules = dict(mlx_model.named_modules())
        for key, value in tree_flatten(mlx_model.parameters()):
            path, _, leaf = key.rpartition(".")
            module = modules[path]
            if leaf in ("scales", "biases"):
                continue
            if "scales" in module:
                value = mx.dequantize(module.weight, module.scales, module.get("biases"), module.group_size,
                                      module.bits)
            # transformers names the expert banks' tensors without ".weight" (moe.sanitize_experts)
            key = key[: -len(".weight")] if key.endswith(("experts.gate_up_proj.weight", "experts.down_proj.weight")) else key
            weights[key] = torch.tensor(np.array(value.astype(mx.float32)), dtype=torch.float64)
        config = transformers.Gemma4TextConfig(**parity.quantized_moe_config())
        model = transformers.Gemma4ForCausalLM(config).to(torch.float64)
        model.set_attn_implementation("eager")
        model.set_experts_implementation("eager")  # the grouped product takes no float64
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]  # tied
        missing, unexpected = model.load_state_dict(weights, strict=False)
        assert not unexpected and not [k for k in missing if "rotary" not in k], (missing, unexpected)
    model.eval()
    with torch.no_grad():
        f64 = model(torch.tensor(ids)).logits.numpy()
        f32 = model.to(torch.float32)(torch.tensor(ids)).logits.numpy()
    return f64, f32


@pytest.mark.oracle
@pytest.mark.parametrize("name", ["gemma4_e2b", "gemma4_moe_q4_in_memory"])
def test_the_split_is_as_close_to_float64_as_one_process(ranks, name):
    """The two models held to 5e-5 (LOOSER): against a float64 evaluation of the same weights (transformers),
    the split model's fp32 logits are on average no further than twice an fp32 evaluation's own distance
    (ours in one process, or transformers' in fp32): the split adds rounding of the size these models' fp32
    arithmetic has anyway.  The mean absolute error, not the largest: the largest of 9,216 logits is one
    draw from the tail, and it moves with the CPU's kernels (transformers' fp32 E2B logits were at most
    3.7e-5 from float64 on one machine, 1.9e-5 on another, where the split's 5.3e-5 then read as 2.2x of
    the envelope and the test failed); the mean is stable.  Measured (mean, split / ours in one process / transformers fp32):
    E2B 2.0e-6 / 1.6e-6 / 0.8e-6, the MoE 1.4e-6 / 1.5e-6 / 1.2e-6."""
    logits = ranks[0]["logits"]
    f64, f32 = _transformers_logits(name, logits[f"{name}/ids"])
    one = np.abs(logits[f"{name}/one"] - f64)
    envelope = max(one.mean(), np.abs(f32 - f64).mean())
    split = np.abs(logits[f"{name}/split"] - f64).mean()
    assert one.max() < 1e-4 and split <= 2 * envelope, (name, split, one.mean(), envelope)


# --- refusals, before anything is loaded or changed ----------------------------------------------------


class StubGroup:
    """What shard_tensor_parallel asks of a group before it communicates: its size and this rank."""

    def __init__(self, size: int, rank: int = 0):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


@pytest.mark.parametrize("name", ["gemma", "gemma2", "gemma3", "gemma3_vlm", "gemma4_e2b", "gemma4_31b",
                                  "gemma4_moe", "paligemma2", "gemma4_mm"])
def test_splits_that_fit_pass_the_check(name):
    config = load_config(FIXTURES / f"tiny_{name}")
    for size in (1, 2):
        check_tensor_parallel(config, size)


@pytest.mark.parametrize("name, size, changes, message", [
    ("gemma", 3, {}, r"layer 0: num_attention_heads \(4\) is not divisible by 3 ranks"),
    ("gemma2", 4, {"num_key_value_heads": 3, "num_attention_heads": 12},
     r"num_key_value_heads \(3\) and 4 ranks: neither divides the other"),
    ("gemma3", 2, {"intermediate_size": 129}, r"intermediate_size \(129\) is not divisible by 2 ranks"),
    ("gemma4_moe", 2, {"num_experts": 5}, r"num_experts \(5\) is not divisible by 2 ranks"),
    ("gemma4_e2b", 4, {}, r"layer 0: num_attention_heads \(2\) is not divisible by 4 ranks$"),
])
def test_splits_that_do_not_fit_are_refused_naming_the_field(name, size, changes, message):
    config = {**load_config(FIXTURES / f"tiny_{name}"), **changes}
    with pytest.raises(DistributedError, match=message):
        check_tensor_parallel(config, size)


def test_a_quantized_folder_must_split_along_whole_groups():
    """o_proj's 4 heads x 16 = 64 input columns give 32 per rank: groups of 64 cannot be split."""
    config = {**load_config(FIXTURES / "tiny_gemma3"), "quantization": {"group_size": 64, "bits": 4}}
    with pytest.raises(DistributedError, match=r"quantization: group_size 64 \(4 bits\) does not split layer 0's "
                                               r"o_proj, whose 64 input columns give 32 per rank over 2 ranks"):
        check_tensor_parallel(config, 2)
    check_tensor_parallel({**config, "quantization": {"group_size": 32, "bits": 4}}, 2)
    override = {"group_size": 32, "bits": 4, "model.layers.1.mlp.down_proj": {"group_size": 128, "bits": 8}}
    with pytest.raises(DistributedError, match=r"quantization.model.layers.1.mlp.down_proj: group_size 128"):
        check_tensor_parallel({**config, "quantization": override}, 2)


def test_what_is_not_a_decoder_or_not_a_count_is_refused():
    with pytest.raises(DistributedError, match="positive whole number of ranks"):
        check_tensor_parallel(load_config(FIXTURES / "tiny_gemma"), 0)
    with pytest.raises(DistributedError, match="not a causal LM"):
        check_tensor_parallel(load_config(FIXTURES / "tiny_embedding_gemma"), 2)
    with pytest.raises(DistributedError, match="not a causal LM"):
        check_tensor_parallel(load_config(FIXTURES / "tiny_gemma4_assistant"), 2)


def _snapshot(model) -> dict:
    return {k: (v.shape, type(v)) for k, v in tree_flatten(model.parameters())}


def test_shard_refuses_before_changing_anything():
    model = load_model(FIXTURES / "tiny_gemma3")
    before = _snapshot(model)
    with pytest.raises(DistributedError, match=r"num_attention_heads \(4\) is not divisible by 3 ranks"):
        shard_tensor_parallel(model, StubGroup(3))
    assert _snapshot(model) == before
    shard_tensor_parallel(model, StubGroup(1))  # one rank: nothing to split
    assert _snapshot(model) == before

    shard_tensor_parallel(model, StubGroup(2, rank=1))
    halved = _snapshot(model)
    assert halved["model.layers.0.self_attn.q_proj.weight"][0] == (32, 64)
    assert halved["model.layers.0.mlp.down_proj.weight"][0] == (64, 64)
    with pytest.raises(DistributedError, match="split already"):
        shard_tensor_parallel(model, StubGroup(2))
    assert _snapshot(model) == halved

    adapted = load_model(FIXTURES / "tiny_gemma3")
    enable_lora(adapted, rank=2, target_names=("q_proj", "down_proj"))
    with pytest.raises(DistributedError, match="LoRALinear.*fuse the adapters"):
        shard_tensor_parallel(adapted, StubGroup(2))


def test_rank_one_keeps_the_second_half_of_each_split():
    """The slices each rank keeps: rank 1 of 2 takes the second half of q's rows, of the MLP's columns and
    of the experts; with one KV head for two ranks, both keep it whole."""
    whole = load_model(FIXTURES / "tiny_gemma4_moe")
    model = load_model(FIXTURES / "tiny_gemma4_moe")
    shard_tensor_parallel(model, StubGroup(2, rank=1))
    a, b = whole.layers[2], model.layers[2]  # a global layer: 1 KV head, head dim 64
    assert mx.array_equal(b.self_attn.q_proj.weight, a.self_attn.q_proj.weight[64:])
    assert mx.array_equal(b.self_attn.k_proj.weight, a.self_attn.k_proj.weight)
    assert mx.array_equal(b.self_attn.o_proj.weight, a.self_attn.o_proj.weight[:, 64:])
    assert mx.array_equal(b.mlp.up_proj.weight, a.mlp.up_proj.weight[16:])
    assert mx.array_equal(b.mlp.down_proj.weight, a.mlp.down_proj.weight[:, 16:])
    assert mx.array_equal(b.experts.down_proj.weight, a.experts.down_proj.weight[2:])
    assert (b.self_attn.n_heads, b.self_attn.n_kv_heads, b.experts.first) == (1, 1, 2)
    s = model.layers[0].self_attn  # a sliding layer: 2 KV heads, one per rank
    assert mx.array_equal(s.k_proj.weight, whole.layers[0].self_attn.k_proj.weight[32:])


# --- expert parallel: from OWN_PAIRS_MIN pairs a rank runs only the pairs of its own experts ------------


def _bank_and_routing(kind: str, tokens: int):
    """A tiny expert bank (8 experts, top 2; float32, bf16 or 4-bit) and a router's picks for `tokens` tokens."""
    mx.random.seed(11)
    experts = Experts(8, 64, 32, "gelu_pytorch_tanh")
    if kind == "q4":
        nn.quantize(experts, group_size=32, bits=4, class_predicate=lambda _, m: hasattr(m, "to_quantized"))
    elif kind == "bf16":
        experts.set_dtype(mx.bfloat16)
    router = Router(64, 8, 2, 1e-6)
    x = mx.random.normal((tokens, 64)).astype(mx.bfloat16 if kind == "bf16" else mx.float32)
    weights, indices = router(x)
    mx.eval(experts.parameters(), x, weights, indices)
    return experts, x, indices, weights


def _rank_share(whole: Experts, rank: int) -> ExpertShardedExperts:
    """Rank `rank` of 2's share of `whole` (a copy), its all_sum over this one process (which returns its input)."""
    share = copy.copy(whole)
    share.gate_up_proj, share.down_proj = copy.copy(whole.gate_up_proj), copy.copy(whole.down_proj)
    tensor_parallel._shard_experts(share, 2, rank, mx.distributed.init())
    return share


def _every_pair(share: ExpertShardedExperts, x, indices, weights) -> mx.array:
    """A rank's partial sum the way before: every pair run, other ranks' pairs on its expert 0 weighed by 0
    (a plain bank holding the rank's experts, given the masked routing)."""
    plain = copy.copy(share)
    plain.__class__ = Experts
    local = share.gate_up_proj.weight.shape[0]
    shifted = indices.astype(mx.int32) - share.first
    mine = (shifted >= 0) & (shifted < local)
    return plain(x, mx.where(mine, shifted, 0).astype(mx.uint32), mx.where(mine, weights, 0))


@pytest.mark.parametrize("kind", ["fp32", "bf16", "q4"])
@pytest.mark.parametrize("many", [False, True])
def test_a_rank_runs_its_own_pairs_and_its_sum_is_unchanged(kind, many):
    """Prefill-sized calls (>= OWN_PAIRS_MIN pairs) run each rank's own pairs only (counted where the expert
    MLP runs), decode-sized ones every pair; either way a rank's partial sum is bit for bit the one every pair
    gave (the distributed parity test's exactness rests on it), and the ranks' sums add up to the whole bank
    in one process (checked against transformers in test_moe.py) within float rounding."""
    tokens = tensor_parallel.OWN_PAIRS_MIN // 2 + 3 if many else 3
    whole, x, indices, weights = _bank_and_routing(kind, tokens)
    expected = whole(x, indices, weights).astype(mx.float32)
    ran, total = [], mx.zeros_like(expected)
    for rank in (0, 1):
        share = _rank_share(whole, rank)
        before = _every_pair(share, x, indices, weights)
        mlp = share._mlp
        share._mlp = lambda rows, idx, sorted_indices: ran.append(idx.size) or mlp(rows, idx, sorted_indices)
        partial = share(x, indices, weights)
        assert mx.array_equal(partial, before).item(), (kind, rank)
        total = total + partial.astype(mx.float32)
    own = [int(((indices >= 4 * r) & (indices < 4 * r + 4)).sum().item()) for r in (0, 1)]
    assert ran == (own if many else [indices.size] * 2)  # the pairs each rank's expert MLP ran
    scale = mx.abs(expected).max().item()
    tolerance = 1e-6 if kind != "bf16" else 2e-2  # bf16: the two ranks' bf16 sums add one rounding
    assert mx.abs(total - expected).max().item() <= tolerance * scale, kind


def test_own_pairs_read_their_count_on_the_host_only_from_the_threshold():
    """Below OWN_PAIRS_MIN (decoding) a rank's bank traces without reading anything on the host (a read
    inside mx.compile raises), so a decode step stays pipelined; from it, the count of its pairs is read."""
    few, x, indices, weights = _bank_and_routing("fp32", 3)
    share = _rank_share(few, 1)
    compiled = mx.compile(lambda x, i, w: share(x, i, w))
    assert mx.array_equal(compiled(x, indices, weights), share(x, indices, weights)).item()
    _, x, indices, weights = _bank_and_routing("fp32", tensor_parallel.OWN_PAIRS_MIN // 2)
    with pytest.raises(ValueError, match="eval"):
        mx.compile(lambda x, i, w: share(x, i, w))(x, indices, weights)


def test_a_rank_with_none_of_the_pairs_returns_zeros():
    whole, x, indices, weights = _bank_and_routing("fp32", tensor_parallel.OWN_PAIRS_MIN // 2 + 3)
    indices = indices % 4  # every pair on rank 0's experts
    share = _rank_share(whole, 1)
    assert mx.array_equal(share(x, indices, weights), mx.zeros_like(x)).item()
