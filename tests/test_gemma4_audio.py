"""Gemma 4's audio tower and its embedder (mlx_gemma/models/gemma4_audio.py) against transformers.

References: tests/fixtures/gemma4_audio/ (tests/fixtures/make_gemma4_audio.py): transformers
5.25's `Gemma4AudioModel` and `Gemma4MultimodalEmbedder` on a tiny random config (fp32,
clip bounds, the hidden-state clamp, the logit cap and a large norm epsilon that all
change the output), run on the extractor's features of a tone and speech-like noise;
and, live, fresh transformers towers of other configurations.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES

from mlx_gemma.audio import log_mel_features, num_soft_tokens
from mlx_gemma.errors import AudioError, ConfigError
from mlx_gemma.models.gemma4_audio import AudioArgs, AudioEmbedder, AudioModel

FOLDER = FIXTURES / "gemma4_audio"
TOWER, EMBEDDER = "model.audio_tower.", "model.embed_audio."


def relative(ours, expected) -> float:
    ours = np.array(ours)
    return float(np.abs(ours - expected).max() / np.abs(expected).max())


def config(**changes) -> dict:
    return {**json.loads((FOLDER / "config.json").read_text()), **changes}


def tower(**changes) -> AudioModel:
    """The fixture's tower (config changes keep the weights' shapes; unclipped: no bounds to load)."""
    model = AudioModel(AudioArgs.from_dict(config(**changes), "config.json"))
    weights = mx.load(str(FOLDER / "model.safetensors"))
    weights = model.sanitize({k: v for k, v in weights.items() if k.startswith(TOWER)}, TOWER)
    clipped = model.args.use_clipped_linears
    model.load_weights([(k[len(TOWER):], v) for k, v in weights.items()
                        if clipped or not k.endswith(("_min", "_max"))], strict=True)
    return model


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(FOLDER / "reference.npz"))


def test_one_clip_matches_transformers(ref):
    # The tone is the longer clip: its own features are the batch's first row.
    out, mask = tower()(mx.array(ref["features"][:1]), mx.array(ref["features_mask"][:1]))
    assert out.shape == ref["one"].shape == (1, 25, 24)
    assert np.array_equal(np.array(mask), ref["one_mask"])
    assert relative(out, ref["one"]) < 1e-4


def test_padded_batch_matches_transformers(ref):
    out, mask = tower()(mx.array(ref["features"]), mx.array(ref["features_mask"]))
    assert np.array_equal(np.array(mask), ref["batch_mask"]) and not ref["batch_mask"][1].all()
    assert relative(out, ref["batch"]) < 1e-4


def test_right_context_and_other_chunks_match_transformers(ref):
    chunk, left, right = ref["right_settings"].tolist()
    model = tower(attention_chunk_size=chunk, attention_context_left=left, attention_context_right=right)
    out, _ = model(mx.array(ref["features"]), mx.array(ref["features_mask"]))
    assert relative(out, ref["right"]) < 1e-4


def test_embedder_matches_transformers(ref):
    cfg = config()
    embedder = AudioEmbedder(AudioArgs.from_dict(cfg), cfg["text_hidden_size"])
    weights = mx.load(str(FOLDER / "model.safetensors"))
    embedder.load_weights([(k[len(EMBEDDER):], v) for k, v in weights.items() if k.startswith(EMBEDDER)],
                          strict=True)
    out = embedder(mx.array(ref["batch"]))
    assert out.shape == (2, 25, 20)
    assert relative(out, ref["embedded"]) < 1e-4


def test_clip_to_tokens_end_to_end(ref):
    """Our features of the stored PCM, through our tower: transformers' tokens."""
    clips = [ref["pcm"][i, :n].astype(np.float32) / 32768.0 for i, n in enumerate(ref["lengths"])]
    features, mask = log_mel_features(clips)
    out, out_mask = tower()(mx.array(features), mx.array(mask))
    assert relative(out, ref["batch"]) < 1e-4
    assert np.array(out_mask).sum(axis=1).tolist() == [num_soft_tokens(m) for m in mask]


def test_padding_does_not_reach_real_tokens(ref):
    """The noise alone gives the tokens it gets in the padded batch (its real ones)."""
    clip = ref["pcm"][1, : ref["lengths"][1]].astype(np.float32) / 32768.0
    features, mask = log_mel_features(clip)
    alone, alone_mask = tower()(mx.array(features[None]), mx.array(mask[None]))
    valid = np.array(alone_mask[0])
    n = int(valid.sum())
    assert np.array_equal(ref["batch_mask"][1][:n], valid[:n]) and n == ref["batch_mask"][1].sum()
    assert relative(np.array(alone)[0, :n], ref["batch"][1, :n]) < 1e-4


@pytest.mark.parametrize("change", ["clips", "gradient_clipping", "attention_logit_cap", "rms_norm_eps"])
def test_the_fixture_exercises_each_bound(ref, change):
    """Dropping any of them moves the output far past the tolerance: the tests above check them."""
    unbounded = {"clips": ("use_clipped_linears", False), "gradient_clipping": ("gradient_clipping", 1e10),
                 "attention_logit_cap": ("attention_logit_cap", 50.0), "rms_norm_eps": ("rms_norm_eps", 1e-6)}
    key, value = unbounded[change]
    model = tower(**{key: value})
    out, _ = model(mx.array(ref["features"]), mx.array(ref["features_mask"]))
    assert relative(out, ref["batch"]) > 1e-2


