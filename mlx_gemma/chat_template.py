"""Gemma 4's chat format, written out in code: a conversation as special-token ids and text.

`GemmaTokenizer.apply_chat_template` renders Gemma 1-3's `<start_of_turn>` format itself and
Gemma 4's through `gemma4_segments` here; neither runs a checkpoint's Jinja.  The rules are those
of Google's Gemma 4 chat template (the "Canonical Chat Template" of 2026-07-09, as shipped in the
gemma-4-*-it folders' chat_template.jinja; for tools, the copy in
tests/fixtures/gemma4_chat_template, its source noted in tests/test_tool_calls.py):

    <bos><|turn>system\\n[<|think|>\\n]{system, trimmed}{<|tool>declaration<tool|> per tool}<turn|>\\n
    <|turn>user\\n{text, trimmed; <|image|> <|audio|> <|video|> for media parts}<turn|>\\n
    <|turn>model\\n{reply without its <|channel>...<channel|> thoughts, trimmed}<turn|>\\n
    <|turn>model\\n[<|channel>thought\\n<channel|>]                  (add_generation_prompt)

* `assistant` is rendered as the role `model`; consecutive assistant messages are one model turn.
* `enable_thinking` (default False, as the template's `enable_thinking | default(false)`) puts
  `<|think|>` first in the system turn.  With thinking off, the 26B / 31B templates close an empty
  thought channel after the generation prompt while the E2B / E4B ones do not (`empty_thought`).
* An assistant message's `reasoning` / `reasoning_content` after the last user message is kept
  as `<|channel>thought\\n...\\n<channel|>`; earlier thoughts are dropped, as the template does.
* Tools (OpenAI `tools`, checked by mlx_gemma.tool_calls.check_tools) are declared in the system
  turn.  An assistant message's `tool_calls` become `<|tool_call>call:NAME{args}<tool_call|>` and
  the `tool` messages right after it `<|tool_response>response:NAME{value:...}<tool_response|>`
  in the same model turn, NAME found by `tool_call_id`; a call with no response yet ends the
  prompt with `<|tool_response>` (the model's stop piece) and no new model turn.  The value syntax
  is mlx_gemma.tool_formats.literals' (strings between `<|"|>` tokens).  A `tool` message that
  follows no call is a typed error: the template would drop it in silence.

The same module holds what both formats check: the message list and the text's Unicode.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .errors import GenerationError, TokenizerError
from .json_input import json_type
from .tool_formats.checks import check_tools, tool_call_arguments
from .tool_formats.declarations import QUOTE, format_declaration
from .tool_formats.literals import format_fields, format_value

# The turn markers that tell a Gemma 4 vocabulary from Gemma 1-3's <start_of_turn> / <end_of_turn>.
GEMMA4_TURN, GEMMA4_END_TURN = "<|turn>", "<turn|>"
# What a Gemma 4 model may end a reply with: transformers' generation_config for Gemma 4 lists
# <eos>, <turn|> and <|tool_response> (transformers 5.25 modeling_gguf_pytorch_utils.py).
GEMMA4_STOP_PIECES = ("<turn|>", "<|tool_response>")
# The generation prompt of a template that closes an empty thought channel (26B / 31B), as it
# appears in the Jinja source, with its newline escaped or not.
_EMPTY_THOUGHT_MARKS = ("<|channel>thought\\n<channel|>", "<|channel>thought\n<channel|>")
_SYSTEM_ROLES = ("system", "developer")
_ROLES = ("user", "assistant", "model", *_SYSTEM_ROLES)
# Content-part types and the placeholder each becomes (the OpenAI-style names the template accepts too).
_MEDIA_PIECES = {"image": "<|image|>", "image_url": "<|image|>", "audio": "<|audio|>",
                 "input_audio": "<|audio|>", "video": "<|video|>"}
# The pieces of Gemma 4's tool syntax: each is one token (its tokenizer_config's std/etd, stc/etc,
# str/etr and escape tokens), so template text holding them is split into their ids.
TOOL_PIECES = ("<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", QUOTE)
_TOOL_SPLIT = re.compile("(" + "|".join(re.escape(p) for p in TOOL_PIECES) + ")")
# What a message's type is after it, as the template's ns.prev_message_type: after a call awaiting
# its response, or after responses, the generation prompt opens no new model turn.
_CALL, _RESPONSE = "tool_call", "tool_response"


@dataclass(frozen=True)
class Gemma4Vocab:
    """The ids Gemma 4's format uses; a piece the vocabulary lacks is None."""

    bos: int  # <bos>
    turn: int  # <|turn>: opens a turn, followed by the role and "\n"
    end_turn: int  # <turn|>: closes a turn, followed by "\n"
    think: int | None  # <|think|>: thinking mode on, first in the system turn
    channel: int | None  # <|channel>: opens a thought ("thought\n...")
    end_channel: int | None  # <channel|>: closes it
    media: dict  # {"<|image|>": id or None, "<|audio|>": ..., "<|video|>": ...}
    tools: dict = field(default_factory=dict)  # each of TOOL_PIECES: id or None

    @classmethod
    def from_lookup(cls, bos: int, piece_id: Callable[[str], int | None]) -> Gemma4Vocab | None:
        """The ids through `piece_id` (None for a missing piece); None if this is no Gemma 4 vocabulary."""
        turn, end_turn = piece_id(GEMMA4_TURN), piece_id(GEMMA4_END_TURN)
        if turn is None or end_turn is None:
            return None
        media = {p: piece_id(p) for p in set(_MEDIA_PIECES.values())}
        return cls(bos, turn, end_turn, piece_id("<|think|>"), piece_id("<|channel>"), piece_id("<channel|>"), media,
                   {p: piece_id(p) for p in TOOL_PIECES})


