"""Tool calls in Gemma's own formats (mlx_gemma/tool_calls.py, tool_formats/, chat_template.py's tools).

Reference for rendering: Google's Gemma 4 chat template, as committed in
tests/fixtures/gemma4_chat_template/chat_template.jinja.  HF model repos are not reachable here; the
text is the gemma-4-E4B-it chat_template.jinja as NVIDIA Megatron-LM copies it
(megatron/training/tokenizer/sft_tokenizer.py, `gemma4_assistant_masked_template`, "The REAL Gemma4
(E4B) chat template"), with that copy's `{% generation %}` / `{% endgeneration %}` markers (Jinja
no-ops) removed; llama.cpp's models/templates/google-gemma-4-31B-it.jinja has the same tool rules.
transformers 5.25's `apply_chat_template(tools=...)` renders it on the tiny Gemma-4-shaped tokenizer.
Where this template and mlx_gemma's earlier tool-free rules differ (it closes each of two
consecutive assistant messages and keeps thoughts only beside tool calls), the conversations here
stay off those points; tests/test_gemma4_chat.py pins the tool-free behaviour.

Reference for parsing: mlx-lm's tool_parsers (gemma4.py, function_gemma.py) on the same texts.
"""

from __future__ import annotations

import copy
import itertools
import json
import random

import pytest
from conftest import FIXTURES

from mlx_gemma.errors import GenerationError
from mlx_gemma.tokenizer import GemmaTokenizer
from mlx_gemma.tool_calls import (FUNCTION_GEMMA, GEMMA3, GEMMA4, ToolCallStream, check_tools,
                                  parse_tool_calls, render_chat, select_tools, tool_format_for)

TEMPLATE = (FIXTURES / "gemma4_chat_template" / "chat_template.jinja").read_text(encoding="utf-8")
Q = '<|"|>'

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather now",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "A city"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "Days": {"type": "array", "items": {"type": "integer", "minimum": 1}, "description": "Days ahead"},
        "note": {"type": ["string", "null"], "default": None, "format": "x"},  # kept and dropped as the template does
        "extra": {"type": "object", "additionalProperties": False, "title": {"type": "string"}}}}}}
BOOK = {"type": "function", "function": {
    "name": "book-trip", "description": "Books a trip",
    "parameters": {"type": "object", "required": ["legs", "who"], "properties": {
        "legs": {"type": "array", "items": {"type": "object", "required": ["from"], "properties": {
            "from": {"type": "string"}, "to": {"type": "string", "nullable": True}}}},
        "who": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                "required": ["name"]},
        "flexible": {"type": "boolean"}}}}}
NO_ARGS = {"type": "function", "function": {"name": "now", "description": "The time",
                                            "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, BOOK, NO_ARGS]


def _call(call_id, name, arguments):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


NESTED = {"legs": [{"from": "Paris", "to": "Rome"}, {"from": "Rome", "to": None}],
          "who": {"name": "Ada", "age": 36}, "flexible": True, "tags": [], "score": -1.5e-3}
ESCAPES = {"city": 'São "Paulo", {BR}: a\\b\nc\t😀', "unit": "celsius", "Days": [1, 2]}
USER = {"role": "user", "content": "What's the weather in Paris?"}
CALL = {"role": "assistant", "content": None, "tool_calls": [_call("c1", "get_weather", {"city": "Paris"})]}
CONVERSATIONS = {
    "declarations only": [{"role": "system", "content": " Be brief. "}, USER],
    "a call": [USER, CALL],
    "call, response, answer": [USER, CALL, {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21C"},
                               {"role": "assistant", "content": "It is sunny."}, {"role": "user", "content": "Thanks"}],
    "several calls": [USER, {"role": "assistant", "content": "", "reasoning": "two cities",
                             "tool_calls": [_call("a", "get_weather", {"city": "Paris", "unit": "celsius"}),
                                            _call("b", "get_weather", {"city": "Rome", "Days": [1, 2, 3]}),
                                            _call("c", "now", {})]},
                      {"role": "tool", "tool_call_id": "b", "content": "rain"},
                      {"role": "tool", "tool_call_id": "a", "content": [{"type": "text", "text": "sun"},
                                                                        {"type": "text", "text": "ny"}]},
                      {"role": "tool", "tool_call_id": "c", "content": "12:00"}],
    "nested arguments": [USER, {"role": "assistant", "content": "Booking.",
                                "tool_calls": [_call("t", "book-trip", NESTED)]},
                         {"role": "tool", "tool_call_id": "t", "content": "booked"}],
    "escapes": [USER, {"role": "assistant", "content": None, "tool_calls": [_call("e", "get_weather", ESCAPES)]},
                {"role": "tool", "tool_call_id": "e", "content": 'a "quoted", {braced} reply\n'}],
    "media and no ids": [USER, {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"type": "function", "function": {"name": "now", "arguments": {}}}]},
        {"role": "tool", "name": "now", "content": [{"type": "text", "text": "see"}, {"type": "image"}]},
        {"role": "assistant", "content": "Done."}, {"role": "user", "content": "ok"}],
    "tool_responses": [USER, {"role": "assistant", "content": "", "tool_calls": [_call("x", "now", {})],
                              "media and no ids": [USER, {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"type": "function", "function": {"name": "now", "arguments": {}}}]},
        {"role": "tool", "name": "now", "content": [{"type": "text", "text": "see"}, {"type": "image"}]},
        {"role": "assistant", "content": "Done."}, {"role": "user", "content": "ok"}],
    "tool_responses": [{"name": "now", "response": {"time": "12:00", "ok": True}}]}],
}


