"""keras-hub `Gemma4Backbone` presets -> our Gemma 4 text model (convert/keras_gemma4.py).

The fast tests read the tiny presets keras-hub wrote in tests/fixtures/keras_gemma4_{e2b,moe,vision}/
and keras_gemma4_audio/ (make_keras_gemma4.py: E2B-like with per-layer inputs, KV sharing and a
double-wide MLP; MoE-like with K = V global layers and top-2 of 4 experts; with a vision encoder
(clipped linears, standardized soft tokens, bidirectional image attention); with an audio encoder
(a 2-layer conformer) and its audio converter; all with windows shorter than the prompts and global
head dims of their own) and compare with keras-hub's logits recorded beside them (fp32, within 1e-4
of the largest logit).  The `oracle` test builds a fresh random backbone with keras-hub.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

h5py = pytest.importorskip("h5py", reason="reading Keras presets needs h5py")

import mlx_gemma  # noqa: E402
from mlx_gemma.convert import convert  # noqa: E402
from mlx_gemma.convert.keras import read_keras_preset  # noqa: E402
from mlx_gemma.convert.keras_common import stop_ids  # noqa: E402
from mlx_gemma.gemma4_prompts import media_rows  # noqa: E402
from mlx_gemma.errors import ConfigError, TokenizerError, UnsupportedModelError, WeightsMismatchError  # noqa: E402
from mlx_gemma.loading import load_model_from  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
PRESETS = {"e2b": FIXTURES / "keras_gemma4_e2b", "moe": FIXTURES / "keras_gemma4_moe",
           "vision": FIXTURES / "keras_gemma4_vision", "audio": FIXTURES / "keras_gemma4_audio"}
RTOL = 1e-4  # of the reference logits' largest magnitude
S, F = "sliding_attention", "full_attention"


def reference(name: str) -> dict:
    return dict(np.load(PRESETS[name] / "reference.npz"))


def model_of(folder):
    ck = read_keras_preset(folder)
    return load_model_from(ck.config, {k: mx.array(v) for k, v in ck.weights.items()})


def rel_err(ours, want) -> float:
    return float(np.abs(np.array(ours, dtype=np.float32) - want).max() / np.abs(want).max())


def test_e2b_config_follows_the_backbone():
    ck = read_keras_preset(PRESETS["e2b"])
    cfg = ck.config
    assert (cfg["model_type"], cfg["architectures"]) == ("gemma4_text", ["Gemma4ForCausalLM"])
    assert cfg["layer_types"] == [S, S, F, S, F] and cfg["sliding_window"] == 4
    assert (cfg["head_dim"], cfg["global_head_dim"], cfg["attention_k_eq_v"]) == (8, 16, False)
    assert (cfg["num_kv_shared_layers"], cfg["use_double_wide_mlp"], cfg["hidden_size_per_layer_input"],
            cfg["vocab_size_per_layer_input"]) == (2, True, 8, 512)
    assert cfg["rope_parameters"] == {
        F: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
        S: {"rope_type": "default", "rope_theta": 1e4}}
    assert cfg["final_logit_softcapping"] == 30.0 and not cfg["enable_moe_block"]
    # Gemma 4's generation_config stops at <eos>, <turn|> and <|tool_response>
    tok = mlx_gemma.GemmaTokenizer(ck.tokenizer_model)
    assert ck.generation_config["eos_token_id"] == [tok.eos_id, tok.piece_to_id("<turn|>"),
                                                    tok.piece_to_id("<|tool_response>")]
    # KV-shared layers carry no key / value weights; their MLPs are twice as wide
    assert "model.layers.3.self_attn.k_proj.weight" not in ck.weights
    assert ck.weights["model.layers.3.mlp.gate_proj.weight"].shape == (32, 32)
    assert ck.weights["model.layers.0.layer_scalar"].shape == (1,)


def test_moe_config_follows_the_backbone():
    ck = read_keras_preset(PRESETS["moe"])
    cfg = ck.config
    assert (cfg["enable_moe_block"], cfg["num_experts"], cfg["top_k_experts"], cfg["moe_intermediate_size"]) == \
        (True, 4, 2, 8)
    assert (cfg["attention_k_eq_v"], cfg["num_global_key_value_heads"]) == (True, 1)
    assert cfg["rope_parameters"][F]["factor"] == 2.0 and cfg["final_logit_softcapping"] is None
    assert cfg["hidden_size_per_layer_input"] == 0
    # global layers hold no value projection (K = V); experts in transformers' layout
    assert "model.layers.2.self_attn.v_proj.weight" not in ck.weights
    assert ck.weights["model.layers.0.experts.gate_up_proj"].shape == (4, 16, 32)  # [E, 2I, H]
    assert ck.weights["model.layers.0.experts.down_proj"].shape == (4, 32, 8)  # [E, H, I]
    assert ck.weights["model.layers.0.router.proj.weight"].shape == (4, 32)


@pytest.mark.parametrize("name", ["e2b", "moe"])
def test_logits_match_keras_hub(name):
    """Each prompt alone, and both as keras-hub ran them: one right-padded batch."""
    ref, model = reference(name), model_of(PRESETS[name])
    ids, mask = ref["token_ids"], ref["padding_mask"].astype(bool)
    for b in range(len(ids)):
        n = int(mask[b].sum())
        assert rel_err(model(mx.array(ids[b:b + 1, :n])), ref["logits"][b:b + 1, :n]) < RTOL
    batch = np.array(model(mx.array(ids), padding_mask=mx.array(mask)))
    assert rel_err(batch[mask], ref["logits"][mask]) < RTOL


def test_converted_folder_loads(tmp_path):
    convert(keras_path=PRESETS["e2b"], mlx_path=tmp_path / "out")
    loaded, tokenizer = mlx_gemma.load(tmp_path / "out")
    ref = reference("e2b")
    n = int(ref["padding_mask"][1].sum())
    assert rel_err(loaded(mx.array(ref["token_ids"][1:, :n])), ref["logits"][1:, :n]) < RTOL
    assert tokenizer.chat_format == "gemma4"
    assert tokenizer.eos_token_ids == {1, tokenizer.piece_to_id("<turn|>"), tokenizer.piece_to_id("<|tool_response>")}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "gemma4_text"


def test_stop_ids_follow_the_vocabulary():
    """Any Keras preset's generation_config: Gemma 4's stops for a Gemma 4 vocabulary, <end_of_turn> else."""
    g4 = (FIXTURES / "gemma4_tokenizer" / "tokenizer.model").read_bytes()
    tok = mlx_gemma.GemmaTokenizer(g4)
    assert stop_ids(g4) == (tok.piece_to_id("<turn|>"), tok.piece_to_id("<|tool_response>"))
    g3 = (FIXTURES / "tokenizer" / "tokenizer.model").read_bytes()
    assert stop_ids(g3) == (mlx_gemma.GemmaTokenizer(g3).piece_to_id("<end_of_turn>"),)


def edited(tmp_path, fn, name="e2b") -> Path:
    folder = tmp_path / "edited"
    shutil.copytree(PRESETS[name], folder)
    top = json.loads((folder / "config.json").read_text())
    fn(top["config"])
    (folder / "config.json").write_text(json.dumps(top))
    return folder


def test_layer_kinds_from_the_pattern(tmp_path):
    """Without layer_types, keras-hub makes layer i global when i % pattern == pattern - 1."""
    cfg = read_keras_preset(edited(tmp_path, lambda c: c.update(layer_types=None, sliding_window_pattern=3),
                                   "moe")).config
    assert cfg["layer_types"] == [S, S, F]


def vision_inputs(ref) -> dict:
    """keras-hub's image inputs as our model takes them: [images, patches, 3 p^2] and [images, patches, 2]."""
    return {"pixel_values": mx.array(ref["pixel_values"][0]), "image_positions": mx.array(ref["pixel_position_ids"][0])}


