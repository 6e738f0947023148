"""mlx_gemma.server end to end: the real server in a subprocess (port 0) on tiny fixtures, driven by
the official `openai` client and raw `httpx`.  Greedy chat and completions equal
`mlx_gemma.generate` on the same prompt token for token (streamed and not), usage counts the
tokens, logprobs equal the engine's within 1e-5; auth and CORS on and off; a failing generation
ends only its request (in-process, with a scheduler that fails).
"""

from __future__ import annotations

import atexit
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import mlx.core as mx
import numpy as np
import openai
import pytest
import soundfile
import uvicorn
from conftest import FIXTURES, TESTS
from PIL import Image
from starlette.testclient import TestClient

import mlx_gemma
from mlx_gemma.batching import Event
from mlx_gemma.tuner import lora
from mlx_gemma.generate import stream_generate
from mlx_gemma.samplers import RepetitionPenalty, make_sampler
from mlx_gemma.server import ServedModel, create_app
from mlx_gemma.server.cli import bind

GEMMA3 = str(FIXTURES / "tiny_gemma3")
GEMMA1 = str(FIXTURES / "tiny_gemma")  # a second model, served beside GEMMA3
GEMMA4 = str(FIXTURES / "tiny_gemma4_mm")  # a Gemma 4 vocabulary (its chat format, thinking mode), images, audio
VLM3 = str(FIXTURES / "tiny_gemma3_vlm")  # Gemma 3 with images
EMBED = str(FIXTURES / "tiny_embedding_gemma")  # a sentence encoder (/v1/embeddings)
BODY_LIMIT = 64 * 1024  # the shared server's --max-body-bytes
KEY = "s3cret-key"
ORIGIN = "http://app.example"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]


# ----- the server process ---------------------------------------------------------------------


def start_server(*args: str, env: dict | None = None, timeout: float = 60.0):
    """(process, base URL) of `python -m mlx_gemma.server ARGS --port 0`, once it prints its port."""
    log = tempfile.TemporaryFile()
    cmd = [sys.executable, "-m", "mlx_gemma.server", *args, "--port", "0", "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=str(TESTS.parent),
                            env={**os.environ, **(env or {})})
    deadline = time.monotonic() + timeout
    line = proc.stdout.readline()
    while line and not line.startswith("serving on ") and time.monotonic() < deadline:
        line = proc.stdout.readline()
    if not line.startswith("serving on "):
        proc.kill()
        log.seek(0)
        raise RuntimeError(f"the server did not start: {log.read().decode(errors='replace')[-3000:]}")
    url = line.split()[-1]
    for _ in range(100):
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.05)
    return proc, url


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def solid_png(color) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(out, format="PNG")
    return out.getvalue()


