"""Run under `mlx.launch -n 2 --backend ring`: pipeline-parallel logits and greedy tokens against one process.

Usage: pipeline_parity.py OUT.json FOLDER...  For each model folder every rank loads its pipeline
share (mlx_gemma.load(group=..., strategy="pipeline")) and, as the single-process reference, the
whole model (mlx_gemma.load).  Checked on every rank, for fp32 folders within 1e-5 (a folder
whose name holds "q" is quantized: the same weights dequantized the same way, so the same bound):
- a full-sequence call past the sliding window;
- chunked prefill (3 positions a call) and 12 cached decode steps past the window's wrap, step by step;
- greedy tokens through mlx_gemma.generate (the engine with its default chunking);
- against transformers' logits and greedy tokens in the fixture's reference.npz (the fixtures' own
  scripts made them), where the folder has one: within 1e-4 of the reference's largest magnitude, as
  tests/test_models.py; with an image for Gemma 3 with images and PaliGemma (the towers run on rank 0);
- each rank's parameter bytes, by role (sharded_loading.tensor_role), beside what the split planned
  for it (sharded_loading.rank_bytes: its layers with their share of Gemma 4's per-layer table, and
  its fixed parts), and the bytes it sends per token in a decoding step.
Rank 0 writes what every rank measured to OUT.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

import mlx_gemma
from mlx.utils import tree_flatten

from mlx_gemma.distributed import pipeline_bytes
from mlx_gemma.distributed.sharded_loading import rank_bytes, tensor_role, tensor_sizes
from mlx_gemma.engine import prefill
from mlx_gemma.models.base import GemmaModel

TOL = 1e-5
RTOL = 1e-4  # of the transformers reference logits' largest magnitude (tests/test_models.py)


def rel_err(ours, ref) -> float:
    return float(np.abs(np.array(ours.astype(mx.float32)) - ref).max() / np.abs(ref).max())


def nhwc(pixel_values_nchw: np.ndarray) -> mx.array:
    return mx.array(pixel_values_nchw.transpose(0, 2, 3, 1))


def against_transformers(model, folder: str) -> dict:
    """Pipeline logits (and greedy tokens) against the fixture's transformers reference, if any."""
    path = Path(folder) / "reference.npz"
    if not path.exists():
        return {}
    ref = dict(np.load(path))
    if "greedy_ids" in ref and "pixel_values" not in ref:  # text models (tests/fixtures/make_tiny_models.py, make_tiny_gemma4.py)
        err = rel_err(model(mx.array(ref["input_ids"])), ref["logits"])
        assert err < RTOL, f"{folder}: logits {err} off transformers'"
        cache = model.make_cache()
        logits = model(mx.array(ref["greedy_prompt"])[None], cache=cache)
        tokens = []
        for _ in range(len(ref["greedy_ids"])):
            tokens.append(int(mx.argmax(logits[0, -1]).item()))
            logits = model(mx.array([[tokens[-1]]]), cache=cache)
        assert tokens == ref["greedy_ids"].tolist(), f"{folder}: greedy {tokens} != transformers' {ref['greedy_ids']}"
        return {"transformers_err": err}
    if "one_pixel_values" in ref and "one_logits" in ref and ref["one_pixel_values"].ndim == 4:  # Gemma 3 + image
        err = rel_err(model(mx.array(ref["one_input_ids"]), pixel_values=nhwc(ref["one_pixel_values"])),
                      ref["one_logits"])
    elif "pixel_values" in ref:  # PaliGemma: the unpadded row (its prompt attends both ways)
        err = rel_err(model(mx.array(ref["input_ids"][1:]), pixel_values=nhwc(ref["pixel_values"][1:])),
                      ref["logits"][1:])
    else:
        return {}
    assert err < RTOL, f"{folder}: image logits {err} off transformers'"
    return {"transformers_err": err}