def test_vision_config_follows_the_backbone():
    ck = read_keras_preset(PRESETS["vision"])
    cfg, tok = ck.config, mlx_gemma.GemmaTokenizer(ck.tokenizer_model)
    assert (cfg["model_type"], cfg["architectures"]) == ("gemma4", ["Gemma4ForConditionalGeneration"])
    assert [cfg[k] for k in ("image_token_id", "boi_token_id", "eoi_token_id")] == \
        [tok.piece_to_id(p) for p in ("<|image|>", "<|image>", "<image|>")]
    assert cfg["text_config"]["use_bidirectional_attention"] == "vision"
    v = cfg["vision_config"]
    assert (v["patch_size"], v["pooling_kernel_size"], v["position_embedding_size"], v["num_key_value_heads"],
            v["use_clipped_linears"], v["standardize"]) == (4, 2, 8, 1, True, True)
    assert ck.weights["model.vision_tower.encoder.layers.1.mlp.up_proj.input_max"].shape == ()
    assert ck.weights["model.embed_vision.embedding_projection.weight"].shape == (32, 16)


def test_vision_logits_match_keras_hub():
    """One image (4 x 4 patches pooled to 4 soft tokens, clip bounds that bite, standardized, each image's
    tokens both ways on sliding layers) in a prompt longer than the window."""
    ref = reference("vision")
    logits = model_of(PRESETS["vision"])(mx.array(ref["token_ids"]), **vision_inputs(ref))
    assert rel_err(logits, ref["logits"]) < RTOL