def noise_png(seed: int, size=(40, 30)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def wav_bytes(seconds: float = 0.4) -> bytes:
    t = np.arange(int(16000 * seconds)) / 16000
    out = io.BytesIO()
    soundfile.write(out, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000, format="WAV")
    return out.getvalue()


_SHARED: dict = {}  # the one server (and its media folder) test_server*.py share in a test process


def media_folder() -> Path:
    """allowed/ (the shared server's --allow-image-dir) with a red image and a link out; beside it, more media."""
    if "folder" not in _SHARED:
        root = Path(tempfile.mkdtemp(prefix="mlx_gemma-server-test-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        (root / "allowed").mkdir()
        (root / "allowed" / "a.png").write_bytes(solid_png((255, 0, 0)))  # the tiny Gemma 3 tells it from white
        (root / "white.png").write_bytes(solid_png((255, 255, 255)))
        (root / "outside.png").write_bytes(noise_png(1))
        (root / "clip.wav").write_bytes(wav_bytes())
        (root / "allowed" / "link.png").symlink_to(root / "outside.png")
        _SHARED["folder"] = root
    return _SHARED["folder"]


def shared_server() -> str:
    """The URL of one server for all test_server*.py modules: five models, local images under
    media_folder()/allowed, a 64 KiB body limit; started once per test process, stopped at exit."""
    if "url" not in _SHARED:
        proc, url = start_server("--model", GEMMA3, "--model", GEMMA1, "--model", GEMMA4, "--model", VLM3, "--model", EMBED,
                                 "--allow-image-dir", str(media_folder() / "allowed"),
                                 "--max-body-bytes", str(BODY_LIMIT))
        atexit.register(stop_server, proc)
        _SHARED["url"] = url
    return _SHARED["url"]


@pytest.fixture(scope="module")
def server():
    return shared_server()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def gemma3():
    return mlx_gemma.load(GEMMA3)


@pytest.fixture(scope="module")
def gemma4():
    return mlx_gemma.load(GEMMA4)


# ----- the reference: mlx_gemma.generate --------------------------------------------------------


@dataclass
class Reference:
    text: str
    tokens: list[int]
    logprobs: list[mx.array]  # each step's [V] log-softmax
    finish: str
    prompt_tokens: int


def reference(loaded, prompt, max_tokens, chat, stop=None, **kwargs) -> Reference:
    model, tok = loaded
    stop_ids = [tok.end_of_turn_id] if chat else None  # the server stops a reply at its turn's end
    out = list(stream_generate(model, tok, prompt, max_tokens=max_tokens, chat=chat, stop_token_ids=stop_ids,
                               stop_strings=stop, **kwargs))
    ids = (tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                   enable_thinking=kwargs.get("enable_thinking", False))
           if chat else tok.encode(prompt, add_bos=True))
    return Reference("".join(r.text for r in out), [r.token for r in out], [r.logprobs for r in out],
                     out[-1].finish_reason, len(ids))


def piece(tok, i: int) -> str:
    if i >= tok.vocab_size:  # embedding rows past the tokenizer (padding) have no text
        return ""
    p = tok.id_to_piece(i)
    return f"bytes:\\x{int(p[3:5], 16):02x}" if tok._sp.is_byte(i) else p.replace("\u2581", " ")


def check_logprobs(tok, ref: Reference, entries, top: int) -> None:
    """Chat logprobs entries equal the engine's: the token, its logprob and the top alternatives, 1e-5."""
    emitted = [t for t in ref.tokens if t not in tok.eos_token_ids | {tok.end_of_turn_id}]
    assert [e.token for e in entries] == [piece(tok, t) for t in emitted]
    for e, t, lp in zip(entries, ref.tokens, ref.logprobs):
        assert abs(e.logprob - lp[t].item()) <= 1e-5
        best = mx.argsort(-lp)[:top].tolist()
        assert [a.token for a in e.top_logprobs] == [piece(tok, b) for b in best]
        assert all(abs(a.logprob - lp[b].item()) <= 1e-5 for a, b in zip(e.top_logprobs, best))


# ----- chat -------------------------------------------------------------------------------------


def test_health_and_models(server, client):
    assert httpx.get(server + "/health").json() == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == [GEMMA3, GEMMA1, GEMMA4, VLM3, EMBED]
    card = client.models.retrieve(GEMMA3)
    assert (card.id, card.object, card.owned_by) == (GEMMA3, "model", "mlx_gemma")


def test_chat_greedy_equals_generate_with_logprobs(client, gemma3):
    ref = reference(gemma3, MESSAGES, 24, chat=True)
    r = client.chat.completions.create(model=GEMMA3, messages=MESSAGES, max_tokens=24, temperature=0,
                                       logprobs=True, top_logprobs=3)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == GEMMA3
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.message.content == ref.text
    assert choice.finish_reason == ref.finish
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (ref.prompt_tokens, len(ref.tokens))
    assert r.usage.total_tokens == ref.prompt_tokens + len(ref.tokens)
    # the prefix cache may hold this prompt from an earlier test; at least its last token is fed
    assert 0 <= r.usage.prompt_tokens_details.cached_tokens < ref.prompt_tokens
    check_logprobs(gemma3[1], ref, choice.logprobs.content, 3)


def test_chat_stream_equals_generate(client, gemma3):
    ref = reference(gemma3, MESSAGES, 30, chat=True)
    stream = client.chat.completions.create(model=GEMMA3, messages=MESSAGES, max_tokens=30, temperature=0,
                                            stream=True, stream_options={"include_usage": True}, logprobs=True)
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    body = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in body) == ref.text
    assert body[-1].choices[0].finish_reason == ref.finish
    assert all(c.choices[0].finish_reason is None for c in body[:-1])
    entries = [e for c in body if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    check_logprobs(gemma3[1], ref, entries, 0)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.tokens)
    assert chunks[-1].usage.prompt_tokens == ref.prompt_tokens


def test_stop_strings_are_never_sent(client, gemma3):
    full = reference(gemma3, MESSAGES, 40, chat=True).text
    stop = full[len(full) // 2: len(full) // 2 + 3]  # spans tokens or not: either way held back
    assert stop.strip()
    ref = reference(gemma3, MESSAGES, 40, chat=True, stop=[stop])
    assert ref.text == full[:full.index(stop)]
    r = client.chat.completions.create(model=GEMMA3, messages=MESSAGES, max_tokens=40, temperature=0, stop=stop)
    assert r.choices[0].message.content == ref.text and r.choices[0].finish_reason == "stop"
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=GEMMA3, messages=MESSAGES, max_tokens=40, temperature=0, stop=[stop, "\x00"], stream=True)
        if c.choices]
    assert "".join(parts) == ref.text


