"""Keras / keras-hub preset -> HF conversion (mlx_gemma.convert.keras).

Fast tests read the two tiny presets keras-hub wrote in
tests/fixtures/keras_gemma{,2}/ (see make_keras_presets.py) and compare our
model's logits with keras-hub's, saved beside them in reference.npz; hostile
inputs are built from copies of those presets with h5py.  The `oracle` tests
run keras-hub itself (skipped when it is not installed).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

h5py = pytest.importorskip("h5py", reason="reading Keras presets needs h5py")
mx = pytest.importorskip("mlx.core")

from mlx_gemma.convert.keras import keras_config_to_hf, read_keras_preset  # noqa: E402
from mlx_gemma.errors import (  # noqa: E402
    ConfigError,
    ModelFileError,
    TokenizerError,
    UnsupportedModelError,
    WeightsMismatchError,
)
from mlx_gemma.loading import load_model_from  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
GEMMA = FIXTURES / "keras_gemma"  # float32, Gemma 1 style, MQA, head_dim 16 != hidden / heads
GEMMA2 = FIXTURES / "keras_gemma2"  # bfloat16, Gemma 2 style, window 4 < 12 tokens, soft-caps

# Keras dataset paths and HF names, written out independently of the module's table.
BLOCK0 = "layers/gemma_decoder_block"
EMBED = "layers/reversible_embedding/vars/0"


def model_of(ck, weights=None, config=None, dtype=None):
    weights = ck.weights if weights is None else weights
    return load_model_from(config or ck.config, {k: mx.array(v) for k, v in weights.items()}, dtype=dtype)


def logits(model, ref) -> np.ndarray:
    out = model(mx.array(ref["token_ids"]), padding_mask=mx.array(ref["padding_mask"].astype(bool)))
    return np.array(out.astype(mx.float32))


def rel_err(ours: np.ndarray, ref: dict, key: str = "logits") -> float:
    """Max error over real (non-padding) positions, relative to the largest logit."""
    keep = ref["padding_mask"].astype(bool)
    want = ref[key][keep]
    return float(np.abs(ours[keep] - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def gemma():
    return read_keras_preset(GEMMA), dict(np.load(GEMMA / "reference.npz"))


@pytest.fixture(scope="module")
def gemma2():
    return read_keras_preset(GEMMA2), dict(np.load(GEMMA2 / "reference.npz"))


# ----------------------------------------------------------------------------- numerics vs keras-hub


def test_gemma_fp32_preset_matches_keras_hub(gemma):
    ck, ref = gemma
    assert ck.source_dtype == "float32"
    assert rel_err(logits(model_of(ck), ref), ref) < 1e-4


def test_gemma2_bf16_preset_matches_keras_hub(gemma2):
    """Against keras-hub computing in float32 with the same bf16-rounded weights: the
    comparison tests the conversion, not two bf16 arithmetics."""
    ck, ref = gemma2
    assert ck.source_dtype == "bfloat16"
    assert rel_err(logits(model_of(ck), ref), ref) < 1e-4


def test_gemma2_bf16_inference_close_to_keras_hub_bf16(gemma2):
    """Both computing in bf16: rounding differs only in places (observed 0.0625 max, 5e-5 mean)."""
    ck, ref = gemma2
    ours = logits(model_of(ck, dtype=mx.bfloat16), ref)
    keep = ref["padding_mask"].astype(bool)
    diff = np.abs(ours - ref["logits_bf16"])[keep]
    assert diff.max() < 0.25 and diff.mean() < 5e-3
    # and keras-hub's own bf16 run is this far from float32: the bf16 check is meaningful
    assert rel_err(ref["logits_bf16"], ref) > 1e-3


def test_bf16_weights_decoded_exactly(gemma2):
    ck, _ = gemma2
    with h5py.File(GEMMA2 / "model.weights.h5", "r") as f:
        ds = f[EMBED]
        assert ds.dtype.kind == "V" and ds.dtype.itemsize == 2 and ds.attrs["dtype"] == "bfloat16"
        bits = ds[()].view("<u2")
    emb = ck.weights["model.embed_tokens.weight"]
    assert emb.dtype == np.float32
    np.testing.assert_array_equal(emb.view("<u4") >> 16, bits.astype("<u4"))
    assert not (emb.view("<u4") & 0xFFFF).any()


def test_gate_and_up_are_not_interchangeable(gemma, gemma2):
    """keras-hub applies the GELU to `gating_ffw` (HF gate_proj), not `gating_ffw_2`:
    swapping them breaks the match by orders of magnitude."""
    for ck, ref in (gemma, gemma2):
        w = dict(ck.weights)
        for i in range(ck.config["num_hidden_layers"]):
            g, u = f"model.layers.{i}.mlp.gate_proj.weight", f"model.layers.{i}.mlp.up_proj.weight"
            w[g], w[u] = ck.weights[u], ck.weights[g]
        assert rel_err(logits(model_of(ck, w), ref), ref) > 0.05


def test_sliding_window_matches_keras_hub_exactly(gemma2):
    """keras-hub's band mask = HF's `sliding_window` (a query sees the last 4 positions,
    itself included) on even layers; windows 3 or 5, or none, do not match."""
    ck, ref = gemma2
    assert ck.config["sliding_window"] == 4
    assert ck.config["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
    for window in (3, 5):
        cfg = dict(ck.config, sliding_window=window)
        assert rel_err(logits(model_of(ck, config=cfg), ref), ref) > 0.01
    cfg = dict(ck.config, layer_types=["full_attention"] * 3)
    assert rel_err(logits(model_of(ck, config=cfg), ref), ref) > 0.01


# ----------------------------------------------------------------------------- the pieces


def test_config_and_weight_layout(gemma, gemma2):
    ck, _ = gemma
    c = ck.config
    assert c["architectures"] == ["GemmaForCausalLM"] and c["model_type"] == "gemma"
    assert (c["hidden_size"], c["intermediate_size"], c["head_dim"]) == (32, 32, 16)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["num_hidden_layers"]) == (4, 1, 2)
    assert c["hidden_activation"] == "gelu_pytorch_tanh" and c["tie_word_embeddings"] is True
    assert c["max_position_embeddings"] == 8192 and c["rms_norm_eps"] == 1e-6 and c["vocab_size"] == 400
    w = ck.weights
    assert w["model.layers.0.self_attn.q_proj.weight"].shape == (64, 32)
    assert w["model.layers.0.self_attn.k_proj.weight"].shape == (16, 32)
    assert w["model.layers.0.self_attn.o_proj.weight"].shape == (32, 64)
    assert w["model.layers.1.mlp.gate_proj.weight"].shape == (32, 32)
    assert "model.layers.0.post_attention_layernorm.weight" in w  # Gemma 1: keras pre_ffw_norm
    assert "lm_head.weight" not in w
    assert all(a.dtype == np.float32 and a.flags.c_contiguous for a in w.values())
    # query kernel [heads, hidden, head_dim] -> q_proj rows head-major
    with h5py.File(GEMMA / "model.weights.h5", "r") as f:
        q = f[f"{BLOCK0}/attention/query_dense/vars/0"][()]
        o = f[f"{BLOCK0}/attention/output_dense/vars/0"][()]
    np.testing.assert_array_equal(w["model.layers.0.self_attn.q_proj.weight"][16 * 2 + 3], q[2, :, 3])
    np.testing.assert_array_equal(w["model.layers.0.self_attn.o_proj.weight"][:, 16 * 1 + 5], o[1, 5, :])

    c2 = gemma2[0].config
    assert c2["architectures"] == ["Gemma2ForCausalLM"] and c2["model_type"] == "gemma2"
    assert c2["query_pre_attn_scalar"] == 8  # query_head_dim_normalize=False: hidden / heads
    assert (c2["attn_logit_softcapping"], c2["final_logit_softcapping"]) == (5.0, 10.0)
    for i in range(3):
        for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                  "post_feedforward_layernorm"):
            assert f"model.layers.{i}.{n}.weight" in gemma2[0].weights
    assert len(gemma2[0].weights) == 2 + 3 * 11


def test_tokenizer_and_generation_config(gemma):
    ck, _ = gemma
    assert ck.tokenizer_model == (GEMMA / "assets/tokenizer/vocabulary.spm").read_bytes()
    # the test vocabulary has <end_of_turn> at 5 (107 in the real one)
    assert ck.generation_config == {"bos_token_id": 2, "eos_token_id": [1, 5], "pad_token_id": 0}
    assert (ck.config["bos_token_id"], ck.config["eos_token_id"], ck.config["pad_token_id"]) == (2, 1, 0)


def test_progress_and_writer_roundtrip(tmp_path):
    from mlx_gemma.convert.writer import write_model_folder
    from mlx_gemma.loading import load_model

    seen = []
    ck = read_keras_preset(GEMMA2, progress=lambda done, total, name: seen.append((done, total, name)))
    assert len(seen) == 35 and seen[-1][:2] == (35, 35)
    dest = tmp_path / "hf"
    write_model_folder(dest, ck.config, ck.weights, ck.tokenizer_model, ck.generation_config)
    ref = dict(np.load(GEMMA2 / "reference.npz"))
    assert rel_err(logits(load_model(dest), ref), ref) < 1e-4


# Published presets' configs (keras-hub gemma_presets / Kaggle) and the HF configs of the same models.
GEMMA_2B = dict(vocabulary_size=256000, num_layers=18, num_query_heads=8, num_key_value_heads=1,
                hidden_dim=2048, intermediate_dim=32768, head_dim=256, layer_norm_epsilon=1e-6, dropout=0)
GEMMA2_9B = dict(vocabulary_size=256000, num_layers=42, num_query_heads=16, num_key_value_heads=8,
                 hidden_dim=3584, intermediate_dim=28672, head_dim=256, layer_norm_epsilon=1e-6, dropout=0,
                 query_head_dim_normalize=True, use_post_ffw_norm=True, use_post_attention_norm=True,
                 final_logit_soft_cap=30.0, attention_logit_soft_cap=50.0, sliding_window_size=4096,
                 use_sliding_window_attention=True)
GEMMA2_27B = dict(GEMMA2_9B, num_layers=46, num_query_heads=32, num_key_value_heads=16, hidden_dim=4608,
                  intermediate_dim=73728, head_dim=128, query_head_dim_normalize=False)


@pytest.mark.parametrize("keras_cfg, hf", [
    (GEMMA_2B, dict(model_type="gemma", hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                    num_attention_heads=8, num_key_value_heads=1, head_dim=256)),
    (GEMMA2_9B, dict(model_type="gemma2", hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                     query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
                     final_logit_softcapping=30.0)),
    (GEMMA2_27B, dict(model_type="gemma2", hidden_size=4608, intermediate_size=36864, head_dim=128,
                      query_pre_attn_scalar=144, num_key_value_heads=16)),
])
def test_published_preset_configs(keras_cfg, hf):
    cfg = keras_config_to_hf(keras_cfg)
    assert {k: cfg[k] for k in hf} == hf
    if cfg["model_type"] == "gemma2":
        assert cfg["layer_types"][:3] == ["sliding_attention", "full_attention", "sliding_attention"]
    from mlx_gemma.models import MODELS

    MODELS[cfg["model_type"]].ModelArgs.from_dict(cfg)  # our loader accepts it


def test_gemma2_without_sliding_window_is_all_global():
    cfg = keras_config_to_hf(dict(GEMMA2_9B, use_sliding_window_attention=False))
    assert cfg["layer_types"] == ["full_attention"] * 42


# ----------------------------------------------------------------------------- hostile input


def copy_preset(tmp_path, src=GEMMA) -> Path:
    dest = tmp_path / src.name
    shutil.copytree(src, dest)
    return dest


def edit_h5(folder: Path, fn, name="model.weights.h5"):
    with h5py.File(folder / name, "r+") as f:
        fn(f)


def edit_config(folder: Path, fn):
    p = folder / "config.json"
    top = json.loads(p.read_text())
    fn(top)
    p.write_text(json.dumps(top))


def test_not_a_folder(tmp_path):
    with pytest.raises(ModelFileError, match="Keras preset folder"):
        read_keras_preset(tmp_path / "nope")


@pytest.mark.parametrize("class_name, registered, match", [
    ("RecurrentGemmaBackbone", "keras_hub>RecurrentGemmaBackbone", "not yet supported"),  # PaliGemma: own tests
    ("Gemma3nBackbone", "keras_hub>Gemma3nBackbone", "not yet supported"),  # Gemma3Backbone: own tests
    ("LlamaBackbone", "keras_hub>LlamaBackbone", "not a Gemma backbone"),
    ("GemmaCausalLM", "keras_hub>GemmaCausalLM", "is a task"),
    ("GemmaBackbone", "keras_hub>LlamaBackbone", "LlamaBackbone"),
    ("GemmaBackbone", "evil>GemmaBackbone", "not a Gemma backbone"),
])
def test_refuses_other_classes(tmp_path, class_name, registered, match):
    folder = copy_preset(tmp_path)
    edit_config(folder, lambda t: t.update(class_name=class_name, registered_name=registered))
    with pytest.raises(UnsupportedModelError, match=match) as e:
        read_keras_preset(folder)
    assert e.value.path == str(folder / "config.json")


def test_accepts_keras_nlp_presets(tmp_path):
    folder = copy_preset(tmp_path)
    edit_config(folder, lambda t: t.update(registered_name="keras_nlp>GemmaBackbone",
                                           module="keras_nlp.src.models.gemma.gemma_backbone"))
    assert read_keras_preset(folder).config["model_type"] == "gemma"


@pytest.mark.parametrize("mutate, error, match", [
    (lambda t: t["config"].update(num_key_value_heads=3), ConfigError, "not a multiple"),
    (lambda t: t["config"].update(intermediate_dim=63), ConfigError, "must be even"),
    (lambda t: t["config"].update(hidden_dim="32"), ConfigError, "hidden_dim must be an integer"),
    (lambda t: t["config"].update(hidden_dim=-1), ConfigError, "hidden_dim"),
    (lambda t: t["config"].pop("num_layers"), ConfigError, "missing 'num_layers'"),
    (lambda t: t["config"].update(layer_norm_epsilon=float("nan")), ConfigError, "layer_norm_epsilon"),
    (lambda t: t["config"].update(use_post_ffw_norm="yes"), ConfigError, "true or false"),
    (lambda t: t["config"].update(use_post_ffw_norm=True), UnsupportedModelError, "neither"),
    (lambda t: t["config"].update(final_logit_soft_cap=30.0), UnsupportedModelError, "no Hugging Face"),
    (lambda t: t.pop("config"), ConfigError, "no 'config' object"),
    (lambda t: t["config"].update(vocabulary_size=300), TokenizerError, "400 pieces"),
])
def test_bad_configs(tmp_path, mutate, error, match):
    folder = copy_preset(tmp_path)
    edit_config(folder, mutate)
    with pytest.raises(error, match=match):
        read_keras_preset(folder)


def test_gemma2_null_soft_cap_refused():
    with pytest.raises(UnsupportedModelError, match="soft_cap"):
        keras_config_to_hf(dict(GEMMA2_9B, attention_logit_soft_cap=None))


@pytest.mark.parametrize("content, match", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b"{}", "no class_name"),
    (b" " * (5 << 20), "bytes"),
], ids=["not-json", "array", "empty-object", "too-big"])
def test_bad_config_json(tmp_path, content, match):
    folder = copy_preset(tmp_path)
    (folder / "config.json").write_bytes(content)
    with pytest.raises(ConfigError, match=match):
        read_keras_preset(folder)


def test_missing_files(tmp_path):
    folder = copy_preset(tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(ConfigError, match="missing"):
        read_keras_preset(folder)
    folder = copy_preset(tmp_path / "b")
    (folder / "model.weights.h5").unlink()
    with pytest.raises(ModelFileError, match="model.weights.h5"):
        read_keras_preset(folder)
    folder = copy_preset(tmp_path / "c")
    (folder / "assets/tokenizer/vocabulary.spm").unlink()
    with pytest.raises(TokenizerError, match="missing"):
        read_keras_preset(folder)
    folder = copy_preset(tmp_path / "d")
    (folder / "assets/tokenizer/vocabulary.spm").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(TokenizerError, match="SentencePiece"):
        read_keras_preset(folder)


@pytest.mark.parametrize("content, match", [
    (b"", "not an HDF5 file"),
    (b"PK\x03\x04 a zip, not hdf5", "not an HDF5 file"),
    (b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 4, "cannot open HDF5"),
])
def test_corrupt_h5(tmp_path, content, match):
    folder = copy_preset(tmp_path)
    (folder / "model.weights.h5").write_bytes(content)
    with pytest.raises(ModelFileError, match=match) as e:
        read_keras_preset(folder)
    assert e.value.path == str(folder / "model.weights.h5")


@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_truncated_h5(tmp_path, keep):
    folder = copy_preset(tmp_path)
    p = folder / "model.weights.h5"
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelFileError, match="truncated|corrupt") as e:
        read_keras_preset(folder)
    assert e.value.path == str(p)


def test_missing_variable(tmp_path):
    folder = copy_preset(tmp_path)
    edit_h5(folder, lambda f: f.__delitem__("layers/gemma_decoder_block_1/gating_ffw_2/vars/0"))
    with pytest.raises(WeightsMismatchError, match="missing variables: 'layers/gemma_decoder_block_1/gating_ffw_2"):
        read_keras_preset(folder)


@pytest.mark.parametrize("name", [
    "layers/reversible_embedding/vars/1",  # an untied output projection
    "layers/gemma_decoder_block_2/pre_ffw_norm/vars/0",  # a third block for a 2-layer config
    "layers/gemma_decoder_block/post_ffw_norm/vars/0",  # a Gemma 2 norm in a Gemma 1 config
    "something_else",
])
def test_unexpected_variable(tmp_path, name):
    folder = copy_preset(tmp_path)
    edit_h5(folder, lambda f: f.create_dataset(name, data=np.zeros(32, np.float32)))
    with pytest.raises(WeightsMismatchError, match="no gemma counterpart"):
        read_keras_preset(folder)


def replace(f, name, data, **kw):
    del f[name]
    return f.create_dataset(name, data=data, **kw)


def test_wrong_shape(tmp_path):
    folder = copy_preset(tmp_path)
    edit_h5(folder, lambda f: replace(f, f"{BLOCK0}/attention/key_dense/vars/0", np.zeros((2, 32, 16), np.float32)))
    with pytest.raises(WeightsMismatchError, match=r"key_dense/vars/0' has shape \[2, 32, 16\], expected \[1, 32, 16\]"):
        read_keras_preset(folder)


@pytest.mark.parametrize("data, error, match", [
    (np.zeros(32, np.int32), ModelFileError, "unsupported dtype int32"),
    (np.zeros(32, np.complex64), ModelFileError, "unsupported dtype"),
    (np.zeros(32, np.int8), UnsupportedModelError, "quantized"),
    (np.full(32, np.nan, np.float32), ModelFileError, "NaN"),
])
def test_bad_dtype_or_values(tmp_path, data, error, match):
    folder = copy_preset(tmp_path)
    edit_h5(folder, lambda f: replace(f, "layers/rms_normalization/vars/0", data))
    with pytest.raises(error, match=match):
        read_keras_preset(folder)


def test_declared_dtype_must_agree(tmp_path):
    folder = copy_preset(tmp_path)
    edit_h5(folder, lambda f: f["layers/rms_normalization/vars/0"].attrs.__setitem__("dtype", "float16"))
    with pytest.raises(ModelFileError, match="declares dtype 'float16'"):
        read_keras_preset(folder)


def test_float16_and_uint16_bf16_are_read(tmp_path):
    folder = copy_preset(tmp_path)
    ref = read_keras_preset(GEMMA).weights
    norm = ref["model.norm.weight"]
    bf16_bits = (norm.view("<u4") >> 16).astype("<u2")  # truncated, exactly representable back
    edit_h5(folder, lambda f: replace(f, "layers/rms_normalization/vars/0", bf16_bits))
    edit_h5(folder, lambda f: replace(f, f"{BLOCK0}/pre_ffw_norm/vars/0",
                                      ref["model.layers.0.post_attention_layernorm.weight"].astype(np.float16)))
    w = read_keras_preset(folder).weights
    np.testing.assert_array_equal(w["model.norm.weight"], (bf16_bits.astype("<u4") << 16).view(np.float32))
    np.testing.assert_array_equal(w["model.layers.0.post_attention_layernorm.weight"],
                                  ref["model.layers.0.post_attention_layernorm.weight"].astype(np.float16))


@pytest.mark.parametrize("kind", ["soft", "external"])
def test_links_are_not_followed(tmp_path, kind):
    folder = copy_preset(tmp_path)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as o:
        o.create_dataset("x", data=np.zeros(32, np.float32))

    def add(f):
        del f["layers/rms_normalization/vars/0"]
        f["layers/rms_normalization/vars/0"] = (
            h5py.SoftLink("/layers/gemma_decoder_block/pre_ffw_norm/vars/0") if kind == "soft"
            else h5py.ExternalLink(str(other), "/x")
        )

    edit_h5(folder, add)
    with pytest.raises(ModelFileError, match="Link: links are not followed"):
        read_keras_preset(folder)


def test_external_storage_refused(tmp_path):
    folder = copy_preset(tmp_path)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.ones(32, np.float32).tobytes())
    edit_h5(folder, lambda f: (f.__delitem__("layers/rms_normalization/vars/0"), f.create_dataset(
        "layers/rms_normalization/vars/0", shape=(32,), dtype=np.float32, external=[(str(secret), 0, 128)])))
    with pytest.raises(ModelFileError, match="external files"):
        read_keras_preset(folder)


def test_compressed_dataset_refused(tmp_path):
    folder = copy_preset(tmp_path)
    edit_h5(folder, lambda f: replace(f, "layers/rms_normalization/vars/0", np.zeros(32, np.float32),
                                      compression="gzip", chunks=(32,)))
    with pytest.raises(ModelFileError, match="compressed or filtered"):
        read_keras_preset(folder)


def test_unallocated_dataset_refused(tmp_path):
    """A dataset that declares a shape but stores no data (HDF5 would hand back fill values)."""
    folder = copy_preset(tmp_path)
    edit_h5(folder, lambda f: (f.__delitem__("layers/rms_normalization/vars/0"),
                               f.create_dataset("layers/rms_normalization/vars/0", shape=(32,), dtype=np.float32)))
    with pytest.raises(ModelFileError, match="should hold 128 bytes"):
        read_keras_preset(folder)


# ----------------------------------------------------------------------------- sharded presets


def shard_preset(folder: Path, split_at: str = "layers/gemma_decoder_block_1") -> dict:
    """Rewrite a preset the way keras writes sharded weights: model.weights.json + model_0000N.weights.h5."""
    src = folder / "model.weights.h5"
    weight_map, names = {}, []
    with h5py.File(src, "r") as f:
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        with h5py.File(folder / "model_00000.weights.h5", "w") as a, h5py.File(folder / "model_00001.weights.h5", "w") as b:
            for n in names:
                shard, fname = (b, "model_00001.weights.h5") if n >= split_at else (a, "model_00000.weights.h5")
                f.copy(f[n], shard.require_group(n.rsplit("/", 1)[0]), name=n.rsplit("/", 1)[1])
                weight_map["/" + n.rsplit("/", 1)[0]] = fname
    src.unlink()
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.weights.json").write_text(json.dumps(index, indent=4))
    return index


def test_sharded_preset(tmp_path):
    folder = copy_preset(tmp_path, GEMMA2)
    shard_preset(folder)
    ck = read_keras_preset(folder)
    ref = read_keras_preset(GEMMA2)
    assert ck.weights.keys() == ref.weights.keys()
    for k in ref.weights:
        np.testing.assert_array_equal(ck.weights[k], ref.weights[k])


@pytest.mark.parametrize("bad", ["../model_00000.weights.h5", "/etc/passwd", "sub/model_00000.weights.h5",
                                 "model_00000.h5", 7, "..", ["model_00000.weights.h5", "/tmp/x.weights.h5"]])
def test_shard_names_must_stay_in_folder(tmp_path, bad):
    folder = copy_preset(tmp_path)
    index = shard_preset(folder)
    index["weight_map"]["/layers/reversible_embedding/vars"] = bad
    (folder / "model.weights.json").write_text(json.dumps(index))
    with pytest.raises(ModelFileError, match="shard|file name") as e:
        read_keras_preset(folder)
    assert e.value.path == str(folder / "model.weights.json")


def test_sharded_problems(tmp_path):
    folder = copy_preset(tmp_path)
    shard_preset(folder)
    (folder / "model_00001.weights.h5").unlink()
    with pytest.raises(ModelFileError, match="missing: model.weights.json lists this shard"):
        read_keras_preset(folder)

    folder = copy_preset(tmp_path / "b")
    shard_preset(folder)
    (folder / "model.weights.json").write_text('{"weight_map": {}}')
    with pytest.raises(ModelFileError, match="weight_map"):
        read_keras_preset(folder)

    folder = copy_preset(tmp_path / "c")
    shard_preset(folder)
    dup = f"{BLOCK0}/pre_ffw_norm/vars"  # in the first shard; copy it into the second too
    with h5py.File(folder / "model_00000.weights.h5", "r") as a, h5py.File(folder / "model_00001.weights.h5", "r+") as b:
        a.copy(a[f"{dup}/0"], b.require_group(dup), name="0")
    with pytest.raises(WeightsMismatchError, match="also in"):
        read_keras_preset(folder)


# ----------------------------------------------------------------------------- live keras-hub


def _keras_hub():
    os.environ.setdefault("KERAS_BACKEND", "jax")
    return pytest.importorskip("keras_hub", reason="the live oracle needs keras-hub (pip install keras-hub jax)")


@pytest.mark.oracle
@pytest.mark.parametrize("folder", [GEMMA, GEMMA2])
def test_live_keras_hub_fresh_ids(folder):
    """keras-hub loads the preset itself (in float32) and scores fresh random ids."""
    keras_hub = _keras_hub()
    import keras

    backbone = keras_hub.models.GemmaBackbone.from_preset(str(folder), dtype="float32")
    rng = np.random.default_rng(99)
    ids = rng.integers(3, 400, size=(2, 20)).astype("int32")
    mask = np.ones_like(ids)
    mask[1, :5] = 0  # left padding
    ids[1, :5] = 0
    ref_logits = keras.ops.convert_to_numpy(
        backbone.token_embedding(backbone({"token_ids": ids, "padding_mask": mask}), reverse=True))
    ref = {"token_ids": ids, "padding_mask": mask, "logits": np.asarray(ref_logits, np.float32)}
    ck = read_keras_preset(folder)
    assert rel_err(logits(model_of(ck), ref), ref) < 1e-4


@pytest.mark.oracle
@pytest.mark.parametrize("variant", [
    # Gemma 1 style with multi-head attention (kv heads = heads) and three layers
    dict(num_layers=3, num_query_heads=2, num_key_value_heads=2, hidden_dim=24, intermediate_dim=48, head_dim=12),
    # Gemma 2 style, MQA, window 7 < 16 tokens, caps low enough to bite
    dict(num_layers=4, num_query_heads=4, num_key_value_heads=1, hidden_dim=32, intermediate_dim=96, head_dim=8,
         query_head_dim_normalize=True, use_post_ffw_norm=True, use_post_attention_norm=True,
         attention_logit_soft_cap=3.0, final_logit_soft_cap=6.0, use_sliding_window_attention=True,
         sliding_window_size=7),
])
def test_live_keras_hub_fresh_preset(tmp_path, variant):
    """A freshly built random backbone, saved by keras-hub, read by us."""
    keras_hub = _keras_hub()
    import keras

    backbone = keras_hub.models.GemmaBackbone(vocabulary_size=400, **variant)
    rng = np.random.default_rng(5)
    for v in backbone.weights:
        v.assign(rng.normal(0, 1.0 if "embeddings" in v.path else 0.4, v.shape).astype("float32"))
    backbone.save_to_preset(str(tmp_path / "p"))
    keras_hub.models.GemmaTokenizer(proto=str(FIXTURES / "tokenizer" / "tokenizer.model")).save_to_preset(
        str(tmp_path / "p"))
    ids = rng.integers(3, 400, size=(2, 16)).astype("int32")
    mask = np.ones_like(ids)
    out = backbone.token_embedding(backbone({"token_ids": ids, "padding_mask": mask}), reverse=True)
    ref = {"token_ids": ids, "padding_mask": mask, "logits": np.asarray(keras.ops.convert_to_numpy(out), np.float32)}
    ck = read_keras_preset(tmp_path / "p")
    assert rel_err(logits(model_of(ck), ref), ref) < 1e-4


# ----------------------------------------------------------------------------- fuzzing

import random  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402

from hypothesis import event, example, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fuzzing import fuzz_settings, refused_cleanly  # noqa: E402
from mlx_gemma.tasks import presets  # noqa: E402

PALIGEMMA = FIXTURES / "keras_paligemma"
PALIGEMMA2 = FIXTURES / "keras_paligemma2"
FUZZ_PRESETS = {"gemma": GEMMA, "gemma2": GEMMA2, "paligemma": PALIGEMMA, "paligemma2": PALIGEMMA2,
                "gemma3_vlm": FIXTURES / "keras_gemma3_vlm"}
# What keras-hub's GemmaCausalLMPreprocessor.save_to_preset writes (tests/fixtures/keras_generate.json).
PREPROCESSOR = {
    "module": "keras_hub.src.models.gemma.gemma_causal_lm_preprocessor", "class_name": "GemmaCausalLMPreprocessor",
    "config": {"name": "gemma_causal_lm_preprocessor", "trainable": True, "config_file": "preprocessor.json",
               "sequence_length": 20, "add_start_token": True, "add_end_token": False},
    "registered_name": "keras_hub>GemmaCausalLMPreprocessor",
}
PRESET_FILES = ("config.json", "metadata.json", "tokenizer.json", "preprocessor.json", "model.weights.h5",
                "model.weights.json", "model_00000.weights.h5", "model_00001.weights.h5",
                "assets/tokenizer/vocabulary.spm")


@pytest.fixture(scope="module")
def fuzz_presets(tmp_path_factory):
    """The fixtures plus a preprocessor.json each, and a sharded Gemma 2 (model.weights.json)."""
    root = tmp_path_factory.mktemp("fuzz-presets")
    out = {}
    for name, src in FUZZ_PRESETS.items():
        out[name] = root / name
        shutil.copytree(src, out[name], ignore=shutil.ignore_patterns("reference.npz"))
        (out[name] / "preprocessor.json").write_text(json.dumps(PREPROCESSOR, indent=4))
    out["gemma2-sharded"] = root / "gemma2-sharded"
    shutil.copytree(out["gemma2"], out["gemma2-sharded"])
    shard_preset(out["gemma2-sharded"])
    return out


def _fresh_copy(src: Path, root: str) -> Path:
    folder = Path(root) / "preset"
    shutil.copytree(src, folder)
    return folder


def _check_preset(folder: Path):
    """Every reader of the folder accepts it or refuses with our typed error naming one of its
    files; what is accepted is a model our loader builds strictly, with finite float32 weights."""
    files = [folder / f for f in PRESET_FILES]
    ck = None
    with refused_cleanly(*files):
        try:
            ck = read_keras_preset(folder)
        except ModelFileError as e:  # the statistics show what the mutations reach
            problem = re.sub(r"'[^']*'|\[[^]]*\]|\d+", "_", e.problem)
            event(f"refused, {type(e).__name__}: {' '.join(problem.split()[:5])[:50]}")
            raise
    if ck is not None:
        event("accepted")
    if ck is not None:
        assert all(w.dtype == np.float32 and np.isfinite(w).all() for w in ck.weights.values())
        model_of(ck)  # names and shapes checked strictly against the config
        assert ck.tokenizer_model == (folder / "assets/tokenizer/vocabulary.spm").read_bytes()
    assert presets.is_keras_preset(folder) in (True, False)
    assert presets._keras_dtype(folder) in (None, "float32", "bfloat16", "float16")
    with refused_cleanly(folder / "preprocessor.json"):
        settings = presets.keras_preprocessor_settings(str(folder))
        assert set(settings) <= {"sequence_length", "add_start_token", "add_end_token"}
    if presets.is_keras_preset(folder):
        with refused_cleanly(folder / "config.json"):
            assert isinstance(presets.keras_backbone_config(folder), dict)
    return ck


# --- JSON: a value anywhere replaced by any JSON value, keys dropped or added, the text damaged

_NUMBERS = st.sampled_from([0, 1, -1, 2, 3, 400, 2**31, 2**63, -(2**63), 2**64, 10**400, 0.5, 1e-300, 1e308,
                            float("nan"), float("inf"), -0.0])
_LEAVES = st.one_of(st.none(), st.booleans(), _NUMBERS, st.integers(), st.floats(), st.text(max_size=12),
                    st.sampled_from(["GemmaBackbone", "PaliGemmaBackbone", "keras_hub>GemmaBackbone",
                                     "keras_hub>PaliGemmaBackbone", "bfloat16", "float32", "DTypePolicy", ""]))
_JSON = st.recursive(_LEAVES, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)


def _json_slots(doc, at=()):
    """Every (path to a container, key or index in it) of a decoded JSON document."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in items:
        yield at, key
        yield from _json_slots(value, at + (key,))