def _openai(messages):
    """The conversation as an OpenAI client sends it: call arguments as JSON strings."""
    out = copy.deepcopy(messages)
    for m in out:
        for call in m.get("tool_calls") or []:
            call["function"]["arguments"] = json.dumps(call["function"]["arguments"])
    return out


@pytest.fixture(scope="module")
def tok() -> GemmaTokenizer:
    return GemmaTokenizer.from_file(FIXTURES / "gemma4_tokenizer" / "tokenizer.model")


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    return transformers.GemmaTokenizer.from_pretrained(str(FIXTURES / "gemma4_tokenizer"))


# ----- rendering against the official template ---------------------------------------------------


@pytest.mark.oracle
@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=list(CONVERSATIONS))
def test_rendering_equals_the_official_template(tok, hf, conversation):
    messages = CONVERSATIONS[conversation]
    for prompt, thinking in itertools.product((True, False), (False, True)):
        ref = hf.apply_chat_template(messages, tools=TOOLS, chat_template=TEMPLATE, tokenize=False,
                                     add_generation_prompt=prompt, enable_thinking=thinking)
        ours = dict(tools=TOOLS, add_generation_prompt=prompt, enable_thinking=thinking, empty_thought=False)
        assert tok.apply_chat_template(_openai(messages), **ours) == ref
        assert tok.apply_chat_template(_openai(messages), tokenize=True, **ours) == \
            hf(ref, add_special_tokens=False)["input_ids"]


def test_a_pending_call_ends_the_prompt_with_the_stop_piece(tok):
    text = tok.apply_chat_template(_openai(CONVERSATIONS["a call"]), tools=TOOLS)
    assert text.endswith(f"<|tool_call>call:get_weather{{city:{Q}Paris{Q}}}<tool_call|><|tool_response>")


ALL = ["get_weather", "book-trip", "now"]


@pytest.mark.parametrize("choice,declared", [("auto", ALL), (None, ALL), ("required", ALL), ("none", []),
                                             ({"type": "function", "function": {"name": "now"}}, ["now"])])
def test_tool_choice_selects_the_declared_tools(tok, choice, declared):
    chosen = select_tools(check_tools(TOOLS), choice)
    assert [t["function"]["name"] for t in chosen] == declared
    text = tok.apply_chat_template([USER], tools=chosen)
    assert text.count("<|tool>") == len(declared) and all(f"declaration:{n}{{" in text for n in declared)


# ----- parsing ------------------------------------------------------------------------------------


def _ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def _reply(tok, messages) -> str:
    """What the model wrote in the conversation's last model turn, as the template renders it."""
    text = tok.apply_chat_template(_openai(messages), tools=TOOLS, add_generation_prompt=False)
    return text[text.rindex("<|turn>model\n") + len("<|turn>model\n"):]


@pytest.mark.parametrize("conversation", ["a call", "several calls", "nested arguments", "escapes"])
def test_parsing_round_trips_what_rendering_wrote(tok, conversation):
    messages = CONVERSATIONS[conversation][:2]
    content, calls = parse_tool_calls(_reply(tok, messages), GEMMA4, _ids())
    expected = messages[1]["tool_calls"]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [(c["function"]["name"], c["function"]["arguments"]) for c in expected]
    assert [(c["index"], c["id"], c["type"]) for c in calls] == [(i, f"call_{i}", "function") for i in range(len(calls))]
    # Thoughts stay in the content (the server splits them off); the text the template puts after the calls too.
    thought = messages[1].get("reasoning")
    assert content == (f"<|channel>thought\n{thought}\n<channel|>" if thought else "") + (messages[1]["content"] or "")


