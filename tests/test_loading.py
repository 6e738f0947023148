"""Loading model folders: HF layouts, mlx-community quantized folders, hub ids from
a prepared cache, and every kind of bad folder refused with a typed error."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn

from mlx_gemma.errors import (
    ConfigError, ModelFileError, TokenizerError, UnsafeCheckpointError, UnsupportedModelError,
    WeightsMismatchError,
)
from mlx_gemma.loading import load, load_model
from mlx_gemma.tensorfile import load_file, save_file

from conftest import FIXTURES

TINY3 = FIXTURES / "tiny_gemma3"


@pytest.fixture
def folder(tmp_path) -> Path:
    """A writable copy of the tiny Gemma 3 folder."""
    dest = tmp_path / "model"
    shutil.copytree(TINY3, dest)
    return dest


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def reference_logits():
    ref = np.load(TINY3 / "reference.npz")
    return ref["input_ids"], ref["logits"]


def test_load_returns_model_and_tokenizer():
    model, tokenizer = load(TINY3)
    assert model.model_type == "gemma3_text"
    assert tokenizer.vocab_size <= model.args.vocab_size
    ids = tokenizer.encode("hello world")
    assert model(mx.array([ids])).shape == (1, len(ids), model.args.vocab_size)


def test_nested_text_config_and_multimodal_weight_names(folder):
    """A `gemma3` config without a vision_config loads its text_config as a text model, its
    weights under multimodal names (stray vision weights dropped); with a vision_config it
    builds the vision-language model (tests/test_gemma3_vlm.py)."""
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(
        {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "text_config": config}
    ))
    weights = load_file(folder / "model.safetensors")
    renamed = {k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k: v
               for k, v in weights.items()}
    renamed["model.vision_tower.patch.weight"] = mx.zeros((2, 2))
    save_file(folder / "model.safetensors", renamed)
    ids, expected = reference_logits()
    np.testing.assert_allclose(load_model(folder)(mx.array(ids)), expected, atol=1e-4 * np.abs(expected).max())


def test_sharded_checkpoint(folder):
    from mlx_gemma.tensorfile import save_sharded

    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    files = save_sharded(folder, weights, max_shard_bytes=200_000)
    assert len(files) > 1 and (folder / "model.safetensors.index.json").exists()
    ids, expected = reference_logits()
    np.testing.assert_allclose(load_model(folder)(mx.array(ids)), expected, atol=1e-4 * np.abs(expected).max())


def test_dtype_argument_casts_weights():
    model = load_model(TINY3, dtype=mx.bfloat16)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == mx.bfloat16


# --- hub ids, from a prepared cache, never the network -----------------------------------


def prepare_hub_cache(cache: Path, repo_id: str, source: Path) -> Path:
    """Lay out `source` as huggingface_hub's cache stores a downloaded snapshot."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(p for p in source.iterdir() if p.is_file())):
        blob = repo / "blobs" / f"{i:040x}"
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(Path("../../blobs") / blob.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def test_hub_repo_id_resolves_from_the_local_cache_offline(tmp_path, monkeypatch):
    prepare_hub_cache(tmp_path / "hub", "google/tiny-gemma3", TINY3)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    model, tokenizer = load("google/tiny-gemma3")
    ids, expected = reference_logits()
    np.testing.assert_allclose(model(mx.array(ids)), expected, atol=1e-4 * np.abs(expected).max())


def test_uncached_repo_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelFileError, match="google/not-here.*cache"):
        load_model("google/not-here")


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelFileError, match="no such folder"):
        load_model(tmp_path / "nothing" / "here")


# --- bad configs -------------------------------------------------------------------------


