"""Run under `mlx.launch -n 2 --backend ring` by tests/test_distributed_guards.py: what cannot run across
ranks is refused on every rank (and the ranks still work together afterwards), and ranks holding
differently quantized layers agree on the prefill chunk.

usage: pipeline_guards.py OUT_DIR FLOAT_FOLDER MIXED_FOLDER

- FLOAT_FOLDER as a 2-rank pipeline: contrastive search, score() and saving the prompt cache must each
  raise a typed error on every rank; a prompt cache made in one process is refused by check(); then
  greedy decoding must still give the single process's tokens (no rank was left waiting), and beam
  search (logits only) the single process's beams.
- MIXED_FOLDER (float layers first, the last layer quantized, so rank 0 holds float layers only) as a
  2-rank pipeline: chunked prefill with the default chunk and greedy decoding, against the same folder in
  this one process (the test checks that the ranks' own layers differ in quantization).
- FLOAT_FOLDER tensor-parallel: the caches hold this rank's KV heads; the model's fingerprint (the whole
  model's head count) carries the rank's share; saving is refused.
Rank r writes OUT_DIR/rank<r>.json; the test asserts on them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

import mlx_gemma
from mlx_gemma.engine import default_prefill_step, prefill
from mlx_gemma.errors import MlxGemmaError
from mlx_gemma.prompt_cache import PromptCache, model_fingerprint, save_prompt_cache
from mlx_gemma.score import score
from mlx_gemma.search import beam_search, contrastive_search

PROMPT = [2] + [(7 * i + 3) % 500 + 5 for i in range(69)]  # 70 positions: over 32 (float) and under 256 rows
NEW_TOKENS = 6


def refusal(call) -> str:
    """'<ErrorType>: <message>' of the typed error `call` raises, or 'no error'."""
    try:
        call()
    except MlxGemmaError as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def greedy_logits(model) -> tuple[list[int], list[mx.array]]:
    """Default-chunk prefill of PROMPT, then greedy decoding: the tokens and each step's logits."""
    cache = model.make_cache()
    hidden = prefill(model, mx.array([PROMPT]), cache)  # the default chunk: what the guard agrees on
    tokens, logits = [], []
    for _ in range(NEW_TOKENS):
        row = model.logits(hidden[:, -1]).astype(mx.float32)
        mx.eval(row)
        logits.append(row)
        tokens.append(int(mx.argmax(row, axis=-1).item()))
        hidden = model.model(mx.array([[tokens[-1]]]), cache=cache)
    return tokens, logits


def max_error(a: list[mx.array], b: list[mx.array]) -> float:
    return max(float(mx.abs(x - y).max().item()) for x, y in zip(a, b))


def main() -> None:
    out, float_folder, mixed_folder = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    group = mx.distributed.init()
    rank = group.rank()
    result: dict = {"rank": rank}

    whole, _ = mlx_gemma.load(float_folder)
    model, _ = mlx_gemma.load(float_folder, group=group, strategy="pipeline")
    s = model.share
    result["pipeline_share"] = [s.strategy, s.rank, s.size, s.quantized, s.hidden_states]
    result["contrastive"] = refusal(lambda: next(contrastive_search(model, PROMPT[:5], max_tokens=3)))
    result["score"] = refusal(lambda: score(model, mx.array([PROMPT[:5]])))
    cache = PromptCache(model)
    cache.extend(model, PROMPT[:8])  # in memory, a rank's cache works (chat keeps one between turns)
    result["save_pipeline_cache"] = refusal(lambda: save_prompt_cache(out / f"rank{rank}.safetensors", cache))
    result["whole_cache_on_rank"] = refusal(lambda: PromptCache(whole).check(model))
    want, _ = greedy_logits(whole)
    got, _ = greedy_logits(model)  # the ranks still go together after the refusals
    result["tokens_after_refusals_equal"] = got == want
    # beam search reads logits only (the shared ones): it runs across the pipeline, as in one process
    beams = [(b.tokens, b.logprob) for b in beam_search(model, PROMPT[:5], max_tokens=4, num_beams=3, num_return=2)]
    want_beams = [(b.tokens, b.logprob) for b in beam_search(whole, PROMPT[:5], max_tokens=4, num_beams=3, num_return=2)]
    result["beams_equal"] = [t for t, _ in beams] == [t for t, _ in want_beams]
    result["beams_logprob_err"] = max(abs(a - b) for (_, a), (_, b) in zip(beams, want_beams))

    whole, _ = mlx_gemma.load(mixed_folder)
    model, _ = mlx_gemma.load(mixed_folder, group=group, strategy="pipeline")
    result["mixed_local_quantized"] = any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    result["mixed_share_quantized"] = model.share.quantized
    result["mixed_prefill_step"] = [default_prefill_step(model), default_prefill_step(whole)]
    want, want_logits = greedy_logits(whole)
    got, got_logits = greedy_logits(model)
    result["mixed_tokens_equal"] = got == want
    result["mixed_err"] = max_error(got_logits, want_logits)

    model, _ = mlx_gemma.load(float_folder, group=group, strategy="tensor")
    s = model.share
    result["tensor_share"] = [s.strategy, s.rank, s.size, s.quantized, s.hidden_states]
    cache = PromptCache(model)
    cache.extend(model, PROMPT[:8])
    result["tensor_cache_heads"] = [c.keys[0].shape[1] for c in cache.caches]
    fingerprint = model_fingerprint(model)
    result["tensor_fingerprint"] = {k: fingerprint[k] for k in ("num_key_value_heads", "share")}
    result["save_tensor_cache"] = refusal(lambda: save_prompt_cache(out / f"rank{rank}.safetensors", cache))
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