def test_converted_vision_folder_loads(tmp_path):
    convert(keras_path=PRESETS["vision"], mlx_path=tmp_path / "out")
    loaded, _ = mlx_gemma.load(tmp_path / "out")
    ref = reference("vision")
    assert loaded.model_type == "gemma4" and loaded.image_input is not None
    assert rel_err(loaded(mx.array(ref["token_ids"]), **vision_inputs(ref)), ref["logits"]) < RTOL


@pytest.mark.parametrize("mutate, error, match", [
    (lambda c: c["vision_encoder"].update(class_name="Other"), UnsupportedModelError, "Gemma4VisionEncoder"),
    (lambda c: c["vision_encoder"]["config"].update(output_dim=16), ConfigError, "output_dim"),
    (lambda c: c.update(vision_encoder=[1]), ConfigError, "vision_encoder"),
])
def test_refused_vision_configs(tmp_path, mutate, error, match):
    with pytest.raises(error, match=match):
        read_keras_preset(edited(tmp_path, mutate, "vision"))


def test_vocabulary_without_image_pieces_refused(tmp_path):
    folder = edited(tmp_path, lambda c: None, "vision")
    shutil.copy(FIXTURES / "tokenizer" / "tokenizer.model", folder / "assets" / "tokenizer" / "vocabulary.spm")
    with pytest.raises(TokenizerError, match=re.escape("<|image|>")):
        read_keras_preset(folder)


AUDIO_PROMPT = "Listen to <|audio|> and say"  # make_keras_gemma4.AUDIO_PROMPT


def audio_inputs(ref) -> dict:
    """keras-hub's clip features as our model takes them: [clips, frames, mels] and [clips, frames]."""
    return {"audio_features": mx.array(ref["audio_mel"][0]), "audio_mask": mx.array(ref["audio_mel_mask"][0] > 0)}


def test_audio_config_follows_the_backbone():
    ck = read_keras_preset(PRESETS["audio"])
    cfg, tok = ck.config, mlx_gemma.GemmaTokenizer(ck.tokenizer_model)
    assert (cfg["model_type"], cfg["vision_config"]) == ("gemma4", None)
    assert [cfg[k] for k in ("audio_token_id", "boa_token_id", "eoa_token_index")] == \
        [tok.piece_to_id(p) for p in ("<|audio|>", "<|audio>", "<audio|>")]
    a = cfg["audio_config"]
    assert (a["hidden_size"], a["num_hidden_layers"], a["num_attention_heads"], a["subsampling_conv_channels"],
            a["attention_chunk_size"], a["attention_context_left"], a["attention_context_right"],
            a["attention_logit_cap"], a["output_proj_dims"]) == (16, 2, 2, [128, 4], 4, 5, 0, 10.0, 24)
    w = ck.weights  # transformers' (torch) layouts
    assert w["model.audio_tower.subsample_conv_projection.layer1.conv.weight"].shape == (4, 128, 3, 3)
    assert w["model.audio_tower.subsample_conv_projection.input_proj_linear.weight"].shape == (16, 128)
    assert w["model.audio_tower.layers.1.lconv1d.depthwise_conv1d.weight"].shape == (16, 1, 5)
    assert w["model.audio_tower.layers.1.lconv1d.linear_start.linear.weight"].shape == (32, 16)
    assert w["model.audio_tower.layers.0.self_attn.post.output_max"].shape == ()
    assert w["model.embed_audio.embedding_projection.weight"].shape == (32, 24)
    extractor = json.loads(ck.extra_files["processor_config.json"])["feature_extractor"]
    assert (extractor["feature_size"], extractor["hop_length"], extractor["fft_length"], extractor["mel_floor"],
            extractor["max_length"]) == (128, 160, 512, 1e-3, 16_000)


