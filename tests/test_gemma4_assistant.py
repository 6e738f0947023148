"""The Gemma 4 assistant drafter (models/gemma4_assistant.py) against transformers 5.25's
`Gemma4AssistantForCausalLM`, on the tiny pair make_tiny_gemma4_assistant.py records (fp32, logits
within 1e-4 of the reference's scale): drafts for several steps, the centroid-masked head, loading,
converting and quantizing its folder, and typed errors for a drafter that does not fit its target."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn

import mlx_gemma
from mlx_gemma.convert import convert
from mlx_gemma.errors import ConfigError, GenerationError
from mlx_gemma.loading import load_model, load_model_from
from mlx_gemma.model_folder import load_weights_from_folder
from mlx_gemma.models import DRAFTERS, gemma4_assistant, supported_model_types
from mlx_gemma.models.gemma4_assistant import check_target, target_sources

from conftest import FIXTURES

FOLDER = FIXTURES / "tiny_gemma4_assistant"
RTOL = 1e-4
STEPS = 4


@pytest.fixture(scope="module")
def ref():
    return np.load(FOLDER / "reference.npz")


@pytest.fixture(scope="module")
def drafter():
    return load_model(FOLDER)


@pytest.fixture(scope="module")
def target():
    return load_model(FIXTURES / "tiny_gemma4_e2b")


def rel_err(ours, theirs) -> float:
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def recorded_kv(ref, case: str) -> dict:
    return {kind: (mx.array(ref[f"{case}_kv_{short}_keys"]), mx.array(ref[f"{case}_kv_{short}_values"]))
            for kind, short in (("full_attention", "full"), ("sliding_attention", "sliding"))}


def draft(drafter, target, ids, hidden, kv, padding_mask=None, steps=STEPS):
    """Greedy drafts as transformers' candidate generator makes them: every step at the last position,
    the drafted token's target embedding and the drafter's state fed back."""
    last, position = mx.array(ids[:, -1:]), ids.shape[1] - 1
    logits, tokens, states = [], [], []
    for _ in range(steps):
        out, hidden = drafter(target.model.embed(last), hidden, kv, position, padding_mask)
        last = mx.argmax(out, axis=-1)
        logits.append(out[:, 0])
        tokens.append(last[:, 0])
        states.append(hidden[:, 0])
    return np.array(mx.stack(logits, 1)), np.array(mx.stack(tokens, 1)), np.array(mx.stack(states, 1))


@pytest.mark.parametrize("case, suffix", [("short", ""), ("long", "_cut")])
def test_drafts_equal_transformers(drafter, target, ref, case, suffix):
    """Four greedy draft steps from the target's recorded hidden state and K/V: logits, drafted tokens
    and the projected states fed back.  `long` (12 positions, window 6) is compared with transformers
    given the sliding K/V of the last 6 positions: what a query there sees in the target (keras-hub)."""
    ids = ref[f"{case}_ids"]
    logits, tokens, states = draft(drafter, target, ids, mx.array(ref[f"{case}_hidden"]), recorded_kv(ref, case))
    assert rel_err(logits, ref[f"{case}_logits{suffix}"]) < RTOL
    assert np.array_equal(tokens, ref[f"{case}_tokens{suffix}"])
    assert rel_err(states, ref[f"{case}_states{suffix}"]) < RTOL


def test_sliding_layers_see_the_targets_window_not_one_more(drafter, target, ref):
    """Given all 12 sliding positions, our drafter masks to the last 6 (equal to transformers on the cut
    K/V, above); transformers' own bidirectional sliding mask shows 7, and that changes its logits."""
    logits, _, _ = draft(drafter, target, ref["long_ids"], mx.array(ref["long_hidden"]), recorded_kv(ref, "long"))
    assert rel_err(logits, ref["long_logits_cut"]) < RTOL
    assert rel_err(logits, ref["long_logits_full"]) > 100 * RTOL