def primes_empty_thought(template: str) -> bool:
    """Whether a Gemma 4 chat template (Jinja source) opens the model's turn with an empty thought
    channel when thinking is off: the 26B / 31B templates do, the E2B / E4B ones do not."""
    return any(mark in template for mark in _EMPTY_THOUGHT_MARKS)


def check_unicode(text: str, what: str) -> str:
    """`text`, if SentencePiece can take it: a lone surrogate (from JSON's "\\ud800", or
    surrogateescape'd bytes) has no UTF-8 form."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise GenerationError(f"{what} is not valid Unicode: {e.reason} at position {e.start}") from None
    return text


def check_messages(messages) -> list[Mapping]:
    """`messages` as a list, if it is a non-empty list of dicts with a string 'role' and a 'content'."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Iterable):
        raise GenerationError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts, "
                              f"got {type(messages).__name__}")
    messages = list(messages)
    if not messages:
        raise GenerationError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise GenerationError(f"message {i} must be a dict with 'role' and 'content'")
        if not isinstance(m["role"], str):
            raise GenerationError(f"message {i}: 'role' must be a string, found {json_type(m['role'])}")
    return messages


def gemma4_segments(vocab: Gemma4Vocab, messages, add_generation_prompt: bool, enable_thinking: bool,
                    empty_thought: bool, path: str | None, tools=None) -> list:
    """The conversation in Gemma 4's format, as a list of special-token ids (int) and text (str);
    `tools` are OpenAI tool declarations (a list of {"type": "function", "function": {...}})."""
    messages = check_messages(messages)
    _check_roles(messages)
    tools = check_tools(tools)
    if enable_thinking and vocab.think is None:
        raise TokenizerError(path, "vocabulary has no <|think|>: this model has no thinking mode")
    segments: list = [vocab.bos]
    rest, system = messages, messages[0]["role"] in _SYSTEM_ROLES
    if enable_thinking or system or tools:
        segments += [vocab.turn, "system\n"]
        if enable_thinking:
            segments += [vocab.think, "\n"]
        if system:
            segments += _system_content(messages[0]["content"])
            rest = messages[1:]
        for tool in tools:
            segments += tool_pieces(vocab, "<|tool>" + format_declaration(tool["function"]) + "<tool|>", path)
        segments += [vocab.end_turn, "\n"]
    offset = len(messages) - len(rest)
    last_user = max((i for i, m in enumerate(rest) if m["role"] == "user"), default=-1)
    answered: set = set()  # the tool messages rendered as responses
    last = None
    for i, m in enumerate(rest):
        if m["role"] != "tool":
            turn, last = _turn(vocab, rest, i, i > last_user, offset, path, answered)
            segments += turn
    stray = [i + offset for i, m in enumerate(rest) if m["role"] == "tool" and i not in answered]
    if stray:
        raise GenerationError(f"message {stray[0]}: tool use: a 'tool' message must follow an assistant message "
                              "with 'tool_calls' (and other 'tool' messages); the template would drop it")
    if add_generation_prompt and last not in (_CALL, _RESPONSE):
        segments += [vocab.turn, "model\n"]
        if empty_thought and not enable_thinking:
            segments += _thought(vocab, "", path)
    return segments


