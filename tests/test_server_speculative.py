"""Speculative decoding on the server (mlx_gemma/batch_speculation.py, server/speculation.py), end to end.

The real server in a subprocess, driven by the official `openai` client.  Reference: plain greedy
`mlx_gemma.generate` (stream_generate without speculation; the plain path is checked against
transformers in test_generate), token for token, streamed and not.  The tiny Gemma 2 / 3 fixtures have
sliding windows of 6 / 5 tokens, far shorter than the replies, so rows speculate on rings that have
wrapped.  The servers run with k proposals every step (FixedK in place of the adaptive controller,
patched in by a sitecustomize the subprocess imports): the adaptive controller would rightly switch a
draft as costly as its target off, and these tests are about what speculation does when it runs.
A draft that is the target itself is always right under greedy decoding, so there every proposal is kept.
"""

from __future__ import annotations

import json
import threading

import httpx
import jsonschema
import openai
import pytest
from conftest import FIXTURES
from test_server import reference, start_server, stop_server
from test_server_json import SCHEMA, SCHEMA_FORMAT

import mlx_gemma
from mlx_gemma.errors import MlxGemmaError
from mlx_gemma.generate import stream_generate
from mlx_gemma.grammar import json_constraint
from mlx_gemma.server.cli import build_parser
from mlx_gemma.server.speculation import ServerSpeculation
from mlx_gemma.tokenizer import GemmaTokenizer

GEMMA3 = str(FIXTURES / "tiny_gemma3")  # window 5
GEMMA2 = str(FIXTURES / "tiny_gemma2")  # window 6, soft-capped
GEMMA4 = str(FIXTURES / "tiny_gemma4_mm")  # another vocabulary
QUOTE = "Repeat after me: the cat sat on the mat, the cat sat on the mat, the cat sat on the mat."
MESSAGES = [{"role": "user", "content": QUOTE}]
FIXED_K = ("from mlx_gemma import speculative\nfrom mlx_gemma.speculative_control import FixedK\n"
           "speculative.Adaptive = lambda k, **_: FixedK(k)\n")


@pytest.fixture(scope="module")
def fixed_k_env(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fixed_k")
    (folder / "sitecustomize.py").write_text(FIXED_K)
    return {"PYTHONPATH": str(folder)}


def _server(env, *args):
    proc, url = start_server(*args, env=env)
    return proc, url, openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def lookup(fixed_k_env):
    """Prompt lookup (2-grams, k = 3) by default, on Gemma 3, Gemma 2 and Gemma 4 (a 4k context: room for JSON)."""
    proc, url, client = _server(fixed_k_env, "--model", GEMMA3, "--model", GEMMA2, "--model", GEMMA4,
                                "--prompt-lookup", "2", "--num-draft-tokens", "3")
    yield url, client
    stop_server(proc)


@pytest.fixture(scope="module")
def drafted(fixed_k_env):
    """Gemma 3 with itself as the draft model (k = 3)."""
    proc, url, client = _server(fixed_k_env, "--model", GEMMA3, "--draft-model", GEMMA3)
    yield url, client
    stop_server(proc)


_loaded: dict = {}


def loaded(path):
    if path not in _loaded:
        _loaded[path] = mlx_gemma.load(path)
    return _loaded[path]


def chat(client, model, max_tokens=40, messages=MESSAGES, **extra):
    return client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                          extra_body=extra or None)


def stream_chat(client, model, max_tokens=40, messages=MESSAGES, **extra):
    """(text, usage) of a streamed chat with include_usage."""
    text, usage = "", None
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                temperature=0, stream=True, stream_options={"include_usage": True},
                                                extra_body=extra or None):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            usage = chunk.usage
    return text, usage


def speculated(usage) -> dict | None:
    return (usage.model_extra or {}).get("speculative")


@pytest.mark.parametrize("model", [GEMMA3, GEMMA2])
def test_prompt_lookup_equals_plain_greedy(lookup, model):
    _, client = lookup
    ref = reference(loaded(model), MESSAGES, 40, chat=True)
    r = chat(client, model)
    assert r.choices[0].message.content == ref.text
    assert r.usage.completion_tokens == len(ref.tokens)
    counts = speculated(r.usage)
    assert counts["proposed"] > 0 and 0 <= counts["accepted"] <= counts["proposed"]
    text, usage = stream_chat(client, model)
    assert text == ref.text
    assert speculated(usage) == counts  # the same tokens, the same proposals


def test_draft_model_equals_plain_greedy_and_keeps_every_proposal(drafted):
    _, client = drafted
    ref = reference(loaded(GEMMA3), MESSAGES, 40, chat=True)
    r = chat(client, GEMMA3)
    assert r.choices[0].message.content == ref.text
    counts = speculated(r.usage)
    assert counts["proposed"] > 0 and counts["accepted"] == counts["proposed"]
    text, usage = stream_chat(client, GEMMA3)
    assert text == ref.text and speculated(usage) == counts


