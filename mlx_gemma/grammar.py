"""JSON output by constrained decoding: OpenAI's `response_format` as a logits processor.

`json_constraint(tokenizer, response_format)` turns `{"type": "json_object"}` or
`{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}` into a processor in
samplers.py's convention: it is called with the history `[B, n]` and the logits `[B, V]`,
reads the tokens sampled since its last call, advances its parser by them, and returns the
logits with every token the grammar does not allow at -inf.  Once the JSON is complete only
the tokenizer's eos ids remain, so generation ends there.  One constraint serves one request
(each of its B rows gets its own parser); the batcher gives each row its own constraint.

    from mlx_gemma.grammar import json_constraint
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    for r in stream_generate(model, tokenizer, messages, logits_processors=[json_constraint(tokenizer, fmt)]):
        ...

The grammar engine is llguidance (guidance-ai; Rust with Python bindings, `pip install
"mlx_gemma[server]"`).  Of the three maintained engines it fits best here:
- no torch at run time: its masks are plain numpy bit arrays, which mx ops apply on any
  device (CPU, Metal, CUDA); xgrammar's Python package imports torch;
- it takes any vocabulary as a list of byte strings, so the Gemma SentencePiece view is
  built exactly from our own tokenizer (byte-fallback pieces `<0xXX>` as one byte, '▁' as a
  space), with no tokenizer.json needed (Gemma 3 folders ship only tokenizer.model);
- it computes each mask lazily, at the step that needs it, where outlines-core first builds an
  index of the schema's regex over the whole vocabulary (per schema, before the first token);
- special pieces are marked (a 0xFF first byte, as llguidance/llamacpp.py marks control tokens), so
  no grammar made from a JSON schema can ever allow them: `<start_of_turn>`, `<pad>`, image
  and audio markers never appear inside JSON; eos is allowed only where the JSON may end;
- a mask takes a millisecond or so on this vocabulary (a token trie walked by an Earley
  parser), and schema keywords it does not implement are refused at compile time.

Cost per step on 262,144 ids (1 to 4 ms in all on a busy 2-core x86 CPU; tests/test_grammar.py prints
it with -s): the engine's mask, the host unpacking its 32 KiB bitmask into a 256 KiB byte mask
(np.unpackbits), one host-to-device copy of it, one mx.where.  The processor also reads the last sampled token on the host, so the engine
cannot queue step n + 1 before step n is done: constrained decoding runs unpipelined.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections.abc import Mapping

import mlx.core as mx
import numpy as np

from .errors import GenerationError
from .tokenizer import GemmaTokenizer

try:
    import llguidance
    from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask
except ImportError as e:  # an optional dependency: the server extra
    raise ImportError('mlx_gemma.grammar needs llguidance: pip install "mlx_gemma[server]"') from e

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte-fallback pieces
_SPECIAL_MARK = b"\xff"  # llguidance marks special tokens by this first byte (never valid UTF-8)
# Whitespace between JSON tokens: a space or a newline and an indent of up to 20 spaces, enough
# for json.dumps's styles (compact, indent=2 or 4) a few levels deep.  Bounded, and with at most
# one newline, because small models otherwise fill their budget with "\r\n" and spaces.
_WHITESPACE = r"\n?[ ]{0,20}"
_COMPILE_OPTIONS = {"whitespace_pattern": _WHITESPACE, "lenient": False}  # lenient=False: refuse unknown keywords
_SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for json_schema.name
_JSON_SCHEMA_KEYS = {"name", "schema", "strict", "description"}


# ----- the tokenizer as llguidance sees it --------------------------------------------------


def token_bytes(tokenizer: GemmaTokenizer) -> list[bytes]:
    """Each id's bytes as it appears in decoded text; special pieces get llguidance's 0xFF mark.

    A piece is its text with '▁' as a space (Gemma's SentencePiece adds no dummy prefix and
    keeps every space); `<0xXX>` is that one byte (byte fallback).
    """
    special = tokenizer.special_ids
    out = []
    for i, piece in enumerate(tokenizer.get_vocabulary()):
        if i in special:
            out.append(_SPECIAL_MARK + piece.encode("utf-8"))
            continue
        byte = _BYTE_PIECE.fullmatch(piece)
        out.append(bytes([int(byte.group(1), 16)]) if byte else piece.replace("\u2581", " ").encode("utf-8"))
    return out


class _LLGuidanceView:
    """The attributes llguidance.TokenizerWrapper reads from a tokenizer."""

    def __init__(self, tokenizer: GemmaTokenizer):
        self._tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self.tokens = token_bytes(tokenizer)
        self.special_token_ids = sorted(tokenizer.special_ids)

    def __call__(self, text):
        if not isinstance(text, str):  # TokenizerWrapper probes with bytes: we take str only
            raise TypeError("text must be a str")
        return self._tokenizer.encode(text, add_bos=False)


_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (eos ids, LLTokenizer)
_VIEWS_LOCK = threading.Lock()


def grammar_tokenizer(tokenizer: GemmaTokenizer) -> llguidance.LLTokenizer:
    """llguidance's view of `tokenizer` (its eos ids end the output), built once per tokenizer
    (a few seconds on a 262k vocabulary) and again only if its eos ids change."""
    eos = frozenset(tokenizer.eos_token_ids)
    with _VIEWS_LOCK:
        cached = _VIEWS.get(tokenizer)
        if cached is None or cached[0] != eos:
            view = llguidance.TokenizerWrapper(_LLGuidanceView(tokenizer))
            cached = (eos, llguidance.LLTokenizer(view, n_vocab=tokenizer.vocab_size, eos_token=sorted(eos)))
            _VIEWS[tokenizer] = cached
    return cached[1]


# ----- response_format -> grammar ------------------------------------------------------------


def _schema_of(response_format) -> tuple[dict | bool, str]:
    """The JSON schema a response_format asks for, and the field to blame for its faults."""
    if not isinstance(response_format, Mapping):
        raise GenerationError(f"response_format must be an object, got {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind == "json_object":
        extra = set(response_format) - {"type"}
        if extra:
            raise GenerationError(f"response_format: unknown field {sorted(extra)[0]!r} for type json_object")
        return {"type": "object"}, "response_format"
    if kind != "json_schema":
        raise GenerationError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}")
    extra = set(response_format) - {"type", "json_schema"}
    if extra:
        raise GenerationError(f"response_format: unknown field {sorted(extra)[0]!r}")
    spec = response_format.get("json_schema")
    if not isinstance(spec, Mapping):
        raise GenerationError("response_format.json_schema must be an object with 'name' and 'schema'")
    extra = set(spec) - _JSON_SCHEMA_KEYS
    if extra:
        raise GenerationError(f"response_format.json_schema: unknown field {sorted(extra)[0]!r}")
    name = spec.get("name")
    if not isinstance(name, str) or not _SCHEMA_NAME.fullmatch(name):
        raise GenerationError("response_format.json_schema.name must be 1-64 letters, digits, '_' or '-', "
                              f"got {name!r}")
    if not isinstance(spec.get("strict", False), bool) or not isinstance(spec.get("description", ""), str):
        raise GenerationError("response_format.json_schema.strict must be a boolean and description a string")
    # OpenAI makes `schema` optional; without one, any JSON object.  `strict` changes nothing:
    # the output always follows the schema.
    schema = spec.get("schema", {"type": "object"})
    if not isinstance(schema, (Mapping, bool)):
        raise GenerationError(f"response_format.json_schema.schema must be an object, got {type(schema).__name__}")
    return schema, "response_format.json_schema.schema"


def response_schema(response_format) -> dict | bool | None:
    """The JSON schema `response_format` asks for (None for `{"type": "text"}`); GenerationError if malformed."""
    if isinstance(response_format, Mapping) and response_format.get("type") == "text" and len(response_format) == 1:
        return None
    return _schema_of(response_format)[0]


def compile_response_format(response_format, tokenizer: GemmaTokenizer | None = None) -> str | None:
    """llguidance's grammar for `response_format` (None for `{"type": "text"}`: no constraint).

    Raises GenerationError naming the field when the format is malformed or the schema uses
    a feature the engine does not support (checked against `tokenizer` when given).
    """
    if response_schema(response_format) is None:
        return None
    schema, field = _schema_of(response_format)
    try:
        text = json.dumps(schema, allow_nan=False)
        grammar = llguidance.LLMatcher.grammar_from_json_schema(text, overrides=_COMPILE_OPTIONS)
    except (TypeError, ValueError) as e:
        raise GenerationError(f"{field}: not a JSON schema ({e})") from None
    return check_grammar(grammar, tokenizer, field)


def compile_lark(text: str, tokenizer: GemmaTokenizer | None, field: str) -> str:
    """llguidance's grammar for Lark text (tool_formats/call_grammar.py writes it); GenerationError naming
    `field` if it does not compile (a schema keyword the engine lacks, a bad regex)."""
    return check_grammar(llguidance.LLMatcher.grammar_from_lark(text), tokenizer, field)


def check_grammar(grammar: str, tokenizer: GemmaTokenizer | None, field: str) -> str:
    vocab = grammar_tokenizer(tokenizer) if tokenizer is not None else None
    problem = llguidance.LLMatcher.validate_grammar(grammar, vocab)
    if problem:
        raise GenerationError(f"{field}: unsupported or invalid schema: {' '.join(problem.split())}")
    return grammar


# ----- the processor -------------------------------------------------------------------------


class GrammarConstraint:
    """A logits processor that keeps each row's output inside `grammar` (llguidance's format).

    The first call sees the prompt (nothing is fed to the parser); each later call feeds the
    ids appended since.  A row whose output is complete is held to the eos ids; after it
    emits one it only gets eos ids again (a batch keeps stepping its finished rows).
    """

    def __init__(self, tokenizer: GemmaTokenizer, grammar: str):
        self.vocab = grammar_tokenizer(tokenizer)
        self.grammar = grammar
        self._tokenizer = tokenizer
        self._eos = sorted(self.vocab.eos_tokens)
        self._matchers: list = []  # one llguidance.LLMatcher per batch row, made at the first call
        self._seen = 0  # history length at the last call
        self._ended: list[bool] = []  # the row emitted an eos id
        self._bitmask = None  # [B, ceil(vocab / 32)] int32, reused every step
        # Per row, what each id fed did (True: the matcher consumed it; False: the row ended there;
        # None: the row had ended), so `rollback` can undo the last ones.
        self._log: list[list[bool | None]] = []

    def _start(self, rows: int) -> None:
        first = llguidance.LLMatcher(self.vocab, self.grammar, log_level=0)
        if first.is_error():
            raise GenerationError(f"the grammar does not compile: {first.get_error()}")
        self._matchers = [first] + [first.deep_copy() for _ in range(rows - 1)]
        self._ended = [False] * rows
        self._log = [[] for _ in range(rows)]
        self._bitmask = allocate_token_bitmask(rows, self.vocab.vocab_size)

    def _feed(self, tokens: mx.array) -> None:
        """Advance every row by the ids appended to the history since the last call."""
        n = tokens.shape[1]
        if n < self._seen:
            raise GenerationError(f"a grammar constraint follows one generation: its history shrank from "
                                  f"{self._seen} to {n} ids (make a new constraint per request)")
        new = tokens[:, self._seen:].tolist() if n > self._seen else [[] for _ in self._matchers]
        self._seen = n
        for b, ids in enumerate(new):
            for token in ids:
                if self._ended[b]:
                    self._log[b].append(None)
                    continue
                if token in self._eos and self._matchers[b].is_accepting():
                    self._ended[b] = True
                    self._log[b].append(False)
                    continue
                self._log[b].append(True)
                if not self._matchers[b].consume_token(token):
                    piece = self._tokenizer.id_to_piece(token) if 0 <= token < self.vocab.vocab_size else "?"
                    raise GenerationError(f"batch row {b}: token {token} ({piece!r}) breaks the JSON grammar: "
                                          f"{self._matchers[b].get_error()}")

    def rollback(self, n: int) -> None:
        """Forget the last `n` ids fed, in every row (speculative decoding: proposals the target
        rejected, which the processor saw while it masked the positions after them)."""
        if n <= 0:
            return
        if any(n > len(log) for log in self._log) or not self._log:
            raise GenerationError(f"a grammar constraint cannot go back {n} ids: it was fed fewer")
        for b, log in enumerate(self._log):
            undone = log[-n:]
            del log[-n:]
            consumed = sum(1 for m in undone if m)
            if consumed and not self._matchers[b].rollback(consumed):
                raise GenerationError(f"batch row {b}: the grammar's parser cannot go back {consumed} tokens: "
                                      f"{self._matchers[b].get_error()}")
            if False in undone:
                self._ended[b] = False
        self._seen -= n

    def allowed(self) -> np.ndarray:
        """Which ids each row may take next: bool [B, vocab] (host side)."""
        for b, matcher in enumerate(self._matchers):
            if self._ended[b] or matcher.is_stopped():
                row = np.zeros(self._bitmask.shape[1] * 32, np.uint8)
                row[self._eos] = 1
                self._bitmask[b] = np.packbits(row, bitorder="little").view(np.int32)
            else:
                fill_next_token_bitmask(matcher, self._bitmask, b)
        bits = np.unpackbits(self._bitmask.view(np.uint8), axis=1, bitorder="little")  # bit j of word w: id 32w + j
        return bits[:, : self.vocab.vocab_size].astype(bool)

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if tokens.ndim == 1:
            tokens = tokens[None]
        B, V = logits.shape
        if not self._matchers:
            self._start(B)
            self._seen = tokens.shape[1]
        elif B != len(self._matchers):
            raise GenerationError(f"a grammar constraint made for {len(self._matchers)} rows got {B}")
        else:
            self._feed(tokens)
        if V < self.vocab.vocab_size:
            raise GenerationError(f"the logits have {V} ids, the tokenizer {self.vocab.vocab_size}")
        allowed = self.allowed()
        if V > allowed.shape[1]:  # embedding rows past the tokenizer's ids are never text
            allowed = np.pad(allowed, ((0, 0), (0, V - allowed.shape[1])))
        return mx.where(mx.array(allowed), logits, mx.array(-float("inf"), logits.dtype))

    @property
    def started(self) -> bool:
        """Whether it has seen a history: its parsers hold state that `grammar` alone does not
        describe (the server across ranks sends only fresh constraints, as their grammar)."""
        return bool(self._matchers)

    def complete(self, row: int = 0) -> bool:
        """Whether the row's output so far is a whole JSON value of the grammar."""
        return bool(self._matchers) and (self._ended[row] or self._matchers[row].is_accepting())


def json_constraint(tokenizer: GemmaTokenizer, response_format) -> GrammarConstraint | None:
    """A fresh constraint for one request's `response_format` (None for `{"type": "text"}`).

    Bad formats and unsupported schema features raise GenerationError here, at request time,
    naming the field.
    """
    grammar = compile_response_format(response_format, tokenizer)
    return None if grammar is None else GrammarConstraint(tokenizer, grammar)