def test_sampling_n_and_seed_are_reproducible(client):
    ask = dict(model=GEMMA3, messages=MESSAGES, max_tokens=12, temperature=1.0, top_p=0.9,
               presence_penalty=0.5, frequency_penalty=0.2, logit_bias={"7": 5}, seed=11, n=3,
               extra_body={"top_k": 50, "min_p": 0.01})
    a, b = client.chat.completions.create(**ask), client.chat.completions.create(**ask)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.usage.completion_tokens == 36  # 3 x 12: a random tiny model does not stop early here
    assert len({c.message.content for c in a.choices}) > 1  # seed + i: n different draws


def test_repetition_penalty_as_generate(client, gemma3):
    ref = reference(gemma3, MESSAGES, 16, chat=True, logits_processors=[RepetitionPenalty(1.3)])
    r = client.chat.completions.create(model=GEMMA3, messages=MESSAGES, max_tokens=16, temperature=0,
                                       extra_body={"repetition_penalty": 1.3})
    assert r.choices[0].message.content == ref.text


def test_a_second_model_is_served(client):
    ref = reference(mlx_gemma.load(GEMMA1), MESSAGES, 12, chat=True)
    r = client.chat.completions.create(model=GEMMA1, messages=MESSAGES, max_tokens=12, temperature=0)
    assert r.model == GEMMA1 and r.choices[0].message.content == ref.text