def test_left_padded_batch_equals_transformers(drafter, target, ref):
    mask = mx.array(ref["pad_mask"]).astype(mx.bool_)
    logits, tokens, _ = draft(drafter, target, ref["pad_ids"], mx.array(ref["pad_hidden"]), recorded_kv(ref, "pad"),
                              mask)
    assert rel_err(logits, ref["pad_logits"]) < RTOL
    assert np.array_equal(tokens, ref["pad_tokens"])


class _Recorder:
    """Stands in for one target block and keeps the keys/values it attended with."""

    def __init__(self, layer):
        self.layer, self.kv = layer, None
        self.window, self.kind, self.self_attn = layer.window, layer.kind, layer.self_attn

    def __call__(self, *args, **kwargs):
        h, self.kv = self.layer(*args, **kwargs)
        return h, self.kv


def test_our_target_feeds_the_drafter_as_transformers_does(drafter, target, ref):
    """End to end on our side: our E2B-like target's last hidden state and its store layers' K/V (layers
    target_sources names) over the long prompt, as a prefill with a cache hands them out, then drafts."""
    sources = target_sources(target.args)
    assert sources == {"sliding_attention": 3, "full_attention": 2}  # the target's last unshared layer of each kind
    layers = list(target.model.layers)
    recorders = {kind: _Recorder(layers[i]) for kind, i in sources.items()}
    try:
        for kind, i in sources.items():
            target.model.layers[i] = recorders[kind]
        ids = ref["long_ids"]
        hidden = target.model(mx.array(ids), cache=target.make_cache())[:, -1:]
    finally:
        target.model.layers[:] = layers
    assert rel_err(hidden, ref["long_hidden"]) < RTOL
    kv = {kind: r.kv for kind, r in recorders.items()}
    assert kv["sliding_attention"][0].shape[2] <= ids.shape[1]  # whatever the cache fetched, in time order
    logits, tokens, _ = draft(drafter, target, ids, hidden, kv)
    assert rel_err(logits, ref["long_logits_cut"]) < RTOL
    assert np.array_equal(tokens, ref["long_tokens_cut"])


def _first_hidden(drafter, target, ref):
    """The drafter's normed hidden state at the first short-prompt step (what its head reads)."""
    ids = ref["short_ids"]
    x = mx.concatenate([target.model.embed(mx.array(ids[:, -1:])), mx.array(ref["short_hidden"])], axis=-1)
    return drafter.model(drafter.pre_projection(x), recorded_kv(ref, "short"), ids.shape[1] - 1, None)


def test_centroid_mask_is_transformers(drafter, target, ref):
    """The top-k centroids, the token ids they allow (by token_ordering), and the fill every other id gets."""
    h = _first_hidden(drafter, target, ref)
    head = drafter.masked_embedding
    top = np.array(mx.argpartition(-head.centroids(h), kth=head.top_k - 1, axis=-1)[..., : head.top_k])
    assert set(top.ravel()) == set(ref["short_centroids"].ravel())
    allowed = np.zeros(drafter.args.vocab_size, bool)
    allowed[np.array(head.allowed(h)).ravel()] = True
    assert np.array_equal(allowed, ref["short_allowed"][0, 0])
    assert allowed.sum() == head.top_k * drafter.args.vocab_size // drafter.args.num_centroids
    logits = np.array(drafter.head(h))[0, 0]
    assert np.all(logits[~allowed] == logits[allowed].min() - 1.0)  # one fill below every kept logit


def test_plain_head_equals_transformers(target, ref, tmp_path):
    """use_ordered_embeddings false (the 26B / 31B drafters): the tied head over the whole vocabulary."""
    config = json.loads((FOLDER / "config.json").read_text())
    weights = {k: v for k, v in load_weights_from_folder(FOLDER).items() if not k.startswith("masked_embedding.")}
    plain = load_model_from({**config, "use_ordered_embeddings": False}, weights)
    assert "masked_embedding" not in plain
    logits, _, _ = draft(plain, target, ref["short_ids"], mx.array(ref["short_hidden"]), recorded_kv(ref, "short"))
    assert rel_err(logits, ref["short_plain_logits"]) < RTOL