@st.composite
def json_mutation(draw):
    """(preset, file, [(operation, value)], random) to apply to one JSON file of a preset."""
    name = draw(st.sampled_from(["gemma", "gemma2", "paligemma", "gemma2-sharded", "gemma3_vlm"]))
    files = ["config.json", "metadata.json", "tokenizer.json", "preprocessor.json"]
    file = draw(st.sampled_from(files + ["model.weights.json"] if name == "gemma2-sharded" else files))
    op = st.sampled_from(["replace", "replace", "replace", "delete", "insert", "document", "text", "deep", "long-number"])
    return name, file, draw(st.lists(st.tuples(op, _JSON), min_size=1, max_size=3)), draw(st.randoms(use_true_random=False))


def _apply_json(path: Path, ops, rnd) -> None:
    for op, value in ops:
        data = path.read_bytes()
        if op == "text":  # the bytes themselves: cut short, or a stray byte that is not UTF-8
            cut = rnd.randrange(len(data) or 1)
            path.write_bytes(data[:cut] if rnd.random() < 0.5 else data[:cut] + b"\xff" + data[cut:])
            return
        try:
            doc = json.loads(data)
        except ValueError:
            return
        slots = list(_json_slots(doc))
        if op == "set":  # only in @example: value is (path of keys, new value)
            *at, key = value[0]
            parent = doc
            for k in at:
                parent = parent[k]
            parent[key] = value[1]
        elif op == "document" or not slots:
            doc = value
        else:
            at, key = rnd.choice(slots)
            parent = doc
            for k in at:
                parent = parent[k]
            if op in ("deep", "long-number"):  # past the recursion limit, past int's 4300 digits
                parent[key] = "@raw@"
                raw = "[" * 50_000 + "]" * 50_000 if op == "deep" else "9" * 5000
                path.write_text(json.dumps(doc).replace('"@raw@"', raw))
                return
            if op == "replace":
                parent[key] = value
            elif op == "delete":
                del parent[key]
            elif isinstance(parent, dict):
                parent[str(rnd.choice([key, "extra", ""]))] = value
            else:
                parent.insert(key, value)
        path.write_text(json.dumps(doc))  # NaN and Infinity included, as Python's json writes them


