"""Pipeline-parallel Gemma (mlx_gemma.distributed): the split, per-rank loading, and 2-rank runs.

The fast tests check the planning and the shard selection in this process.  The others launch
`mlx.launch -n 2 --backend ring` (MLX's CPU backend over localhost) on the scripts in
tests/distributed_scripts/, each checking several models per launch: starting two ranks costs
tens of seconds here (each imports MLX and mlx_gemma), so the launches are few and long.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_gemma
from conftest import FIXTURES
from mlx_gemma import model_folder
from mlx_gemma.convert import convert
from mlx_gemma.distributed.per_layer_split import layers_per_cut, read_part, slice_range
from mlx_gemma.distributed.sharded_loading import (
    allowed_cuts, plan_split, rank_bytes, split_for, tensor_role, tensor_sizes, wanted_by,
)
from mlx_gemma.errors import DistributedError
from mlx_gemma.loading import build_model, load_config, model_args
from mlx_gemma.tensorfile import INDEX_NAME, load_file, save_file, save_sharded

SCRIPTS = Path(__file__).parent / "distributed_scripts"
# MLX's launcher: a console script beside this Python (MLX 0.32 has no `python -m mlx.launch`)
MLX_LAUNCH = shutil.which("mlx.launch", path=os.path.dirname(sys.executable)) or shutil.which("mlx.launch")
LAUNCH_TIMEOUT = 900  # seconds: two ranks importing MLX and mlx_gemma on a busy machine take a while


def launch(*args: str, env: dict | None = None, timeout: float = LAUNCH_TIMEOUT) -> subprocess.CompletedProcess:
    """`mlx.launch -n 2 --backend ring python ARGS...` from the repository root."""
    # a port of our own: other test runs on this machine may be launching at the same time
    port = str(20_000 + (os.getpid() * 7 + time.monotonic_ns() // 1000) % 20_000)
    cmd = [MLX_LAUNCH, "-n", "2", "--backend", "ring", "--starting-port", port, sys.executable, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).parent.parent,
                          env={**os.environ, **(env or {})})


def sharded_copy(src: Path, dst: Path, max_shard_bytes: int) -> Path:
    """`src` with its weights cut into many shards and an index (save_sharded)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "reference.npz"))
    save_sharded(dst, load_file(src / "model.safetensors"), max_shard_bytes=max_shard_bytes)
    assert (dst / INDEX_NAME).exists()
    return dst


def random_gemma4_e2b_q4(tmp: Path) -> Path:
    """tiny_gemma4_e2b made 64 wide with per-layer inputs of P = 16 (the fixture's 48 takes no group size
    MLX quantizes with), random weights, converted to 4 bits in groups of 32.  The per-layer table
    [512, 6 * 16] is quantized, each layer's 16 columns half a group: a cut may fall only after an even layer."""
    src = tmp / "gemma4_e2b_64"
    shutil.copytree(FIXTURES / "tiny_gemma4_e2b", src, ignore=shutil.ignore_patterns("*.safetensors", "reference.npz"))
    config = {**load_config(src), "hidden_size": 64, "hidden_size_per_layer_input": 16}
    (src / "config.json").write_text(json.dumps(config))
    mx.random.seed(5)
    save_file(src / "model.safetensors", dict(tree_flatten(build_model(config).parameters())))
    return convert(src, mlx_path=tmp / "gemma4_e2b_q4", quantize=True, q_group_size=32, progress=False)


# ----- planning, in this process ------------------------------------------------------------


def brute_force(layer_bytes, first, last, size, cuts):
    """The smallest largest rank load over every allowed split (the reference for plan_split)."""
    best = None
    for chosen in itertools.combinations(cuts, size - 1):
        bounds = [0, *chosen, len(layer_bytes)]
        loads = [sum(layer_bytes[a:b]) for a, b in zip(bounds, bounds[1:])]
        loads[0] += first
        loads[-1] += last
        best = max(loads) if best is None else min(best, max(loads))
    return best