def test_logit_cap_is_the_targets_softcap(drafter, target, ref):
    """keras-hub caps draft logits with the target's final_logit_softcapping: cap * tanh(x / cap)."""
    ids, kv, hidden = ref["short_ids"], recorded_kv(ref, "short"), mx.array(ref["short_hidden"])
    embedding = target.model.embed(mx.array(ids[:, -1:]))
    raw, _ = drafter(embedding, hidden, kv, ids.shape[1] - 1)
    capped, _ = drafter(embedding, hidden, kv, ids.shape[1] - 1, logit_cap=target.args.final_logit_softcapping)
    cap = target.args.final_logit_softcapping
    assert rel_err(capped, cap * np.tanh(np.array(raw) / cap)) < 1e-6
    assert int(mx.argmax(raw)) == int(mx.argmax(capped))


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_half_precision_drafts_stay_in_their_dtype(target, ref, dtype):
    """Loaded in bf16 / fp16 (target too), a step computes in that dtype, near the fp32 reference
    (bf16 keeps 8 significant bits: a few parts in a thousand per rounding, a tiny stack of them)."""
    model, half_target = load_model(FOLDER, dtype=dtype), load_model(FIXTURES / "tiny_gemma4_e2b", dtype=dtype)
    kv = {kind: (k.astype(dtype), v.astype(dtype)) for kind, (k, v) in recorded_kv(ref, "short").items()}
    ids = ref["short_ids"]
    logits, state = model(half_target.model.embed(mx.array(ids[:, -1:])), mx.array(ref["short_hidden"]).astype(dtype),
                          kv, ids.shape[1] - 1)
    assert logits.dtype == dtype and state.dtype == dtype
    assert rel_err(logits.astype(mx.float32)[:, 0], ref["short_logits"][:, 0]) < 3e-2


def test_load_registers_the_drafter_without_a_tokenizer(ref):
    model, tokenizer = mlx_gemma.load(FOLDER)
    assert tokenizer is None  # the folder has none: a drafter's ids are its target's
    assert model.model_type == "gemma4_assistant" and DRAFTERS["gemma4_assistant"] is gemma4_assistant
    assert "gemma4_assistant" in supported_model_types()
    assert model.masked_embedding.token_ordering.dtype == mx.int32
    assert sorted(np.array(model.masked_embedding.token_ordering).tolist()) == list(range(512))


def _short_logits(model, target, ref) -> np.ndarray:
    return draft(model, target, ref["short_ids"], mx.array(ref["short_hidden"]), recorded_kv(ref, "short"))[0]


def test_convert_writes_a_folder_that_loads_with_the_same_drafts(target, ref, tmp_path):
    out = convert(FOLDER, mlx_path=tmp_path / "mlx", progress=False)
    assert json.loads((out / "config.json").read_text())["model_type"] == "gemma4_assistant"
    model, tokenizer = mlx_gemma.load(out)
    assert tokenizer is None
    assert rel_err(_short_logits(model, target, ref), ref["short_logits"]) < RTOL


def test_quantized_drafter_loads_and_equals_its_dequantized_weights(target, ref, tmp_path):
    """4-bit, group 32: every linear layer, the centroids and the tied embedding quantize; the norms,
    layer scalars and token_ordering (int32, no layer) stay as they were."""
    q = convert(FOLDER, mlx_path=tmp_path / "q", quantize=True, q_bits=4, q_group_size=32, progress=False)
    model, _ = mlx_gemma.load(q)
    assert isinstance(model.masked_embedding.centroids, nn.QuantizedLinear)
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    assert isinstance(model.pre_projection, nn.QuantizedLinear)
    assert model.model.norm.weight.dtype == mx.float32
    assert model.masked_embedding.token_ordering.dtype == mx.int32
    deq = convert(q, mlx_path=tmp_path / "deq", dequantize=True, progress=False)
    float_model, _ = mlx_gemma.load(deq)
    assert rel_err(_short_logits(model, target, ref), _short_logits(float_model, target, ref)) < RTOL