def test_missing_config(folder):
    (folder / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json: missing"):
        load_model(folder)


@pytest.mark.parametrize("text,problem", [("{not json", "not valid JSON"), ("[1, 2]", "JSON object"), (b"\xff\xfe", "not valid JSON")])
def test_unreadable_config(folder, text, problem):
    path = folder / "config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=problem):
        load_model(folder)


def test_unknown_model_type_lists_supported(folder):
    edit_config(folder, model_type="llama")
    with pytest.raises(UnsupportedModelError, match="'llama' is not supported; supported: gemma, gemma2, gemma3, gemma3_text"):
        load_model(folder)


def test_missing_required_key(folder):
    edit_config(folder, hidden_size=None)
    with pytest.raises(ConfigError, match="missing required keys: hidden_size"):
        load_model(folder)


@pytest.mark.parametrize("key", ["auto_map", "model_file"])
def test_code_loading_keys_are_refused(folder, key):
    edit_config(folder, **{key: {"AutoModel": "evil.Model"} if key == "auto_map" else "evil.py"})
    with pytest.raises(UnsafeCheckpointError, match=key):
        load_model(folder)


@pytest.mark.parametrize("changes,problem", [
    ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer"),
    ({"num_attention_heads": 3}, "not a multiple of num_key_value_heads"),
    ({"vocab_size": 10**12}, "vocab_size must be a positive integer"),
    ({"hidden_size": "64"}, "hidden_size must be a positive integer"),
    ({"rms_norm_eps": -1}, "rms_norm_eps must be a positive number"),
    ({"layer_types": ["full_attention"]}, "layer_types must list 6 entries"),
    ({"hidden_size": 60000, "intermediate_size": 900000, "num_hidden_layers": 1000}, "parameters; refusing"),
])
def test_absurd_values_refused_before_allocating(folder, changes, problem):
    edit_config(folder, **changes)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=problem):
        load_model(folder)
    assert time.perf_counter() - start < 5, "refusal must come before any large allocation"


# --- bad weights -------------------------------------------------------------------------


def test_wrong_shape_names_the_tensor(folder):
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.2.mlp.up_proj.weight"] = mx.zeros((7, 64))
    save_file(folder / "model.safetensors", weights)
    with pytest.raises(WeightsMismatchError, match=r"wrong shape: model.layers.2.mlp.up_proj.weight \(7, 64\) \(expected \(128, 64\)\)"):
        load_model(folder)


def test_missing_and_unexpected_tensors_are_named(folder):
    weights = load_file(folder / "model.safetensors")
    del weights["model.norm.weight"]
    weights["model.layers.0.surprise.weight"] = mx.zeros((2,))
    save_file(folder / "model.safetensors", weights)
    with pytest.raises(WeightsMismatchError, match="missing: model.norm.weight; unexpected: model.layers.0.surprise.weight"):
        load_model(folder)


def test_truncated_weights(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ModelFileError, match="model.safetensors"):
        load_model(folder)


def test_pickled_weights_refused(folder):
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(UnsafeCheckpointError, match="pickle"):
        load_model(folder)


def test_tokenizer_larger_than_embedding(folder):
    edit_config(folder, vocab_size=100)
    weights = load_file(folder / "model.safetensors")
    weights = {k: (v[:100] if k in ("model.embed_tokens.weight", "lm_head.weight") else v) for k, v in weights.items()}
    save_file(folder / "model.safetensors", weights)
    with pytest.raises(TokenizerError, match="tokenizer.model"):
        load(folder)


# --- mlx-community folders, written by mlx-lm itself ----------------------------------------