@fuzz_settings(150)
@given(mutation=json_mutation())
# is_keras_preset (from_preset's first look at a folder) let json's RecursionError out:
@example(mutation=("gemma", "config.json", [("deep", None)], random.Random(0)))
# a 5000-digit integer: Python's json raises a plain ValueError (int max str digits)
@example(mutation=("gemma", "config.json", [("long-number", None)], random.Random(0)))
# a list as registered_name beside class_name PaliGemmaBackbone: TypeError (unhashable) in the dispatch
@example(mutation=("gemma", "config.json", [("document", {"class_name": "PaliGemmaBackbone", "registered_name": []})],
                   random.Random(0)))
# an epsilon of 10**400 (JSON integers are unbounded): OverflowError in math.isfinite
@example(mutation=("gemma", "config.json", [("set", (("config", "layer_norm_epsilon"), 10**400))], random.Random(0)))
# preprocessor.json's "config" a list or a string: TypeError indexing it by key
@example(mutation=("gemma", "preprocessor.json", [("document", {"config": ["sequence_length"]})], random.Random(0)))
@example(mutation=("gemma", "preprocessor.json", [("document", {"config": "sequence_length"})], random.Random(0)))
def test_fuzz_keras_json(fuzz_presets, mutation):
    """A preset whose config.json, metadata.json, tokenizer.json, preprocessor.json or shard
    index holds anything JSON can say (or is cut short) reads, or is refused naming a file."""
    name, file, ops, rnd = mutation
    with tempfile.TemporaryDirectory() as root:
        folder = _fresh_copy(fuzz_presets[name], root)
        _apply_json(folder / file, ops, rnd)
        _check_preset(folder)


