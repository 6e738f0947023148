"""Grammars for tool calls in a model's own syntax, as llguidance Lark text (plain strings, no engine here).

A forced tool call (`tool_choice` "required" or a named function) must come out whole and well formed,
its arguments valid against the tool's JSON schema; with `response_format` and tools the reply is a
call or a JSON answer.  mlx_gemma.grammar turns the text made here into a logits processor.

* Gemma 4 / FunctionGemma (`literal_calls`): `<start>call:NAME{key:value,...}<end>`, the markers and the
  string quote each one special token (written `<[id]>`), keys bare and sorted as the chat templates
  sort them (Jinja's dictsort), strings between quote tokens.  The schema is compiled here into rules
  of that syntax; a keyword the syntax cannot enforce here (see SUPPORTED) is refused by name when the
  call is forced (`strict`), and dropped when it only shapes an optional call (tool_choice auto).
  String values never hold the text of the quote or of the call markers: the parser reads decoded
  text, where such text would end the string or the call early.
* Gemma 1-3's prompted JSON (`json_calls`): each call a JSON object `{"name": ..., "parameters": ...}`
  on its own line, by llguidance's own JSON-schema compiler (`%json`), so every keyword it supports holds.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from ..errors import GenerationError
from .literals import sorted_items

# Keywords enforced in the literal syntax; ANNOTATIONS change nothing a value may be.
SUPPORTED = ("type", "enum", "const", "anyOf", "properties", "required", "additionalProperties", "items",
             "minItems", "maxItems", "minLength", "maxLength")
# Keywords that change nothing a value may be.  OpenAPI's `nullable` is one here: JSON Schema validators
# do not read it, so a null it would allow could fail them.
ANNOTATIONS = ("title", "description", "default", "examples", "$comment", "deprecated", "readOnly", "writeOnly",
               "$schema", "$id", "nullable")
_TYPES = ("string", "integer", "number", "boolean", "null", "object", "array")
_INTEGER = r"-?(0|[1-9][0-9]*)"
_NUMBER = _INTEGER + r"(\.[0-9]+)?([eE][+-]?[0-9]+)?"
_KEY_FORBIDDEN = set(":,{}[]")  # the parser ends a bare key at these
# Whitespace in the JSON: a call's as the prompt shows calls (json.dumps: one space after ':' and ','),
# an answer's as grammar.py's response_format (bounded: see its comment); unknown keywords refused.
_CALL_OPTIONS = {"whitespace_pattern": "[ ]?", "lenient": False}
_ANSWER_OPTIONS = {"whitespace_pattern": r"\n?[ ]{0,20}", "lenient": False}


def _lark_string(text: str) -> str:
    return json.dumps(text)  # llguidance reads a Lark string literal as a JSON string


def _regex_literal(text: str) -> str:
    # Every non-alphanumeric character as \x{..}: `\<` and friends mean something in llguidance's regexes.
    return "".join(c if c.isalnum() and c.isascii() else f"\\x{{{ord(c):x}}}" for c in text)


class _Rules:
    """Collects Lark rules for values of JSON schemas in the literal call syntax."""

    def __init__(self, quote: int, forbidden: Sequence[str], strict: bool, syntax: str):
        self.quote, self.strict, self.syntax = f"<[{quote}]>", strict, syntax
        self.forbidden = tuple(forbidden)
        self.lines: list[str] = []
        self.count = 0
        self.any_value: str | None = None

    def new(self, body: str, terminal: bool = False) -> str:
        name = f"{'T' if terminal else 'r'}{self.count}"
        self.count += 1
        self.lines.append(f"{name}: {body}")
        return name

    def refuse(self, where: str, what: str):
        raise GenerationError(f"{where}: {what} cannot be enforced in {self.syntax}'s call syntax (mlx_gemma "
                              f"enforces {', '.join(SUPPORTED)} there)")

    # ----- scalars --------------------------------------------------------------------------------------

    def text(self, low: int = 0, high: int | None = None) -> str:
        """A string's characters: `low`..`high` of them, none of the forbidden texts inside."""
        count = f"{{{low},{'' if high is None else high}}}"
        banned = "|".join(_regex_literal(t) for t in self.forbidden)
        return self.new(f"/(?s:.){count}/ & ~/(?s:.)*({banned})(?s:.)*/", terminal=True)

    def literal(self, value, where: str) -> str:
        """One JSON value as the exact text the syntax writes for it (enum / const)."""
        if isinstance(value, str):
            if any(t in value for t in self.forbidden):
                raise GenerationError(f"{where}: the string {value[:40]!r} holds a marker of {self.syntax}'s syntax")
            return f"{self.quote} {_lark_string(value)} {self.quote}" if value else f"{self.quote} {self.quote}"
        if isinstance(value, bool):
            return '"true"' if value else '"false"'
        if value is None:
            return '"null"'
        if isinstance(value, (int, float)):
            return _lark_string(json.dumps(value))
        if isinstance(value, Mapping):
            fields = [f'{self.key(k, where)} ":" {self.literal(v, where)}' for k, v in sorted_items(value)]
            return '"{" ' + ' "," '.join(fields) + ' "}"' if fields else '"{}"'
        if isinstance(value, list):
            items = [self.literal(v, where) for v in value]
            return '"[" ' + ' "," '.join(items) + ' "]"' if items else '"[]"'
        raise GenerationError(f"{where}: {value!r:.40} is no JSON value")

    def key(self, key: str, where: str) -> str:
        if not key or _KEY_FORBIDDEN & set(key) or key != key.strip() or any(t in key for t in self.forbidden):
            raise GenerationError(f"{where}: the property name {key!r:.40} cannot be written bare in "
                                  f"{self.syntax}'s call syntax")
        return _lark_string(key)

    # ----- schemas --------------------------------------------------------------------------------------

    def value(self, schema, where: str) -> str:
        """A rule (or expression) for the values `schema` allows."""
        if schema is True or schema == {}:
            return self.anything()
        if not isinstance(schema, Mapping):
            raise GenerationError(f"{where} must be a JSON schema (an object or true), got {schema!r:.40}")
        for key in schema:
            if key not in SUPPORTED and key not in ANNOTATIONS and self.strict:
                self.refuse(where, f"the keyword {key!r}")
        if "const" in schema:
            return self.literal(schema["const"], f"{where}.const")
        if "enum" in schema:
            if not isinstance(schema["enum"], list) or not schema["enum"]:
                raise GenerationError(f"{where}.enum must be a non-empty list")
            return "(" + " | ".join(self.literal(v, f"{where}.enum") for v in schema["enum"]) + ")"
        if "anyOf" in schema:
            if not isinstance(schema["anyOf"], list) or not schema["anyOf"]:
                raise GenerationError(f"{where}.anyOf must be a non-empty list")
            rest = {k: v for k, v in schema.items() if k != "anyOf"}
            return "(" + " | ".join(self.value({**rest, **s} if isinstance(s, Mapping) else s, f"{where}.anyOf[{i}]")
                                    for i, s in enumerate(schema["anyOf"])) + ")"
        kinds = schema.get("type", _implied_type(schema))
        kinds = [kinds] if isinstance(kinds, str) else list(kinds) if isinstance(kinds, list) else None
        if not kinds or any(k not in _TYPES for k in kinds):
            raise GenerationError(f"{where}.type must be one of {', '.join(_TYPES)} (or a list of them), "
                                  f"got {schema.get('type')!r:.40}")
        return "(" + " | ".join(self.typed(kind, schema, where) for kind in kinds) + ")" if len(kinds) > 1 \
            else self.typed(kinds[0], schema, where)

    def typed(self, kind: str, schema: Mapping, where: str) -> str:
        if kind == "string":
            low, high = _bound(schema, "minLength", where, 0), _bound(schema, "maxLength", where, None)
            return f"{self.quote} {self.text(low, high)} {self.quote}"
        if kind in ("integer", "number"):
            return self.new(f"/{_INTEGER if kind == 'integer' else _NUMBER}/", terminal=True)
        if kind == "boolean":
            return '("true" | "false")'
        if kind == "null":
            return '"null"'
        if kind == "array":
            return self.array(schema, where)
        return self.object(schema, where)

    def array(self, schema: Mapping, where: str) -> str:
        low, high = _bound(schema, "minItems", where, 0), _bound(schema, "maxItems", where, None)
        items = schema.get("items", True)
        if isinstance(items, list):
            self.refuse(where, "a list of 'items' (tuple validation)")
        if high == 0:
            return '"[]"'
        item = self.value(items, f"{where}.items")
        more = f'("," {item})' + ("*" if low <= 1 and high is None else f"{{{max(low - 1, 0)},{'' if high is None else high - 1}}}")
        body = f"{item} {more}"
        return self.new(f'"[" {body} "]"' if low else f'"[" ({body})? "]"')

    def object(self, schema: Mapping, where: str) -> str:
        properties = schema.get("properties") or {}
        required = schema.get("required") or []
        if not isinstance(properties, Mapping) or not isinstance(required, list):
            raise GenerationError(f"{where}: properties must be an object and required a list")
        names = {**{k: properties[k] for k in properties}, **{k: True for k in required if k not in properties}}
        members = []  # (rule of `key:value`, required), in the order the templates write keys (dictsort)
        for key, sub in sorted_items(names):
            value = self.value(sub, f"{where}.properties.{key}")
            members.append((self.new(f'{self.key(key, where)} ":" {value}'), key in required))
        if not members:
            return '"{}"'

        def tail(start: int) -> str:  # the members from `start` on, each after a comma
            return " ".join(f'"," {m}' if req else f'("," {m})?' for m, req in members[start:])

        firsts = []  # the first member written (those before it skipped: optional ones only)
        for i, (m, req) in enumerate(members):
            firsts.append(f"{m} {tail(i + 1)}".strip())
            if req:
                break
        body = " | ".join(firsts)
        optional = not any(req for _, req in members)
        return self.new(f'"{{" ({body}){"?" if optional else ""} "}}"')

    def anything(self) -> str:
        """Any value (a schema of `true`): scalars, and objects / arrays of any values."""
        if self.any_value is None:
            name = self.any_value = f"r{self.count}"
            self.count += 1
            key, number = self.new(r"/[A-Za-z_][A-Za-z0-9_]*/", terminal=True), self.new(f"/{_NUMBER}/", terminal=True)
            text = self.text()
            self.lines.append(f'{name}: {self.quote} {text} {self.quote} | {number} | "true" | "false" | "null" | '
                              f'"{{" ({key} ":" {name} ("," {key} ":" {name})*)? "}}" | "[" ({name} ("," {name})*)? "]"')
        return self.any_value