CALL_TEXT = f"<|tool_call>call:get_weather{{city:{Q}Paris, FR{Q},Days:[1,2],deep:{{a:{Q}}}{Q}}}}}<tool_call|>"
REPLIES = [
    "Plain answer, no call. <|tool_ <tool_call|> < |",
    CALL_TEXT + "<|tool_response>",
    "Let me look." + CALL_TEXT + CALL_TEXT.replace("Paris", "Rome") + "<|tool_resp",
    "Before " + CALL_TEXT + " between " + CALL_TEXT + " after",
    "unclosed <|tool_call>call:get_weather{city:" + Q + "Par",
    "bad <|tool_call>call:get_weather{city:" + Q + "Paris}<tool_call|> then " + CALL_TEXT,
    "bad <|tool_call>call get_weather{}<tool_call|><|tool_call>call:f{a}<tool_call|><|tool_call>call:f{a:1,}<tool_call|>",
    "<|tool_call>call:now{}<tool_call|><|tool_call>call:now{}<tool_call|>",
]


def _as(fmt, text: str) -> str:
    """A Gemma 4 reply in another marker format (FunctionGemma's tokens for the same roles)."""
    for a, b in zip((GEMMA4.call_start, GEMMA4.call_end, GEMMA4.quote, GEMMA4.response_start),
                    (fmt.call_start, fmt.call_end, fmt.quote, fmt.response_start)):
        text = text.replace(a, b)
    return text


def _stream(text: str, cuts: list[int], fmt=GEMMA4) -> tuple[str, list[dict]]:
    stream, events = ToolCallStream(fmt, _ids()), []
    for a, b in zip([0, *cuts], [*cuts, len(text)]):
        events += stream.feed(text[a:b])
    events += stream.finish()
    assert all(e.get("content") != "" for e in events)
    return "".join(e.get("content", "") for e in events), [e["tool_call"] for e in events if "tool_call" in e]


@pytest.mark.parametrize("fmt", [GEMMA4, FUNCTION_GEMMA], ids=["gemma4", "function_gemma"])
@pytest.mark.parametrize("reply", REPLIES)
def test_streaming_in_every_split_equals_the_whole_parse(reply, fmt):
    original, reply = reply, _as(fmt, reply)
    whole = parse_tool_calls(reply, fmt, _ids())
    rng = random.Random(reply)
    splits = [list(range(1, len(reply))), []]
    splits += [sorted(rng.sample(range(1, len(reply)), rng.randint(1, min(12, len(reply) - 1)))) for _ in range(30)]
    for cuts in splits:
        assert _stream(reply, cuts, fmt) == whole
    if fmt is FUNCTION_GEMMA:  # the same calls as the Gemma 4 reply it was made from
        assert whole == (_as(fmt, parse_tool_calls(original, GEMMA4, _ids())[0]), parse_tool_calls(original, GEMMA4,
                                                                                                   _ids())[1])


def test_what_the_parser_reads_and_what_it_leaves_as_content():
    content, calls = parse_tool_calls(REPLIES[2], GEMMA4, _ids())
    assert content == "Let me look.<|tool_resp"  # a cut-off stop piece is not a stop piece
    assert parse_tool_calls(REPLIES[1], GEMMA4)[0] == "" and parse_tool_calls("x<|tool_response>", GEMMA4)[0] == \
        "x<|tool_response>"  # the stop piece is dropped from a reply with calls only
    assert [json.loads(c["function"]["arguments"])["city"] for c in calls] == ["Paris, FR", "Rome, FR"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris, FR", "Days": [1, 2], "deep": {"a": "}"}}
    for malformed in REPLIES[4:7]:  # unclosed call, unclosed string, no 'call:', key without value, trailing ','
        content, calls = parse_tool_calls(malformed, GEMMA4, _ids())
        assert len(calls) == (1 if CALL_TEXT in malformed else 0)
        assert content == malformed.replace(CALL_TEXT, "")
    assert parse_tool_calls("text" + CALL_TEXT, None) == ("text" + CALL_TEXT, [])