# --- HDF5 bytes: flips, 64-bit numbers and cuts, mostly in the metadata (object headers, B-trees)


def _metadata_bytes(h5_path: Path) -> np.ndarray:
    """Offsets of the bytes of an .h5 file that are not variable data."""
    size = h5_path.stat().st_size
    is_meta = np.ones(size, bool)
    with h5py.File(h5_path, "r") as f:
        def visit(_, obj):
            if isinstance(obj, h5py.Dataset) and obj.id.get_offset() is not None:
                start = obj.id.get_offset()
                is_meta[start:start + obj.id.get_storage_size()] = False
        f.visititems(visit)
    return np.flatnonzero(is_meta)


_META = {}  # per fixture, not per copy: a copy's path is new each example


def _meta_of(preset: str) -> np.ndarray:
    if preset not in _META:
        _META[preset] = _metadata_bytes(FUZZ_PRESETS[preset] / "model.weights.h5")
    return _META[preset]


@st.composite
def h5_byte_mutation(draw):
    """(preset, [(kind, position as a fraction, value)]): 1-4 edits of its model.weights.h5."""
    name = draw(st.sampled_from(list(FUZZ_PRESETS)))
    edit = st.tuples(
        st.sampled_from(["flip", "flip", "number", "byte", "truncate", "data"]),
        st.floats(0, 1, exclude_max=True),
        st.sampled_from([0, 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1]) | st.integers(0, 2**64 - 1))
    return name, draw(st.lists(edit, min_size=1, max_size=4))


