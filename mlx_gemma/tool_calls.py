"""OpenAI tool calling over Gemma's own function-calling formats: check `tools`, honour
`tool_choice`, and parse model output back into OpenAI `tool_calls`, whole or streamed.

The server calls, in order:

    ids = render_chat(tokenizer, messages, tools, tool_choice, tokenize=True)   # the prompt
    fmt = tool_format_for(tokenizer)               # None: this model has no tool syntax we read
    content, calls = parse_tool_calls(text, fmt)    # a whole reply
    stream = ToolCallStream(fmt); stream.feed(delta) ... stream.finish()   # a streamed one

`tool_choice`: "none" declares no tools (the model cannot know of them) and the reply is all
content; "auto" (the default with tools) and "required" declare them all; a named function
declares that one only.  `call_grammar` gives, for "required" or a named function, the grammar a reply
must follow (whole calls in the model's syntax, arguments valid against their schemas), and for "auto"
beside a `response_format` a grammar of calls or that JSON; mlx_gemma.grammar enforces it.

Gemma 3 has no tool tokens: its calls are the JSON objects of Google's prompt-based format
(mlx_gemma.tool_formats.gemma3).  Otherwise a call is `<start>call:NAME{key:value,...}<end>` in both Gemma 4 (`<|tool_call>` / `<tool_call|>`,
strings between `<|"|>`; its chat_template.jinja and mlx-lm's tool_parsers/gemma4.py) and
FunctionGemma (`<start_function_call>` / `<end_function_call>`, strings between `<escape>`;
mlx-lm's tool_parsers/function_gemma.py).  Text the parser cannot read as a call (no closing
marker, arguments that do not parse) stays content, never an exception.
"""

from __future__ import annotations

import itertools
import json
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .errors import GenerationError
from .tool_formats import function_gemma, gemma3
from .tool_formats.call_grammar import json_calls, literal_calls
from .tool_formats.checks import check_tools
from .tool_formats.literals import LiteralSyntaxError, parse_fields


@dataclass(frozen=True)
class ToolCallFormat:
    """How one model family writes a call in its output."""

    name: str  # "gemma4" or "function_gemma"
    call_start: str  # the token opening a call
    call_end: str  # the token closing it
    quote: str  # the token around string values
    response_start: str  # the token the model stops at after its calls (it then awaits the response)
    prompted: bool = False  # no call tokens: a reply is calls only if all of it is (Gemma 3's JSON format)


GEMMA4 = ToolCallFormat("gemma4", "<|tool_call>", "<tool_call|>", '<|"|>', "<|tool_response>")
# FunctionGemma's tokens: its tokenizer_config and Google's "FunctionGemma formatting" guide.
FUNCTION_GEMMA = ToolCallFormat("function_gemma", "<start_function_call>", "<end_function_call>", "<escape>",
                                "<start_function_response>")
GEMMA3 = ToolCallFormat("gemma3", "", "", '"', "", prompted=True)
_SYNTAX = {"gemma4": "Gemma 4", "function_gemma": "FunctionGemma", "gemma3": "Gemma 3"}
# A call's body: `call:NAME{...}`; names as mlx-lm's gemma4 parser takes them (word characters and '-').
_CALL = re.compile(r"\s*call:([\w\-.]+)\{(.*)\}\s*", re.DOTALL)


def tool_format_for(tokenizer) -> ToolCallFormat | None:
    """The tool-call format of a tokenizer: the one whose tokens its vocabulary has, else Gemma 1-3's
    prompted format for a `<start_of_turn>` chat model, else None."""
    for fmt in (GEMMA4, FUNCTION_GEMMA):
        if tokenizer.piece_to_id(fmt.call_start) is not None and tokenizer.piece_to_id(fmt.call_end) is not None:
            return fmt
    return GEMMA3 if tokenizer.chat_format == "gemma" else None


def render_chat(tokenizer, messages, tools=None, tool_choice=None, **kwargs):
    """The prompt for an OpenAI chat request with tools: `tokenizer.apply_chat_template`'s result
    (text, or ids with tokenize=True; `kwargs` go to it), tools declared as `tool_choice` says."""
    declared = select_tools(check_tools(tools), tool_choice)
    fmt = tool_format_for(tokenizer)
    if fmt is GEMMA3:
        return tokenizer.apply_chat_template(gemma3.messages_with_tools(messages, declared), **kwargs)
    if fmt is FUNCTION_GEMMA:
        return _function_gemma_chat(tokenizer, messages, declared, **kwargs)
    return tokenizer.apply_chat_template(messages, tools=declared, **kwargs)


