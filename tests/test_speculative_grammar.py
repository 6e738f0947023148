"""Speculative decoding under a grammar constraint (grammar.py's llguidance parser): the parser sees only
kept tokens, and each of the k + 1 verified positions is masked after the proposals before it.

References: a fresh constraint fed the same prefix (for `rollback`), and plain constrained greedy decoding
(no speculation; checked in test_grammar) for the tokens; outputs validated with `jsonschema`.  The model
is a random Gemma 3 with the real 262,144-id vocabulary, built in code from fixed seeds, as test_grammar's.
"""

from __future__ import annotations

import json

import jsonschema
import mlx.core as mx
import numpy as np
import pytest

from conftest import FIXTURES
from mlx_gemma.errors import GenerationError
from mlx_gemma.generate import stream_generate
from mlx_gemma.grammar import json_constraint
from mlx_gemma import speculative
from mlx_gemma.speculative_control import FixedK
from mlx_gemma.loading import build_model
from mlx_gemma.tokenizer import GemmaTokenizer

SCHEMA = {"type": "object",
          "properties": {"kind": {"enum": ["cat", "dog"]}, "age": {"type": "integer", "minimum": 0, "maximum": 9},
                         "ok": {"type": "boolean"}},
          "required": ["kind", "age", "ok"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True}}
PROMPT = 'Pets as JSON.\n{"kind": "cat", "age": 3, "ok": true}\n{"kind": "dog", "age": 3, "ok": true}\n'


@pytest.fixture(autouse=True)
def fixed_k(monkeypatch):
    """k proposals every step: the adaptive controller (test_speculative_adaptive) would rightly switch a
    draft as costly as the target off, and these tests are about what speculation does when it runs."""
    monkeypatch.setattr(speculative, "Adaptive", lambda k, **_: FixedK(k))


@pytest.fixture(scope="module")
def tokenizer():
    return GemmaTokenizer.from_folder(FIXTURES / "gemma3_270m")


def random_model(seed: int):
    config = json.loads((FIXTURES / "tiny_gemma3" / "config.json").read_text())
    config.update(vocab_size=262144, hidden_size=16, head_dim=8, intermediate_size=32, num_hidden_layers=2,
                  layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=8,
                  tie_word_embeddings=True)
    mx.random.seed(seed)
    model = build_model(config)
    mx.eval(model.parameters())
    return model


def allowed_after(tokenizer, ids) -> np.ndarray:
    """The ids a fresh constraint allows after `ids` (fed one call at a time, as decoding feeds them)."""
    constraint = json_constraint(tokenizer, FORMAT)
    history, logits = [2, 100], mx.zeros((1, tokenizer.vocab_size))
    for token in [None, *ids]:
        if token is not None:
            history.append(token)
        masked = constraint(mx.array([history]), logits)
    return np.isfinite(np.array(masked[0]))


def test_rollback_returns_the_parser_to_an_earlier_prefix(tokenizer):
    ids = tokenizer.encode('{"kind": "dog", "age": 7, "ok": false}', add_bos=False) + [tokenizer.eos_id]
    constraint = json_constraint(tokenizer, FORMAT)
    history, logits = [2, 100], mx.zeros((1, tokenizer.vocab_size))
    constraint(mx.array([history]), logits)
    for token in ids:  # to the end, eos included (the row has ended: only eos ids allowed)
        history.append(token)
        constraint(mx.array([history]), logits)
    for back in (1, 4, 3):  # undo the end, then part of the object, then more
        constraint.rollback(back)
        del history[-back:]
        got = np.isfinite(np.array(constraint(mx.array([history]), logits)[0]))
        assert np.array_equal(got, allowed_after(tokenizer, history[2:])), back
    assert not constraint.complete()
    with pytest.raises(GenerationError, match="cannot go back"):
        constraint.rollback(len(history))


def test_constrained_greedy_speculation_equals_plain_and_parses(tokenizer):
    model, bad = random_model(0), random_model(1)
    plain = list(stream_generate(model, tokenizer, PROMPT, max_tokens=48,
                                 logits_processors=[json_constraint(tokenizer, FORMAT)]))
    assert plain[-1].finish_reason == "stop"
    expected = [r.token for r in plain]
    jsonschema.validate(json.loads("".join(r.text for r in plain)), SCHEMA)
    for label, speculation in {"lookup": {"prompt_lookup": 3}, "self draft": {"draft_model": (model, tokenizer)},
                               "bad draft": {"draft_model": (bad, tokenizer)}}.items():
        out = list(stream_generate(model, tokenizer, PROMPT, max_tokens=48, num_draft_tokens=4,
                                   logits_processors=[json_constraint(tokenizer, FORMAT)], **speculation))
        assert [r.token for r in out] == expected, label
        jsonschema.validate(json.loads("".join(r.text for r in out)), SCHEMA)
        assert out[-1].draft_proposed > 0, label
        if label == "lookup":  # the prompt's records quote what the schema makes it write
            assert out[-1].draft_accepted > 0
