"""JSON output through the server: `response_format` json_object / json_schema, constrained by
mlx_gemma.grammar, on the shared server's tiny Gemma 4 (a 4k context, room for a random model's
JSON), with the official `openai` client.

A greedy reply equals `mlx_gemma.generate` with `grammar.json_constraint` for the same format,
streamed and not; sampled replies (temperature 1, seeded) parse and validate with `jsonschema`.
The packaged Gemma 3 270M's 20 sampled requests are in test_server_real_model.py (`slow`).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import mlx_gemma
import openai
import pytest
from test_server import GEMMA4, shared_server

from mlx_gemma.generate import stream_generate
from mlx_gemma.grammar import json_constraint

# Bounded strings, numbers and arrays, so that a random model's JSON ends within max_tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "kind": {"enum": ["cat", "dog"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
    },
    "required": ["name", "age", "kind", "tags"],
    "additionalProperties": False,
}
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True}}
MESSAGES = [{"role": "user", "content": "Describe a pet as JSON."}]
MAX_TOKENS = 600


@pytest.fixture(scope="module")
def client():
    return openai.OpenAI(base_url=shared_server() + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def gemma4():
    return mlx_gemma.load(GEMMA4)


@pytest.mark.parametrize("response_format", [{"type": "json_object"}, SCHEMA_FORMAT],
                         ids=["json_object", "json_schema"])
def test_greedy_json_equals_generate_with_the_constraint(client, gemma4, response_format):
    model, tok = gemma4
    ref = list(stream_generate(model, tok, MESSAGES, max_tokens=MAX_TOKENS, stop_token_ids=[tok.end_of_turn_id],
                               logits_processors=[json_constraint(tok, response_format)]))
    text = "".join(r.text for r in ref)
    ask = dict(model=GEMMA4, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0, response_format=response_format)
    r = client.chat.completions.create(**ask)
    assert r.choices[0].message.content == text and r.usage.completion_tokens == len(ref)
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(text), dict)
    streamed = client.chat.completions.create(**ask, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text


def test_sampled_json_validates(client):
    """20 requests at temperature 1 (issue 21's check; the packaged 270M's in test_server_real_model.py, `slow`)."""
    def ask(seed: int):
        return client.chat.completions.create(model=GEMMA4, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=1.0,
                                              seed=seed, n=2 if seed < 2 else 1, response_format=SCHEMA_FORMAT)

    with ThreadPoolExecutor(8) as pool:  # concurrent: rows of one batch, each with its own parser
        replies = list(pool.map(ask, range(20)))
    values = []
    for choice in (c for r in replies for c in r.choices):  # 20 requests, two of them with 2 choices
        assert choice.finish_reason == "stop"
        values.append(json.loads(choice.message.content))
        jsonschema.validate(values[-1], SCHEMA)
    assert len({json.dumps(v) for v in values}) > 10  # sampled, not one answer