def _implied_type(schema: Mapping):
    if "properties" in schema or "required" in schema or "additionalProperties" in schema:
        return "object"
    if "items" in schema or "minItems" in schema or "maxItems" in schema:
        return "array"
    if "minLength" in schema or "maxLength" in schema:
        return "string"
    return list(_TYPES)  # no type: any of them


def _bound(schema: Mapping, key: str, where: str, default):
    value = schema.get(key, default)
    if value is not default and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise GenerationError(f"{where}.{key} must be a non-negative integer, got {value!r:.40}")
    return value


def literal_calls(tools: list[dict], *, start: int, end: int, quote: int, forbidden: Sequence[str], syntax: str,
                  stop: int | None = None, many: bool = True, answer: Mapping | bool | None = None,
                  thought: tuple[int, int] | None = None) -> str:
    """Lark text for one call (`many`: one or more) of `tools` in the literal syntax: `<[start]>call:NAME{...}<[end]>`,
    then optionally the `stop` token the model writes to await results.  With `answer` (a JSON schema), the
    reply is either those calls or a JSON value of it (tool_choice auto beside response_format), and schema
    keywords the syntax cannot enforce are dropped rather than refused.  With `thought` (the ids of Gemma 4's
    `<|channel>` and `<channel|>`: thinking is on), the calls may follow one thought (`thought_block`)."""
    rules = _Rules(quote, forbidden, strict=answer is None, syntax=syntax)
    bodies = []
    for i, tool in enumerate(tools):
        function = tool["function"]
        where = f"tools[{i}].function.parameters"
        params = function.get("parameters")
        body = rules.value(params, where) if params else '"{}"'
        bodies.append(f'{_lark_string("call:" + function["name"])} {body}')  # names: check_tools' rule
    call = rules.new(f"<[{start}]> ({' | '.join(bodies)}) <[{end}]>")
    calls = f"{call}+" if many else call
    if stop is not None:
        calls += f" <[{stop}]>?"
    top = f"start: {calls}"
    if thought is not None:
        top = f"start: thought? {calls}\n{thought_block(*thought)}"
    if answer is not None:
        top = f"start: ({calls}) | answer\nanswer: %json {_json_schema(answer, _ANSWER_OPTIONS)}"
    return "\n".join([top, *rules.lines]) + "\n"


