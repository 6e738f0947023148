"""Tool declarations in Gemma 4's and FunctionGemma's chat templates: an OpenAI `tools` entry as the text
between `<|tool>` and `<tool|>` (Gemma 4) or `<start_function_declaration>` and `<end_function_declaration>`.

The rules are those of the templates' `format_function_declaration` / `format_parameters` macros, quirks
included, since the models were trained on exactly this text (Gemma 4:
tests/fixtures/gemma4_chat_template/chat_template.jinja; FunctionGemma:
tests/fixtures/function_gemma_chat_template/chat_template.jinja; their sources are noted in
tests/test_tool_calls.py and tests/test_tool_function_gemma.py):

    declaration:NAME{description:Q D Q,parameters:{properties:{...},required:[...],type:Q OBJECT Q}}

* property keys are sorted case-insensitively (`dictsort`); types are upper-cased;
* the parameters' closing brace is written with their `type` only (no type: no brace, as the templates);
* a property's `description`, `enum` (strings), `items` (arrays), nested `properties` / `required`
  (objects) are kept; its other keys are dropped, as the templates drop them.

Where the two differ (the `Style`): Gemma 4 writes a description only when there is one, keeps
`nullable`, lists an object's schema keys only where it has no `properties`, and declares a `response`;
FunctionGemma writes `description:Q Q` for every property, has no `nullable` or `response`, and drops
every property named like a schema key (`description`, `type`, `properties`, `required`, `nullable`)
at every level, as its `format_parameters` filters them always.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .literals import format_value, sorted_items

QUOTE = '<|"|>'  # Gemma 4's string delimiter token (its tokenizer_config's escape_token)
_STANDARD = ("description", "type", "properties", "required", "nullable")


@dataclass(frozen=True)
class Style:
    """What one template writes differently (see the module docstring)."""

    quote: str  # the string delimiter token
    gemma4: bool  # Gemma 4's rules; False: FunctionGemma's


GEMMA4 = Style(QUOTE, True)
FUNCTION_GEMMA = Style("<escape>", False)


def _upper(value) -> str:
    # Jinja's `upper` filter prints a non-string first (a list as Python's repr, None as "None"),
    # then upper-cases it; a missing key is an undefined value, printed as "" (callers pass "").
    return str(value).upper()


def _quoted_list(items, style: Style) -> str:
    return "[" + ",".join(style.quote + str(i) + style.quote for i in items) + "]"


def _items(items: Mapping, style: Style) -> str:
    """An array's `items` schema (format_parameters' items branch)."""
    out = []
    for key, value in sorted_items(items):
        if value is None:
            continue
        if key == "properties":
            inner = format_parameters(value, False, style) if isinstance(value, Mapping) else ""
            out.append("properties:{" + inner + "}")
        elif key == "required":
            out.append("required:" + _quoted_list(value, style))
        elif key == "type":
            kind = value.upper() if isinstance(value, str) else [str(v).upper() for v in value]
            out.append("type:" + format_value(kind, style.quote))
        else:
            out.append(f"{key}:{format_value(value, style.quote)}")
    return "items:{" + ",".join(out) + "}"


def _property(value, style: Style) -> str:
    """One property's schema, without its name (the body of format_parameters' loop)."""
    if not isinstance(value, Mapping):
        value = {}  # e.g. `additionalProperties: false`: the template's lookups in it are all undefined
    kind, quote = _upper(value.get("type", "")), style.quote
    parts = []
    if not style.gemma4:  # FunctionGemma prints it always (a missing one as Jinja prints undefined: "")
        parts.append(f"description:{quote}{value.get('description', '')}{quote}")
    elif value.get("description"):
        parts.append(f"description:{quote}{value['description']}{quote}")
    if kind == "STRING" and value.get("enum"):
        parts.append("enum:" + format_value(value["enum"], quote))
    elif kind == "ARRAY" and isinstance(value.get("items"), Mapping) and value["items"]:
        parts.append(_items(value["items"], style))
    if value.get("nullable") and style.gemma4:
        parts.append("nullable:true")
    if kind == "OBJECT":
        if isinstance(value.get("properties"), Mapping):
            parts.append("properties:{" + format_parameters(value["properties"], False, style) + "}")
        else:  # the template then lists the object's own non-schema keys as its properties
            parts.append("properties:{" + format_parameters(value, True, style) + "}")
        if value.get("required"):
            parts.append("required:" + _quoted_list(value["required"], style))
    parts.append(f"type:{quote}{kind}{quote}}}")
    return ",".join(parts)


def format_parameters(properties: Mapping, filter_keys: bool, style: Style = GEMMA4) -> str:
    """`name:{...},...` for each property, sorted; `filter_keys` (always, for FunctionGemma) skips the
    schema's own keys."""
    filter_keys = filter_keys or not style.gemma4
    return ",".join(f"{key}:{{{_property(value, style)}" for key, value in sorted_items(properties)
                    if not (filter_keys and key in _STANDARD))


def format_declaration(function: Mapping, style: Style = GEMMA4) -> str:
    """An OpenAI tool's `function` object as the template's declaration text (trimmed, as the template)."""
    quote = style.quote
    out = f"declaration:{function['name']}{{description:{quote}{function.get('description') or ''}{quote}"
    params = function.get("parameters")
    if params:
        out += ",parameters:{"
        if params.get("properties"):
            out += "properties:{" + format_parameters(params["properties"], False, style) + "},"
        if params.get("required"):
            out += "required:" + _quoted_list(params["required"], style) + ","
        if params.get("type"):
            out += f"type:{quote}{_upper(params['type'])}{quote}}}"  # no type: no closing brace, as the template
    if "response" in function and style.gemma4:
        response = function["response"]
        out += ",response:{"
        if response.get("description"):
            out += f"description:{QUOTE}{response['description']}{QUOTE},"
        if _upper(response.get("type", "")) == "OBJECT":
            out += f"type:{QUOTE}OBJECT{QUOTE}}}"
    return (out + "}").strip()
