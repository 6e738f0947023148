"""FunctionGemma's chat format (google/functiongemma-270m-it), written out in code: a conversation with tools
as special-token ids and text.

The rules are those of its chat_template.jinja (tests/fixtures/function_gemma_chat_template, its source
noted in tests/test_tool_function_gemma.py), quirks included:

    <bos><start_of_turn>developer\\n{system, trimmed | "You are a model that can do function calling with
    the following functions"}{<start_function_declaration>declaration<end_function_declaration> per tool}
    <end_of_turn>\\n                                   (when there are tools or a system / developer message)
    <start_of_turn>user\\n{text, trimmed}<end_of_turn>\\n
    <start_of_turn>model\\n{text}<start_function_call>call:NAME{args}<end_function_call>...
    <start_function_response>response:NAME{value:<escape>...<escape>}<end_function_response>{next text}...

* a message with calls leaves the model's turn open; its responses follow in the same turn, and the next
  message after responses opens no turn of its own (whatever its role), as the template's
  `prev_message_type` rules;
* `<start_function_response>` after calls only when that message is the conversation's last (the
  template's `loop.last`), and then the generation prompt still opens a model turn;
* a tool result is `response:NAME{value:...}` for a string, the object's own fields for an object (or
  for `{"name", "response"}` the response's), each part of a list its own response; NAME is the tool
  message's `name`, else the called function its `tool_call_id` answers;
* declarations by mlx_gemma.tool_formats.declarations (FUNCTION_GEMMA style), values by literals'
  syntax with `<escape>` quotes.

Where the template would drop something in silence (an image part in a text-only model, a content
part of another type) this raises a typed error instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

from ..errors import GenerationError, TokenizerError
from ..json_input import json_type
from .checks import check_tools, tool_call_arguments
from .declarations import FUNCTION_GEMMA, format_declaration
from .literals import format_fields, format_value

QUOTE = FUNCTION_GEMMA.quote
# The template's default developer prompt when tools come without a system message.
DEFAULT_SYSTEM = "You are a model that can do function calling with the following functions"
PIECES = ("<start_function_declaration>", "<end_function_declaration>", "<start_function_call>", "<end_function_call>",
          "<start_function_response>", "<end_function_response>", QUOTE, "<start_of_turn>", "<end_of_turn>")
_SPLIT = re.compile("(" + "|".join(re.escape(p) for p in PIECES[:7]) + ")")
_SYSTEM = ("system", "developer")
_ROLES = ("user", "assistant", "model", *_SYSTEM, "tool")


def segments(messages, tools, add_generation_prompt: bool, bos: int, piece_id: Callable[[str], int | None],
             path: str | None = None) -> list:
    """The conversation as special-token ids (int) and text (str); `tools` are OpenAI function tools."""
    ids = {p: piece_id(p) for p in PIECES}
    missing = [p for p, i in ids.items() if i is None]
    if missing:
        raise TokenizerError(path, f"vocabulary has no {missing[0]}: not a FunctionGemma vocabulary")
    messages = _checked(messages)
    tools = check_tools(tools)
    sot, eot = ids["<start_of_turn>"], ids["<end_of_turn>"]
    out: list = [bos]
    rest = messages
    if tools or messages[0]["role"] in _SYSTEM:
        out += [sot, "developer\n"]
        if messages[0]["role"] in _SYSTEM:
            out.append(_system_text(messages[0]["content"]))
            rest = messages[1:]
        else:
            out.append(DEFAULT_SYSTEM)
        for tool in tools:
            out += [ids["<start_function_declaration>"],
                    *_pieces(format_declaration(tool["function"], FUNCTION_GEMMA).strip(), ids),
                    ids["<end_function_declaration>"]]
        out += [eot, "\n"]
    offset, prev = len(messages) - len(rest), None
    for i, m in enumerate(rest):
        index, role = i + offset, "model" if m["role"] == "assistant" else m["role"]
        if role != "tool":
            if prev != "tool_response":
                out += [sot, f"{role}\n"]
            prev = None
            if m.get("content") is not None:
                out.append(_content_text(m["content"], index))
                prev = "content"
            calls = tool_call_arguments(m.get("tool_calls"), index) if m.get("tool_calls") else []
            if calls:
                for name, arguments in calls:
                    out += [ids["<start_function_call>"], *_pieces(f"call:{name}{{{format_fields(arguments, QUOTE)}}}",
                                                                    ids), ids["<end_function_call>"]]
                if i == len(rest) - 1:
                    out.append(ids["<start_function_response>"])
                prev = "tool_call"
        else:
            out += _responses(m, _called_name(rest, i), index, ids)
            prev = "tool_response"
        if prev not in ("tool_call", "tool_response"):
            out += [eot, "\n"]
    if add_generation_prompt and prev != "tool_response":
        out += [sot, "model\n"]
    return out


def _checked(messages) -> list[Mapping]:
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence) or not messages:
        raise GenerationError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or m.get("role") not in _ROLES:
            raise GenerationError(f"message {i} must be a dict whose 'role' is one of {', '.join(_ROLES)}")
    return list(messages)


def _pieces(text: str, ids: dict) -> list:
    """Template text of the tool syntax, its FunctionGemma pieces as their ids."""
    return [ids[part] if k % 2 else part for k, part in enumerate(_SPLIT.split(text)) if k % 2 or part]


def _system_text(content) -> str:
    # Text parts trimmed and joined with nothing between them, as the template writes them.
    if isinstance(content, str):
        return content.strip()
    if isinstance(content, Sequence):
        return "".join(p["text"].strip() for p in content if isinstance(p, Mapping) and p.get("type") == "text"
                       and isinstance(p.get("text"), str))
    return ""


def _content_text(content, index: int) -> str:
    if isinstance(content, str):
        return content.strip()
    if not isinstance(content, Sequence) or isinstance(content, Mapping):
        raise GenerationError(f"message {index}: content must be a string or a list of parts, "
                              f"found {json_type(content)}")
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text" and isinstance(part.get("text"), str):
            out.append(part["text"].strip())
        else:  # FunctionGemma is text only: an image would be a marker with nothing behind it
            raise GenerationError(f"message {index}: content part {j}: FunctionGemma takes text parts only, "
                                  f"got {part!r:.60}")
    return "".join(out)


def _called_name(messages: list[Mapping], i: int) -> str | None:
    """The function a tool message answers: its `name`, else the call its `tool_call_id` names."""
    m = messages[i]
    if isinstance(m.get("name"), str):
        return m["name"].strip()
    for earlier in reversed(messages[:i]):
        for call in earlier.get("tool_calls") or []:
            if isinstance(call, Mapping) and call.get("id") is not None and call.get("id") == m.get("tool_call_id"):
                return str(call["function"]["name"]).strip()
    return None


def _responses(m: Mapping, name: str | None, index: int, ids: dict) -> list:
    content = m.get("content")
    if not content:
        return []
    if isinstance(content, Mapping):
        items = [content]
    elif isinstance(content, str):
        if name is None:
            raise GenerationError(f"message {index}: tool use: a tool message needs a 'name' or a 'tool_call_id' "
                                  "of an earlier call")
        return _response(name, "value:" + format_value(content, QUOTE, quote_keys=False), ids)
    elif isinstance(content, Sequence):
        items = list(content)
    else:
        raise GenerationError(f"message {index}: a tool message's content must be a string, an object or a list "
                              f"of objects, found {json_type(content)}")
    out = []
    for item in items:
        if not isinstance(item, Mapping):
            raise GenerationError(f"message {index}: each part of a tool result must be an object")
        if "name" in item and "response" in item and isinstance(item["response"], Mapping):
            out += _response(str(item["name"]).strip(), format_fields(item["response"], QUOTE), ids)
        elif name is not None:
            out += _response(name, format_fields(item, QUOTE), ids)
        else:
            raise GenerationError(f"message {index}: tool use: a tool result needs a 'name' (the message's, or "
                                  "{'name', 'response'}) or a 'tool_call_id' of an earlier call")
    return out


def _response(name: str, body: str, ids: dict) -> list:
    return [ids["<start_function_response>"], *_pieces(f"response:{name}{{{body}}}", ids),
            ids["<end_function_response>"]]