def _apply_bytes(path: Path, edits, meta: np.ndarray) -> None:
    data = bytearray(path.read_bytes())
    for kind, where, value in edits:
        if not data:
            break
        if kind == "truncate":
            del data[int(where * len(data)):]
            continue
        # metadata bytes, except "data": anywhere (the variables' own bytes)
        # the 8-byte signature aside: a file without it is refused before HDF5 sees it
        i = int(where * len(data)) if kind == "data" else int(meta[8 + int(where * (len(meta) - 8))])
        i = min(i, len(data) - 1)
        if kind in ("flip", "data"):
            data[i] ^= 1 << (value % 8)
        elif kind == "byte":
            data[i] = value % 256
        else:  # a length, count or file address that lies
            data[i:i + 8] = value.to_bytes(8, "little")
    path.write_bytes(bytes(data))


@fuzz_settings(150)
@given(mutation=h5_byte_mutation())
def test_fuzz_keras_h5_bytes(fuzz_presets, mutation):
    """A model.weights.h5 with flipped bits, lying 64-bit fields or cut short reads (every
    weight finite, of its config's shape), or is refused naming the file; never a bare h5py
    error, a crash, a hang or an allocation the file's size does not justify."""
    name, edits = mutation
    with tempfile.TemporaryDirectory() as root:
        folder = _fresh_copy(fuzz_presets[name], root)
        _apply_bytes(folder / "model.weights.h5", edits, _meta_of(name))
        _check_preset(folder)


