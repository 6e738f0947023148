"""Tool calls and Gemma 4 thoughts through the server, with the official `openai` client.

Tiny random models never write a call of their own, so two kinds of test:
- the real shared server (a subprocess) on the tiny Gemma 4 fixture (Gemma 3's prompted format on
  the packaged 270M: test_server_real_model.py): a request with tools, an earlier call and its
  result is prompted as `tool_calls.render_chat` renders it (usage counts those ids) and answers
  greedily what `mlx_gemma.generate` answers on those ids; a tool_choice naming a function, or a
  response_format beside tools, holds the reply to tool_calls.call_grammar (equal to generate under
  that grammar's constraint; the forced call's arguments validate with jsonschema); thoughts are
  split out of what generate writes, streamed and not;
- the app in-process with a scheduler that plays a scripted reply (tokens we chose: thoughts,
  content, calls), so the parse path (detokenizer, thought split, tool-call parse, OpenAI's
  shapes) is checked whole and streamed; the job it receives holds render_chat's ids.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from types import SimpleNamespace

import jsonschema
import openai
import pytest
import uvicorn
from test_server import GEMMA3, GEMMA4, reference, shared_server

import mlx_gemma
from mlx_gemma.batching import Event
from mlx_gemma.generate import stream_generate
from mlx_gemma.samplers import make_logits_processors
from mlx_gemma.server import ServedModel, create_app
from mlx_gemma.server.cli import bind
from mlx_gemma.server.replies import Reply
from mlx_gemma.grammar import GrammarConstraint, compile_lark
from mlx_gemma.tool_calls import call_grammar, check_tools, parse_tool_calls, render_chat, tool_format_for

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "array"}},
                   "required": ["city"]}}}
NOW = {"type": "function", "function": {"name": "now", "description": "The time.",
                                        "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, NOW]
USER = {"role": "user", "content": "What's the weather in Paris?"}
EARLIER = [USER, {"role": "assistant", "content": None, "tool_calls": [
    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21C"},
    {"role": "assistant", "content": "It is sunny."}, {"role": "user", "content": "And tomorrow?"}]


@pytest.fixture(scope="module")
def client():
    return openai.OpenAI(base_url=shared_server() + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tiny():
    """The tiny Gemma 4 and Gemma 3 fixtures, loaded once: {"gemma4": (model, tokenizer), "gemma3": ...}."""
    return {"gemma4": mlx_gemma.load(GEMMA4), "gemma3": mlx_gemma.load(GEMMA3)}


def stream_parts(chunks) -> dict:
    """A streamed chat reply put together: content, reasoning, calls (ids dropped), finish reason."""
    content, reasoning, calls, finish = "", "", [], None
    for c in chunks:
        if not c.choices:
            continue
        delta = c.choices[0].delta
        content += delta.content or ""
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        calls += [(t.index, t.type, t.function.name, t.function.arguments) for t in delta.tool_calls or []]
        finish = c.choices[0].finish_reason or finish
    return {"content": content, "reasoning": reasoning, "calls": calls, "finish": finish}


def whole_parts(r) -> dict:
    message, choice = r.choices[0].message, r.choices[0]
    calls = [(i, t.type, t.function.name, t.function.arguments) for i, t in enumerate(message.tool_calls or [])]
    return {"content": message.content or "", "reasoning": (message.model_extra or {}).get("reasoning_content") or "",
            "calls": calls, "finish": choice.finish_reason}


def generate_on(loaded, ids: list[int], max_tokens: int) -> tuple[str, list[int]]:
    """(text, tokens) of greedy mlx_gemma.generate on prompt ids, stopping where the server's chat does."""
    model, tok = loaded
    out = list(stream_generate(model, tok, ids, max_tokens=max_tokens, stop_token_ids=[tok.end_of_turn_id]))
    return "".join(r.text for r in out), [r.token for r in out]


def split(text: str, thinking: bool, fmt) -> dict:
    """What the server should make of a reply text: replies.Reply, fed whole."""
    reply = Reply(thinking, fmt)
    events = reply.feed(text) + reply.finish()
    calls = [e["tool_call"] for e in events if "tool_call" in e]
    return {"content": "".join(e.get("content", "") for e in events),
            "reasoning": "".join(e.get("reasoning", "") for e in events),
            "calls": [(c["index"], c["type"], c["function"]["name"], c["function"]["arguments"]) for c in calls]}


# ----- the real server: prompts and greedy replies equal generate's -------------------------------


def test_tools_prompt_and_greedy_reply_equal_generate(client, tiny):
    gemma4 = tiny["gemma4"]
    # Gemma 3's prompted format (~350 tokens of Google's instruction) outgrows the tiny Gemma 3's
    # 256-token context: test_server_real_model.py runs it on the packaged Gemma 3 270M.
    loaded, model_path, tok = gemma4, GEMMA4, gemma4[1]
    ids = render_chat(tok, EARLIER, TOOLS, None, add_generation_prompt=True, tokenize=True)
    text, tokens = generate_on(loaded, ids, 16)
    ask = dict(model=model_path, messages=EARLIER, tools=TOOLS, max_tokens=16, temperature=0)
    r = client.chat.completions.create(**ask)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(tokens)
    expected = split(text, False, tool_format_for(tok))
    got = whole_parts(r)
    assert (got["content"], got["calls"]) == (expected["content"], expected["calls"])
    streamed = stream_parts(client.chat.completions.create(**ask, stream=True))
    assert {k: streamed[k] for k in got} == got


