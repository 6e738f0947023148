"""POST /v1/embeddings on the tiny EmbeddingGemma fixture (the shared server of test_server.py): vectors
equal `mlx_gemma.embed` on the same texts (float and base64, Matryoshka dimensions, task prompts),
through the official `openai` client and raw `httpx`."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest
from test_server import EMBED, shared_server

import mlx_gemma

TEXTS = ["The sky is blue.", "Rayleigh scattering", "Gemma"]


@pytest.fixture(scope="module")
def encoder():
    return mlx_gemma.load(EMBED)


def expected(encoder, texts=TEXTS, **kwargs) -> np.ndarray:
    return np.array(mlx_gemma.embed(*encoder, texts, **kwargs))


def test_openai_client_embeddings_equal_embed(encoder):
    client = openai.OpenAI(base_url=shared_server() + "/v1", api_key="unused", max_retries=0)
    r = client.embeddings.create(model=EMBED, input=TEXTS)  # the client asks for base64 and decodes it
    assert [d.index for d in r.data] == [0, 1, 2] and r.model == EMBED
    np.testing.assert_allclose(np.array([d.embedding for d in r.data]), expected(encoder), atol=1e-6)
    tok = encoder[1]
    assert r.usage.prompt_tokens == sum(len(tok.encode(t, add_bos=False)) for t in TEXTS) == r.usage.total_tokens


@pytest.mark.parametrize("fields", [{}, {"dimensions": 32}, {"prompt_name": "query"},
                                    {"dimensions": 16, "prompt_name": "document"}])
def test_float_embeddings_with_dimensions_and_prompts(encoder, fields):
    r = httpx.post(shared_server() + "/v1/embeddings", json={"model": EMBED, "input": TEXTS[0],
                                                             "encoding_format": "float", **fields}, timeout=30)
    (row,) = r.json()["data"]
    assert row["object"] == "embedding" and r.json()["object"] == "list"
    np.testing.assert_allclose(np.array([row["embedding"]]), expected(encoder, TEXTS[0], **fields), atol=1e-6)


def test_base64_is_little_endian_float32(encoder):
    r = httpx.post(shared_server() + "/v1/embeddings", json={"model": EMBED, "input": TEXTS,
                                                             "encoding_format": "base64"}, timeout=30)
    got = np.array([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in r.json()["data"]])
    np.testing.assert_array_equal(got, expected(encoder).astype("<f4"))
