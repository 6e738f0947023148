"""Gemma 4's tool declarations: an OpenAI `tools` entry as the text between `<|tool>` and `<tool|>`.

The rules are those of the `format_function_declaration` / `format_parameters` macros of Google's
Gemma 4 chat template (tests/fixtures/gemma4_chat_template/chat_template.jinja, its source noted in
tests/test_tool_calls.py), quirks included, since the model was trained on exactly this text:

    declaration:NAME{description:<|"|>D<|"|>,parameters:{properties:{...},required:[...],type:<|"|>OBJECT<|"|>}}

* property keys are sorted case-insensitively (`dictsort`); types are upper-cased;
* the parameters' closing brace is written with their `type` only (no type: no brace, as the template);
* a property's `description`, `enum` (strings), `items` (arrays), `nullable`, nested `properties` /
  `required` (objects) are kept; its other keys are dropped, as the template drops them.
"""

from __future__ import annotations

from collections.abc import Mapping

from .literals import format_value, sorted_items

QUOTE = '<|"|>'  # Gemma 4's string delimiter token (its tokenizer_config's escape_token)
_STANDARD = ("description", "type", "properties", "required", "nullable")


def _upper(value) -> str:
    # Jinja's `upper` filter prints a non-string first (a list as Python's repr, None as "None"),
    # then upper-cases it; a missing key is an undefined value, printed as "" (callers pass "").
    return str(value).upper()


def _quoted_list(items) -> str:
    return "[" + ",".join(QUOTE + str(i) + QUOTE for i in items) + "]"


def _items(items: Mapping) -> str:
    """An array's `items` schema (format_parameters' items branch)."""
    out = []
    for key, value in sorted_items(items):
        if value is None:
            continue
        if key == "properties":
            inner = format_parameters(value, filter_keys=False) if isinstance(value, Mapping) else ""
            out.append("properties:{" + inner + "}")
        elif key == "required":
            out.append("required:" + _quoted_list(value))
        elif key == "type":
            kind = value.upper() if isinstance(value, str) else [str(v).upper() for v in value]
            out.append("type:" + format_value(kind, QUOTE))
        else:
            out.append(f"{key}:{format_value(value, QUOTE)}")
    return "items:{" + ",".join(out) + "}"


def _property(value) -> str:
    """One property's schema, without its name (the body of format_parameters' loop)."""
    if not isinstance(value, Mapping):
        value = {}  # e.g. `additionalProperties: false`: the template's lookups in it are all undefined
    kind = _upper(value.get("type", ""))
    parts = []
    if value.get("description"):
        parts.append(f"description:{QUOTE}{value['description']}{QUOTE}")
    if kind == "STRING" and value.get("enum"):
        parts.append("enum:" + format_value(value["enum"], QUOTE))
    elif kind == "ARRAY" and isinstance(value.get("items"), Mapping) and value["items"]:
        parts.append(_items(value["items"]))
    if value.get("nullable"):
        parts.append("nullable:true")
    if kind == "OBJECT":
        if isinstance(value.get("properties"), Mapping):
            parts.append("properties:{" + format_parameters(value["properties"], filter_keys=False) + "}")
        else:  # the template then lists the object's own non-schema keys as its properties
            parts.append("properties:{" + format_parameters(value, filter_keys=True) + "}")
        if value.get("required"):
            parts.append("required:" + _quoted_list(value["required"]))
    parts.append(f"type:{QUOTE}{kind}{QUOTE}}}")
    return ",".join(parts)


def format_parameters(properties: Mapping, filter_keys: bool) -> str:
    """`name:{...},...` for each property, sorted; `filter_keys` skips the schema's own keys."""
    return ",".join(f"{key}:{{{_property(value)}" for key, value in sorted_items(properties)
                    if not (filter_keys and key in _STANDARD))


def format_declaration(function: Mapping) -> str:
    """An OpenAI tool's `function` object as Gemma 4's declaration text (trimmed, as the template)."""
    out = f"declaration:{function['name']}{{description:{QUOTE}{function.get('description') or ''}{QUOTE}"
    params = function.get("parameters")
    if params:
        out += ",parameters:{"
        if params.get("properties"):
            out += "properties:{" + format_parameters(params["properties"], filter_keys=False) + "},"
        if params.get("required"):
            out += "required:" + _quoted_list(params["required"]) + ","
        if params.get("type"):
            out += f"type:{QUOTE}{_upper(params['type'])}{QUOTE}}}"  # no type: no closing brace, as the template
    if "response" in function:
        response = function["response"]
        out += ",response:{"
        if response.get("description"):
            out += f"description:{QUOTE}{response['description']}{QUOTE},"
        if _upper(response.get("type", "")) == "OBJECT":
            out += f"type:{QUOTE}OBJECT{QUOTE}}}"
    return (out + "}").strip()