@pytest.mark.oracle
@pytest.mark.parametrize("reply", [CALL_TEXT, CALL_TEXT.replace("Days:[1,2],", "n:-3.5,b:true,")])
def test_gemma4_parse_equals_mlx_lm(reply):
    gemma4 = pytest.importorskip("mlx_lm.tool_parsers.gemma4")
    body = reply[len(GEMMA4.call_start):-len(GEMMA4.call_end)]
    (call,) = parse_tool_calls(reply, GEMMA4)[1]
    assert gemma4.parse_tool_call(body) == {"name": call["function"]["name"],
                                            "arguments": json.loads(call["function"]["arguments"])}


@pytest.mark.oracle
@pytest.mark.parametrize("body", ["call:get_weather{city:<escape>Tokyo, JP<escape>,days:3}",
                                  "call:set_alarm{on:true,label:<escape>wake: up, now<escape>,t:7.5}",
                                  "call:now{}"])
def test_function_gemma_parse_equals_mlx_lm(body):
    function_gemma = pytest.importorskip("mlx_lm.tool_parsers.function_gemma")
    text = f"ok {FUNCTION_GEMMA.call_start}{body}{FUNCTION_GEMMA.call_end}<start_function_response>"
    content, (call,) = parse_tool_calls(text, FUNCTION_GEMMA)
    assert content == "ok " and function_gemma.parse_tool_call(body) == {
        "name": call["function"]["name"], "arguments": json.loads(call["function"]["arguments"])}


def test_tool_format_for_a_vocabulary(tok):
    assert tool_format_for(tok) is GEMMA4
    gemma3 = GemmaTokenizer.from_file(FIXTURES / "tokenizer" / "tokenizer.model")
    with pytest.raises(GenerationError, match="tools"):  # Gemma 3's tools go through render_chat
        gemma3.apply_chat_template([USER], tools=TOOLS)
    assert render_chat(tok, _openai(CONVERSATIONS["a call"]), TOOLS, tokenize=True) == \
        tok.apply_chat_template(_openai(CONVERSATIONS["a call"]), tools=TOOLS, tokenize=True)


# ----- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("tools,match", [
    ({"type": "function"}, "tools must be a list"),
    ([{"type": "retrieval"}], r"tools\[0\] must be"),
    ([{"type": "function", "function": "f"}], r"tools\[0\]\.function must be an object"),
    ([{"type": "function", "function": {"name": "a b"}}], r"tools\[0\]\.function\.name"),
    ([WEATHER, copy.deepcopy(WEATHER)], r"tools\[1\]\.function\.name 'get_weather' is declared twice"),
    ([{"type": "function", "function": {"name": "f", "parameters": "{}"}}], r"tools\[0\]\.function\.parameters must"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}], r"parameters\.type"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"properties": {"x": 1}}}}], r"parameters\.prop"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"required": "x"}}}], r"parameters\.required"),
])
def test_bad_tools_are_typed_errors_naming_the_field(tok, tools, match):
    with pytest.raises(GenerationError, match=match):
        check_tools(tools)
    with pytest.raises(GenerationError, match=match):
        tok.apply_chat_template([USER], tools=tools)


@pytest.mark.parametrize("choice,match", [({"type": "function", "function": {"name": "nope"}}, "'nope'"),
                                          ("sometimes", "tool_choice must be"), ({"type": "function"}, "tool_choice")])
def test_bad_tool_choice_is_a_typed_error(choice, match):
    with pytest.raises(GenerationError, match=match):
        select_tools(check_tools(TOOLS), choice)
    with pytest.raises(GenerationError, match="needs tools"):
        select_tools([], "required")


@pytest.mark.parametrize("messages,match", [
    ([USER, {"role": "tool", "tool_call_id": "x", "content": "hi"}], r"message 1: tool use: a 'tool' message"),
    ([USER, {"role": "assistant", "content": None, "tool_calls": [_call("x", "f", "{not json")]}],
     r"message 1: tool use: tool_calls\[0\]\.function\.arguments is not JSON"),
    ([USER, {"role": "assistant", "content": None, "tool_calls": [_call("x", "f", "[1]")]}], "JSON object"),
    ([USER, {"role": "assistant", "content": None, "tool_calls": [{"id": "x"}]}], r"tool_calls\[0\] needs"),
    ([USER, {"role": "assistant", "content": None, "tool_calls": {"id": "x"}}], "must be a list"),
    ([{"role": "user", "content": "x", "tool_calls": [_call("x", "f", "{}")]}], "only an assistant"),
    ([USER, {"role": "assistant", "content": None, "tool_calls": [_call("x", "f", '{"a": "\\ud800"}')]}], "Unicode"),
    ([USER, CALL, {"role": "tool", "tool_call_id": "c1", "content": {"a": "\ud800"}}], "Unicode"),
])
def test_bad_tool_messages_are_typed_errors(tok, messages, match):
    with pytest.raises(GenerationError, match=match):
        tok.apply_chat_template(messages, tools=TOOLS)