def test_sanitize_transposes_torch_kernels_only():
    model = tower()
    weights = {k: v for k, v in mx.load(str(FOLDER / "model.safetensors")).items() if k.startswith(TOWER)}
    conv0, conv1 = (f"{TOWER}subsample_conv_projection.layer{i}.conv.weight" for i in (0, 1))
    depthwise = f"{TOWER}layers.0.lconv1d.depthwise_conv1d.weight"
    assert weights[conv0].shape == (128, 1, 3, 3) and weights[depthwise].shape == (16, 1, 5)
    once = model.sanitize(weights, TOWER)
    assert once[conv0].shape == (128, 3, 3, 1) and once[conv1].shape == (8, 3, 3, 128)
    assert once[depthwise].shape == (16, 5, 1)
    assert mx.array_equal(once[conv1][2, 0, 1], weights[conv1][2, :, 0, 1])
    twice = model.sanitize(once, TOWER)  # an MLX folder's kernels load back unchanged
    assert all(mx.array_equal(twice[k], once[k]) for k in once)


def test_unknown_config_keys_are_kept():
    args = AudioArgs.from_dict(config(some_future_key=3))
    assert args.extra == {"text_hidden_size": 20, "some_future_key": 3}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_size": 15}, "must be even and a multiple of num_attention_heads"),
        ({"num_attention_heads": 3}, "must be even and a multiple of num_attention_heads"),
        ({"subsampling_conv_channels": [128]}, "two positive integers"),
        ({"hidden_act": "tanh"}, "hidden_act 'tanh'"),
        ({"attention_context_right": -1}, "attention_context_right"),
        ({"attention_chunk_size": 0}, "attention_chunk_size must be a positive integer"),
        ({"attention_logit_cap": 0}, "attention_logit_cap must be a positive number"),
        ({"residual_weight": "half"}, "residual_weight"),
    ],
)
def test_impossible_configs_are_refused(change, message):
    with pytest.raises(ConfigError, match=message) as e:
        AudioArgs.from_dict(config(**change), "config.json")
    assert "config.json" in str(e.value) and "audio_config." in str(e.value)


def test_bad_features_are_refused():
    model = tower()
    with pytest.raises(AudioError, match="64 mel bins per frame; this tower takes 125 to 128"):
        model(mx.zeros((1, 20, 64)))
    with pytest.raises(AudioError, match=r"\[B, T, n_mels\]"):
        model(mx.zeros((20, 128)))
    with pytest.raises(AudioError, match=r"\[B, T\] mask"):
        model(mx.zeros((1, 20, 128)), mx.ones((1, 19), dtype=mx.bool_))


@pytest.mark.oracle
@pytest.mark.parametrize(
    "changes",
    [
        # The real tower's attention geometry, no clipped linears, GELU, a wider conv kernel.
        {"attention_chunk_size": 12, "attention_context_left": 13, "use_clipped_linears": False,
         "hidden_act": "gelu_pytorch_tanh", "conv_kernel_size": 7},
        # One-frame chunks with right context, 4 heads.
        {"attention_chunk_size": 1, "attention_context_left": 3, "attention_context_right": 3,
         "num_attention_heads": 4, "num_hidden_layers": 1},
    ],
)
def test_fresh_transformers_towers(changes):
    """Random towers of other shapes, on random features with a ragged mask: within 1e-4."""
    torch = pytest.importorskip("torch")
    modeling = pytest.importorskip("transformers.models.gemma4.modeling_gemma4")
    cfg = {k: v for k, v in config(**changes).items() if k != "text_hidden_size"}
    reference = modeling.Gemma4AudioModel(pytest.importorskip("transformers").Gemma4AudioConfig(**cfg)).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.3 * torch.randn(p.shape, generator=g))
    rng = np.random.default_rng(7)
    features = rng.normal(size=(2, 61, 128)).astype(np.float32)
    mask = np.arange(61)[None, :] < np.array([[61], [37]])
    with torch.no_grad():
        expected = reference(torch.from_numpy(features), torch.from_numpy(mask))
    model = AudioModel(AudioArgs.from_dict(cfg))
    state = {k: mx.array(v.numpy()) for k, v in reference.state_dict().items()}
    model.load_weights(list(model.sanitize(state).items()), strict=True)
    out, out_mask = model(mx.array(features), mx.array(mask))
    assert np.array_equal(np.array(out_mask), expected.attention_mask.numpy())
    assert relative(out, expected.last_hidden_state.numpy()) < 1e-4


def test_bfloat16_weights_run_in_bfloat16(ref):
    """A bf16 tower stays bf16 (the float32 bounds and features do not promote it) and near fp32."""
    model = tower()
    model.set_dtype(mx.bfloat16)
    out, _ = model(mx.array(ref["features"]), mx.array(ref["features_mask"]))
    assert out.dtype == mx.bfloat16
    assert relative(out.astype(mx.float32), ref["batch"]) < 3e-2  # measured 9e-3