# --- HDF5 structure: variables of other shapes and types, groups gone, attributes changed

_DTYPES = ["<f4", ">f4", "<f2", "<f8", "V2", "<u2", "<i1", "<u1", "<i4", "?", "<c8", "S4", "str", "compound",
           "enum"]


def _dtype(name: str):
    if name == "str":
        return h5py.string_dtype()
    if name == "compound":
        return np.dtype([("a", "<u1"), ("b", "<u1")])
    if name == "enum":
        return h5py.enum_dtype({"a": 0, "b": 1}, basetype="i1")
    return np.dtype(name)


def _data(shape, dtype, rnd):
    if dtype.kind == "O":
        return np.array([str(rnd.random())] * int(np.prod(shape)), dtype=object).reshape(shape)
    raw = np.frombuffer(rnd.randbytes(int(np.prod(shape)) * dtype.itemsize), np.uint8)
    out = raw.view(dtype).reshape(shape) if dtype.names is None else np.zeros(shape, dtype)
    if dtype.kind == "f" and rnd.random() < 0.7:
        out = np.clip(np.nan_to_num(out), -1, 1).astype(dtype)  # mostly finite values
    return out


_ATTR_VALUES = st.one_of(
    st.sampled_from(["bfloat16", "float32", "float16", "int8", "", "é"]),
    st.sampled_from([b"bfloat16", b"\xff\xfe"]),
    st.integers(-(2**63), 2**63 - 1), st.floats(), st.lists(st.sampled_from(["bfloat16", "float32"]), max_size=3),
    st.just(np.array([1, 2, 3], np.int64)), st.just(np.array([b"bfloat16"])), st.just(np.array(2.5)))