@pytest.mark.oracle
@pytest.mark.parametrize("name,bits", [("gemma3", 4), ("gemma3", 8)])
def test_mlx_lm_quantized_folder_loads_and_matches_mlx_lm(tmp_path, name, bits):
    """A folder quantized by mlx-lm's own converter loads as it is, and gives
    the logits mlx-lm's model gives on the same weights.  (Gemma 3 only: mlx-lm
    0.32's Gemma 1 uses exact GELU where the reference uses the tanh
    approximation, and its Gemma 2 ignores the sliding window.)"""
    mlx_lm = pytest.importorskip("mlx_lm")
    from mlx_lm.convert import convert

    source = tmp_path / "source"
    shutil.copytree(FIXTURES / f"tiny_{name}", source)
    if name == "gemma3":
        # mlx-lm 0.32 reads only the pre-5.0 RoPE keys, not `rope_parameters`.
        edit_config(source, rope_theta=1e6, rope_local_base_freq=1e4,
                    rope_scaling={"rope_type": "linear", "factor": 4.0})
    dest = tmp_path / f"q{bits}"
    convert(str(source), mlx_path=str(dest), quantize=True, q_bits=bits, q_group_size=32)
    config = json.loads((dest / "config.json").read_text())
    assert config["quantization"]["bits"] == bits
    theirs, _ = mlx_lm.load(str(dest))
    ours = load_model(dest)
    assert isinstance(ours.model.layers[0].mlp.up_proj, nn.QuantizedLinear)
    ids = mx.array(np.load(source / "reference.npz")["input_ids"])
    expected = np.array(theirs(ids))
    np.testing.assert_allclose(np.array(ours(ids)), expected, atol=1e-4 * np.abs(expected).max())


# ----- fuzzing config.json --------------------------------------------------------------

from fuzzing import fuzz_settings  # noqa: E402
from hypothesis import event, example, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

_BASE_CONFIG = json.loads((TINY3 / "config.json").read_text())
_FUZZ_FOLDERS: dict = {}


def fuzz_folder(tmp_path_factory, name: str) -> Path:
    """A copy of tiny folder `name`, made once per session; each example rewrites its files.
    (Copies, not symlinks: the loader refuses weights that point outside their folder.)"""
    if name not in _FUZZ_FOLDERS:
        _FUZZ_FOLDERS[name] = tmp_path_factory.mktemp("fuzz") / name
        shutil.copytree(FIXTURES / name, _FUZZ_FOLDERS[name])
    return _FUZZ_FOLDERS[name]
_json_scalars = (st.none() | st.booleans() | st.text(max_size=8)
                 | st.sampled_from([0, -1, 1, 2, 3, 7, 16, 2**31, 2**62, 10**12])
                 | st.integers(-4, 64) | st.floats(allow_nan=True, allow_infinity=True))
_json_values = st.recursive(_json_scalars, lambda inner: st.lists(inner, max_size=4)
                            | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)


@st.composite
def mutated_config(draw):
    config = json.loads(json.dumps(_BASE_CONFIG))
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(config) + ["model_type", "auto_map", "text_config", "rope_scaling"]))
        if draw(st.integers(0, 5)) == 0:
            config.pop(key, None)
        else:
            config[key] = draw(_json_values)
    return config


@fuzz_settings(150)
@given(config=mutated_config())
# Found by a fresh CI run: a null text_config was a bare TypeError.
@example(config={**_BASE_CONFIG, "text_config": None})
# Found by the long campaign: an unknown hidden_activation was a bare ValueError building the MLP.
@example(config={**_BASE_CONFIG, "hidden_activation": ""})
def test_fuzz_config(tmp_path_factory, config):
    """A config.json with random values in random fields either loads (the weights still
    fit it) or raises our typed error naming the file; never another exception type, and
    never an allocation the checkpoint's own shapes do not justify."""
    folder = fuzz_folder(tmp_path_factory, "tiny_gemma3")
    (folder / "config.json").write_text(json.dumps(config))
    try:
        model = load_model(folder)
    except ModelFileError as e:
        assert str(folder) in str(e), e
        event(f"refused: {type(e).__name__}")
        return
    event("accepted")
    assert model.model.embed_tokens.weight.shape == (_BASE_CONFIG["vocab_size"], _BASE_CONFIG["hidden_size"])


# Shared with the other formats' fuzz tests (test_tuner_lora, test_prompt_cache, test_tuner_datasets).


def json_paths(value, prefix=()):
    """Every place inside decoded JSON (a tuple of keys / indices), the root included."""
    yield prefix
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        yield from json_paths(v, prefix + (k,))