@pytest.mark.parametrize("layer_bytes,first,last,size", [
    ([10] * 8, 0, 0, 2), ([10] * 8, 35, 0, 2), ([5, 5, 40, 5, 5, 5, 30, 5], 10, 10, 3),
    ([1, 100, 1, 1, 1, 100, 1], 0, 50, 4), ([7, 3, 9, 1, 4, 4, 8, 2, 6], 12, 3, 4),
])
def test_plan_split_minimises_the_largest_rank(layer_bytes, first, last, size):
    cuts = list(range(1, len(layer_bytes)))
    starts = plan_split(layer_bytes, first, last, size, cuts)
    assert starts[0] == 0 and len(starts) == size and starts == sorted(set(starts))
    bounds = [*starts, len(layer_bytes)]
    loads = [sum(layer_bytes[a:b]) for a, b in zip(bounds, bounds[1:])]
    loads[0] += first
    loads[-1] += last
    assert max(loads) == brute_force(layer_bytes, first, last, size, cuts)


def test_split_counts_bytes_not_layers():
    # a heavy layer (a MoE block, say) at the front moves the cut forward
    assert plan_split([100, 10, 10, 10, 10, 10], 0, 0, 2, [1, 2, 3, 4, 5]) == [0, 1]
    # rank 0's embeddings count against it
    assert plan_split([10] * 6, 25, 0, 2, [1, 2, 3, 4, 5]) == [0, 2]  # 45 | 40, not 35 | 50 or 55 | 30


def test_kv_shared_layers_stay_with_the_layer_they_read():
    # tiny E2B: layers 4 and 5 read layers 3 (sliding) and 2 (global): no cut from 3 on
    e2b = model_args(load_config(FIXTURES / "tiny_gemma4_e2b"))
    assert e2b.kv_sources() == [None, None, None, None, 3, 2]
    assert allowed_cuts(e2b) == [1, 2]
    # tiny Gemma 4 with towers: layers 2 and 3 read layers 0 and 1: one stage only
    mm = model_args(load_config(FIXTURES / "tiny_gemma4_mm")).text
    assert allowed_cuts(mm) == []
    assert allowed_cuts(model_args(load_config(FIXTURES / "tiny_gemma3"))) == [1, 2, 3, 4, 5]
    with pytest.raises(DistributedError, match="2 pipeline ranks cannot split a model of 4 layers"):
        split_for(load_config(FIXTURES / "tiny_gemma4_mm"), tensor_sizes(FIXTURES / "tiny_gemma4_mm"), 2)


def test_more_ranks_than_layers_is_an_error():
    folder = FIXTURES / "tiny_gemma3"
    with pytest.raises(DistributedError, match="7 pipeline ranks cannot split a model of 6 layers.*at most 6"):
        split_for(load_config(folder), tensor_sizes(folder), 7)
    starts, tied = split_for(load_config(folder), tensor_sizes(folder), 6)
    assert starts == [0, 1, 2, 3, 4, 5] and tied == load_config(folder).get("tie_word_embeddings", True)


@pytest.mark.parametrize("name,role", [
    ("model.layers.3.mlp.down_proj.weight", ("layer", 3)),
    ("model.language_model.layers.11.self_attn.q_proj.scales", ("layer", 11)),
    ("language_model.model.layers.0.input_layernorm.weight", ("layer", 0)),
    ("model.vision_tower.vision_model.encoder.layers.2.mlp.fc1.weight", ("tower", None)),
    ("vision_tower.encoder.layers.0.mlp.fc1.weight", ("tower", None)),
    ("model.embed_audio.embedding_projection.weight", ("tower", None)),
    ("model.multi_modal_projector.mm_input_projection_weight", ("tower", None)),
    ("model.embed_tokens.weight", ("embed", None)), ("lm_head.weight", ("head", None)),
    ("model.language_model.embed_tokens_per_layer.weight", ("per_layer", None)),
    ("model.per_layer_model_projection.weight", ("per_layer", None)),
    ("language_model.model.embed_tokens_per_layer.scales", ("per_layer", None)),
    ("model.language_model.per_layer_projection_norm.weight", ("per_layer_norm", None)),
    ("model.norm.weight", ("other", None)),
])
def test_tensor_roles_in_every_layout(name, role):
    assert tensor_role(name) == role


