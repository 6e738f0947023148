"""What the converter keeps besides the weights: processor files and chat templates of
vision-language and classifier folders (as transformers 5.25's save_pretrained writes them, and
as older hub folders hold them), and EmbeddingGemma's sentence-transformers layout.

Expected numbers come from the fixtures' references (transformers / sentence-transformers) or
from sentence-transformers run live on the converted folder.
"""

from __future__ import annotations

import json
import shutil
import sys

import mlx.core as mx
import numpy as np
import pytest

import mlx_gemma
from mlx_gemma.convert import convert
from mlx_gemma.errors import ConfigError
from mlx_gemma.loading import load_model
from mlx_gemma.shieldgemma2 import DEFAULT_POLICIES, ShieldGemma2

from conftest import FIXTURES
from test_gemma3_chat import GEMMA3_CHAT_TEMPLATE
from test_gemma3_vlm import RTOL, case_inputs, rel_err

EMBEDDING = FIXTURES / "tiny_embedding_gemma"
CUSTOM = {"ip": "No IP: The image shall not reproduce trademarks."}  # as make_tiny_shieldgemma2.py's


def copy_fixture(name, tmp_path):
    return shutil.copytree(FIXTURES / name, tmp_path / name)


def test_shieldgemma2_policies_from_processor_config_survive_conversion(tmp_path):
    """A folder whose processor_config.json defines a custom policy: after conversion the
    classifier reads it there and gives transformers' probabilities for it (the processor
    merges custom policies into the same definitions)."""
    source = copy_fixture("tiny_shieldgemma2", tmp_path)
    processor = json.loads((source / "processor_config.json").read_text())
    processor["policy_definitions"] = {**processor["policy_definitions"], **CUSTOM}
    (source / "processor_config.json").write_text(json.dumps(processor, indent=2))
    dest = convert(source, mlx_path=tmp_path / "out", progress=False)
    for name in ("processor_config.json", "chat_template.jinja"):
        assert (dest / name).read_bytes() == (source / name).read_bytes()
    shield = ShieldGemma2.load(dest)
    assert shield.policy_definitions == {**DEFAULT_POLICIES, **CUSTOM}
    ref = np.load(FIXTURES / "tiny_shieldgemma2" / "reference.npz")
    out = shield(ref["image1"], policies=["violence", "ip"])
    np.testing.assert_allclose(out.probabilities, ref["custom_probabilities"], atol=1e-5, rtol=0)


def test_gemma3_vlm_keeps_what_save_pretrained_writes(tmp_path):
    """transformers 5.25 saves Gemma3Processor as processor_config.json + chat_template.jinja +
    tokenizer files; the converted folder keeps them byte for byte, transformers reads its chat
    template back, and the logits are unchanged."""
    transformers = pytest.importorskip("transformers")
    sys.path.insert(0, str(FIXTURES))  # as test_gemma3_chat: the fixture script's own processor
    from make_tiny_gemma3_vlm import processor

    source = copy_fixture("tiny_gemma3_vlm", tmp_path)
    proc = processor(source)
    proc.chat_template = GEMMA3_CHAT_TEMPLATE
    proc.save_pretrained(source)
    written = {"processor_config.json", "chat_template.jinja", "tokenizer_config.json", "tokenizer.json"}
    assert written <= {p.name for p in source.iterdir()}
    dest = convert(source, mlx_path=tmp_path / "out", progress=False)
    for name in written:
        assert (dest / name).read_bytes() == (source / name).read_bytes(), name
    assert transformers.AutoProcessor.from_pretrained(dest).chat_template == GEMMA3_CHAT_TEMPLATE
    ref = np.load(source / "reference.npz")
    ids, pixels, real = case_inputs(ref, "batch")
    logits = load_model(dest)(ids, pixel_values=pixels, padding_mask=mx.array(real))
    assert rel_err(logits, ref["batch_logits"], real) < RTOL


