"""keras-hub `Gemma4AssistantCausalLM` task presets (the `gemma4_instruct_*_assistant` drafters) convert to
our `gemma4_assistant` folders (convert/keras_gemma4_assistant.py): the converted drafter's steps equal
keras-hub 0.32's `call_with_cache` on the tiny preset make_keras_gemma4_assistant.py records (fp32), it
drafts for a converted keras-hub Gemma 4 target, and what is not such a preset is a typed refusal."""

from __future__ import annotations

import json
import shutil

import h5py
import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES

import mlx_gemma
from mlx_gemma.convert import convert
from mlx_gemma.errors import ConfigError, UnsupportedModelError
from mlx_gemma.generate import stream_generate

PRESET = FIXTURES / "keras_gemma4_assistant"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = convert(keras_path=PRESET, mlx_path=tmp_path_factory.mktemp("assistant") / "mlx", progress=False)
    return out, mlx_gemma.load(out)[0]


def _kv(cache: np.ndarray, layer: int, head_dim: int, index: int) -> tuple:
    """keras-hub's cache slot [B, 2, max_len, heads, max_dim] -> our keys, values [B, heads, S, D] for
    positions 0..index (keras-hub's query at `index` masks the rest), cut to the layer's head dim."""
    part = cache[:, layer, :, : index + 1, :, :head_dim].transpose(1, 0, 3, 2, 4)
    return mx.array(part[0]), mx.array(part[1])


def test_drafts_equal_keras_hub(converted):
    """Three steps, each feeding back the next hidden state, at position 9 past the window of 4."""
    out, drafter = converted
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma4_assistant" and config["backbone_hidden_size"] == 32
    assert config["text_config"]["num_kv_shared_layers"] == 2 and config["num_centroids"] == 16
    assert not (out / "tokenizer.model").exists()  # a drafter speaks its target's ids
    ref = np.load(PRESET / "reference.npz")
    index, cache = int(ref["index"]), ref["target_cache"]
    kv = {"sliding_attention": _kv(cache, 0, 8, index), "full_attention": _kv(cache, 1, 16, index)}
    hidden = mx.array(ref["hidden"])
    for step in range(len(ref["logits"])):
        logits, hidden = drafter(mx.array(ref["embeddings"][step]), hidden, kv, index)
        theirs = ref["logits"][step]
        assert np.abs(np.array(logits) - theirs).max() < 1e-5 * np.abs(theirs).max()
        assert np.abs(np.array(hidden) - ref["states"][step]).max() < 1e-5 * np.abs(ref["states"][step]).max()
    ordering = np.array(drafter.masked_embedding.token_ordering)
    assert drafter.masked_embedding.token_ordering.dtype == mx.int32
    with h5py.File(PRESET / "task.weights.h5") as f:
        assert np.array_equal(ordering, f["vars/0"][()].astype(np.int64))


def test_it_drafts_for_a_converted_keras_target(converted, tmp_path):
    """The tiny keras-hub E2B-like target (hidden 32, its store layers' K/V shaped as the drafter reads):
    greedy speculative decoding with the converted drafter gives plain greedy decoding's tokens."""
    _, drafter = converted
    target_folder = convert(keras_path=FIXTURES / "keras_gemma4_e2b", mlx_path=tmp_path / "target", progress=False)
    target, tokenizer = mlx_gemma.load(target_folder)
    prompt = [2, 100, 200, 300]
    plain = [r.token for r in stream_generate(target, tokenizer, prompt, max_tokens=16)]
    responses = list(stream_generate(target, tokenizer, prompt, max_tokens=16, draft_model=drafter,
                                     num_draft_tokens=3))
    assert [r.token for r in responses] == plain and responses[-1].draft_proposed > 0


def _copy(tmp_path):
    folder = tmp_path / "preset"
    shutil.copytree(PRESET, folder)
    return folder


def test_a_backbone_without_its_task_is_refused_naming_task_json(tmp_path):
    folder = _copy(tmp_path)
    (folder / "task.json").unlink()
    with pytest.raises(UnsupportedModelError, match="task.json"):
        convert(keras_path=folder, mlx_path=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_another_task_class_is_refused(tmp_path):
    folder = _copy(tmp_path)
    task = json.loads((folder / "task.json").read_text())
    task["class_name"], task["registered_name"] = "Gemma4CausalLM", "keras_hub>Gemma4CausalLM"
    (folder / "task.json").write_text(json.dumps(task))
    with pytest.raises(UnsupportedModelError, match="Gemma4AssistantCausalLM"):
        convert(keras_path=folder, mlx_path=tmp_path / "out", progress=False)


def test_a_token_ordering_that_is_not_a_permutation_is_a_config_error(tmp_path):
    folder = _copy(tmp_path)
    with h5py.File(folder / "task.weights.h5", "r+") as f:
        f["vars/0"][0] = f["vars/0"][1]
    with pytest.raises(ConfigError, match="token_ordering"):
        convert(keras_path=folder, mlx_path=tmp_path / "out", progress=False)


def test_a_task_setting_our_drafter_refuses_names_task_json(tmp_path):
    folder = _copy(tmp_path)
    task = json.loads((folder / "task.json").read_text())
    task["config"]["num_centroids"] = 24  # does not divide the 512 ids
    (folder / "task.json").write_text(json.dumps(task))
    with pytest.raises(ConfigError, match="num_centroids") as e:
        convert(keras_path=folder, mlx_path=tmp_path / "out", progress=False)
    assert "task.json" in str(e.value)