def test_the_per_layer_table_is_counted_with_its_layers():
    """Gemma 4's per-layer table and projection are split by layers: the plan counts each layer's share
    of them (not rank 0's whole table), and every rank reads its part (sharded_loading.wanted_by)."""
    folder = FIXTURES / "tiny_gemma4_e2b"
    sizes = tensor_sizes(folder)
    table = sum(b for n, (_, b) in sizes.items() if tensor_role(n)[0] == "per_layer")
    assert table == (512 * 48 + 48 * 48) * 4  # [V, L*P] and [L*P, hidden] in fp32, L*P = 6 * 8
    layer_bytes, first, last = rank_bytes(sizes, 6, tied=True)
    own = [sum(b for n, (_, b) in sizes.items() if tensor_role(n) == ("layer", i)) for i in range(6)]
    assert [b - o for b, o in zip(layer_bytes, own)] == [table // 6] * 6
    # tied: the first rank's embedding is the last rank's head; both hold the per-layer norm, the last the final norm
    assert first == sum(sizes[n][1] for n in ("model.embed_tokens.weight", "model.per_layer_projection_norm.weight"))
    assert last == first + sizes["model.norm.weight"][1]
    for rank in (0, 1):
        assert wanted_by(rank, 2, 2 * rank, 2 + 4 * rank, True)("model.embed_tokens_per_layer.weight")
        assert wanted_by(rank, 2, 2 * rank, 2 + 4 * rank, True)("model.per_layer_projection_norm.weight")


def test_a_quantized_table_is_cut_only_at_whole_groups():
    # a leaf of w stored columns for L layers: a cut after layer c falls at column c * w / L
    assert layers_per_cut([8960, 8960 * 4 // 32, 8960 // 64], 35) == 1  # E2B: P = 256, 4 bits, groups of 64
    assert layers_per_cut([96, 12, 3], 6) == 2  # P = 16 in groups of 32: half a group per layer
    assert layers_per_cut([48], 6) == 1  # float
    e2b = model_args(load_config(FIXTURES / "tiny_gemma4_e2b"))
    assert allowed_cuts(e2b, [96, 12, 3]) == [2]
    assert slice_range("model.embed_tokens_per_layer.scales", (512, 3), 6, 2, 6) == (-1, 1, 3)
    assert slice_range("model.per_layer_model_projection.weight", (96, 8), 6, 2, 6) == (0, 32, 96)
    with pytest.raises(DistributedError, match="embed_tokens_per_layer.scales: its 3 stored columns do not split"):
        slice_range("model.embed_tokens_per_layer.scales", (512, 3), 6, 1, 6)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.uint32])
def test_a_rank_reads_its_columns_and_rows_from_the_file(tmp_path, dtype):
    table = (mx.random.normal((7, 12)) * 100).astype(dtype)
    save_file(tmp_path / "t.safetensors", {"model.embed_tokens_per_layer.weight": table,
                                            "model.per_layer_model_projection.weight": table})
    got = read_part(tmp_path / "t.safetensors", "model.embed_tokens_per_layer.weight", -1, 4, 10)
    assert got.dtype == dtype and mx.array_equal(got, table[:, 4:10])
    got = read_part(tmp_path / "t.safetensors", "model.per_layer_model_projection.weight", 0, 2, 5)
    assert got.dtype == dtype and mx.array_equal(got, table[2:5])


def test_each_rank_opens_only_the_shards_holding_its_tensors(tmp_path, monkeypatch):
    folder = sharded_copy(FIXTURES / "tiny_gemma3", tmp_path / "sharded", max_shard_bytes=60_000)
    sizes = tensor_sizes(folder)
    every = {file for file, _ in sizes.values()}
    assert len(every) > 6
    starts, tied = split_for(load_config(folder), sizes, 2)
    opened = {}
    real = model_folder.load_file
    for rank, (start, end) in enumerate(zip(starts, [*starts[1:], 6])):
        wanted = wanted_by(rank, 2, start, end, tied)
        seen = []
        monkeypatch.setattr(model_folder, "load_file", lambda path: seen.append(path.name) or real(path))
        weights = model_folder.load_weights_from_folder(folder, wanted)
        opened[rank] = set(seen)
        assert opened[rank] == {sizes[n][0] for n in sizes if wanted(n)}  # every needed shard, no other
        assert {tensor_role(n)[1] for n in weights if tensor_role(n)[0] == "layer"} >= set(range(start, end))
    assert opened[0] | opened[1] == every
    assert opened[0] != every and opened[1] != every


@pytest.mark.parametrize("strategy", ["pipeline", "tensor"])
def test_a_one_rank_group_loads_the_whole_model(strategy):
    folder = FIXTURES / "tiny_gemma3"
    group = mx.distributed.init()
    if group.size() != 1:
        pytest.skip("run inside mlx.launch")  # pytest itself is never launched so: this never skips in CI
    model, _ = mlx_gemma.load(folder, group=group, strategy=strategy)
    reference, _ = mlx_gemma.load(folder)
    ref = np.load(folder / "reference.npz")
    logits = np.array(model(mx.array(ref["input_ids"])))
    assert np.array_equal(logits, np.array(reference(mx.array(ref["input_ids"]))))
    assert np.abs(logits - ref["logits"]).max() / np.abs(ref["logits"]).max() < 1e-4  # transformers' logits
    assert len(model.make_cache()) == len(reference.layers) == len(model.layers)


def test_bad_strategy_and_adapters_are_refused():
    group = mx.distributed.init()
    with pytest.raises(DistributedError, match="strategy must be one of pipeline, tensor"):
        mlx_gemma.load(FIXTURES / "tiny_gemma3", group=group, strategy="data")
    with pytest.raises(DistributedError, match="fuse the adapters"):
        mlx_gemma.load(FIXTURES / "tiny_gemma3", group=group, adapter_path=FIXTURES)


# ----- two ranks ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Fixture folders plus: tiny Gemma 3 cut into shards with an index, and 4-bit copies of tiny
    Gemma 3 (sharded too) and Gemma 2, and a 4-bit Gemma 4 E2B-shaped folder (random_gemma4_e2b_q4)."""
    tmp = tmp_path_factory.mktemp("pipeline")
    out = {name: FIXTURES / f"tiny_{name}" for name in
           ("gemma", "gemma2", "gemma4_e2b", "gemma4_moe", "gemma4_31b", "gemma3_vlm", "paligemma2")}
    out["gemma3_sharded"] = sharded_copy(FIXTURES / "tiny_gemma3", tmp / "gemma3_sharded", 60_000)
    q3 = convert(FIXTURES / "tiny_gemma3", mlx_path=tmp / "q3", quantize=True, q_group_size=32, progress=False)
    out["gemma3_q4_sharded"] = sharded_copy(q3, tmp / "gemma3_q4_sharded", 30_000)
    out["gemma2_q4"] = convert(FIXTURES / "tiny_gemma2", mlx_path=tmp / "gemma2_q4", quantize=True,
                               q_group_size=32, progress=False)
    out["gemma4_e2b_q4"] = random_gemma4_e2b_q4(tmp)
    return out


@pytest.fixture(scope="module")
def parity(folders, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("parity") / "out.json"
    start = time.monotonic()
    done = launch(str(SCRIPTS / "pipeline_parity.py"), str(out), *map(str, folders.values()))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    results["seconds"] = time.monotonic() - start
    return {name: results[str(path)] for name, path in folders.items()}


# One launch checks all of them (minutes here: two ranks, eleven models, each against one process).
def test_pipeline_logits_and_tokens_equal_one_process(parity):
    for name, ranks in parity.items():
        assert [r["rank"] for r in ranks] == [0, 1], name
        assert ranks[0]["start"] == 0 and ranks[0]["end"] == ranks[1]["start"] and ranks[1]["end"] == ranks[0]["layers"]
        for r in ranks:
            assert r["full_err"] <= 1e-5 and r["cached_err"] <= 1e-5, (name, r)
            assert r["caches"] == r["end"] - r["start"], (name, r)  # each rank's caches hold its layers only
            if "transformers_err" in r:
                assert r["transformers_err"] < 1e-4, (name, r)


def test_each_rank_loads_its_share(parity, folders):
    """Each rank's parameter bytes (measured on the loaded model, by role): its layers, its layers'
    share of Gemma 4's per-layer table and projection, and its fixed parts (rank 0: the embedding and
    towers; the last: the head, or the embedding it is tied to).  Checked: nothing is held twice but the
    tied embedding and the per-layer norm; the table is split as the layers are; each rank holds what the
    split planned for it (less only what the loader drops: KV-shared layers' unused K/V weights); the
    ranks' layer bytes differ by at most one layer plus the fixed parts the split balances against."""
    for name, (r0, r1) in parity.items():
        whole, total = r0["total_roles"], r0["total_bytes"]
        sizes = tensor_sizes(folders[name])
        stored = sum(b for _, b in sizes.values())
        twice = {"per_layer_norm"} | ({"embed"} if "embed" in r1["roles"] else set())  # embed: a tied head
        for role, b in whole.items():
            held = r0["roles"].get(role, 0) + r1["roles"].get(role, 0)
            assert held == (2 * b if role in twice else b), (name, role, held, b)
        for r in (r0, r1):
            share = whole.get("per_layer", 0) * (r["end"] - r["start"]) // r["layers"]
            assert r["roles"].get("per_layer", 0) == share, (name, r["roles"])
            assert 0 <= r["planned_bytes"] - r["bytes"] <= stored - total, (name, r["planned_bytes"], r["bytes"])
            assert r["bytes"] < total, name
        layer_bytes, first, last = rank_bytes(sizes, r0["layers"], "embed" in r1["roles"])
        mine = [sum(layer_bytes[r["start"]:r["end"]]) for r in (r0, r1)]
        assert abs(mine[0] - mine[1]) <= max(layer_bytes) + first + last, (name, mine)


def test_what_a_rank_sends_per_token(parity):
    """One decoding step of one token: rank 0 sends its stage's output, [hidden] in the activation dtype,
    and for Gemma 4 with per-layer inputs also its embedded state h0 (another [hidden]), from which rank 1
    computes its layers' per-layer inputs; the last rank sends nothing (its logits go by all_sum)."""
    widths = {"gemma4_e2b": 48, "gemma4_e2b_q4": 64}
    for name, (r0, r1) in parity.items():
        assert r1["sent_per_token"] == 0, name
        if name in widths:
            assert r0["sent_per_token"] == 2 * widths[name] * 4, (name, r0["sent_per_token"])  # fp32


def test_mismatched_folders_and_too_many_ranks_fail_on_every_rank(tmp_path):
    other = tmp_path / "other"
    shutil.copytree(FIXTURES / "tiny_gemma3", other)
    config = json.loads((other / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (other / "config.json").write_text(json.dumps(config))
    done = launch(str(SCRIPTS / "pipeline_failures.py"), "mismatch", str(FIXTURES / "tiny_gemma3"), str(other))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: DistributedError: rank {rank}: the ranks load different models" in done.stdout
    done = launch(str(SCRIPTS / "pipeline_failures.py"), "too_many", str(FIXTURES / "tiny_gemma4_mm"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: DistributedError: 2 pipeline ranks cannot split a model of 4 layers" in done.stdout


@pytest.mark.parametrize("case", ["dies", "hangs"])
def test_a_lost_rank_ends_the_others_with_an_error(case):
    start = time.monotonic()
    done = launch(str(SCRIPTS / "pipeline_failures.py"), case, str(FIXTURES / "tiny_gemma3"),
                  env={"MLX_GEMMA_DISTRIBUTED_TIMEOUT": "10"}, timeout=LAUNCH_TIMEOUT)
    # mlx.launch 0.32 exits 0 even when a node fails; it warns with each node's exit code instead
    rank0_failed = re.search(r"Node with rank 0 exited with code [1-9]", done.stderr) is not None
    assert done.returncode != 0 or rank0_failed or "rank 0: RuntimeError" in done.stdout, done.stderr[-2000:]
    assert ("rank 0: RuntimeError: [ring] connection to a peer was lost" in done.stdout
            or "error: distributed: no progress for 10 s while generating" in done.stderr), \
        done.stdout[-2000:] + done.stderr[-2000:]
    assert "generation ended without an error" not in done.stdout + done.stderr
    assert time.monotonic() - start < LAUNCH_TIMEOUT


def test_generate_cli_pipeline_prints_once_and_matches_one_process(capsys):
    prompt = "The quick brown fox"
    folder = FIXTURES / "tiny_gemma3"
    done = launch("-m", "mlx_gemma.generate", "--model", str(folder), "--pipeline", "--prompt", prompt,
                  "--max-tokens", "12", "--no-chat")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    model, tokenizer = mlx_gemma.load(folder)
    want = mlx_gemma.generate(model, tokenizer, prompt, max_tokens=12)
    assert done.stdout.count("==========") == 0 and done.stderr.count("==========") == 1  # rank 0's stats only
    assert done.stdout.strip() == want.strip()