def test_hub_layout_side_files_are_kept_and_text_conversions_drop_processor_files(tmp_path):
    """Older hub folders: preprocessor_config.json, chat_template.json and a chat template inside
    tokenizer_config.json; all kept.  A text-only gemma3 conversion keeps the tokenizer files only."""
    source = copy_fixture("tiny_gemma3_vlm", tmp_path)
    files = {"preprocessor_config.json": {"image_processor_type": "Gemma3ImageProcessor"},
             "processor_config.json": {"image_seq_length": 4, "processor_class": "Gemma3Processor"},
             "chat_template.json": {"chat_template": GEMMA3_CHAT_TEMPLATE},
             "tokenizer_config.json": {"chat_template": GEMMA3_CHAT_TEMPLATE, "add_bos_token": True}}
    for name, content in files.items():
        (source / name).write_text(json.dumps(content))
    dest = convert(source, mlx_path=tmp_path / "out", progress=False)
    assert all(json.loads((dest / n).read_text()) == c for n, c in files.items())
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "vision_config"}))
    text = convert(source, mlx_path=tmp_path / "text", progress=False)
    assert not (text / "processor_config.json").exists() and not (text / "preprocessor_config.json").exists()
    assert (text / "chat_template.json").is_file() and (text / "tokenizer_config.json").is_file()


@pytest.mark.parametrize("name, content", [("processor_config.json", b'{"image_seq_length": '),
                                           ("tokenizer_config.json", b"\xff\xfe"),
                                           ("chat_template.jinja", b"{{ bos_token }}\xff")])