def _function_gemma_chat(tokenizer, messages, tools, add_generation_prompt: bool = True, tokenize: bool = False,
                         enable_thinking: bool = False):
    """FunctionGemma's own template (tool_formats/function_gemma.py), as text or ids; message text is
    encoded as plain text (a user cannot forge a marker), markers as their ids."""
    if enable_thinking:
        raise GenerationError("enable_thinking: FunctionGemma has no thinking mode (Gemma 4 has)")
    segments = function_gemma.segments(messages, tools, add_generation_prompt, tokenizer.bos_id, tokenizer.piece_to_id,
                                       getattr(tokenizer, "path", None))
    if not tokenize:
        return "".join(tokenizer.id_to_piece(s) if isinstance(s, int) else s for s in segments)
    ids: list[int] = []
    for is_text, run in itertools.groupby(segments, key=lambda s: isinstance(s, str)):
        ids += tokenizer.encode("".join(run), add_bos=False) if is_text else list(run)
    return ids


# ----- the request: tools and tool_choice ---------------------------------------------------------


def select_tools(tools: list[dict], tool_choice=None) -> list[dict]:
    """The tools to declare in the prompt for `tool_choice` (see the module docstring)."""
    if tool_choice is None or tool_choice in ("auto", "required"):
        if tool_choice == "required" and not tools:
            raise GenerationError("tool_choice 'required' needs tools")
        return tools
    if tool_choice == "none":
        return []
    name = _chosen_name(tool_choice)
    chosen = [t for t in tools if t["function"]["name"] == name]
    if not chosen:
        raise GenerationError(f"tool_choice names the function {name!r}, which is not among the tools")
    return chosen