def _replace(value, path, new):
    """A copy of `value` with the thing at `path` replaced by `new` (`_DROP`: removed)."""
    if not path:
        return new
    head, rest = path[0], path[1:]
    copy = dict(value) if isinstance(value, dict) else list(value)
    inner = _replace(copy[head], rest, new)
    if inner is _DROP:
        del copy[head]
    else:
        copy[head] = inner
    return copy


_DROP = object()


@st.composite
def mutated_json(draw, value, keys=(), values=_json_values, max_edits=3):
    """`value` (decoded JSON) after 1-`max_edits` edits anywhere inside it: a member dropped,
    replaced by random JSON (or one of `values`), wrapped in an array or object, or a key of
    `keys` added to some object."""
    for _ in range(draw(st.integers(1, max_edits))):
        paths = list(json_paths(value))
        path = draw(st.sampled_from(paths))
        old = value
        for step in path:
            old = old[step]
        op = draw(st.sampled_from(["drop", "replace", "replace", "wrap", "add"]))
        if op == "drop" and path:
            value = _replace(value, path, _DROP)
        elif op == "wrap":
            value = _replace(value, path, draw(st.sampled_from([[old], {"x": old}])))
        elif op == "add" and isinstance(old, dict):
            key = draw(st.sampled_from(list(keys) or ["x"]) | st.text(max_size=6))
            value = _replace(value, path, {**old, key: draw(values)})
        else:
            value = _replace(value, path, draw(values))
    return value


@st.composite
def mutated_bytes(draw, data: bytes):
    """`data` cut short, with a byte changed, or a run of bytes deleted or repeated."""
    n = len(data)
    op = draw(st.sampled_from(["truncate", "flip", "delete", "repeat", "digits"]))
    i = draw(st.integers(0, max(n - 1, 0)))
    digits = [k for k, c in enumerate(data) if 48 <= c <= 57]
    if op == "digits" and digits:  # a number longer than Python will convert (4300 digits)
        k = draw(st.sampled_from(digits))
        return data[:k] + b"9" * 5000 + data[k:]
    if op == "truncate":
        return data[:i]
    if op == "flip":
        return data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1:]
    j = draw(st.integers(i, min(n, i + 16)))
    return data[:i] + data[j:] if op == "delete" else data[:j] + data[i:j] * draw(st.integers(2, 1000)) + data[j:]


@st.composite
def mutated_file(draw, value, keys=(), values=_json_values):
    """The bytes of a JSON file made from `value`: mutated as JSON, and sometimes as bytes too."""
    if draw(st.integers(0, 9)) > 0:
        value = draw(mutated_json(value, keys, values))
    data = json.dumps(value, indent=draw(st.sampled_from([None, 2]))).encode()
    if draw(st.integers(0, 4)) == 0:
        data = draw(mutated_bytes(data))
    return data


_TINY_FOLDERS = ["tiny_gemma", "tiny_gemma2", "tiny_gemma3", "tiny_paligemma", "tiny_paligemma2"]
_CONFIGS = {name: json.loads((FIXTURES / name / "config.json").read_text()) for name in _TINY_FOLDERS}
# Keys worth adding somewhere: ours and transformers', the quantization ones among them.
_CONFIG_KEYS = sorted({k for c in _CONFIGS.values() for k in json_paths(c) for k in k if isinstance(k, str)}
                      | {"quantization", "quantization_config", "group_size", "bits", "mode", "rope_scaling",
                         "factor", "rope_type", "auto_map", "image_token_id", "sliding_window_pattern"})
# Quantization objects, whole or per layer, with the values MLX refuses or crashes on.
_quant_values = st.fixed_dictionaries(
    {}, optional={"group_size": st.sampled_from([0, -32, 16, 32, 48, 64, 128, 2**40, None, "64"]),
                  "bits": st.sampled_from([0, -4, 1, 3, 4, 7, 8, 9, 2**40, None, 4.0]),
                  "mode": st.sampled_from(["affine", "mxfp4", "nvfp4", "mxfp8", "x", 3]),
                  "model.layers.0.mlp.down_proj": st.sampled_from([False, True, {}, {"bits": 8}, {"group_size": 0},
                                                                   {"group_size": 32, "bits": 4}, [], "x"]),
                  "model.layers.0.self_attn.q_proj": st.just({"group_size": 64, "bits": 2})})