# ----- Gemma 3: Google's prompt-based JSON format -------------------------------------------------

# The JSON variant's instruction in Google's guide (ai.google.dev/gemma/docs/capabilities/function-calling).
GUIDE = ("You have access to functions. If you decide to invoke any of the function(s),\n"
         "you MUST put it in the format of\n"
         '{"name": function name, "parameters": dictionary of argument name and its value}\n'
         "You SHOULD NOT include any other text in the response if you call a function")


@pytest.fixture(scope="module")
def gemma3() -> GemmaTokenizer:
    return GemmaTokenizer.from_file(FIXTURES / "tokenizer" / "tokenizer.model")


def test_gemma3_prompt_is_the_guides(gemma3):
    functions = json.dumps([t["function"] for t in TOOLS], indent=2)
    messages = [{"role": "system", "content": "Be brief."}, *CONVERSATIONS["call, response, answer"]]
    text = render_chat(gemma3, _openai(messages), TOOLS)
    call = json.dumps({"name": "get_weather", "parameters": {"city": "Paris"}})
    assert text == (f"<bos><start_of_turn>user\nBe brief.\n\n{GUIDE}\n{functions}\n\n{USER['content']}<end_of_turn>\n"
                    f"<start_of_turn>model\n{call}<end_of_turn>\n"
                    "<start_of_turn>user\n```tool_output\nsunny, 21C\n```<end_of_turn>\n"
                    "<start_of_turn>model\nIt is sunny.<end_of_turn>\n<start_of_turn>user\nThanks<end_of_turn>\n"
                    "<start_of_turn>model\n")
    assert render_chat(gemma3, [USER], TOOLS, "none") == gemma3.apply_chat_template([USER])
    assert tool_format_for(gemma3) is GEMMA3


def test_gemma3_parse_round_trips_rendering(gemma3):
    messages = _openai(CONVERSATIONS["several calls"][:2])
    del messages[1]["reasoning"]
    text = render_chat(gemma3, messages, TOOLS, add_generation_prompt=False)
    reply = text[text.rindex("<start_of_turn>model\n") + 21:-len("<end_of_turn>\n")]
    content, calls = parse_tool_calls(reply, GEMMA3, _ids())
    assert content == "" and [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == \
        [(c["function"]["name"], c["function"]["arguments"]) for c in messages[1]["tool_calls"]]


GEMMA3_REPLIES = [
    '{"name": "now", "parameters": {}}\n{"name": "get_weather", "parameters": {"city": "Ro\\"me, {x}"}}',
    '  ```json\n[{"name": "now", "arguments": {"a": [1, {"b": null}]}}]\n```\n',
    "The weather is fine.",
    '{"name": "now", "parameters": {}} and some text',
    '{"name": "now", "parameters": [1]}',
    '```tool_code\n{"name": "now"',
    "\n  Sure: {\"name\": 1}",
]


@pytest.mark.parametrize("reply", GEMMA3_REPLIES)
def test_gemma3_streaming_equals_the_whole_parse(reply):
    whole = parse_tool_calls(reply, GEMMA3, _ids())
    assert bool(whole[1]) == (GEMMA3_REPLIES.index(reply) < 2) and (whole[0] == reply) == (not whole[1])
    rng = random.Random(reply)
    for cuts in [list(range(1, len(reply))), *(sorted(rng.sample(range(1, len(reply)), 5)) for _ in range(20))]:
        stream, events = ToolCallStream(GEMMA3, _ids()), []
        for a, b in zip([0, *cuts], [*cuts, len(reply)]):
            events += stream.feed(reply[a:b])
        events += stream.finish()
        assert ("".join(e.get("content", "") for e in events), [e["tool_call"] for e in events if "tool_call" in e]) \
            == whole


@pytest.mark.oracle
def test_gemma3_parse_equals_mlx_lm_json_tools():
    json_tools = pytest.importorskip("mlx_lm.tool_parsers.json_tools")
    for obj in ({"name": "now", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "a\"b", "n": [1.5]}}):
        (call,) = parse_tool_calls(json.dumps(obj), GEMMA3)[1]
        assert json_tools.parse_tool_call(json.dumps(obj)) == {
            "name": call["function"]["name"], "arguments": json.loads(call["function"]["arguments"])}
