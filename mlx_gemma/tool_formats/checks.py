"""Checks of OpenAI tool-calling input shared by every format: `tools` and an assistant's `tool_calls`.

Each problem is a GenerationError naming the field (`tools[1].function.name`, `message 2: tool use:
tool_calls[0].function.arguments`), never an assertion or a silent drop.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence

from ..errors import GenerationError
from ..json_input import json_type

_NAME = re.compile(r"[A-Za-z0-9_\-.]{1,64}")  # OpenAI's function-name rule (plus '.')


def check_tools(tools) -> list[dict]:
    """OpenAI `tools` as a list of {"type": "function", "function": {...}}; a typed error naming the
    field for anything else (not a list, no name, a duplicate name, parameters that are no JSON
    schema of an object)."""
    if tools is None:
        return []
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise GenerationError(f"tools must be a list of function tools, found {json_type(tools)}")
    seen: set = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function":
            raise GenerationError(f"{where} must be {{'type': 'function', 'function': {{...}}}}")
        function = tool.get("function")
        if not isinstance(function, Mapping):
            raise GenerationError(f"{where}.function must be an object, found {json_type(function)}")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise GenerationError(f"{where}.function.name must be 1-64 letters, digits, '_', '-' or '.', got {name!r}")
        if name in seen:
            raise GenerationError(f"{where}.function.name {name!r} is declared twice")
        seen.add(name)
        if not isinstance(function.get("description", ""), str):
            raise GenerationError(f"{where}.function.description must be a string")
        _check_schema(function.get("parameters"), f"{where}.function.parameters")
    return [dict(t, type="function") for t in tools]


def _check_schema(schema, where: str) -> None:
    """A JSON schema of an object (or absent): an object whose `properties` are schemas themselves."""
    if schema is None:
        return
    if not isinstance(schema, Mapping):
        raise GenerationError(f"{where} must be a JSON schema object, found {json_type(schema)}")
    if schema.get("type", "object") != "object":
        raise GenerationError(f"{where}.type must be 'object' (a function takes named arguments), "
                              f"got {schema.get('type')!r}")
    properties = schema.get("properties", {})
    if not isinstance(properties, Mapping) or not all(isinstance(v, Mapping) for v in properties.values()):
        raise GenerationError(f"{where}.properties must map each argument name to a JSON schema object")
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise GenerationError(f"{where}.required must be a list of argument names")


def tool_call_arguments(calls, index: int) -> list[tuple[str, dict]]:
    """An assistant message's OpenAI `tool_calls` as (name, arguments) pairs; `arguments` may be the
    JSON string OpenAI sends or an object (as the template takes it)."""
    if not calls:
        return []
    if isinstance(calls, (str, Mapping)) or not isinstance(calls, Sequence):
        raise GenerationError(f"message {index}: tool use: 'tool_calls' must be a list, found {json_type(calls)}")
    out = []
    for j, call in enumerate(calls):
        where = f"message {index}: tool use: tool_calls[{j}]"
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) or not function["name"]:
            raise GenerationError(f"{where} needs a 'function' with a non-empty string 'name'")
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError as e:
                raise GenerationError(f"{where}.function.arguments is not JSON: {e}") from None
        if not isinstance(arguments, Mapping):
            raise GenerationError(f"{where}.function.arguments must be a JSON object, found {json_type(arguments)}")
        out.append((function["name"], dict(arguments)))
    return out