_config_values = _json_values | _quant_values | st.sampled_from(
    ["linear", "default", "gemma", "gemma2", "gemma3", "gemma3_text", "paligemma", "full_attention",
     "sliding_attention", "gelu", 0.0, 1e308, -1e-6])


def _shapes(model) -> dict:
    return {k: v.shape for k, v in tree_flatten(model.parameters())}


_SHAPES: dict = {}


@fuzz_settings(150)
@given(name=st.sampled_from(_TINY_FOLDERS), data=st.data())
# MLX 0.32 dies of a floating-point exception quantizing with group size 0.
@example(name="tiny_gemma3", data=json.dumps(
    {**_CONFIGS["tiny_gemma3"], "quantization": {"group_size": 0, "bits": 4, "model.layers.0.mlp.down_proj": True}}))
# A list model_type was a bare TypeError (unhashable) in the registry lookup.
@example(name="tiny_gemma", data=json.dumps({**_CONFIGS["tiny_gemma"], "model_type": []}))
# A string where rope_parameters' object belongs was an AttributeError in Gemma's from_dict.
@example(name="tiny_gemma", data=json.dumps({**_CONFIGS["tiny_gemma"], "rope_parameters": "x"}))
# A linear RoPE without its factor was a KeyError.
@example(name="tiny_gemma3", data=json.dumps({**_CONFIGS["tiny_gemma3"], "rope_parameters": {
    "full_attention": {"rope_type": "linear"}, "sliding_attention": {}}}))
# sliding_window_pattern 0 was a ZeroDivisionError.
@example(name="tiny_gemma3", data=json.dumps({k: v for k, v in {**_CONFIGS["tiny_gemma3"],
                                                                  "sliding_window_pattern": 0}.items() if k != "layer_types"}))
# A soft-cap given as a string was a TypeError in math.isfinite, and named no file.
@example(name="tiny_gemma2", data=json.dumps({**_CONFIGS["tiny_gemma2"], "final_logit_softcapping": "30"}))
# Deep nesting was a bare RecursionError from the JSON reader.
@example(name="tiny_gemma", data="[" * 100_000 + "]" * 100_000)
# A 5000-digit integer was a bare ValueError from Python's int conversion (found by the Keras campaign).
@example(name="tiny_gemma", data='{"model_type": "gemma", "hidden_size": 1' + "0" * 5000 + "}")
# An unknown hidden_activation for Gemma 2/3 was a bare ValueError when the MLP was built (long campaign).
@example(name="tiny_gemma3", data=json.dumps({**_CONFIGS["tiny_gemma3"], "hidden_activation": ""}))
def test_fuzz_config_files(tmp_path_factory, name, data):
    """Every tiny checkpoint's config.json, mutated anywhere (nested objects included) or
    damaged as bytes: the model loads with every parameter of the original's shape, or the
    refusal is our typed error naming config.json."""
    if isinstance(data, str):
        raw = data.encode()
    else:
        raw = data.draw(mutated_file(_CONFIGS[name], _CONFIG_KEYS, _config_values), label="config.json")
    folder = fuzz_folder(tmp_path_factory, name)
    (folder / "config.json").write_bytes(raw)
    try:
        model = load_model(folder)
    except ModelFileError as e:
        # The config's own faults name config.json; weights that no longer fit it, the folder.
        assert str(folder / "config.json" if isinstance(e, ConfigError) else folder) in str(e), e
        event(f"refused: {type(e).__name__}")
        return
    event("accepted")
    if name not in _SHAPES:
        _SHAPES[name] = _shapes(load_model(FIXTURES / name))
    # A config that ties the output head to the embeddings drops the checkpoint's own head.
    expected = {k: v for k, v in _SHAPES[name].items() if k != "lm_head.weight" or not model.args.tie_word_embeddings}
    assert _shapes(model) == expected
