"""EmbeddingGemma: a tiny random one saved by sentence-transformers, against its `encode`.

The fixture (tests/fixtures/make_tiny_embedding_gemma.py) holds sentence-transformers'
embeddings of four texts of different lengths (the long one cut at max_seq_length, every
one longer than the sliding band): plain, with the "query" / "document" prompts, and
truncated to 32 / 16 dimensions then re-normalized.  Every number compared comes from it
(or, in the oracle test, from sentence-transformers run live).
"""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

import mlx_gemma
from mlx_gemma.embed import _token_ids
from mlx_gemma.errors import ConfigError, MlxGemmaError, WeightsMismatchError
from mlx_gemma.models import embedding_gemma

from conftest import FIXTURES

FOLDER = FIXTURES / "tiny_embedding_gemma"
TOL = 1e-5


@pytest.fixture(scope="module")
def loaded():
    return mlx_gemma.load(FOLDER)


@pytest.fixture(scope="module")
def ref():
    return np.load(FOLDER / "reference.npz")


def texts(ref) -> list[str]:
    return [str(t) for t in ref["texts"]]


def close(ours: mx.array, theirs: np.ndarray) -> None:
    ours = np.array(ours)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)
    cosine = np.sum(ours * theirs, axis=1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    assert cosine.min() >= 0.99999


def test_loads_as_an_encoder(loaded):
    model, tokenizer = loaded
    assert model.model_type == "embedding_gemma" and model.path == FOLDER
    assert model.args.dimensions == 64 and [d.out_features for d in model.args.dense] == [256, 64]
    # transformers' bidirectional window: 8 // 2 + 1, a symmetric band, on the sliding layers only.
    assert [layer.window for layer in model.model.layers] == [5, None, 5, None]
    settings = model.embedding_settings
    assert settings.prompts["query"] == "task: search result | query: "
    assert (settings.add_bos, settings.add_eos, settings.max_seq_length) == (True, True, 48)


@pytest.mark.oracle
def test_band_of_the_300m_config_matches_transformers():
    """embeddinggemma-300m's window 512, saved and read back: transformers' band, ours."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.Gemma3TextConfig(
        vocab_size=262_144, hidden_size=768, intermediate_size=1152, num_hidden_layers=24, num_attention_heads=3,
        num_key_value_heads=1, head_dim=256, sliding_window=512, max_position_embeddings=2048,
        use_bidirectional_attention=True)
    dense = [{"in_features": 768, "out_features": 3072, "bias": False,
              "activation_function": "torch.nn.modules.linear.Identity"},
             {"in_features": 3072, "out_features": 768, "bias": False,
              "activation_function": "torch.nn.modules.linear.Identity"}]
    config = {**hf.to_dict(), "sentence_transformers": {"pooling_mode": "mean", "dense": dense, "normalize": True}}
    args = embedding_gemma.ModelArgs.from_dict(config)
    assert args.text.sliding_window == hf.sliding_window == 257
    assert args.text.layer_types == hf.layer_types and args.dimensions == 768


@pytest.mark.parametrize("prompt", ["query", "document"])
def test_token_ids_match_the_hf_tokenizer(loaded, ref, prompt):
    model, tokenizer = loaded
    settings = model.embedding_settings
    ours = [_token_ids(tokenizer, settings, settings.prompts[prompt] + t) for t in texts(ref)]
    theirs = [[int(i) for i in row if i >= 0] for row in ref[f"ids_{prompt}"]]
    assert ours == theirs
    assert max(len(r) for r in ours) == 48 and len({len(r) for r in ours}) > 2  # cut, and padded in a batch


def test_padded_batch_matches_sentence_transformers(loaded, ref):
    model, tokenizer = loaded
    out = mlx_gemma.embed(model, tokenizer, texts(ref))
    close(out, ref["plain"])
    np.testing.assert_allclose(np.linalg.norm(np.array(out), axis=1), 1.0, atol=1e-6)


def test_the_fixture_tells_the_band_apart(ref):
    """The texts outrun the band: a global mask on the sliding layers (as mlx-embeddings uses) or
    a causal-width band would miss sentence-transformers' numbers."""
    for window in (None, 8):
        model, tokenizer = mlx_gemma.load(FOLDER)
        for layer in model.model.layers:
            layer.window = window if layer.window is not None else None
        out = np.array(mlx_gemma.embed(model, tokenizer, texts(ref)))
        assert np.abs(out - ref["plain"]).max() > 1e-2


@pytest.mark.parametrize("prompt", ["query", "document"])
def test_prompts_match_sentence_transformers(loaded, ref, prompt):
    model, tokenizer = loaded
    close(mlx_gemma.embed(model, tokenizer, texts(ref), prompt_name=prompt), ref[f"prompt_{prompt}"])
    # An explicit prompt string is the same prefix.
    literal = model.embedding_settings.prompts[prompt]
    close(mlx_gemma.embed(model, tokenizer, texts(ref), prompt=literal), ref[f"prompt_{prompt}"])


@pytest.mark.parametrize("dim", [32, 16])
def test_matryoshka_truncation_matches_sentence_transformers(loaded, ref, dim):
    model, tokenizer = loaded
    out = mlx_gemma.embed(model, tokenizer, texts(ref), prompt_name="query", dimensions=dim)
    close(out, ref[f"truncate_{dim}"])


def test_batch_equals_one_at_a_time(loaded, ref):
    model, tokenizer = loaded
    batched = np.array(mlx_gemma.embed(model, tokenizer, texts(ref), prompt_name="query"))
    for batch_size in (1, 3):
        single = np.array(mlx_gemma.embed(model, tokenizer, texts(ref), prompt_name="query", batch_size=batch_size))
        np.testing.assert_allclose(single, batched, atol=1e-6, rtol=0)
    close(mlx_gemma.embed(model, tokenizer, texts(ref), batch_size=1), ref["single"])  # encode() one by one
    assert mlx_gemma.embed(model, tokenizer, texts(ref)[1]).shape == (1, 64)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_half_precision_weights(ref, dtype):
    model, tokenizer = mlx_gemma.load(FOLDER, dtype=dtype)
    out = mlx_gemma.embed(model, tokenizer, texts(ref), prompt_name="query")
    assert out.dtype == mx.float32  # unit vectors in float32, whatever the weights
    out = np.array(out)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    assert np.sum(out * ref["prompt_query"], axis=1).min() > 0.999  # half precision, same direction


def test_default_prompt_name_is_used(tmp_path, ref):
    folder = _copy(tmp_path)
    path = folder / "config_sentence_transformers.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "default_prompt_name": "query"}))
    model, tokenizer = mlx_gemma.load(folder)
    # sentence-transformers' encode(prompt_name="query") is what its default_prompt_name gives.
    close(mlx_gemma.embed(model, tokenizer, texts(ref)), ref["prompt_query"])
    close(mlx_gemma.embed(model, tokenizer, texts(ref), prompt=""), ref["plain"])


@pytest.mark.oracle
def test_live_sentence_transformers(loaded):
    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(str(FOLDER), device="cpu", model_kwargs={"attn_implementation": "eager"})
    model, tokenizer = loaded
    others = ["a", "Mountains rise above the quiet lake at dawn.", "x" * 200, "emoji 😀 and CJK 日本語"]
    theirs = reference.encode(others, prompt_name="STS", batch_size=4, truncate_dim=8, normalize_embeddings=True)
    close(mlx_gemma.embed(model, tokenizer, others, prompt_name="STS", dimensions=8), theirs)


# ----- bad input -------------------------------------------------------------------------------

def _copy(tmp_path):
    folder = tmp_path / "embedding_gemma"
    shutil.copytree(FOLDER, folder)
    return folder


def test_missing_dense_weights(tmp_path):
    folder = _copy(tmp_path)
    (folder / "2_Dense" / "model.safetensors").unlink()
    with pytest.raises(WeightsMismatchError, match="2_Dense/model.safetensors"):
        mlx_gemma.load(folder)


@pytest.mark.parametrize("config, match", [
    ({"embedding_dimension": 64, "pooling_mode": "cls"}, "pooling mode 'cls' is not supported"),
    ({"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}, "exactly one pooling mode"),
    ({"pooling_mode": "mean", "include_prompt": False}, "include_prompt"),
    ({"pooling_mode": 3}, "pooling_mode"),
])
def test_unsupported_pooling(tmp_path, config, match):
    folder = _copy(tmp_path)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=match) as error:
        mlx_gemma.load(folder)
    assert error.value.path == str(folder / "1_Pooling" / "config.json")


def test_legacy_pooling_keys_are_read(tmp_path, loaded, ref):
    folder = _copy(tmp_path)  # EmbeddingGemma's own folder still uses the pre-5.2 keys
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 64, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
         "include_prompt": True}))
    model, tokenizer = mlx_gemma.load(folder)
    close(mlx_gemma.embed(model, tokenizer, texts(ref)), ref["plain"])