def test_per_request_fields(lookup, drafted):
    """num_draft_tokens 0 and prompt_lookup false turn speculation off for one request; prompt_lookup true
    turns prompt lookup on in place of the server's draft; other k give the same tokens."""
    ref = reference(loaded(GEMMA3), MESSAGES, 40, chat=True)
    _, client = lookup
    for off in ({"num_draft_tokens": 0}, {"prompt_lookup": False}):
        r = chat(client, GEMMA3, **off)
        assert r.choices[0].message.content == ref.text and speculated(r.usage) is None
    for k in (1, 5):
        r = chat(client, GEMMA3, num_draft_tokens=k)
        assert r.choices[0].message.content == ref.text and speculated(r.usage)["proposed"] > 0
    _, client = drafted
    r = chat(client, GEMMA3, prompt_lookup=1)
    counts = speculated(r.usage)
    assert r.choices[0].message.content == ref.text and counts["accepted"] < counts["proposed"]  # not the draft's


def test_a_second_request_joins_a_speculating_one(lookup, drafted):
    """A request arriving while another speculates: the first leaves speculation for the batch, both get
    what they get alone (plain greedy); the first's usage still counts what it speculated."""
    other = [{"role": "user", "content": "Name three colours."}]
    first_ref = reference(loaded(GEMMA3), MESSAGES, 80, chat=True)
    second_ref = reference(loaded(GEMMA3), other, 30, chat=True)
    for _, client in (lookup, drafted):
        got, started = {}, threading.Event()

        def long_stream():
            text, usage = "", None
            for chunk in client.chat.completions.create(model=GEMMA3, messages=MESSAGES, max_tokens=80, temperature=0,
                                                        stream=True, stream_options={"include_usage": True}):
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    if len(text) > 10:
                        started.set()
                if chunk.usage is not None:
                    usage = chunk.usage
            got["first"] = (text, usage)
            started.set()

        thread = threading.Thread(target=long_stream)
        thread.start()
        assert started.wait(60)
        second = chat(client, GEMMA3, 30, messages=other)
        thread.join(60)
        assert got["first"][0] == first_ref.text
        assert speculated(got["first"][1])["proposed"] > 0
        assert second.choices[0].message.content == second_ref.text


def test_sampled_request_speculates(drafted):
    _, client = drafted
    r = client.chat.completions.create(model=GEMMA3, messages=MESSAGES, max_tokens=30, temperature=1.0, seed=3)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens > 0
    assert speculated(r.usage)["proposed"] > 0


@pytest.mark.parametrize("response_format", [{"type": "json_object"}, SCHEMA_FORMAT], ids=["json_object", "json_schema"])
def test_json_output_speculates_and_equals_generate_with_the_constraint(lookup, response_format):
    """A grammar (response_format) takes back the proposals a verify step does not keep: the reply equals
    generate's under the same constraint (test_server_json's reference), and it validates."""
    _, client = lookup
    model, tok = loaded(GEMMA4)
    messages = [{"role": "user", "content": "Describe a pet as JSON."}]
    ref = list(stream_generate(model, tok, messages, max_tokens=600, stop_token_ids=[tok.end_of_turn_id],
                               logits_processors=[json_constraint(tok, response_format)]))
    r = client.chat.completions.create(model=GEMMA4, messages=messages, max_tokens=600, temperature=0,
                                       response_format=response_format)
    assert r.choices[0].message.content == "".join(x.text for x in ref)
    if response_format is SCHEMA_FORMAT:
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    assert speculated(r.usage)["proposed"] > 0


@pytest.mark.parametrize("field,value", [("num_draft_tokens", -1), ("num_draft_tokens", "3"), ("num_draft_tokens", 1.5),
                                         ("num_draft_tokens", 33), ("prompt_lookup", 0), ("prompt_lookup", "yes")])
def test_bad_fields_are_400(lookup, field, value):
    url, _ = lookup
    body = {"model": GEMMA3, "messages": MESSAGES, "max_tokens": 4, field: value}
    r = httpx.post(url + "/v1/chat/completions", content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert field in json.dumps(error) and "Traceback" not in r.text
    assert httpx.get(url + "/health").status_code == 200


@pytest.mark.parametrize("args,needle", [
    (["--draft-model", GEMMA3, "--prompt-lookup", "2"], "not both"),
    (["--num-draft-tokens", "3"], "needs --draft-model or --prompt-lookup"),
    (["--prompt-lookup", "0"], "at least 1"),
    (["--draft-model", GEMMA3, "--model", GEMMA2], "one model"),
])
def test_startup_refusals(args, needle):
    """In process (test_server checks that a start-up error is one line and exit status 2)."""
    with pytest.raises(MlxGemmaError, match=needle):
        ServerSpeculation(build_parser().parse_args(["--model", GEMMA3, *args]))


def test_a_draft_with_another_tokenizer_is_refused():
    speculation = ServerSpeculation(build_parser().parse_args(["--model", GEMMA3, "--draft-model", GEMMA3]))
    with pytest.raises(MlxGemmaError, match="tokenizer differs"):
        speculation.policy(GemmaTokenizer.from_folder(GEMMA4))