def test_audio_tower_matches_keras_hub():
    """The clip's 15 valid soft tokens (keras-hub returns all 25, its padded ones computed differently:
    it zeroes padded frames before the light conv; transformers and we drop them)."""
    ref, model = reference("audio"), model_of(PRESETS["audio"])
    inputs = audio_inputs(ref)
    tokens, valid = model.model.audio_tower(inputs["audio_features"], inputs["audio_mask"])
    valid = np.array(valid)[0]
    assert valid.sum() == 15 and not valid[15:].any()
    want = ref["audio_embeddings"][0, :15]
    assert rel_err(model.model.embed_audio(tokens)[0, :15], want) < RTOL


def test_audio_logits_match_keras_hub():
    """The prompt with the clip's 15 placeholders (per-layer inputs read them as the pad id)."""
    ref = reference("audio")
    assert rel_err(model_of(PRESETS["audio"])(mx.array(ref["token_ids"]), **audio_inputs(ref)), ref["logits"]) < RTOL


def test_converted_audio_folder_generates_as_keras_hub(tmp_path):
    """The converted folder (the previously refused kind) keeps its audio tower and the preset's
    converter settings; our features for the clip equal keras-hub's converter's on every valid frame,
    the prompt's ids keras-hub's, and stream_generate(audio=clip) gives Gemma4CausalLM.generate's ids."""
    convert(keras_path=PRESETS["audio"], mlx_path=tmp_path / "out")
    model, tokenizer = mlx_gemma.load(tmp_path / "out")
    ref = reference("audio")
    assert model.model_type == "gemma4" and model.audio_input is not None
    ids, media = media_rows(model, tokenizer, [AUDIO_PROMPT], [None], [ref["clip"]])
    assert ids == ref["token_ids"].tolist()
    mask, want = np.array(media.audio_mask)[0], ref["audio_mel"][0, 0]
    assert np.array_equal(mask, ref["audio_mel_mask"][0, 0, :len(mask)] > 0) and mask.sum() == 59
    assert np.abs(np.array(media.audio_features)[0][mask] - want[:len(mask)][mask]).max() < 1e-5
    tokens = [r.token for r in mlx_gemma.stream_generate(model, tokenizer, AUDIO_PROMPT, audio=ref["clip"],
                                                         max_tokens=8)]
    assert tokens == ref["greedy"][0, ref["token_ids"].shape[1]:].tolist()


def corrupt_audio_weight(folder: Path, name: str, shape: tuple | None) -> None:
    """Replace (or, with shape None, delete) one dataset of the preset's weights file."""
    with h5py.File(folder / "model.weights.h5", "r+") as f:
        del f[name]
        if shape is not None:
            f.create_dataset(name, data=np.zeros(shape, dtype="float32"))


@pytest.mark.parametrize("shape", [None, (5, 16)])
def test_malformed_audio_weights_refused_before_writing(tmp_path, shape):
    """A missing or misshapen audio variable: a typed error naming the weights file and the variable,
    and no output folder."""
    folder = edited(tmp_path, lambda c: None, "audio")
    name = "layers/gemma4_audio_encoder/conformer_blocks/gemma4_audio_conformer_block_1/lconv/depthwise_conv/vars/0"
    corrupt_audio_weight(folder, name, shape)
    with pytest.raises(WeightsMismatchError, match="model.weights.h5") as e:
        convert(keras_path=folder, mlx_path=tmp_path / "out")
    assert "depthwise_conv" in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mutate, error, match", [
    (lambda a: a.update(context_right=2), UnsupportedModelError, "context_right"),
    (lambda a: a.update(chunk_size=8), UnsupportedModelError, "chunk_size"),
    (lambda a: a.update(reduction_factor=2), UnsupportedModelError, "reduction_factor"),
    (lambda a: a.update(sscp_kernel_sizes=[[5, 5], [3, 3]]), UnsupportedModelError, "sscp_kernel_sizes"),
    (lambda a: a.update(norm_eps=1e-5), UnsupportedModelError, "norm_eps"),
    (lambda a: a.update(input_feat_size=80), UnsupportedModelError, "input_feat_size"),
    (lambda a: a.update(output_proj_dims=None), UnsupportedModelError, "output_proj_dims"),
    (lambda a: a.update(output_dim=16), ConfigError, "output_dim"),
    (lambda a: a.update(sscp_conv_channels=[128]), ConfigError, "sscp_conv_channels"),
    (lambda a: a.update(invalid_logit_value="low"), ConfigError, "invalid_logit_value"),
])
def test_refused_audio_configs(tmp_path, mutate, error, match):
    with pytest.raises(error, match=match):
        read_keras_preset(edited(tmp_path, lambda c: mutate(c["audio_encoder"]["config"]), "audio"))