# Bounded values: a greedy random model inside an unbounded string or number may never leave it.
BOUNDED = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6}, "soon": {"type": "boolean"}},
                   "required": ["city"]}}}, NOW]


def under_grammar(loaded, tool_choice, answer=None):
    """(prompt ids, reply tokens, (content, calls)) of greedy generate on render_chat's prompt for BOUNDED,
    held to tool_calls.call_grammar's constraint."""
    model, tok = loaded
    ids = render_chat(tok, [USER], BOUNDED, tool_choice, add_generation_prompt=True, tokenize=True)
    grammar = compile_lark(call_grammar(tok, tool_format_for(tok), check_tools(BOUNDED), tool_choice, answer), tok,
                           "tools")
    out = list(stream_generate(model, tok, ids, max_tokens=64, stop_token_ids=[tok.end_of_turn_id],
                               logits_processors=[GrammarConstraint(tok, grammar)]))
    return ids, out, parse_tool_calls("".join(r.text for r in out), tool_format_for(tok))


def test_a_named_tool_choice_forces_a_whole_valid_call(client, tiny):
    """The reply equals greedy generate under tool_calls.call_grammar's constraint, and is one call of
    that function whose arguments validate against its schema (jsonschema)."""
    choice = {"type": "function", "function": {"name": "get_weather"}}
    ids, out, (content, calls) = under_grammar(tiny["gemma4"], choice)
    r = client.chat.completions.create(model=GEMMA4, messages=[USER], tools=BOUNDED, tool_choice=choice,
                                       max_tokens=64, temperature=0)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(out)
    assert r.choices[0].finish_reason == "tool_calls" and not r.choices[0].message.content and not content
    got = [(c.function.name, json.loads(c.function.arguments)) for c in r.choices[0].message.tool_calls]
    assert got == [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]
    assert got and all(name == "get_weather" for name, _ in got)
    for _, arguments in got:
        jsonschema.validate(arguments, BOUNDED[0]["function"]["parameters"])


def test_response_format_beside_tools_is_a_call_or_the_json(client, tiny):
    """tool_choice auto with a json_schema: greedy equals generate under the one grammar of both."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    _, _, (content, calls) = under_grammar(tiny["gemma4"], None, schema)
    r = client.chat.completions.create(model=GEMMA4, messages=[USER], tools=BOUNDED, max_tokens=64, temperature=0,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "answer", "schema": schema}})
    message = r.choices[0].message
    assert (message.content or "") == content and len(message.tool_calls or []) == len(calls)
    if not calls:
        jsonschema.validate(json.loads(content), schema)


def test_gemma4_thoughts_are_split_as_generate_writes_them(client, tiny):
    gemma4 = tiny["gemma4"]
    # A bias on <|channel> and <channel|> makes the random model open and close thoughts.
    tok, messages = gemma4[1], [{"role": "user", "content": "Hello"}]
    bias = {tok.piece_to_id("<|channel>"): 5.0, tok.piece_to_id("<channel|>"): 5.0}
    ref = reference(gemma4, messages, 24, chat=True, enable_thinking=True,
                    logits_processors=make_logits_processors(bias))
    expected = split(ref.text, True, None)
    assert expected["reasoning"] and expected["content"]
    ask = dict(model=GEMMA4, messages=messages, max_tokens=24, temperature=0, logit_bias={str(k): v for k, v in bias.items()},
               extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    got = whole_parts(client.chat.completions.create(**ask))
    assert (got["content"], got["reasoning"]) == (expected["content"], expected["reasoning"])
    streamed = stream_parts(client.chat.completions.create(**ask, stream=True))
    assert (streamed["content"], streamed["reasoning"]) == (got["content"], got["reasoning"])


# ----- in-process: a scripted reply through the parse path --------------------------------------------


class ScriptedScheduler:
    """Plays `ids` as every job's reply (the last one with finish_reason "stop"); records the jobs."""

    def __init__(self, ids: list[int]):
        self.ids, self.jobs = ids, []

    def submit(self, job, on_event):
        self.jobs.append(job)
        job_id = len(self.jobs)
        for n, token in enumerate(self.ids):
            last = n == len(self.ids) - 1
            on_event(Event(job_id, token, -0.5, [], "stop" if last else None,
                           prompt_tokens=len(job.prompt_ids) if n == 0 else 0))
        return job_id

    def cancel(self, job_id):
        pass


