"""Tools beside image and audio parts through the real server (the shared subprocess of
test_server.py, on the tiny Gemma 4 with both towers and the tiny Gemma 3 vision fixture), with the
official `openai` client.

The reference is `mlx_gemma.generate` on the same messages: their prompt ids are the media builders'
with the same tools (`gemma4_prompts.media_rows` / `image_chat.chat_image_rows`, themselves equal to
transformers' processors in test_media_tool_prompts.py) and the same files, the reply greedy, held to
the request's grammar where it has one (`tool_calls.call_grammar` for a forced call, or calls | JSON
beside a `response_format`; the response_format's own JSON grammar without tools).  The server's
`usage.prompt_tokens` counts those ids, its reply is generate's tokens, parsed into `tool_calls`
(forced: arguments valid against the schema, `jsonschema`), streamed and not.
"""

from __future__ import annotations

import base64
import json

import httpx
import jsonschema
import openai
import pytest
from test_server import GEMMA4, VLM3, media_folder, shared_server
from test_server_tools import BOUNDED, split, stream_parts, whole_parts

import mlx_gemma
from mlx_gemma.gemma4_prompts import media_rows
from mlx_gemma.generate import stream_generate
from mlx_gemma.grammar import GrammarConstraint, compile_lark, compile_response_format, response_schema
from mlx_gemma.image_chat import chat_image_rows
from mlx_gemma.tool_calls import call_grammar, check_tools, parse_tool_calls, tool_format_for

CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}


@pytest.fixture(scope="module")
def client():
    return openai.OpenAI(base_url=shared_server() + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def files():
    folder = media_folder()
    return {"image": folder / "outside.png", "other": folder / "allowed" / "a.png", "clip": folder / "clip.wav"}


@pytest.fixture(scope="module")
def gemma4():
    return mlx_gemma.load(GEMMA4)


def image_part(path) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()}}


def audio_part(path) -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(path.read_bytes()).decode(), "format": "wav"}}


def as_template(messages: list) -> list:
    """The messages as the media builders take them: each image_url / input_audio part a bare image / audio part."""
    kinds = {"image_url": "image", "input_audio": "audio"}
    return [{**m, "content": [p if p["type"] == "text" else {"type": kinds[p["type"]]} for p in m["content"]]}
            if isinstance(m.get("content"), list) else m for m in messages]


def reference(loaded, messages, images, clips, tools, tool_choice=None, response_format=None, max_tokens=64):
    """(prompt ids, reply tokens, reply text) of greedy generate on the Gemma 4 media builder's prompt,
    under the grammar the server gives this request (none when the reply is free)."""
    model, tok = loaded
    ids = media_rows(model, tok, [as_template(messages)], [[str(p) for p in images]], [[str(p) for p in clips]],
                     chat=True, tools=tools, tool_choice=tool_choice)[0][0]
    answer = response_schema(response_format) if response_format else None
    lark = call_grammar(tok, tool_format_for(tok), check_tools(tools), tool_choice, answer) if tools else None
    grammar = compile_lark(lark, tok, "tools") if lark else \
        compile_response_format(response_format, tok) if response_format else None
    out = list(stream_generate(model, tok, ids, max_tokens=max_tokens, image=[str(p) for p in images] or None,
                               audio=[str(p) for p in clips] or None, stop_token_ids=[tok.end_of_turn_id],
                               logits_processors=[GrammarConstraint(tok, grammar)] if grammar else None))
    return ids, [r.token for r in out], "".join(r.text for r in out)


def test_forced_call_with_an_image_equals_generate(client, gemma4, files):
    """tool_choice required beside an image: a whole call of a declared tool, arguments valid against its
    schema, equal to generate under call_grammar on the builder's prompt; streamed the same."""
    messages = [{"role": "user", "content": [image_part(files["image"]), {"type": "text", "text": "Weather there?"}]}]
    ids, tokens, text = reference(gemma4, messages, [files["image"]], [], BOUNDED, "required")
    _, calls = parse_tool_calls(text, tool_format_for(gemma4[1]))
    assert calls  # the grammar holds the tiny random model to a call
    ask = dict(model=GEMMA4, messages=messages, tools=BOUNDED, tool_choice="required", max_tokens=64, temperature=0)
    r = client.chat.completions.create(**ask)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(tokens)
    assert r.choices[0].finish_reason == "tool_calls" and not r.choices[0].message.content
    got = [(c.function.name, json.loads(c.function.arguments)) for c in r.choices[0].message.tool_calls]
    assert got == [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in BOUNDED}
    for name, arguments in got:
        jsonschema.validate(arguments, schemas[name])
    streamed = stream_parts(client.chat.completions.create(**ask, stream=True))
    assert [(n, json.loads(a)) for _, _, n, a in streamed["calls"]] == got and streamed["finish"] == "tool_calls"