def tool_pieces(vocab: Gemma4Vocab, text: str, path: str | None) -> list:
    """Template text of the tool syntax, its TOOL_PIECES as their ids (as the reference tokenizes them)."""
    out: list = []
    for k, part in enumerate(_TOOL_SPLIT.split(check_unicode(text, f"tool use: {text[:40]!r}"))):
        if k % 2 == 0:
            if part:
                out.append(part)
        elif vocab.tools.get(part) is None:
            raise TokenizerError(path, f"vocabulary has no {part}: this model has no tool use")
        else:
            out.append(vocab.tools[part])
    return out


def _check_roles(messages: list[Mapping]) -> None:
    for i, m in enumerate(messages):
        if m["role"] not in (*_ROLES, "tool"):
            raise GenerationError(f"message {i} has role {m['role']!r}; Gemma 4's roles are "
                                  f"{', '.join(_ROLES)}, tool")
        if m["role"] not in ("assistant", "model") and (m.get("tool_calls") or m.get("tool_responses")):
            raise GenerationError(f"message {i}: tool use: only an assistant message has 'tool_calls' / "
                                  "'tool_responses'")


def _system_content(content) -> list:
    # A list of parts: each text trimmed and followed by a space, as the template joins them.
    if isinstance(content, str):
        return [check_unicode(content, "message 0: 'content'").strip()]
    if not isinstance(content, Sequence) or not all(
            isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        raise GenerationError("message 0: a system message's content must be a string or a list of text parts")
    return [check_unicode(p["text"], f"message 0: content part {j}'s 'text'").strip() + " "
            for j, p in enumerate(content)]


def _turn(vocab: Gemma4Vocab, messages: list[Mapping], i: int, after_last_user: bool, offset: int,
          path: str | None, answered: set) -> tuple[list, str | None]:
    """One message's turn, and its type for what follows (_CALL, _RESPONSE or None).  Consecutive
    assistant messages share a turn, tool messages between them aside: the template does not open
    the second (its `continue_same_model_turn`), nor close the first (`continues_into_next`)."""
    m, index = messages[i], i + offset
    role = "model" if m["role"] == "assistant" else m["role"]
    before = next((p["role"] for p in reversed(messages[:i]) if p["role"] != "tool"), None)
    after = messages[i + 1]["role"] if i + 1 < len(messages) else None
    out: list = [] if role == "model" and before == "assistant" else [vocab.turn, f"{role}\n"]
    thought = m.get("reasoning") or m.get("reasoning_content")
    # The tools template keeps thoughts only beside tool calls; the tool-free rules kept here (and
    # tested in test_gemma4_chat.py) keep any after the last user message: the same for a call.
    if thought and after_last_user:
        if not isinstance(thought, str):
            raise GenerationError(f"message {index}: 'reasoning' must be a string, found {json_type(thought)}")
        out += _thought(vocab, f"{check_unicode(thought, f'message {index}: reasoning')}\n", path)
    calls = tool_call_arguments(m.get("tool_calls"), index)
    kind = _CALL if calls else None
    for name, arguments in calls:
        out += tool_pieces(vocab, f"<|tool_call>call:{name}{{{format_fields(arguments, QUOTE)}}}<tool_call|>", path)
    responses = _responses(vocab, messages, i, offset, calls, path, answered)
    out += responses
    kind = _RESPONSE if responses else kind
    body = [] if m["content"] is None and role == "model" else _content(vocab, m["content"], role == "model",
                                                                         index, path)
    out += body
    if any(isinstance(s, int) for s in body):
        kind = "media"  # the template's prev_message_type becomes the last media part's type
    if kind == _CALL:
        out.append(vocab.tools["<|tool_response>"])  # the model's turn goes on with the response
    elif responses and not any(isinstance(s, int) or s.strip() for s in body):
        pass  # the template keeps the turn open after responses with no text
    elif not (role == "model" and after == "assistant" and not calls):
        out += [vocab.end_turn, "\n"]
    return out, kind


def _responses(vocab: Gemma4Vocab, messages: list[Mapping], i: int, offset: int, calls: list, path: str | None,
               answered: set) -> list:
    """The responses rendered in message i's turn: its own `tool_responses` (Google's native form), or
    else, after `tool_calls`, the run of `tool` messages that follows it (OpenAI's form)."""
    m = messages[i]
    if m.get("tool_responses"):
        if not isinstance(m["tool_responses"], Sequence) or not all(isinstance(r, Mapping)
                                                                    for r in m["tool_responses"]):
            raise GenerationError(f"message {i + offset}: tool use: 'tool_responses' must be a list of objects")
        return sum((_response(vocab, str(r.get("name", "unknown")), r.get("response"), path)
                    for r in m["tool_responses"]), [])
    out: list = []
    k = i + 1
    while calls and k < len(messages) and messages[k]["role"] == "tool":
        follow, name = messages[k], messages[k].get("name", "unknown")
        for call in m["tool_calls"]:  # the template: the last call whose id is this message's tool_call_id
            if call.get("id") == follow.get("tool_call_id"):
                name = call["function"]["name"]
        body = follow["content"]
        if isinstance(body, str):
            out += _response(vocab, name, check_unicode(body, f"message {k + offset}: 'content'"), path)
        elif isinstance(body, Sequence) and not isinstance(body, Mapping):
            text = "".join(p.get("text", "") for p in body if isinstance(p, Mapping) and p.get("type") == "text")
            out += _response(vocab, name, text, path)
            out += [vocab.media[_MEDIA_PIECES[p["type"]]] for p in body
                    if isinstance(p, Mapping) and p.get("type") in ("image", "audio", "video")]
        else:
            out += _response(vocab, name, body, path)
        answered.add(k)
        k += 1
    return out


def _response(vocab: Gemma4Vocab, name: str, response, path: str | None) -> list:
    # The template's format_tool_response_block: an object's fields, anything else as `value`.
    body = format_fields(response, QUOTE) if isinstance(response, Mapping) else \
        "value:" + format_value(response, QUOTE, quote_keys=False)
    return tool_pieces(vocab, f"<|tool_response>response:{name}{{{body}}}<tool_response|>", path)


def _thought(vocab: Gemma4Vocab, text: str, path: str | None) -> list:
    if vocab.channel is None or vocab.end_channel is None:
        raise TokenizerError(path, "vocabulary has no <|channel>/<channel|>: this model has no thought channel")
    return [vocab.channel, "thought\n" + text, vocab.end_channel]


def _content(vocab: Gemma4Vocab, content, model: bool, index: int, path: str | None) -> list:
    if isinstance(content, str):
        return [_text(content, model, f"message {index}: 'content'")]
    if not isinstance(content, Sequence):
        raise GenerationError(f"message {index}: content must be a string or a list of parts, "
                              f"found {json_type(content)}")
    out: list = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text" and isinstance(part.get("text"), str):
            out.append(_text(part["text"], model, f"message {index}: content part {j}'s 'text'"))
        elif kind in _MEDIA_PIECES:
            piece = _MEDIA_PIECES[kind]
            if vocab.media[piece] is None:
                raise TokenizerError(path, f"vocabulary has no {piece}: this model cannot take {kind} parts")
            out.append(vocab.media[piece])
        else:
            raise GenerationError(f"message {index}: unsupported content part {j}: {part!r:.80}")
    return out


def _text(text: str, model: bool, what: str) -> str:
    """A text, trimmed; in a model turn without its thoughts (the template's strip_thinking:
    of each piece ending at <channel|>, what comes before its <|channel>)."""
    check_unicode(text, what)
    if model:
        text = "".join(part.split("<|channel>")[0] for part in text.split("<channel|>"))
    return text.strip()