@pytest.fixture()
def scripted():
    """serve(loaded, ids) -> (openai client, scheduler): the app on a loopback port, in a thread."""
    servers = []

    def serve(loaded, ids):
        scheduler = ScriptedScheduler(ids)
        sock = bind("127.0.0.1", 0)
        server = uvicorn.Server(uvicorn.Config(create_app([ServedModel("m", *loaded, scheduler, 0)]),
                                               log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        servers.append((server, thread))
        while not server.started:
            time.sleep(0.01)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        return openai.OpenAI(base_url=url, api_key="unused", max_retries=0), scheduler

    yield serve
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=10)


G4_REPLY = ('<|channel>thought\nThe user wants the weather.\n<channel|>Let me check. '
            '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:[1,2]}<tool_call|><|tool_call>call:now{}<tool_call|>')
G4_CALLS = [(0, "function", "get_weather", {"city": "Paris", "days": [1, 2]}), (1, "function", "now", {})]


def _loaded_calls(parts: dict) -> list:
    return [(i, kind, name, json.loads(arguments)) for i, kind, name, arguments in parts["calls"]]


def test_gemma4_calls_and_thoughts_whole_and_streamed(scripted, tiny):
    gemma4 = tiny["gemma4"]
    tok = gemma4[1]
    ids = tok.encode(G4_REPLY, add_bos=False, parse_special=True) + [tok.piece_to_id("<|tool_response>")]
    client, scheduler = scripted(gemma4, ids)
    ask = dict(model="m", messages=EARLIER, tools=TOOLS, extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    r = client.chat.completions.create(**ask)
    assert scheduler.jobs[0].prompt_ids == render_chat(tok, EARLIER, TOOLS, None, add_generation_prompt=True,
                                                       tokenize=True, enable_thinking=True)
    assert tok.piece_to_id("<|tool_response>") in scheduler.jobs[0].stop_ids
    whole = whole_parts(r)
    assert whole["reasoning"] == "The user wants the weather." and whole["content"] == "Let me check. "
    assert _loaded_calls(whole) == G4_CALLS and whole["finish"] == "tool_calls"
    assert all(t.id.startswith("call_") for t in r.choices[0].message.tool_calls)
    assert r.usage.completion_tokens == len(ids)
    streamed = stream_parts(client.chat.completions.create(**ask, stream=True))
    assert streamed == whole
    # The reply sent back with its results is prompted as render_chat renders it.
    turn = r.choices[0].message.model_dump(exclude_none=True, exclude={"refusal"})
    results = [{"role": "tool", "tool_call_id": t.id, "content": "ok"} for t in r.choices[0].message.tool_calls]
    later = [*EARLIER, turn, *results]
    client.chat.completions.create(model="m", messages=later, tools=TOOLS)
    assert scheduler.jobs[-1].prompt_ids == render_chat(tok, later, TOOLS, None, add_generation_prompt=True,
                                                        tokenize=True)


def test_gemma4_thoughts_stay_content_with_thinking_off(scripted, tiny):
    gemma4 = tiny["gemma4"]
    tok = gemma4[1]
    client, _ = scripted(gemma4, tok.encode(G4_REPLY, add_bos=False, parse_special=True) + [tok.end_of_turn_id])
    r = client.chat.completions.create(model="m", messages=[USER])  # no tools: no parse either
    assert r.choices[0].message.content == G4_REPLY and r.choices[0].finish_reason == "stop"
    assert "reasoning_content" not in (r.choices[0].message.model_extra or {})


def test_gemma3_prompted_calls_whole_and_streamed(scripted, tiny):
    gemma3 = tiny["gemma3"]
    # The scripted scheduler runs no model: a stand-in with a 4k context (the tiny one's 256 tokens
    # cannot hold Google's prompted-format instruction) beside the tiny Gemma 3's own tokenizer.
    model, tok = gemma3
    roomy = SimpleNamespace(args=replace(model.args, max_position_embeddings=4096), image_input=None,
                            audio_input=None, prefix_lm=False)
    text = '{"name": "get_weather", "parameters": {"city": "Paris"}}\n{"name": "now", "parameters": {}}'
    client, scheduler = scripted((roomy, tok), tok.encode(text, add_bos=False) + [tok.end_of_turn_id])
    ask = dict(model="m", messages=EARLIER, tools=TOOLS, tool_choice="auto")
    r = client.chat.completions.create(**ask)
    assert scheduler.jobs[0].prompt_ids == render_chat(tok, EARLIER, TOOLS, "auto", add_generation_prompt=True,
                                                       tokenize=True)
    whole = whole_parts(r)
    assert r.choices[0].message.content is None and whole["finish"] == "tool_calls"
    assert _loaded_calls(whole) == [(0, "function", "get_weather", {"city": "Paris"}), (1, "function", "now", {})]
    assert stream_parts(client.chat.completions.create(**ask, stream=True)) == whole
    # tool_choice "none": the tools are not declared and the reply is not parsed.
    r = client.chat.completions.create(model="m", messages=[USER], tools=TOOLS, tool_choice="none")
    assert scheduler.jobs[-1].prompt_ids == tok.apply_chat_template([USER], add_generation_prompt=True, tokenize=True)
    assert r.choices[0].message.content == text and r.choices[0].message.tool_calls is None