def test_check_target_accepts_its_target_and_names_what_differs(drafter, target):
    check_target(drafter.args, target.args, FOLDER)
    cases = [
        (dataclasses.replace(target.args, hidden_size=64), "backbone_hidden_size 48"),
        (dataclasses.replace(target.args, vocab_size=1024), "vocab_size 512"),
        (dataclasses.replace(target.args, layer_types=["sliding_attention"] * 6), "no such layer"),
        (load_model(FIXTURES / "tiny_gemma4_31b").args, "KV heads"),  # its sliding layers have 2 KV heads
    ]
    for other, words in cases:
        with pytest.raises(ConfigError, match=words) as e:
            check_target(drafter.args, other, FOLDER)
        assert str(FOLDER) in str(e.value)  # the drafter's file is named


@pytest.mark.parametrize("change, words", [
    ({"hidden_size_per_layer_input": 8}, "hidden_size_per_layer_input must be 0"),
    ({"num_kv_shared_layers": 1}, "num_kv_shared_layers must equal"),
    ({"use_double_wide_mlp": True}, "use_double_wide_mlp"),
    ({"enable_moe_block": True}, "enable_moe_block"),
])
def test_bad_text_config_is_a_config_error(change, words):
    config = json.loads((FOLDER / "config.json").read_text())
    config["text_config"].update(change)
    with pytest.raises(ConfigError, match=words):
        gemma4_assistant.ModelArgs.from_dict(config, FOLDER / "config.json")


@pytest.mark.parametrize("change, words", [
    ({"num_centroids": 24}, "num_centroids must divide"),
    ({"centroid_intermediate_top_k": 17}, "centroid_intermediate_top_k"),
    ({"backbone_hidden_size": 0}, "backbone_hidden_size"),
    ({"text_config": None}, "text_config object"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings false"),
])
def test_bad_drafter_config_is_a_config_error(change, words):
    config = {**json.loads((FOLDER / "config.json").read_text()), **change}
    with pytest.raises(ConfigError, match=words):
        gemma4_assistant.ModelArgs.from_dict(config, FOLDER / "config.json")


def test_bad_inputs_are_generation_errors(drafter, target, ref):
    ids, kv, hidden = ref["short_ids"], recorded_kv(ref, "short"), mx.array(ref["short_hidden"])
    embedding, position = target.model.embed(mx.array(ids[:, -1:])), ids.shape[1] - 1
    keys, values = kv["full_attention"]
    bad = [
        ((embedding, hidden, {"full_attention": kv["full_attention"]}, position), "no 'sliding_attention'"),
        ((embedding, hidden, {**kv, "full_attention": (keys[..., :32], values[..., :32])}, position), "full_attention"),
        ((mx.concatenate([embedding] * 2, 1), hidden, kv, position), "embedding must be"),
        ((embedding, hidden[..., :32], kv, position), "hidden must be"),
        ((embedding, hidden, kv, position - 1), "cut it at position"),
    ]
    for args, words in bad:
        with pytest.raises(GenerationError, match=words):
            drafter(*args)
    with pytest.raises(GenerationError, match="padding_mask"):
        drafter(embedding, hidden, kv, position, mx.ones((1, position)).astype(mx.bool_))


def test_fixture_folder_has_no_tokenizer_and_stays_small():
    assert not (FOLDER / "tokenizer.model").exists()
    assert sum(p.stat().st_size for p in FOLDER.iterdir()) < 400_000