def _chosen_name(tool_choice) -> str:
    function = tool_choice.get("function") if isinstance(tool_choice, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise GenerationError("tool_choice must be 'none', 'auto', 'required' or "
                              f"{{'type': 'function', 'function': {{'name': ...}}}}, got {tool_choice!r:.80}")
    return function["name"]


def _forced(tool_choice) -> bool:
    return tool_choice not in (None, "auto", "none")


def call_grammar(tokenizer, fmt: ToolCallFormat, tools: list[dict], tool_choice=None, answer=None,
                 parallel: bool = True, thinking: bool = False) -> str | None:
    """Lark text (for mlx_gemma.grammar.compile_lark) that a reply must follow, or None when it is free.

    For "required" or a named function: one call (`parallel`: one or more) of the declared tools in the
    model's own syntax, arguments valid against each tool's schema (tool_formats/call_grammar.py).  For
    "auto" beside a `response_format` schema `answer`: either such calls or that JSON.  "none", or "auto"
    alone: None.  `thinking` (Gemma 4's thinking on): forced calls may follow one thought, whose
    text the reply's parser returns as reasoning.  `tools` as check_tools returns them; a typed error
    names what cannot be enforced."""
    declared = select_tools(tools, tool_choice)
    if not declared or not (_forced(tool_choice) or answer is not None):
        return None
    answer = None if _forced(tool_choice) else answer
    if fmt.prompted:
        return json_calls(declared, many=parallel, answer=answer)
    ids = {piece: tokenizer.piece_to_id(piece) for piece in (fmt.call_start, fmt.call_end, fmt.quote)}
    missing = [piece for piece, i in ids.items() if i is None]
    if missing:
        raise GenerationError(f"tool_choice: the vocabulary has no {missing[0]}: this model cannot be held to "
                              f"{fmt.name}'s call syntax")
    channel = [tokenizer.piece_to_id(p) for p in ("<|channel>", "<channel|>")]  # (Gemma 4's thought channel)
    thought = tuple(channel) if thinking and answer is None and None not in channel else None
    return literal_calls(
        declared, start=ids[fmt.call_start], end=ids[fmt.call_end], quote=ids[fmt.quote],
        forbidden=(fmt.quote, fmt.call_start, fmt.call_end), syntax=_SYNTAX[fmt.name],
        stop=tokenizer.piece_to_id(fmt.response_start), many=parallel, answer=answer, thought=thought)


# ----- the reply: parsing calls -------------------------------------------------------------------


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def read_call(body: str, fmt: ToolCallFormat) -> tuple[str, str] | None:
    """(name, arguments as a JSON string) of the text between a call's markers; None if malformed."""
    match = _CALL.fullmatch(body)
    if match is None:
        return None
    try:
        arguments = parse_fields(match.group(2), fmt.quote)
    except LiteralSyntaxError:
        return None
    return match.group(1), json.dumps(arguments, ensure_ascii=False)


def _openai_call(index: int, call_id: str, name: str, arguments: str) -> dict:
    return {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def parse_tool_calls(text: str, fmt: ToolCallFormat | None,
                     make_id: Callable[[], str] = new_call_id) -> tuple[str, list[dict]]:
    """(content, tool_calls) of a whole reply: the calls as OpenAI's {index, id, type, function},
    the content what is left (a malformed or unclosed call included, as text).  A reply with calls
    that ends with the format's response_start (the stop piece, if the decoder kept it) loses it."""
    if fmt is None:
        return text, []
    if fmt.prompted:
        calls = gemma3.read_calls(text)
        return ("", [_openai_call(i, make_id(), *c) for i, c in enumerate(calls)]) if calls else (text, [])
    content, calls, pos = [], [], 0
    while True:
        start = text.find(fmt.call_start, pos)
        end = -1 if start < 0 else text.find(fmt.call_end, start + len(fmt.call_start))
        if end < 0:
            content.append(text[pos:])
            return _without_stop("".join(content), fmt, calls), calls
        content.append(text[pos:start])
        call = read_call(text[start + len(fmt.call_start):end], fmt)
        pos = end + len(fmt.call_end)
        if call is None:
            content.append(text[start:pos])
        else:
            calls.append(_openai_call(len(calls), make_id(), *call))


def _without_stop(content: str, fmt: ToolCallFormat, calls: list) -> str:
    if calls and content.endswith(fmt.response_start):
        return content[:-len(fmt.response_start)]
    return content


def _held(text: str, fmt: ToolCallFormat) -> int:
    """How many characters at the end of `text` to hold back from content: what could begin a call
    marker, or a response_start (whole or begun) that may yet end the reply."""
    for k in range(min(len(text), max(len(fmt.call_start) - 1, len(fmt.response_start))), 0, -1):
        if fmt.call_start.startswith(text[-k:]) or fmt.response_start.startswith(text[-k:]):
            return k
    return 0


class ToolCallStream:
    """Parses a reply fed as text deltas: `feed` and `finish` return events, each {"content": str}
    or {"tool_call": {index, id, type, function: {name, arguments}}} (a whole call, sent when it
    closes).  Text that may begin a call marker is held back until it is known not to; the events
    of any split of a text add up to `parse_tool_calls` of the whole."""

    def __init__(self, fmt: ToolCallFormat | None, make_id: Callable[[], str] = new_call_id):
        self.fmt, self.make_id = fmt, make_id
        self.buffer, self.in_call, self.count, self.scanned = "", False, 0, 0
        self.passing = fmt is None  # text goes straight to content from now on

    def feed(self, delta: str) -> list[dict]:
        if self.passing:
            return [{"content": delta}] if delta else []
        self.buffer += delta
        if self.fmt.prompted:
            return self._prompted()
        events: list[dict] = []
        while self._step(events):
            pass
        return events

    def _step(self, events: list[dict]) -> bool:
        """Consumes what it can from the buffer; True if it should be called again."""
        fmt, buf = self.fmt, self.buffer
        if self.in_call:
            # Only the new text (and a marker begun before it) can hold the end: no rescans of a long call.
            end = buf.find(fmt.call_end, max(0, self.scanned - len(fmt.call_end) + 1))
            if end < 0:
                self.scanned = len(buf)
                return False
            self.scanned = 0
            call = read_call(buf[:end], fmt)
            self.buffer, self.in_call = buf[end + len(fmt.call_end):], False
            if call is None:
                _content(events, fmt.call_start + buf[:end + len(fmt.call_end)])
            else:
                events.append({"tool_call": _openai_call(self.count, self.make_id(), *call)})
                self.count += 1
            return True
        start = buf.find(fmt.call_start)
        if start >= 0:
            _content(events, buf[:start])
            self.buffer, self.in_call = buf[start + len(fmt.call_start):], True
            return True
        keep = _held(buf, fmt)
        _content(events, buf[:len(buf) - keep])
        self.buffer = buf[len(buf) - keep:]
        return False

    def _prompted(self) -> list[dict]:
        """Gemma 3: a reply that starts like JSON or a code fence is held whole (parsed at the end)."""
        head = self.buffer.lstrip()
        if not head or head[0] in "{[`":
            return []
        self.passing, events = True, []
        _content(events, self.buffer)
        self.buffer = ""
        return events

    def finish(self) -> list[dict]:
        """The events of what is left when the reply ends: an unclosed call or held text, as content."""
        events: list[dict] = []
        if self.fmt is not None and self.fmt.prompted and not self.passing:
            content, calls = parse_tool_calls(self.buffer, self.fmt, self.make_id)
            events += [{"tool_call": c} for c in calls]
            _content(events, content)
        elif not self.passing:
            rest = self.fmt.call_start + self.buffer if self.in_call else self.buffer
            _content(events, _without_stop(rest, self.fmt, [None] * self.count))
        self.buffer, self.in_call = "", False
        return events


def _content(events: list[dict], text: str) -> None:
    if text:
        events.append({"content": text})