@pytest.mark.parametrize("mutate, error, match", [
    (lambda c: c.update(num_fft_bins=400), UnsupportedModelError, "num_fft_bins"),
    (lambda c: c.update(num_mels=0), ConfigError, "num_mels"),
    (lambda c: c.update(max_frequency=-1), ConfigError, "max_frequency"),
])
def test_refused_audio_converters(tmp_path, mutate, error, match):
    folder = edited(tmp_path, lambda c: None, "audio")
    top = json.loads((folder / "audio_converter.json").read_text())
    mutate(top["config"])
    (folder / "audio_converter.json").write_text(json.dumps(top))
    with pytest.raises(error, match=match) as e:
        read_keras_preset(folder)
    assert "audio_converter.json" in str(e.value)


def test_audio_converter_not_json_and_absent(tmp_path):
    folder = edited(tmp_path, lambda c: None, "audio")
    (folder / "audio_converter.json").write_text("{")
    with pytest.raises(ConfigError, match="audio_converter.json"):
        read_keras_preset(folder)
    (folder / "audio_converter.json").unlink()  # no converter: transformers' extractor defaults apply
    assert "processor_config.json" not in read_keras_preset(folder).extra_files


def test_vocabulary_without_audio_pieces_refused(tmp_path):
    folder = edited(tmp_path, lambda c: None, "audio")
    shutil.copy(FIXTURES / "tokenizer" / "tokenizer.model", folder / "assets" / "tokenizer" / "vocabulary.spm")
    with pytest.raises(TokenizerError, match=re.escape("<|audio|>")):
        read_keras_preset(folder)


@pytest.mark.parametrize("mutate, error, match", [
    (lambda c: c.update(audio_encoder={"class_name": "Gemma4AudioEncoder", "config": {}}), ConfigError, "output_dim"),
    (lambda c: c.update(layer_types=[S, S, F, F, S]), UnsupportedModelError, "last layer"),
    (lambda c: c.update(layer_types=[S, S]), ConfigError, "layer_types"),
    (lambda c: c.update(use_sliding_window_attention=False), UnsupportedModelError, "use_sliding_window_attention"),
    (lambda c: c.update(attention_logit_soft_cap=50.0), UnsupportedModelError, "soft-cap"),
    (lambda c: c.update(is_embedding_model=True), UnsupportedModelError, "embedding"),
    (lambda c: c.update(num_kv_shared_layers=5), UnsupportedModelError, "assistant"),
    (lambda c: c.update(global_rope_partial_rotary_factor=0.1), UnsupportedModelError, "pairs"),
    (lambda c: c.update(num_layers="5"), ConfigError, "num_layers"),
])
def test_refused_configs(tmp_path, mutate, error, match):
    with pytest.raises(error, match=match):
        read_keras_preset(edited(tmp_path, mutate))


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    """A config that says 4 experts over weights of 4 is read; one that says 8 is refused by name."""
    with pytest.raises(WeightsMismatchError):
        read_keras_preset(edited(tmp_path, lambda c: c.update(num_experts=8), "moe"))