def test_a_malformed_side_file_is_a_typed_error_and_nothing_is_written(tmp_path, name, content):
    source = copy_fixture("tiny_shieldgemma2", tmp_path)
    (source / name).write_bytes(content)
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        convert(source, mlx_path=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny_shieldgemma2"]  # no temporary folder left


def test_an_oversized_side_file_is_refused(tmp_path, monkeypatch):
    from mlx_gemma.convert import hf

    monkeypatch.setitem(hf.SIDE_FILES, "processor_config.json", 100)
    source = copy_fixture("tiny_shieldgemma2", tmp_path)
    with pytest.raises(ConfigError, match="processor_config.json"):
        convert(source, mlx_path=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def embed_reference():
    ref = np.load(EMBEDDING / "reference.npz")
    return ref, [str(t) for t in ref["texts"]]


def test_embedding_gemma_converts_to_a_sentence_transformers_folder(tmp_path):
    """The output keeps sentence-transformers' layout (modules.json, Pooling, the Dense subfolders,
    its configs), loads with mlx_gemma.load and gives sentence-transformers' vectors (1e-5)."""
    dest = convert(EMBEDDING, mlx_path=tmp_path / "out", progress=False)
    for name in ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json",
                 "1_Pooling/config.json", "2_Dense/config.json", "3_Dense/config.json", "4_Normalize/config.json",
                 "tokenizer.json", "tokenizer_config.json"):
        assert (dest / name).read_bytes() == (EMBEDDING / name).read_bytes(), name
    for dense in ("2_Dense", "3_Dense"):
        ours, theirs = mx.load(str(dest / dense / "model.safetensors")), mx.load(str(EMBEDDING / dense / "model.safetensors"))
        assert ours.keys() == theirs.keys() == {"linear.weight"}
        assert mx.array_equal(ours["linear.weight"], theirs["linear.weight"])
    model, tokenizer = mlx_gemma.load(dest)
    ref, texts = embed_reference()
    for key, kwargs in (("plain", {}), ("prompt_query", {"prompt_name": "query"}), ("truncate_16", {
            "prompt_name": "query", "dimensions": 16})):
        out = np.array(mlx_gemma.embed(model, tokenizer, texts, **kwargs))
        np.testing.assert_allclose(out, ref[key], atol=1e-5, rtol=0)


def test_sentence_transformers_reads_the_converted_folder(tmp_path):
    """The root weights are named as Gemma3TextModel saves them, so sentence-transformers itself
    loads the converted float folder and gives its own reference vectors."""
    st = pytest.importorskip("sentence_transformers")
    dest = convert(EMBEDDING, mlx_path=tmp_path / "out", progress=False)
    ref, texts = embed_reference()
    theirs = st.SentenceTransformer(str(dest), device="cpu").encode(texts, prompt_name="query")
    np.testing.assert_allclose(theirs, ref["prompt_query"], atol=1e-5, rtol=0)


def test_embedding_gemma_8bit_quantizes_the_backbone_and_keeps_dense_float(tmp_path):
    dest = convert(EMBEDDING, mlx_path=tmp_path / "out", quantize=True, q_bits=8, progress=False)
    assert json.loads((dest / "config.json").read_text())["quantization"]["bits"] == 8
    assert any(k.endswith(".scales") for k in mx.load(str(dest / "model.safetensors")))
    assert set(mx.load(str(dest / "2_Dense" / "model.safetensors"))) == {"linear.weight"}
    model, tokenizer = mlx_gemma.load(dest)
    ref, texts = embed_reference()
    out = np.array(mlx_gemma.embed(model, tokenizer, texts, prompt_name="query"))
    cosine = np.sum(out * ref["prompt_query"], axis=1)  # both unit vectors
    # Measured on this random tiny model: min cosine 0.99986 (8 bits, group size 64).
    assert cosine.min() > 0.9995


def mlx_embeddings_folder(dest):
    """EmbeddingGemma as mlx-embeddings 0.1 saves it (its models/gemma3_text.py sanitize and its
    convert): one root file with the backbone as `model.*` and the Dense layers as
    `dense.0.weight` / `dense.1.weight`, the root JSON files copied, no module subfolders."""
    dest.mkdir()
    weights = {f"model.{k}": v for k, v in mx.load(str(EMBEDDING / "model.safetensors")).items()}
    for i, sub in enumerate(("2_Dense", "3_Dense")):
        weights[f"dense.{i}.weight"] = mx.load(str(EMBEDDING / sub / "model.safetensors"))["linear.weight"]
    mx.save_safetensors(str(dest / "model.safetensors"), weights, metadata={"format": "mlx"})
    for path in EMBEDDING.glob("*.json"):
        shutil.copy(path, dest)
    shutil.copy(EMBEDDING / "tokenizer.model", dest)
    return dest


def test_mlx_embeddings_layout_loads_and_converts(tmp_path):
    source = mlx_embeddings_folder(tmp_path / "mlx_embeddings")
    ref, texts = embed_reference()
    model, tokenizer = mlx_gemma.load(source)
    assert [(d.in_features, d.out_features, d.bias) for d in model.args.dense] == [(64, 256, False), (256, 64, False)]
    np.testing.assert_allclose(np.array(mlx_gemma.embed(model, tokenizer, texts, prompt_name="query")),
                               ref["prompt_query"], atol=1e-5, rtol=0)
    dest = convert(source, mlx_path=tmp_path / "out", progress=False)
    assert {k for k in mx.load(str(dest / "model.safetensors")) if k.startswith("dense.")} == {
        "dense.0.weight", "dense.1.weight"}  # written back in the layout it came in
    np.testing.assert_allclose(np.array(mlx_gemma.embed(*mlx_gemma.load(dest), texts)), ref["plain"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("bits", [None, 8])
def test_folders_mlx_embeddings_converts(tmp_path, bits):
    """mlx-embeddings' own converter run live (float and 8-bit, where it quantizes the Dense layers
    too); our loader reads its output (it lacks tokenizer.model, which our tokenizer needs)."""
    convert_mlx_embeddings = pytest.importorskip("mlx_embeddings.convert").convert
    dest = tmp_path / "out"
    convert_mlx_embeddings(str(EMBEDDING), mlx_path=str(dest), dtype="float32", quantize=bits is not None,
                           q_bits=bits or 4, q_group_size=64)
    shutil.copy(EMBEDDING / "tokenizer.model", dest)
    ref, texts = embed_reference()
    out = np.array(mlx_gemma.embed(*mlx_gemma.load(dest), texts, prompt_name="query"))
    if bits is None:
        np.testing.assert_allclose(out, ref["prompt_query"], atol=1e-5, rtol=0)
    else:  # measured: min cosine 0.99980 (8 bits, group size 64, Dense layers quantized as well)
        assert np.sum(out * ref["prompt_query"], axis=1).min() > 0.9995


def test_writer_takes_one_module_subfolder_and_no_escape(tmp_path):
    from mlx_gemma.convert.writer import write_model_folder
    from mlx_gemma.errors import ModelFileError

    dest = write_model_folder(tmp_path / "ok", {}, {}, extra_files={"1_Pooling/config.json": b"{}"})
    assert (dest / "1_Pooling" / "config.json").read_bytes() == b"{}"
    for name in ("a/b/c.json", "sub/../x", "../x", "/x", "sub/", "config.json/x", "tokenizer.model"):
        with pytest.raises(ModelFileError, match="not allowed"):
            write_model_folder(tmp_path / "bad", {}, {}, extra_files={name: b""})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]