@st.composite
def h5_structure_mutation(draw):
    """(preset, [operations]): what h5py can write that a hostile model.weights.h5 might hold."""
    name = draw(st.sampled_from(list(FUZZ_PRESETS)))
    op = st.tuples(
        st.sampled_from(["reshape", "retype", "retype", "empty", "scalar", "delete", "attr", "attr",
                         "group-for-dataset", "dataset-for-group", "add", "chunked", "unallocated", "link"]),
        st.integers(0, 10**6),  # which object
        st.lists(st.integers(0, 6), max_size=4),  # a shape
        st.sampled_from(_DTYPES),
        _ATTR_VALUES,
        st.randoms(use_true_random=False))
    return name, draw(st.lists(op, min_size=1, max_size=3))


def _apply_structure(path: Path, ops) -> None:
    with h5py.File(path, "r+") as f:
        for kind, which, shape, dtype_name, attr, rnd in ops:
            datasets, groups = [], []
            f.visititems(lambda n, o: (datasets if isinstance(o, h5py.Dataset) else groups).append(n))
            objects = datasets + groups
            if not datasets or not objects:
                return
            name = datasets[which % len(datasets)]
            old = f[name]
            dtype = _dtype(dtype_name)
            shape = tuple(shape)
            if kind in ("retype", "chunked"):
                shape = old.shape or (1,)  # a scalar or empty one cannot be chunked
            if kind in ("reshape", "retype", "empty", "scalar", "chunked", "unallocated", "link"):
                del f[name]
            if kind in ("reshape", "retype"):
                f.create_dataset(name, data=_data(shape, dtype, rnd), dtype=dtype)
            elif kind == "empty":
                f.create_dataset(name, data=h5py.Empty(dtype if dtype.kind != "O" else "<f4"))
            elif kind == "scalar":
                f.create_dataset(name, data=_data((), dtype, rnd), dtype=dtype)
            elif kind == "chunked":
                f.create_dataset(name, data=_data(shape, np.dtype("<f4"), rnd), chunks=True, maxshape=(None,) * len(shape))
            elif kind == "unallocated":  # a shape, and no data behind it
                f.create_dataset(name, shape=(shape[0] * 10**6, *shape[1:]) if shape else (10**9,), dtype="<f4")
            elif kind == "link":
                f[name] = h5py.SoftLink("/" + datasets[rnd.randrange(len(datasets))])
            elif kind == "delete":
                del f[objects[which % len(objects)]]
            elif kind == "attr":
                target = f[objects[which % len(objects)]] if rnd.random() < 0.3 else old
                target.attrs[rnd.choice(["dtype", "dtype", "name"])] = attr
            elif kind == "group-for-dataset":
                del f[name]
                f.create_group(name).create_dataset("0", data=_data(shape, np.dtype("<f4"), rnd))
            elif kind == "dataset-for-group":
                group = groups[which % len(groups)]
                del f[group]
                f.create_dataset(group, data=_data(shape, dtype, rnd), dtype=dtype)
            else:  # add: a variable no config asks for
                parent = objects[which % len(objects)].rsplit("/", 1)[0] if rnd.random() < 0.5 else ""
                f.create_dataset(f"{parent}/vars/{rnd.randrange(3)}x".lstrip("/"), data=_data(shape, dtype, rnd),
                                 dtype=dtype)


@fuzz_settings(150)
@given(mutation=h5_structure_mutation())
def test_fuzz_keras_h5_structure(fuzz_presets, mutation):
    """Variables replaced by ones of other shapes, ranks and HDF5 types (opaque, strings,
    compounds, enums, empty or scalar dataspaces, chunked, unallocated), groups and
    datasets swapped or deleted, `dtype` attributes of any type: read, or refused naming the file."""
    name, ops = mutation
    with tempfile.TemporaryDirectory() as root:
        folder = _fresh_copy(fuzz_presets[name], root)
        _apply_structure(folder / "model.weights.h5", ops)
        _check_preset(folder)