@pytest.mark.parametrize("change, error, match", [
    ({"activation_function": "torch.nn.modules.activation.ReLU"}, ConfigError, "activation_function"),
    ({"in_features": "64"}, ConfigError, "in_features"),
    ({"use_residual": True}, ConfigError, "use_residual"),
    ({"out_features": 128}, ConfigError, "3_Dense/config.json: in_features 256 does not match the 128"),
])
def test_malformed_dense_config(tmp_path, change, error, match):
    folder = _copy(tmp_path)
    path = folder / "2_Dense" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(error, match=match):
        mlx_gemma.load(folder)


def test_dense_weights_of_the_wrong_shape(tmp_path):
    folder = _copy(tmp_path)
    path = folder / "2_Dense" / "model.safetensors"
    mx.save_safetensors(str(path), {"linear.weight": mx.zeros((256, 32))})
    with pytest.raises(WeightsMismatchError, match="wrong shape: dense.0.linear.weight"):
        mlx_gemma.load(folder)


def test_bidirectional_config_without_its_modules(tmp_path):
    folder = _copy(tmp_path)
    (folder / "modules.json").unlink()
    with pytest.raises(ConfigError, match="sentence-transformers"):
        mlx_gemma.load(folder)


def test_module_path_outside_the_folder(tmp_path):
    folder = _copy(tmp_path)
    modules = json.loads((folder / "modules.json").read_text())
    modules[2]["path"] = "../2_Dense"
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ConfigError, match="leaves the model folder"):
        mlx_gemma.load(folder)


