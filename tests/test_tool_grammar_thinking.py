"""A forced tool call with Gemma 4's thinking on: one thought may come before the call.

With `tool_choice` "required" or named and `chat_template_kwargs.enable_thinking`, the grammar
(tool_formats/call_grammar.py's `thought_block`) lets the reply open with
`<|channel>thought\\n...<channel|>` (transformers' Gemma 4 chat template writes a kept thought so;
mlx-lm's tokenizer_utils reads `<|channel>thought` ... `<channel|>` as its think span), then holds it
to the call.  What checks it, none of it ours:
- hand-written replies fed to llguidance's matcher (a thought then a call: yes; a thought alone,
  text before the thought, two thoughts, a thought spelling `<channel|>` as text: no);
- a random tiny Gemma 4 sampled at temperature 1 under the grammar, several seeds: each reply's call
  is read by mlx-lm's gemma4 tool parser and its arguments by `jsonschema`; its thought, split out by
  a plain regex of the template's layout, is what the server's reply parser returns as reasoning;
- the real server (the shared test server, tiny Gemma 4) at temperature 1 over several seeds: every
  reply is a call in `tool_calls` whose arguments validate, no content, and a thought comes back as
  `reasoning_content`, never inside the content or the call.
"""

from __future__ import annotations

import json
import re

import jsonschema
import llguidance
import openai
import pytest
from conftest import FIXTURES
from test_server import GEMMA4, shared_server

from mlx_gemma import load
from mlx_gemma.generate import stream_batch_generate
from mlx_gemma.grammar import GrammarConstraint, compile_lark, grammar_tokenizer
from mlx_gemma.samplers import make_logits_processors, make_sampler
from mlx_gemma.server.replies import Reply
from mlx_gemma.tool_calls import GEMMA4 as G4, call_grammar, check_tools, render_chat

gemma4_parser = pytest.importorskip("mlx_lm.tool_parsers.gemma4")

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather", "parameters": {
    "type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 6}, "days": {"type": "integer"}}}}}
NOW = {"type": "function", "function": {"name": "now", "description": "The time"}}
TOOLS = check_tools([WEATHER, NOW])
SCHEMAS = {"get_weather": WEATHER["function"]["parameters"], "now": {"type": "object", "maxProperties": 0}}
USER = {"role": "user", "content": "What's the weather in Paris?"}
Q = G4.quote
CALL = f"<|tool_call>call:get_weather{{city:{Q}Paris{Q}}}<tool_call|>"
# The template's layout of a thought (a regex, not replies.py's parser): its text between the header and
# the newline before <channel|> (an unclosed one runs to the end).
THOUGHT = re.compile(r"<\|channel>thought\n(.*?)\n?(?:<channel\|>|$)", re.DOTALL)


@pytest.fixture(scope="module")
def gemma4():
    return load(FIXTURES / "tiny_gemma4_mm")


def matcher_accepts(tok, grammar: str, text: str) -> bool:
    matcher = llguidance.LLMatcher(grammar_tokenizer(tok), grammar, log_level=0)
    ids = tok.encode(text, add_bos=False, parse_special=True)
    return all(matcher.consume_token(t) for t in ids) and matcher.is_accepting()


@pytest.mark.parametrize("text, ok", [
    (CALL, True),  # the thought is optional
    (f"<|channel>thought\nThe user wants Paris.\n<channel|>{CALL}", True),
    (f"<|channel>thought\n<channel|>{CALL}<|tool_response>", True),  # an empty thought; the await token
    ("<|channel>thought\nHm.\n<channel|>", False),  # a thought and no call
    (f"Sure. <|channel>thought\nHm.\n<channel|>{CALL}", False),  # text before the thought
    (f"<|channel>thought\nA<channel|><|channel>thought\nB<channel|>{CALL}", False),  # two thoughts
    (f"<|channel>Hm.<channel|>{CALL}", False),  # no thought header
    (f"<|channel>thought\nHm.\n<channel|>Let me see. {CALL}", False),  # text between thought and call
    (f"{CALL}<|channel>thought\nHm.\n<channel|>", False),  # a thought after the call
])
def test_the_thinking_grammar_takes_one_optional_thought_before_the_call(gemma4, text, ok):
    tok = gemma4[1]
    grammar = compile_lark(call_grammar(tok, G4, TOOLS, "required", thinking=True), tok, "tools")
    assert matcher_accepts(tok, grammar, text) == ok
    if not ok or not text.startswith("<|channel>"):
        return
    without = compile_lark(call_grammar(tok, G4, TOOLS, "required"), tok, "tools")
    assert not matcher_accepts(tok, without, text)  # thinking off: the call from the first token, as before


def test_a_thought_never_spells_its_markers_as_text(gemma4):
    tok = gemma4[1]
    grammar = compile_lark(call_grammar(tok, G4, TOOLS, "required", thinking=True), tok, "tools")
    matcher = llguidance.LLMatcher(grammar_tokenizer(tok), grammar, log_level=0)
    assert all(matcher.consume_token(t) for t in tok.encode("<|channel>thought\nab", add_bos=False, parse_special=True))
    for marker in ("<channel|>", "<|channel>"):  # typed character by character, not as the special token
        probe = matcher.deep_copy()
        assert not all(probe.consume_token(t) for t in tok.encode(marker, add_bos=False, parse_special=False))


