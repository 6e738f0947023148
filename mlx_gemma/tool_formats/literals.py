"""The value syntax of Gemma's tool calls: `{key:value,...}`, `[a,b]`, strings between a quote token.

Gemma 4 quotes strings with the token `<|"|>`, FunctionGemma with `<escape>`; nothing inside a
string is escaped, so a string ends at the next quote token.  Writing follows the chat templates'
`format_argument` macro (Gemma 4's chat_template.jinja): keys sorted case-insensitively (Jinja's
`dictsort`), booleans `true` / `false`, other scalars as Jinja prints them (Python's `str`: None
is `None`, 1.5 is `1.5`).  Reading accepts what writing produces, plus JSON's `null` and bare
words (taken as strings, as mlx-lm's function_gemma parser does), and raises LiteralSyntaxError
on anything else.
"""

from __future__ import annotations

import json
from collections.abc import Mapping


class LiteralSyntaxError(ValueError):
    """Model output that is not a value in this syntax (callers turn it back into content)."""


def sorted_items(mapping: Mapping) -> list:
    # Jinja's dictsort: by key, case-insensitively; a stable sort, as Python's.
    return sorted(mapping.items(), key=lambda kv: kv[0].lower() if isinstance(kv[0], str) else kv[0])


def format_value(value, quote: str, quote_keys: bool = True) -> str:
    """`value` in the template's syntax; `quote_keys` False writes object keys bare (call arguments)."""
    if isinstance(value, str):
        return quote + value + quote
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "{" + ",".join((quote + k + quote if quote_keys else str(k)) + ":" + format_value(v, quote, quote_keys)
                              for k, v in sorted_items(value)) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v, quote, quote_keys) for v in value) + "]"
    return str(value)


def format_fields(mapping: Mapping, quote: str) -> str:
    """`key:value,...` without braces, keys bare: a call's arguments or a response's fields."""
    return ",".join(f"{k}:{format_value(v, quote, False)}" for k, v in sorted_items(mapping))


_BARE = {"true": True, "false": False, "null": None, "None": None, "True": True, "False": False}


class _Reader:
    """A recursive-descent reader over `text`; `pos` moves forward as values are read."""

    def __init__(self, text: str, quote: str):
        self.text, self.quote, self.pos = text, quote, 0

    def fail(self, what: str):
        raise LiteralSyntaxError(f"{what} at offset {self.pos} of {self.text[:80]!r}")

    def skip(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def take(self, token: str) -> bool:
        self.skip()
        if self.text.startswith(token, self.pos):
            self.pos += len(token)
            return True
        return False

    def string(self) -> str:
        end = self.text.find(self.quote, self.pos)
        if end < 0:
            self.fail("unclosed string")
        out, self.pos = self.text[self.pos:end], end + len(self.quote)
        return out

    def value(self):
        if self.take(self.quote):
            return self.string()
        if self.take("{"):
            return self.fields("}")
        if self.take("["):
            items: list = []
            if self.take("]"):
                return items
            while True:
                items.append(self.value())
                if self.take("]"):
                    return items
                if not self.take(","):
                    self.fail("expected ',' or ']'")
        return self.scalar()

    def scalar(self):
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in ",}]" and \
                not self.text.startswith(self.quote, self.pos):
            self.pos += 1
        word = self.text[start:self.pos].strip()
        if not word:
            self.fail("expected a value")
        if word in _BARE:
            return _BARE[word]
        try:
            number = json.loads(word)
        except ValueError:
            return word  # a bare word: a string, as mlx-lm's function_gemma parser reads it
        return number if isinstance(number, (int, float)) else word

    def key(self) -> str:
        if self.take(self.quote):
            return self.string()
        self.skip()
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in ":,{}[]":
            self.pos += 1
        key = self.text[start:self.pos].strip()
        if not key:
            self.fail("expected a key")
        return key

    def fields(self, close: str | None) -> dict:
        """`key:value,...` up to `close` (consumed) or, with close None, to the end of the text."""
        out: dict = {}
        if (close and self.take(close)) or (close is None and not self.text[self.pos:].strip()):
            return out
        while True:
            key = self.key()
            if not self.take(":"):
                self.fail("expected ':'")
            out[key] = self.value()
            if close and self.take(close):
                return out
            self.skip()
            if close is None and self.pos == len(self.text):
                return out
            if not self.take(","):
                self.fail(f"expected ',' or {close or 'the end'!r}")


def parse_fields(text: str, quote: str) -> dict:
    """The `key:value,...` body of a call (its braces removed) as a dict; LiteralSyntaxError if malformed."""
    return _Reader(text, quote).fields(None)