def cached_logits(model, ids: mx.array, steps: int) -> list[np.ndarray]:
    """Logits after a 3-at-a-time prefill, then after each of `steps` greedy tokens fed one by one."""
    cache = model.make_cache()
    hidden = prefill(model, ids, cache, step_size=3)
    out = []
    for _ in range(steps + 1):
        logits = model.logits(hidden[:, -1, :]).astype(mx.float32)
        out.append(np.array(logits))
        token = mx.argmax(logits, axis=-1)[:, None]
        hidden = model.model(token, cache=cache)
    return out


def role_bytes(model) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, value in tree_flatten(model.parameters()):
        role = tensor_role(name)[0]
        out[role] = out.get(role, 0) + value.nbytes
    return out


def planned_bytes(folder: str, start: int, end: int, rank: int, size: int, layers: int, tied: bool) -> int:
    """What the split counted for this rank (the tensors as stored)."""
    per_layer, first, last = rank_bytes(tensor_sizes(Path(folder)), layers, tied)
    return sum(per_layer[start:end]) + (first if rank == 0 else 0) + (last if rank == size - 1 else 0)


def sent_per_token(model, ids: mx.array) -> int:
    """Bytes this rank sends (mx.distributed.send) in one cached decoding step of one token."""
    cache = model.make_cache()
    mx.eval(model(ids, cache=cache))
    sent, send = [], mx.distributed.send
    mx.distributed.send = lambda x, *a, **k: sent.append(x.nbytes) or send(x, *a, **k)
    try:
        mx.eval(model(ids[:, -1:], cache=cache))
    finally:
        mx.distributed.send = send
    return sum(sent)


def check(folder: str, group) -> dict:
    rank = group.rank()
    model, tokenizer = mlx_gemma.load(folder, group=group, strategy="pipeline")
    reference, _ = mlx_gemma.load(folder)
    assert isinstance(model, GemmaModel), "the pipeline model keeps the model contract"
    vocab = reference.args.vocab_size
    ids = mx.array(np.random.default_rng(0).integers(3, min(vocab, 1000), size=(1, 23)), dtype=mx.int32)
    full = np.array(model(ids).astype(mx.float32))
    want = np.array(reference(ids).astype(mx.float32))
    full_err = float(np.abs(full - want).max())
    assert full_err <= TOL, f"{folder}: full-sequence logits differ by {full_err}"
    got, ref = cached_logits(model, ids, 12), cached_logits(reference, ids, 12)
    cached_err = max(float(np.abs(a - b).max()) for a, b in zip(got, ref))
    assert cached_err <= TOL, f"{folder}: cached logits differ by {cached_err}"
    prompt = "The quick brown fox jumps over the lazy dog, again and again and again"
    text = mlx_gemma.generate(model, tokenizer, prompt, max_tokens=16)
    want_text = mlx_gemma.generate(reference, tokenizer, prompt, max_tokens=16)
    assert text == want_text, f"{folder}: greedy text {text!r} != {want_text!r}"
    stage = model.stage
    layers = len(reference.layers)
    planned = planned_bytes(folder, stage.start, stage.end, rank, group.size(), layers,
                            bool(reference.args.tie_word_embeddings))
    return {**against_transformers(model, folder), "rank": rank, "start": stage.start, "end": stage.end,
            "bytes": pipeline_bytes(model), "total_bytes": pipeline_bytes(reference), "roles": role_bytes(model),
            "total_roles": role_bytes(reference), "planned_bytes": planned, "sent_per_token": sent_per_token(model, ids),
            "full_err": full_err, "cached_err": cached_err, "caches": len(model.make_cache()), "layers": layers}


def main() -> None:
    out, folders = sys.argv[1], sys.argv[2:]
    group = mx.distributed.init()
    results = {}
    for folder in folders:
        mine = check(folder, group)
        # every rank's figures, gathered on rank 0 (json as bytes through an all_gather)
        blob = json.dumps(mine).encode().ljust(2048)
        everyone = mx.distributed.all_gather(mx.array(np.frombuffer(blob, np.uint8)), stream=mx.cpu)
        rows = np.array(everyone).reshape(group.size(), -1)
        results[folder] = [json.loads(bytes(row).decode()) for row in rows]
    if group.rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