def test_thinking_changes_nothing_beside_a_response_format(gemma4):
    """tool_choice auto beside a JSON answer keeps its grammar (a JSON reply from its first token)."""
    tok, answer = gemma4[1], {"type": "object"}
    assert call_grammar(tok, G4, TOOLS, "auto", answer, thinking=True) == call_grammar(tok, G4, TOOLS, "auto", answer)
    assert call_grammar(tok, G4, TOOLS, "auto", thinking=True) is None


def bias(tok) -> dict[int, float]:
    """Makes the random model open a thought often and close it soon (otherwise it would think past any
    budget: any text is a thought's)."""
    return {tok.piece_to_id("<|channel>"): 3.0, tok.piece_to_id("<channel|>"): 6.0}


def check_reply_text(text: str, choice) -> tuple[str | None, dict]:
    """(the thought's text or None, the call) of a sampled reply, read by the references."""
    thought = THOUGHT.match(text)
    rest = text[thought.end():] if thought else text
    assert rest.startswith(G4.call_start) and rest.count(G4.call_start) == 1, text
    body = rest[len(G4.call_start):].split(G4.call_end)[0]
    call = gemma4_parser.parse_tool_call(body)  # mlx-lm's reading of the call
    assert call["name"] in ({"get_weather"} if choice != "required" else set(SCHEMAS))
    jsonschema.validate(call["arguments"], SCHEMAS[call["name"]])
    return (thought.group(1) if thought else None), call


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}],
                         ids=["required", "named"])
def test_sampled_replies_hold_a_valid_call_after_an_optional_thought(gemma4, choice):
    model, tok = gemma4
    grammar = call_grammar(tok, G4, TOOLS, choice, parallel=False, thinking=True)
    prompt = render_chat(tok, [USER], TOOLS, choice, add_generation_prompt=True, tokenize=True, enable_thinking=True)
    stop = [tok.piece_to_id(G4.response_start), tok.end_of_turn_id, *tok.eos_token_ids]
    thoughts = []
    for seed in range(3):
        rows, texts = 4, [""] * 4
        processors = [*make_logits_processors(bias(tok)), GrammarConstraint(tok, grammar)]
        for step in stream_batch_generate(model, tok, [prompt] * rows, max_tokens=160, stop_token_ids=stop,
                                          sampler=make_sampler(temp=1.0, seed=seed), logits_processors=processors):
            for b, r in enumerate(step):
                if r is not None:
                    texts[b] += r.text
        for text in texts:
            thought, call = check_reply_text(text, choice)
            reply = Reply(True, G4)  # the server's parse: the same thought out, the same call
            events = reply.feed(text) + reply.finish()
            assert "".join(e.get("reasoning", "") for e in events) == (thought or "")
            assert "".join(e.get("content", "") for e in events) == ""
            (parsed,) = [e["tool_call"]["function"] for e in events if "tool_call" in e]
            assert (parsed["name"], json.loads(parsed["arguments"])) == (call["name"], call["arguments"])
            thoughts.append(thought)
    assert any(t is None for t in thoughts) and any(t for t in thoughts)  # both kinds sampled


def test_the_server_returns_the_thought_as_reasoning_and_the_call_in_tool_calls(gemma4):
    tok = gemma4[1]
    client = openai.OpenAI(base_url=shared_server() + "/v1", api_key="unused", max_retries=0)
    with_thought = 0
    for seed in range(6):
        stream = seed % 2 == 1
        ask = dict(model=GEMMA4, messages=[USER], tools=[WEATHER, NOW], tool_choice="required", max_tokens=160,
                   temperature=1.0, seed=seed, parallel_tool_calls=False,
                   logit_bias={str(k): v for k, v in bias(tok).items()},
                   extra_body={"chat_template_kwargs": {"enable_thinking": True}})
        if stream:
            content, reasoning, calls, finish = "", "", {}, None
            for chunk in client.chat.completions.create(**ask, stream=True):
                if not chunk.choices:
                    continue
                delta = chunk.choices[0].delta
                content += delta.content or ""
                reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
                for t in delta.tool_calls or []:
                    name, args = calls.get(t.index, ("", ""))
                    calls[t.index] = (name + (t.function.name or ""), args + (t.function.arguments or ""))
                finish = chunk.choices[0].finish_reason or finish
            calls = list(calls.values())
        else:
            r = client.chat.completions.create(**ask)
            message, finish = r.choices[0].message, r.choices[0].finish_reason
            content, reasoning = message.content or "", (message.model_extra or {}).get("reasoning_content") or ""
            calls = [(t.function.name, t.function.arguments) for t in message.tool_calls or []]
        assert finish == "tool_calls" and content == "" and len(calls) == 1, (seed, content, reasoning, calls)
        name, arguments = calls[0]
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])
        assert "<|channel>" not in reasoning and "<channel|>" not in reasoning and "thought\n" not in reasoning[:8]
        with_thought += bool(reasoning)
    assert with_thought  # some replies thought first (the bias opens the channel often)
