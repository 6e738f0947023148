"""The prefix cache with a quantized KV cache (kv_bits): a row that leaves the quantized batch is
stored, quantized, so a second chat turn reuses the first turn's prompt *and reply*.

Scheduler level (tiny Gemma 4 E2B, head dim 32, window 6): the second turn's `cached_tokens` covers
the first turn's prompt and generated tokens (the prompt's own entry alone gives only the prompt),
and both turns' greedy tokens equal `generate_step` with the same KV options (itself checked against
transformers in test_gemma4.py).  The switch to quantized storage sits on a prefill chunk boundary
(0 or 8 with chunks of 4), where a prompt alone and a reused prefix switch alike (batching.py's
docstring: a reused prefix may otherwise move the switch).

Server level: a 2-turn chat on `--kv-bits 8` servers of the tiny Gemma 2 and Gemma 3 fixtures
with head dim 32 (tests/fixtures/make_tiny_kv_models.py; the 16 of the other tiny ones fits no
kv_group_size), whose windows (6, 5) are far shorter than the conversation.
"""

from __future__ import annotations

import threading
from collections import defaultdict

import mlx.core as mx
import numpy as np
import openai
import pytest

import mlx_gemma
from conftest import FIXTURES
from mlx_gemma.batching import Job, Scheduler
from mlx_gemma.generate import generate_step
from mlx_gemma.loading import load
from mlx_gemma.models.kv_cache import KVCacheOptions
from mlx_gemma.samplers import make_logits_processors
from test_server import reference, start_server, stop_server

CHUNK = 4
WAIT = 120


class Collector:
    """Every job's events, for a test thread to wait on."""

    def __init__(self):
        self.events, self.cv = defaultdict(list), threading.Condition()

    def __call__(self, event):
        with self.cv:
            self.events[event.job_id].append(event)
            self.cv.notify_all()

    def done(self, job_id):
        with self.cv:
            ok = self.cv.wait_for(lambda: self.events[job_id] and self.events[job_id][-1].finish_reason, WAIT)
        assert ok, "the scheduler did not finish in time"
        return self.events[job_id]


def alone(model, ids, n, kv):
    """Greedy tokens and their log-probabilities of `ids` run by itself (the reference)."""
    out = list(generate_step(model, ids, prefill_step_size=CHUNK, max_tokens=n, kv_options=kv))
    return [s[0] for s, _ in out], [float(np.array(lp[0])[s[0]]) for s, lp in out]


@pytest.mark.parametrize("start", [0, 8])
def test_a_quantized_row_is_stored_and_a_second_turn_reuses_it(start):
    model = load(FIXTURES / "tiny_gemma4_e2b")[0]
    kv = KVCacheOptions(kv_bits=8, kv_group_size=32, quantized_kv_start=start)
    s = Scheduler(model, prefill_chunk=CHUNK, kv_options=kv)
    s.start()
    try:
        got = Collector()
        rng = np.random.default_rng(start)
        first, n = [2] + rng.integers(30, 500, size=5).tolist(), 10  # 6 + 10 tokens: past the switch at 8
        events = got.done(s.submit(Job(first, n), got))
        tokens = [e.token for e in events]
        assert tokens == alone(model, first, n, kv)[0]
        # Every row left the quantized batch: the float one holds none when it ends.
        assert s._policy.batches[0].rows == [] and s.prefix_cache_bytes > 0
        second = first + tokens + rng.integers(30, 500, size=5).tolist()
        events = got.done(s.submit(Job(second, n), got))
        ref_tokens, ref_logprobs = alone(model, second, n, kv)
        assert [e.token for e in events] == ref_tokens
        # (a key one float ulp off may round to the next 8-bit level: test_batching's kv_bits bound)
        np.testing.assert_allclose([e.logprob for e in events], ref_logprobs, rtol=1e-5, atol=1e-3)
        # The first turn's prompt and its tokens (the last one too where the pipelined loop fed it
        # before the row left); the prompt's own entry alone would give len(first).
        assert len(first) + n - 1 <= events[0].cached_tokens <= len(first) + n
    finally:
        s.close()


GEMMA2, GEMMA3 = str(FIXTURES / "tiny_gemma2_hd32"), str(FIXTURES / "tiny_gemma3_hd32")
SERVER_KV = KVCacheOptions(kv_bits=8, kv_group_size=32, quantized_kv_start=0)  # every token quantized


@pytest.mark.parametrize("path", [GEMMA2, GEMMA3])
def test_the_head_dim_32_fixtures_equal_transformers(path):
    """The fixtures load as transformers built them: logits of its two prompts within 1e-4."""
    model = load(path)[0]
    ref = np.load(f"{path}/reference.npz")
    logits = model(mx.array(ref["input_ids"]))
    np.testing.assert_allclose(np.array(logits), ref["logits"], atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def client():
    proc, url = start_server("--model", GEMMA2, "--model", GEMMA3, "--prompt-cache-bytes", "64M", "--kv-bits", "8",
                             "--kv-group-size", "32", "--quantized-kv-start", "0")
    yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    stop_server(proc)


@pytest.mark.parametrize("path", [GEMMA2, GEMMA3])
def test_second_chat_turn_reuses_the_first_turns_reply_on_a_kv_bits_server(client, path):
    """Turn 2's cached tokens go past turn 1's prompt (all the prompt's own entry holds) into its
    reply.  The reply is held to digits (logit_bias; the tiny vocabulary has one piece per digit and
    none joining them), so its text renders back into the ids the model gave, as a real reply's would;
    the random model's own picks are byte pieces that never do."""
    loaded = mlx_gemma.load(path)
    tok, window = loaded[1], loaded[0].args.sliding_window
    digits = {tok.piece_to_id(d): 100.0 for d in "123459"}
    bias = make_logits_processors(logit_bias=digits)
    messages = [{"role": "user", "content": "Tell me about the sea and the sky, briefly."}]
    r = client.chat.completions.create(model=path, messages=messages, max_tokens=12, temperature=0,
                                       logit_bias={str(t): b for t, b in digits.items()})
    ref = reference(loaded, messages, 12, chat=True, kv_options=SERVER_KV, logits_processors=bias)
    assert r.choices[0].message.content == ref.text and ref.text.isdigit()
    first = r.usage.prompt_tokens
    messages += [{"role": "assistant", "content": r.choices[0].message.content},
                 {"role": "user", "content": "And the mountains?"}]
    r = client.chat.completions.create(model=path, messages=messages, max_tokens=12, temperature=0)
    ref = reference(loaded, messages, 12, chat=True, kv_options=SERVER_KV)
    assert r.choices[0].message.content == ref.text
    assert r.usage.prompt_tokens == ref.prompt_tokens > first > window
    # The first turn's prompt and its 12 reply tokens (stored quantized as the row left).
    assert r.usage.prompt_tokens_details.cached_tokens >= first + 12