def test_tools_with_images_and_audio_in_a_conversation_equal_generate(client, gemma4, files):
    """tool_choice auto; an image and a clip in the user turns, an image in a tool result, an earlier
    call: the prompt is the builder's (usage), the free greedy reply generate's, parsed alike."""
    messages = [{"role": "user", "content": [{"type": "text", "text": "Weather where this is?"}, image_part(files["image"])]},
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "sunny, see"},
                                                                   image_part(files["other"])]},
                {"role": "assistant", "content": "Sunny."},
                {"role": "user", "content": [audio_part(files["clip"]), {"type": "text", "text": "And this?"}]}]
    ids, tokens, text = reference(gemma4, messages, [files["image"], files["other"]], [files["clip"]], BOUNDED,
                                  max_tokens=16)
    tok = gemma4[1]
    assert [ids.count(tok.piece_to_id(p)) for p in ("<|image>", "<|audio>", "<|tool_response>")] == [2, 1, 1]
    ask = dict(model=GEMMA4, messages=messages, tools=BOUNDED, max_tokens=16, temperature=0)
    r = client.chat.completions.create(**ask)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(tokens)
    expected = split(text, False, tool_format_for(gemma4[1]))
    got = whole_parts(r)
    assert (got["content"], got["calls"]) == (expected["content"], expected["calls"])
    streamed = stream_parts(client.chat.completions.create(**ask, stream=True))
    assert {k: streamed[k] for k in got} == got


def test_response_format_with_media_keeps_its_grammar(client, gemma4, files):
    """Beside an image: tools auto + a json_schema make the reply calls or that JSON (one grammar);
    without tools, the json_schema alone holds it.  Each equals generate under that grammar."""
    messages = [{"role": "user", "content": [image_part(files["image"]), {"type": "text", "text": "OK?"}]}]
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    for tools in (BOUNDED, None):
        ids, tokens, text = reference(gemma4, messages, [files["image"]], [], tools, response_format=response_format)
        r = client.chat.completions.create(model=GEMMA4, messages=messages, max_tokens=64, temperature=0,
                                           response_format=response_format, **({"tools": tools} if tools else {}))
        assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(tokens)
        content, calls = parse_tool_calls(text, tool_format_for(gemma4[1]) if tools else None)
        message = r.choices[0].message
        assert (message.content or "") == content and len(message.tool_calls or []) == len(calls)
        if not calls:
            jsonschema.validate(json.loads(message.content), SCHEMA)


def test_gemma3_image_beside_earlier_calls_equals_generate(client, files):
    """Gemma 3's prompted format beside an image: with tool_choice none (no declarations, which would
    outgrow the tiny fixture's 256-token context) the earlier call and its result are rendered as the
    text path renders them; the reply equals generate on chat_image_rows' ids.  Declared, the prompt is
    past the context: a 400 saying so, no longer a refusal of tools."""
    model, tok = mlx_gemma.load(VLM3)
    messages = [{"role": "user", "content": [image_part(files["other"]), {"type": "text", "text": "Weather?"}]},
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    rows, _ = chat_image_rows(model, tok, [as_template(messages)], [[str(files["other"])]], chat=True, system=None,
                              tools=BOUNDED, tool_choice="none")
    out = list(stream_generate(model, tok, rows[0], max_tokens=12, image=[str(files["other"])],
                               stop_token_ids=[tok.end_of_turn_id]))
    r = client.chat.completions.create(model=VLM3, messages=messages, tools=BOUNDED, tool_choice="none",
                                       max_tokens=12, temperature=0)
    assert r.usage.prompt_tokens == len(rows[0]) and r.usage.completion_tokens == len(out)
    assert r.choices[0].message.content == "".join(o.text for o in out) and not r.choices[0].message.tool_calls
    declared = httpx.post(shared_server() + "/v1/chat/completions", timeout=60, json={
        "model": VLM3, "messages": messages, "tools": BOUNDED, "max_tokens": 4})
    assert declared.status_code == 400 and declared.json()["error"]["code"] == "context_length_exceeded"