# What the thought channel's text may not hold: its markers as plain text, which the reply's parser
# (server/replies.py) reads in decoded text, where they would open or end a thought early.
_THOUGHT_MARKERS = ("<|channel>", "<channel|>")


def thought_block(channel: int, end_channel: int) -> str:
    """Lark rules `thought` (and its text's terminal) for one Gemma 4 thought, as the model writes it
    with thinking on: `<|channel>thought\\n{text}<channel|>` (transformers' Gemma 4 chat template renders a kept thought as
    '<|channel>thought\\n' + text + '\\n<channel|>'; mlx-lm's tokenizer_utils takes `<|channel>thought` as a
    think start and `<channel|>` as its end).  The markers are the special tokens; the text is free but
    for their spellings as plain text.  Its length is the model's (max_tokens bounds it, as without tools)."""
    banned = "|".join(_regex_literal(t) for t in _THOUGHT_MARKERS)
    return (f'thought: <[{channel}]> "thought\\n" THOUGHT_TEXT <[{end_channel}]>\n'
            f"THOUGHT_TEXT: /(?s:.)*/ & ~/(?s:.)*({banned})(?s:.)*/")


def json_calls(tools: list[dict], *, many: bool = True, answer: Mapping | bool | None = None) -> str:
    """Lark text for Gemma 1-3's prompted calls: `{"name": NAME, "parameters": {...}}` (one per line with
    `many`), each validated by llguidance's JSON-schema compiler; with `answer`, calls or that JSON."""
    shapes = []
    for tool in tools:
        function = tool["function"]
        params = _closed(function.get("parameters") or {"type": "object", "properties": {}})
        shapes.append({"type": "object", "properties": {"name": {"const": function["name"]}, "parameters": params},
                       "required": ["name", "parameters"], "additionalProperties": False})
    call = shapes[0] if len(shapes) == 1 else {"anyOf": shapes}
    calls = 'call ("\\n" call)*' if many else "call"
    lines = [f"start: {calls}" if answer is None else f"start: ({calls}) | answer",
             f"call: %json {_json_schema(call, _CALL_OPTIONS)}"]
    if answer is not None:
        # The calls' whitespace for the answer too: llguidance 1.9 panics mid-parse ("grammar stack empty
        # for non-root grammar") on an alternation of %json lexemes with different whitespace rules.
        lines.append(f"answer: %json {_json_schema(answer, _CALL_OPTIONS)}")
    return "\n".join(lines) + "\n"


def _closed(schema):
    """`schema` with `additionalProperties: false` on each object that has `properties` and says nothing of
    other keys: a call holds the declared arguments only, as in the literal syntax (its values stay valid
    against the original schema; a random model otherwise invents keys without end)."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    out = {}
    for key, value in schema.items():
        if key in ("properties", "$defs", "definitions", "patternProperties") and isinstance(value, Mapping):
            out[key] = {k: _closed(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "anyOf", "oneOf", "allOf", "prefixItems", "not"):
            out[key] = _closed(value)
        else:
            out[key] = value
    if "properties" in out and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


def _json_schema(schema, options: dict) -> str:
    """A schema as `%json` takes it, with llguidance's `options` (x-guidance)."""
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    return json.dumps({"x-guidance": options, **schema}, allow_nan=False)