@pytest.mark.parametrize("kwargs, match", [
    ({"texts": []}, "at least one text"),
    ({"texts": ["ok", 3]}, "strings"),
    ({"prompt_name": "nope"}, "not one of the model's prompts"),
    ({"dimensions": 65}, "dimensions"),
    ({"dimensions": 0}, "dimensions"),
    ({"batch_size": 0}, "batch_size"),
])
def test_bad_embed_arguments(loaded, kwargs, match):
    model, tokenizer = loaded
    kwargs = {"texts": ["hello"], **kwargs}
    with pytest.raises(MlxGemmaError, match=match):
        mlx_gemma.embed(model, tokenizer, **kwargs)


def test_embed_refuses_a_causal_lm(loaded):
    model, tokenizer = mlx_gemma.load(FIXTURES / "tiny_gemma3")
    with pytest.raises(MlxGemmaError, match="sentence encoder"):
        mlx_gemma.embed(model, tokenizer, ["hello"])


# ----- keras-hub style: Gemma3TextEmbedder ----------------------------------------------------

def test_text_embedder_encode_text_and_predict(ref):
    embedder = mlx_gemma.Gemma3TextEmbedder.from_preset(str(FOLDER))
    out = embedder.encode_text(texts(ref))
    assert isinstance(out, np.ndarray)
    close(mx.array(out), ref["plain"])
    close(mx.array(embedder.encode_text(texts(ref)[0])), ref["plain"][:1])
    query = mlx_gemma.Gemma3TextEmbedder.from_preset(str(FOLDER), prompt_name="query", dimensions=32)
    close(mx.array(query.predict(texts(ref), batch_size=2)), ref["truncate_32"])
    # keras-hub's similarity: the dot products of the (normalized) embeddings.
    sims = embedder.similarity(ref["prompt_query"], ref["prompt_document"])
    np.testing.assert_allclose(embedder.similarity(query.encode_text(texts(ref)), ref["truncate_32"]).diagonal(),
                               1.0, atol=1e-5)
    assert sims.shape == (4, 4)


def test_text_embedder_packed_ids_as_keras_preprocessor_packs_them(ref):
    """preprocessor=None: token ids packed (<bos> ... <eos>, right-padded to sequence_length)."""
    embedder = mlx_gemma.Gemma3TextEmbedder.from_preset(str(FOLDER), preprocessor=None)
    rows = ref["ids_query"]  # the HF tokenizer's ids of the prompted texts, -1 past each row's end
    token_ids = np.where(rows >= 0, rows, 0)
    token_ids = np.pad(token_ids, ((0, 0), (0, 16)))  # keras-hub pads to its sequence_length
    out = embedder.predict({"token_ids": token_ids, "padding_mask": token_ids != 0}, batch_size=3)
    close(mx.array(out), ref["prompt_query"])
    with pytest.raises(MlxGemmaError, match="preprocessor=None"):
        embedder.predict(["text"])
    with pytest.raises(MlxGemmaError, match="same"):
        embedder.predict({"token_ids": token_ids, "padding_mask": token_ids[:, :3] != 0})