def test_gemma4_chat_and_thinking_equal_generate(client, gemma4):
    messages = [{"role": "developer", "content": "Think."}, {"role": "user", "content": [
        {"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}]
    as_system = [{"role": "system", "content": "Think."}, messages[1]]
    for thinking in (False, True):
        ref = reference(gemma4, as_system, 10, chat=True, enable_thinking=thinking)
        r = client.chat.completions.create(model=GEMMA4, messages=messages, max_tokens=10, temperature=0,
                                           extra_body={"chat_template_kwargs": {"enable_thinking": thinking}})
        assert r.choices[0].message.content == ref.text
        assert r.usage.prompt_tokens == ref.prompt_tokens


def test_max_tokens_and_max_completion_tokens(client):
    r = client.chat.completions.create(model=GEMMA3, messages=MESSAGES, max_completion_tokens=5, temperature=0)
    assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (5, "length")


def test_concurrent_streams_each_get_what_they_get_alone(client, gemma3):
    prompts = [[{"role": "user", "content": f"Count to {i}, then stop."}] for i in range(6)]
    refs = [reference(gemma3, p, 12 + 3 * i, chat=True).text for i, p in enumerate(prompts)]

    def ask(i: int) -> str:
        stream = client.chat.completions.create(model=GEMMA3, messages=prompts[i], max_tokens=12 + 3 * i,
                                                temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with ThreadPoolExecutor(len(prompts)) as pool:
        assert list(pool.map(ask, range(len(prompts)))) == refs


def test_startup_errors_are_one_line_and_exit_2():
    r = subprocess.run([sys.executable, "-m", "mlx_gemma.server", "--model", str(FIXTURES / "no-such-model"),
                        "--port", "0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert "serving on" not in r.stdout


# ----- completions ------------------------------------------------------------------------------


def test_completions_equal_generate(client, gemma3):
    tok = gemma3[1]
    ref = reference(gemma3, "The sky is", 20, chat=False)
    r = client.completions.create(model=GEMMA3, prompt="The sky is", max_tokens=20, temperature=0, logprobs=2)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    (choice,) = r.choices
    assert choice.text == ref.text and choice.finish_reason == ref.finish
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (ref.prompt_tokens, len(ref.tokens))
    emitted = [t for t in ref.tokens if t not in tok.eos_token_ids]
    assert choice.logprobs.tokens == [piece(tok, t) for t in emitted]
    for lp, top, t, row in zip(choice.logprobs.token_logprobs, choice.logprobs.top_logprobs, ref.tokens,
                               ref.logprobs):
        assert abs(lp - row[t].item()) <= 1e-5
        best = [piece(tok, b) for b in mx.argsort(-row)[:2].tolist()], mx.sort(-row)[:2].tolist()
        if len(set(best[0])) == 2:  # the legacy format keys by text: two ids with one text share a key
            assert all(abs(top[text] + value) <= 1e-5 for text, value in zip(*best))
    assert choice.logprobs.text_offset[0] == 0
    parts = [c.choices[0].text for c in client.completions.create(
        model=GEMMA3, prompt="The sky is", max_tokens=20, temperature=0, stream=True) if c.choices]
    assert "".join(parts) == ref.text


def test_completions_batch_of_prompts_and_token_ids(client, gemma3):
    model, tok = gemma3
    prompts = ["Once upon", "A B C"]
    r = client.completions.create(model=GEMMA3, prompt=prompts, max_tokens=8, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for i, p in enumerate(prompts):
        ref = reference(gemma3, p, 8, chat=False)
        assert [c.text for c in r.choices[2 * i: 2 * i + 2]] == [ref.text, ref.text]
    ids = tok.encode("Once upon", add_bos=True)
    by_ids = client.completions.create(model=GEMMA3, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text and by_ids.usage.prompt_tokens == len(ids)


def test_sampled_completion_follows_the_seed(client, gemma3):
    model, tok = gemma3
    out = list(stream_generate(model, tok, "The sky is", max_tokens=10, sampler=make_sampler(0.8, seed=5)))
    r = client.completions.create(model=GEMMA3, prompt="The sky is", max_tokens=10, temperature=0.8, seed=5)
    assert r.choices[0].text == "".join(o.text for o in out)


# ----- auth and CORS ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A LoRA adapter for GEMMA3 whose random weights change its answers."""
    model = mlx_gemma.load_model(GEMMA3)
    config = lora.enable_lora(model, rank=4, num_layers=2)
    rng = np.random.default_rng(0)
    for _, layer in lora.lora_layers(model):
        layer.lora_a = mx.array(rng.normal(0, 0.2, layer.lora_a.shape).astype(np.float32))
        layer.lora_b = mx.array(rng.normal(0, 0.3, layer.lora_b.shape).astype(np.float32))
    return lora.save_adapters(tmp_path_factory.mktemp("adapter") / "a", model, config)


@pytest.fixture(scope="module")
def locked(adapter):
    """GEMMA3 with an adapter, behind a key (from the environment), CORS for ORIGIN."""
    proc, url = start_server("--model", GEMMA3, "--adapter-path", str(adapter), "--allowed-origins", ORIGIN,
                             env={"MLX_GEMMA_API_KEY": KEY})
    yield url
    stop_server(proc)


def test_adapter_path_serves_the_adapted_model(locked, adapter, gemma3):
    ref = reference(mlx_gemma.load(GEMMA3, adapter_path=adapter), MESSAGES, 16, chat=True)
    assert ref.text != reference(gemma3, MESSAGES, 16, chat=True).text  # the adapter matters
    good = openai.OpenAI(base_url=locked + "/v1", api_key=KEY, max_retries=0)
    r = good.chat.completions.create(model=GEMMA3, messages=MESSAGES, max_tokens=16, temperature=0)
    assert r.choices[0].message.content == ref.text


def test_api_key_is_required_when_set(locked):
    for key in ("wrong", KEY + "x", KEY[:-1]):
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=locked + "/v1", api_key=key, max_retries=0).models.list()
    r = httpx.post(locked + "/v1/completions", json={"model": GEMMA3, "prompt": "hi"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    good = openai.OpenAI(base_url=locked + "/v1", api_key=KEY, max_retries=0)
    assert good.completions.create(model=GEMMA3, prompt="hi", max_tokens=2).usage.completion_tokens == 2
    assert httpx.get(locked + "/health").status_code == 200  # probes carry no key


def test_no_key_needed_without_one(server):
    assert httpx.get(server + "/v1/models", headers={"Authorization": "Bearer anything"}).status_code == 200
    assert httpx.get(server + "/v1/models").status_code == 200


def test_cors_only_with_allowed_origins(server, locked):
    head = {"Origin": ORIGIN, "Authorization": f"Bearer {KEY}"}
    assert httpx.get(locked + "/v1/models", headers=head).headers["access-control-allow-origin"] == ORIGIN
    assert "access-control-allow-origin" not in httpx.get(locked + "/v1/models", headers={
        **head, "Origin": "http://evil.example"}).headers
    pre = httpx.options(locked + "/v1/chat/completions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == ORIGIN
    assert "access-control-allow-origin" not in httpx.get(server + "/v1/models", headers={"Origin": ORIGIN}).headers


# ----- a generation that fails (in-process, a scheduler whose jobs fail) ------------------------


class FailingScheduler:
    """Emits one token, then an error, for every job; records cancellations."""

    def __init__(self):
        self.cancelled, self.next_id = [], 0

    def submit(self, job, on_event):
        self.next_id += 1
        on_event(Event(self.next_id, 10, -1.0, [], None, prompt_tokens=len(job.prompt_ids)))
        on_event(Event(self.next_id, None, None, [], "error", "the logits held a NaN"))
        return self.next_id

    def cancel(self, job_id):
        self.cancelled.append(job_id)


class RecordingScheduler:
    """Records each job and ends it at once (one token, "length"), reporting 3 cached prompt tokens."""

    def __init__(self):
        self.jobs = []

    def submit(self, job, on_event):
        self.jobs.append(job)
        on_event(Event(len(self.jobs), 10, -1.0, [], "length", prompt_tokens=len(job.prompt_ids), cached_tokens=3))
        return len(self.jobs)

    def cancel(self, job_id):
        pass


def test_gemma4_chat_format_and_thinking_reach_the_job(gemma4):
    # In-process: the Gemma 4 fixture's model is not run, only its tokenizer's chat format is checked.
    scheduler = RecordingScheduler()
    app = create_app([ServedModel("g4", *gemma4, scheduler, 0)])
    tok = gemma4[1]
    messages = [{"role": "developer", "content": "Think."}, {"role": "user", "content": [
        {"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}]
    as_system = [{"role": "system", "content": "Think."}, messages[1]]
    with TestClient(app) as http:
        for thinking in (False, True):
            r = http.post("/v1/chat/completions", json={"model": "g4", "messages": messages,
                                                         "chat_template_kwargs": {"enable_thinking": thinking}})
            ids = tok.apply_chat_template(as_system, tokenize=True, enable_thinking=thinking)
            assert r.status_code == 200 and scheduler.jobs[-1].prompt_ids == ids
            assert scheduler.jobs[-1].stop_ids == tok.eos_token_ids | {tok.end_of_turn_id}
            assert r.json()["usage"]["prompt_tokens"] == len(ids)
            assert r.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 3}  # the scheduler's figure
        assert scheduler.jobs[0].prompt_ids != scheduler.jobs[1].prompt_ids


def test_a_failed_generation_ends_only_its_request(gemma3):
    app = create_app([ServedModel("m", *gemma3, FailingScheduler(), 0)])
    with TestClient(app, raise_server_exceptions=False) as http:
        r = http.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES})
        assert r.status_code == 500 and r.json()["error"]["code"] == "generation_failed"
        assert "NaN" in r.json()["error"]["message"] and "Traceback" not in r.text
        lines = [ln for ln in http.post("/v1/completions", json={"model": "m", "prompt": "x", "stream": True})
                 .text.splitlines() if ln.startswith("data: ")]
        assert json.loads(lines[-2][6:])["error"]["type"] == "server_error" and lines[-1] == "data: [DONE]"
        assert http.get("/health").status_code == 200


class GarbageScheduler(FailingScheduler):
    """Sends an id no tokenizer has: a bug on our side of the bridge, not a failed generation."""

    def submit(self, job, on_event):
        on_event(Event(1, -5, -1.0, [], None))
        return 1


def test_an_internal_error_reaches_the_client_without_a_traceback(gemma3):
    app = create_app([ServedModel("m", *gemma3, GarbageScheduler(), 0)])
    with TestClient(app, raise_server_exceptions=False) as http:
        r = http.post("/v1/completions", json={"model": "m", "prompt": "x"})
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error" and "Traceback" not in r.text
        lines = [ln for ln in http.post("/v1/completions", json={"model": "m", "prompt": "x", "stream": True})
                 .text.splitlines() if ln.startswith("data: ")]
        assert json.loads(lines[-2][6:])["error"]["code"] == "internal_error" and lines[-1] == "data: [DONE]"


class SlowScheduler:
    """Emits a token every 10 ms for 2000 steps per job, on a thread of its own; records cancellations."""

    def __init__(self):
        self.cancelled, self.next_id = set(), 0

    def submit(self, job, on_event):
        self.next_id += 1
        job_id = self.next_id

        def run():
            for n in range(2000):
                if job_id in self.cancelled:
                    return on_event(Event(job_id, None, None, [], "cancelled"))
                on_event(Event(job_id, 10 + n % 50, -1.0, [], None))
                time.sleep(0.01)

        threading.Thread(target=run, daemon=True).start()
        return job_id

    def cancel(self, job_id):
        self.cancelled.add(job_id)


def test_a_client_that_leaves_cancels_its_jobs(gemma3):
    scheduler = SlowScheduler()
    sock = bind("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(create_app([ServedModel("m", *gemma3, scheduler, 0)]),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        with httpx.stream("POST", url + "/v1/completions", json={"model": "m", "prompt": "x", "stream": True,
                                                                 "n": 2}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
        wait_for(lambda: scheduler.cancelled == {1, 2})  # both choices' rows freed
        with pytest.raises(httpx.ReadTimeout):  # a plain request whose client gives up
            httpx.post(url + "/v1/completions", json={"model": "m", "prompt": "x"}, timeout=0.3)
        wait_for(lambda: 3 in scheduler.cancelled)
        assert httpx.get(url + "/health").status_code == 200
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