@pytest.mark.oracle
def test_live_keras_hub_fresh_preset(tmp_path):
    """A fresh random Gemma4Backbone (per-layer inputs, KV sharing, K = V, MoE at once), built and
    saved by keras-hub, read by us: its logits on a prompt longer than the window."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    keras_hub = pytest.importorskip("keras_hub", reason="the live oracle needs keras-hub (pip install keras-hub jax)")
    import keras

    backbone = keras_hub.models.Gemma4Backbone(
        vocabulary_size=512, image_size=None, num_layers=4, num_query_heads=4, num_key_value_heads=2, hidden_dim=32,
        intermediate_dim=24, head_dim=8, global_head_dim=32, num_global_key_value_heads=1, sliding_window_size=5,
        layer_types=[S, F, S, F], num_kv_shared_layers=2, hidden_size_per_layer_input=4, use_double_wide_mlp=True,
        enable_moe_block=True, num_experts=3, expert_intermediate_dim=8, num_experts_per_token=2,
        global_rope_partial_rotary_factor=0.25, final_logit_soft_cap=20.0, dtype="float32")
    rng = np.random.default_rng(5)
    for v in backbone.weights:
        v.assign((rng.uniform(0.6, 1.4, v.shape) if v.path.endswith("scale") or v.shape == ()
                  else rng.normal(0, 0.3, v.shape)).astype("float32"))
    backbone.save_to_preset(str(tmp_path / "p"))
    shutil.copytree(PRESETS["e2b"] / "assets", tmp_path / "p" / "assets")
    ids = rng.integers(3, 512, (1, 12)).astype("int32")
    ids[0, 0] = 2
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids), "position_ids": np.arange(12)[None]}
    want = np.asarray(keras.ops.convert_to_numpy(backbone.token_embedding(backbone(inputs), reverse=True)))
    assert rel_err(model_of(tmp_path / "p")(mx.array(ids)), want) < RTOL


@pytest.mark.oracle
@pytest.mark.parametrize("name", ["e2b", "moe"])
def test_transformers_reads_the_converted_preset_as_keras_hub_runs_it(name):
    """The config and HF-named weights we write, given to transformers 5.25's Gemma4ForCausalLM, give
    keras-hub's recorded logits too (measured <= 1e-5): the two references agree on these presets."""
    torch, hf, _ = transformers_model(name, "Gemma4ForCausalLM", "Gemma4TextConfig")
    ref = reference(name)
    for b in range(len(ref["token_ids"])):
        n = int(ref["padding_mask"][b].sum())
        with torch.no_grad():
            logits = hf(torch.tensor(ref["token_ids"][b:b + 1, :n]).long()).logits.numpy()
        assert rel_err(logits, ref["logits"][b:b + 1, :n]) < RTOL


def transformers_model(name: str, model_class: str, config_class: str):
    """(torch, transformers' `model_class` holding our config and weights of preset `name`, the
    config) -- every weight taken, the head tied to the embedding."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    ck = read_keras_preset(PRESETS[name])
    cfg = {k: v for k, v in ck.config.items() if k not in ("architectures", "model_type", "torch_dtype")}
    hf = getattr(transformers, model_class)(getattr(transformers, config_class)(**cfg)).eval()
    missing, unexpected = hf.load_state_dict({k: torch.tensor(v) for k, v in ck.weights.items()}, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # the head is tied to the embedding
    return torch, hf, cfg


def transformers_multimodal(name: str):
    """transformers_model for Gemma4ForConditionalGeneration (towers included)."""
    return transformers_model(name, "Gemma4ForConditionalGeneration", "Gemma4Config")


@pytest.mark.oracle
def test_transformers_reads_the_converted_vision_preset_as_keras_hub_runs_it():
    """The same for the preset with a vision encoder, through Gemma4ForConditionalGeneration (measured 3e-6)."""
    torch, hf, cfg = transformers_multimodal("vision")
    ref = reference("vision")
    ids = torch.tensor(ref["token_ids"]).long()
    with torch.no_grad():
        logits = hf(input_ids=ids, pixel_values=torch.tensor(ref["pixel_values"][0]),
                    image_position_ids=torch.tensor(ref["pixel_position_ids"][0]).long(),
                    mm_token_type_ids=(ids == cfg["image_token_id"]).long()).logits.numpy()
    assert rel_err(logits, ref["logits"]) < RTOL


@pytest.mark.oracle
def test_transformers_reads_the_converted_audio_preset_as_keras_hub_runs_it():
    """The same for the preset with an audio encoder: transformers' Gemma4ForConditionalGeneration on
    our config and HF-layout weights, fed keras-hub's clip features, gives keras-hub's logits."""
    torch, hf, _ = transformers_multimodal("audio")
    ref = reference("audio")
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor(ref["token_ids"]).long(), input_features=torch.tensor(ref["audio_mel"][0]),
                    input_features_mask=torch.tensor(ref["audio_mel_mask"][0] > 0)).logits.numpy()
    assert rel_err(logits, ref["logits"]) < RTOL


# The default run's: test_live_keras_hub_fresh_preset (today's keras-hub format) and the committed keras-hub
# presets' vision and audio logits (test_vision_logits_match_keras_hub, test_audio_logits_match_keras_hub).
@pytest.mark.slow
@pytest.mark.oracle
def test_live_keras_hub_fresh_preset_with_image_and_clip(tmp_path):
    """A fresh random Gemma4Backbone with both encoders (as E2B / E4B), built and saved by keras-hub,
    read by us: its logits for a prompt holding one image and one clip whose last 8 frames are padding."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    keras_hub = pytest.importorskip("keras_hub", reason="the live oracle needs keras-hub (pip install keras-hub jax)")
    import keras

    vision = keras_hub.models.Gemma4VisionEncoder(
        image_size=8, patch_size=4, num_heads=2, hidden_dim=16, num_layers=1, intermediate_dim=24, head_dim=8,
        output_dim=32, pool_size=1, position_embedding_size=4, dtype="float32")
    audio = keras_hub.models.Gemma4AudioEncoder(
        hidden_size=16, num_heads=4, num_layers=2, chunk_size=5, context_left=6, sscp_conv_channels=(128, 2),
        output_proj_dims=8, output_dim=32, dtype="float32")
    backbone = keras_hub.models.Gemma4Backbone(
        vocabulary_size=512, image_size=8, num_layers=3, num_query_heads=2, num_key_value_heads=1, hidden_dim=32,
        intermediate_dim=16, head_dim=8, global_head_dim=16, sliding_window_size=6, layer_types=[S, S, F],
        hidden_size_per_layer_input=4, vision_encoder=vision, audio_encoder=audio, dtype="float32")
    rng = np.random.default_rng(8)
    for v in backbone.weights:
        bound = v.path.endswith(("_min", "_max"))
        value = (rng.uniform(1.0, 3.0) * (-1 if v.path.endswith("_min") else 1) if bound else
                 rng.uniform(0.6, 1.4, v.shape) if v.path.endswith(("scale", "gamma")) or v.shape == () else
                 rng.normal(0, 0.3, v.shape))
        v.assign(np.asarray(value, dtype="float32"))
    backbone.save_to_preset(str(tmp_path / "p"))
    shutil.copytree(PRESETS["audio"] / "assets", tmp_path / "p" / "assets")
    tok = mlx_gemma.GemmaTokenizer((PRESETS["audio"] / "assets" / "tokenizer" / "vocabulary.spm").read_bytes())
    image, clip = tok.piece_to_id("<|image|>"), tok.piece_to_id("<|audio|>")
    ids = np.array([[2, 40, tok.piece_to_id("<|image>"), *[image] * 4, tok.piece_to_id("<image|>"), 41,
                     tok.piece_to_id("<|audio>"), *[clip] * 8, tok.piece_to_id("<audio|>"), 42, 43]], dtype="int32")
    mel, mel_mask = rng.normal(0, 1, (1, 1, 40, 128)).astype("float32"), (np.arange(40) < 32)[None, None]
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids), "position_ids": np.arange(ids.shape[1])[None],
              "pixel_values": rng.uniform(0, 1, (1, 1, 4, 48)).astype("float32"),
              "pixel_position_ids": np.array([[[[0, 0], [1, 0], [0, 1], [1, 1]]]], dtype="int32"),
              "vision_mask": (ids == image).astype("int32"), "vision_indices": np.nonzero(ids[0] == image)[0][None],
              "audio_mel": mel, "audio_mel_mask": mel_mask.astype("int32"), "audio_mask": (ids == clip).astype("int32"),
              "audio_indices": np.nonzero(ids[0] == clip)[0][None]}
    want = np.asarray(keras.ops.convert_to_numpy(backbone.token_embedding(backbone(inputs), reverse=True)))
    ours = model_of(tmp_path / "p")(mx.array(ids), pixel_values=mx.array(inputs["pixel_values"][0]),
                                    image_positions=mx.array(inputs["pixel_position_ids"][0]),
                                    audio_features=mx.array(mel[0]), audio_mask=mx.array(mel_mask[0]))
    assert rel_err(ours, want) < RTOL
