"""Gemma 4 text (dense) against transformers 5.25, in fp32, and its KV sharing in our caches.

The committed fixtures (tests/fixtures/make_tiny_gemma4.py) hold transformers' logits and greedy
tokens for an E2B-like model (per-layer inputs, KV sharing, double-wide MLPs; saved as
Gemma4ForCausalLM, `model.*`) a 31B-like one (`attention_k_eq_v`, its own global head dim
and KV heads; saved as Gemma4ForConditionalGeneration, `model.language_model.*`) and a
26B-A4B-like one (a mixture of experts, top-2 of 4, beside every block's MLP; models/moe.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import mlx.core as mx
from mlx.utils import tree_flatten

import mlx_gemma
from mlx_gemma.errors import ConfigError, GenerationError
from mlx_gemma.generate import stream_batch_generate, stream_generate
from mlx_gemma.loading import load, load_model
from mlx_gemma.models import MODELS, gemma4
from mlx_gemma.models.kv_cache import KVCache, RotatingKVCache, SharedKVCache
from mlx_gemma.prompt_cache import PromptCache, load_prompt_cache, save_prompt_cache
from mlx_gemma.search import beam_search
from mlx_gemma.tensorfile import load_file_with_metadata

from conftest import FIXTURES

RTOL = 1e-4
NAMES = ["e2b", "31b", "moe"]
_loaded: dict[str, tuple] = {}


def tiny(name: str):
    """(model, tokenizer, reference) for tests/fixtures/tiny_gemma4_<name>, loaded once."""
    if name not in _loaded:
        folder = FIXTURES / f"tiny_gemma4_{name}"
        _loaded[name] = (*load(folder), dict(np.load(folder / "reference.npz")))
    return _loaded[name]


def assert_close(ours, reference, rtol=RTOL):
    """Agreement within rtol of the reference's largest magnitude."""
    ours, reference = np.asarray(ours, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    err, scale = np.abs(ours - reference).max(), np.abs(reference).max()
    assert err <= rtol * scale, f"max abs error {err:.3g} > {rtol} x {scale:.3g}"


def greedy(model, tok, prompt, **kwargs) -> list[int]:
    return [r.token for r in stream_generate(model, tok, prompt, **kwargs)]


# ----- parity with transformers ---------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name):
    model, _, ref = tiny(name)
    logits = model(mx.array(ref["input_ids"]))
    assert logits.dtype == mx.float32
    assert_close(logits, ref["logits"])


@pytest.mark.parametrize("name", NAMES)
def test_left_padded_batch_matches_transformers(name):
    model, _, ref = tiny(name)
    mask = ref["padded_mask"].astype(bool)
    logits = np.array(model(mx.array(ref["padded_ids"]), padding_mask=mx.array(mask)))
    assert np.isfinite(logits).all()
    assert_close(logits[mask], ref["padded_logits"][mask])


@pytest.mark.parametrize("name", NAMES)
def test_chunked_and_cached_decoding_equals_a_full_call_across_the_window(name):
    """Chunks of 4 and 3, then one token at a time, to 16 tokens: past the windows (6, 5) twice."""
    model, _, ref = tiny(name)
    ids = mx.array(ref["input_ids"])
    cache = model.make_cache()
    chunks = [ids[:, :4], ids[:, 4:7]] + [ids[:, i: i + 1] for i in range(7, ids.shape[1])]
    assert_close(mx.concatenate([model(c, cache=cache) for c in chunks], axis=1), ref["logits"])


@pytest.mark.parametrize("name", NAMES)
def test_cached_left_padded_decoding(name):
    model, _, ref = tiny(name)
    mask = ref["padded_mask"].astype(bool)
    ids = mx.array(ref["padded_ids"])
    cache = model.make_cache(left_padding=mx.array((~mask).sum(axis=1)))
    parts = [model(ids[:, :8], cache=cache)] + [model(ids[:, i: i + 1], cache=cache) for i in range(8, ids.shape[1])]
    assert_close(np.array(mx.concatenate(parts, axis=1))[mask], ref["padded_logits"][mask])


@pytest.mark.parametrize("name", NAMES)
def test_greedy_tokens_through_the_engine_match_transformers(name):
    model, tok, ref = tiny(name)
    prompt, expected = ref["greedy_prompt"].tolist(), ref["greedy_ids"].tolist()
    assert greedy(model, tok, prompt, max_tokens=len(expected)) == expected
    assert greedy(model, tok, prompt, max_tokens=len(expected), prefill_step_size=3) == expected
    text = mlx_gemma.generate(model, tok, prompt, max_tokens=len(expected))
    assert text == "".join(r.text for r in stream_generate(model, tok, prompt, max_tokens=len(expected)))


@pytest.mark.parametrize("name", NAMES)
def test_batched_greedy_equals_each_prompt_alone(name):
    model, tok, ref = tiny(name)
    prompts = [ref["input_ids"][0][:5].tolist(), ref["input_ids"][1][:13].tolist(), ref["greedy_prompt"].tolist()]
    steps = list(stream_batch_generate(model, tok, prompts, max_tokens=8, prefill_step_size=4))
    for b, prompt in enumerate(prompts):
        assert [s[b].token for s in steps if s[b] is not None] == greedy(model, tok, prompt, max_tokens=8), b


def test_input_embeddings_take_the_ids_for_the_per_layer_inputs():
    model, _, ref = tiny("e2b")
    ids = mx.array(ref["input_ids"])
    assert_close(model(ids, input_embeddings=model.model.embed(ids)), ref["logits"])
    with pytest.raises(GenerationError, match="per-layer inputs need the token ids"):
        model.model(None, input_embeddings=model.model.embed(ids))


@pytest.mark.parametrize("name", NAMES)
def test_half_precision_runs(name):
    """bf16 / fp16 weights keep their dtype and stay finite; fp16's first positions stay near fp32.  (These
    random models amplify rounding: transformers' own bf16 run is as far from its fp32 logits as ours.)"""
    folder = FIXTURES / f"tiny_gemma4_{name}"
    ref = tiny(name)[2]
    for dtype in (mx.bfloat16, mx.float16):
        logits = load_model(folder, dtype=dtype)(mx.array(ref["input_ids"]))
        assert logits.dtype == dtype and np.isfinite(np.array(logits.astype(mx.float32))).all()
    assert_close(logits[:, :4].astype(mx.float32), ref["logits"][:, :4], rtol=0.05)


def test_hidden_state_intercept_sees_every_block():
    model, _, ref = tiny("e2b")
    seen = []
    logits = model(mx.array(ref["input_ids"]), intercept=lambda h, i: (seen.append(i), h)[1])
    assert seen == list(range(-1, len(model.layers)))
    assert_close(logits, ref["logits"])


def test_moe_blocks_run_the_experts_beside_the_mlp():
    model, _, ref = tiny("moe")
    layer = model.layers[0]
    assert layer.moe and layer.experts.gate_up_proj.weight.shape == (4, 32, 48)  # [E, 2I, H], as transformers
    saved = layer.experts.down_proj.weight
    layer.experts.down_proj.weight = mx.zeros_like(saved)  # without the experts the logits move
    try:
        assert np.abs(np.array(model(mx.array(ref["input_ids"]))) - ref["logits"]).max() > 1e-2
    finally:
        layer.experts.down_proj.weight = saved
    assert_close(model(mx.array(ref["input_ids"])), ref["logits"])


def test_a_transformers_folder_loads_with_mlx_gemma_load():
    """Both key layouts: Gemma4ForCausalLM (gemma4_text, model.*) and the text-only
    Gemma4ForConditionalGeneration (gemma4, model.language_model.*)."""
    for name, model_type in (("e2b", "gemma4_text"), ("31b", "gemma4_text")):
        model, tok = mlx_gemma.load(str(FIXTURES / f"tiny_gemma4_{name}"))
        assert model.model_type == model_type and MODELS[model_type] is gemma4
    config = json.loads((FIXTURES / "tiny_gemma4_31b" / "config.json").read_text())
    assert config["model_type"] == "gemma4" and config["text_config"]["attention_k_eq_v"]


def _folder(path, config: dict, weights: dict):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    return path


@pytest.mark.oracle
@pytest.mark.parametrize("name", ["e2b", "moe"])
def test_weight_names_load_both_ways_with_mlx_lm(tmp_path, name):
    """mlx-lm 0.32's gemma4_text reads transformers' folder and our weights (dense), and we read its
    weights (its experts as switch_glu halves), each giving transformers' logits.  mlx-lm reads the
    global layers' shape as Google's configs spell it (global_head_dim), not per_layer_config."""
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    model, _, ref = tiny(name)
    config = json.loads((FIXTURES / f"tiny_gemma4_{name}" / "config.json").read_text())
    config.update(global_head_dim=64, num_global_key_value_heads=1)
    ids = mx.array(ref["input_ids"])
    hf_weights = mx.load(str(FIXTURES / f"tiny_gemma4_{name}" / "model.safetensors"))
    theirs, _ = mlx_lm_utils.load_model(_folder(tmp_path / "hf", config, hf_weights))
    assert_close(theirs(ids), ref["logits"])
    ours = load_model(_folder(tmp_path / "theirs", config, dict(tree_flatten(theirs.parameters()))))
    assert_close(ours(ids), ref["logits"])
    if name == "e2b":  # experts: mlx-lm reads only its own switch_glu names, which moe.py's writer owns
        theirs, _ = mlx_lm_utils.load_model(_folder(tmp_path / "ours", config, dict(tree_flatten(model.parameters()))))
        assert_close(theirs(ids), ref["logits"])


# ----- KV sharing and the caches --------------------------------------------------------


def test_shared_layers_hold_no_keys_or_values():
    model, _, _ = tiny("e2b")
    assert model.args.kv_sources() == [None, None, None, None, 3, 2]  # the last sliding / full before them
    names = {k for k, _ in tree_flatten(model.parameters())}
    for i in (4, 5):
        assert not any(k.startswith(f"model.layers.{i}.self_attn.{p}") for k in names for p in ("k_", "v_"))
        assert model.layers[i].mlp.gate_proj.weight.shape[0] == 2 * model.args.intermediate_size  # double-wide
    cache = model.make_cache()
    assert [type(c) for c in cache] == [RotatingKVCache, RotatingKVCache, KVCache, RotatingKVCache,
                                        SharedKVCache, SharedKVCache]
    assert cache[4].source is cache[3] and cache[5].source is cache[2]
    model(mx.array([[2, 5, 7, 9]]), cache=cache)
    assert cache[4].offset == cache[5].offset == 4 and cache[4].state == [] and cache[4].nbytes == 0
    with pytest.raises(GenerationError, match="stores nothing"):
        cache[4].update_and_fetch(mx.zeros((1, 1, 1, 32)), mx.zeros((1, 1, 1, 32)))


def e2b_like(**overrides) -> gemma4.Model:
    """E2B's layout (35 layers, 4 local : 1 global, the last 20 sharing KV, one KV head, global heads
    twice as wide) at tiny widths, random weights."""
    config = dict(model_type="gemma4_text", hidden_size=32, intermediate_size=32, num_hidden_layers=35,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=32, global_head_dim=64,
                  sliding_window=8, num_kv_shared_layers=20, hidden_size_per_layer_input=8,
                  vocab_size=64, vocab_size_per_layer_input=64, use_double_wide_mlp=True,
                  final_logit_softcapping=30.0,
                  layer_types=(["sliding_attention"] * 4 + ["full_attention"]) * 7, **overrides)
    model = gemma4.Model(gemma4.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    return model


def test_kv_bytes_of_an_e2b_like_config_count_shared_layers_once():
    model = e2b_like()
    cache = model.make_cache()
    T = 40  # past the window (8) of the sliding layers; a growing cache allocates 256 slots at a time
    model.model(mx.arange(T)[None] % 64, cache=cache)
    mx.eval([c.state for c in cache])
    per_slot = 2 * 4  # keys and values, float32
    stored = [(1 * 64 * 256) if kind == "full_attention" else (1 * 32 * 8)  # heads x head dim x slots
              for kind in model.args.layer_types[:15]]
    assert sum(c.nbytes for c in cache) == per_slot * sum(stored)
    assert all(c.nbytes == 0 and c.state == [] for c in cache[15:])
    shared_too = per_slot * sum((64 * 256) if k == "full_attention" else (32 * 8) for k in model.args.layer_types)
    assert sum(c.nbytes for c in cache) < 0.5 * shared_too  # what storing every layer would take


def test_trim_to_rolls_back_through_shared_entries():
    model, _, ref = tiny("e2b")
    ids = mx.array(ref["input_ids"][:1])
    cache = model.make_cache()
    model(ids[:, :5], cache=cache)
    model(ids[:, 5:6], cache=cache)
    assert all(c.trim_to(5) for c in cache) and cache[5].offset == 5  # within the window (6): possible
    assert_close(model(ids[:, 5:6], cache=cache), ref["logits"][:1, 5:6])
    model(ids[:, 6:7], cache=cache)  # 7 tokens: the sliding rings have dropped the first
    assert not all(c.trim_to(3) for c in cache)


def test_take_gathers_rows_through_shared_entries():
    """Rows reordered and repeated mid-decode (beam search's `take`) continue as their own sequences."""
    model, _, _ = tiny("e2b")
    rows = [[2, 11, 12, 13], [2, 21, 22, 23, 24, 25, 26, 27]]
    pad = [4, 0]
    cache = model.make_cache(left_padding=mx.array(pad))
    model(mx.array([[0] * p + r for p, r in zip(pad, rows)]), cache=cache)
    for c in cache:
        c.take(mx.array([1, 0, 0]))
    seqs = [rows[1], rows[0], rows[0]]
    for t in range(3):  # past the window (6) of the sliding layers and their shared readers
        new = [40 + 3 * t + b for b in range(3)]
        logits = model(mx.array(new)[:, None], cache=cache)[:, -1]
        for b, token in enumerate(new):
            seqs[b] = seqs[b] + [token]
            assert_close(logits[b], model(mx.array(seqs[b])[None])[0, -1])


@pytest.mark.oracle
def test_beam_search_matches_transformers():
    import transformers  # heavy optional dependency
    from test_search import assert_same_beams, hf_beams  # transformers' beams, read as test_search reads them

    model, _, ref = tiny("e2b")
    hf = transformers.Gemma4ForCausalLM.from_pretrained(FIXTURES / "tiny_gemma4_e2b", attn_implementation="eager")
    prompt = ref["greedy_prompt"].tolist()
    theirs = hf_beams(hf.eval(), prompt, 8, 3, 1.0, False, 2, [1])
    ours = beam_search(model, prompt, 8, num_beams=3, length_penalty=1.0, early_stopping=False, num_return=2,
                       stop_token_ids=[1], prefill_step_size=3)
    assert_same_beams(ours, theirs, [1], 1.0, rel_tol=1e-4)


def test_rotating_cache_under_max_kv_size():
    """Under max_kv_size (global layers keep 4 sinks + the last tokens), chunked prefill gives what
    token-by-token decoding gives; at a size the sequence fits, the reference's logits."""
    model, tok, ref = tiny("e2b")
    ids = mx.array(ref["input_ids"][:1])
    stepped_cache, chunked_cache = model.make_cache(max_kv_size=9), model.make_cache(max_kv_size=9)
    assert isinstance(stepped_cache[2], RotatingKVCache) and isinstance(stepped_cache[5], SharedKVCache)
    stepped = mx.concatenate([model(ids[:, i: i + 1], cache=stepped_cache) for i in range(ids.shape[1])], axis=1)
    chunked = mx.concatenate([model(ids[:, i: i + 5], cache=chunked_cache) for i in range(0, ids.shape[1], 5)], axis=1)
    assert_close(chunked, stepped)
    roomy = model.make_cache(max_kv_size=64)
    assert_close(model(ids, cache=roomy), ref["logits"][:1])
    prompt = ref["greedy_prompt"].tolist()
    assert greedy(model, tok, prompt, max_tokens=6, max_kv_size=64) == ref["greedy_ids"][:6].tolist()
    assert len(greedy(model, tok, prompt, max_tokens=12, max_kv_size=9)) == 12


@pytest.mark.parametrize("name", NAMES)
def test_quantized_kv_cache(name):
    """8-bit keys and values: every storing layer quantized, shared layers attending with them; a
    chunked prefill equals token-by-token decoding (each token is quantized alike either way); the
    first positions stay near the float logits (later ones drift: these random models attend sharply)."""
    model, tok, ref = tiny(name)
    ids = mx.array(ref["input_ids"][:1])
    options = dict(kv_bits=8, kv_group_size=32, quantized_kv_start=0)
    chunked_cache, stepped_cache = model.make_cache(**options), model.make_cache(**options)
    chunked = mx.concatenate([model(ids[:, :6], cache=chunked_cache)]
                             + [model(ids[:, i: i + 1], cache=chunked_cache) for i in range(6, ids.shape[1])], axis=1)
    stepped = mx.concatenate([model(ids[:, i: i + 1], cache=stepped_cache) for i in range(ids.shape[1])], axis=1)
    stores = [c for c in chunked_cache if not isinstance(c, SharedKVCache)]
    assert all(c.quantized and len(c.keys) == 3 for c in stores)
    assert_close(chunked, stepped)
    assert_close(chunked[:, :4], ref["logits"][:1, :4], rtol=0.05)
    assert len(greedy(model, tok, ref["greedy_prompt"].tolist(), max_tokens=5, **options)) == 5
    with pytest.raises(GenerationError, match="head_dim"):
        model.make_cache(kv_bits=8, kv_group_size=64)  # 64 does not divide the local head dim 32


@pytest.mark.parametrize("name", NAMES)
def test_prompt_cache_save_load_round_trip_stores_shared_layers_once(tmp_path, name):
    model, tok, ref = tiny(name)
    pc = PromptCache(model)
    ids = ref["input_ids"][0][:9].tolist()
    reply = greedy(model, tok, ids, max_tokens=4, prompt_cache=pc)
    path = tmp_path / "c.safetensors"
    save_prompt_cache(path, pc)
    arrays, _ = load_file_with_metadata(str(path))
    layers = {int(k.split(".")[1]) for k in arrays if k.startswith("layers.")}
    shared = [i for i, s in enumerate(model.args.kv_sources()) if s is not None]
    assert layers == set(range(6)) - set(shared)
    loaded = load_prompt_cache(path, model)
    assert loaded.tokens == pc.tokens
    assert [type(c) for c in loaded.caches] == [type(c) for c in pc.caches]
    more = ids + reply + ref["input_ids"][1][:5].tolist()
    assert greedy(model, tok, more, max_tokens=5, prompt_cache=loaded) == greedy(model, tok, more, max_tokens=5)


def test_prompt_cache_with_capped_quantized_options(tmp_path):
    model, tok, ref = tiny("e2b")
    pc = PromptCache(model, max_kv_size=9, kv_bits=8, kv_group_size=32, quantized_kv_start=4)
    pc.extend(model, ref["input_ids"][0][:12].tolist(), step_size=5)
    save_prompt_cache(tmp_path / "q.safetensors", pc)
    loaded = load_prompt_cache(tmp_path / "q.safetensors", model)
    nxt = mx.array([[7, 8, 9]])
    assert np.array_equal(np.array(model(nxt, cache=loaded.caches)), np.array(model(nxt, cache=pc.caches)))


# ----- configs --------------------------------------------------------------------------


def base_config(**overrides) -> dict:
    return {**json.loads((FIXTURES / "tiny_gemma4_e2b" / "config.json").read_text()), **overrides}


@pytest.mark.parametrize("overrides, field", [
    ({"enable_moe_block": True, "num_experts": 4, "top_k_experts": 2}, "moe_intermediate_size"),
    ({"enable_moe_block": True, "num_experts": 4, "top_k_experts": 5, "moe_intermediate_size": 16}, "top_k_experts"),
    ({"use_bidirectional_attention": "all"}, "use_bidirectional_attention"),
    ({"num_kv_shared_layers": 6}, "num_kv_shared_layers"),
    ({"num_kv_shared_layers": 4}, "num_kv_shared_layers"),  # the shared global layer has no earlier global one
    ({"per_layer_config": {"2": {"head_dim": 64, "sliding_window": 3}}}, "per_layer_config.2"),
    ({"per_layer_config": {"9": {"head_dim": 64}}}, "per_layer_config.9"),
    ({"per_layer_config": {"2": {"num_key_value_heads": 3}}}, "layer 2"),
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "rope_theta": 1e6}}}, "rope_parameters.full"),
    ({"rope_parameters": {"full_attention": {"rope_type": "proportional", "partial_rotary_factor": 2}}},
     "partial_rotary_factor"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ({"hidden_activation": "swish"}, "hidden_activation"),
    ({"final_logit_softcapping": 0}, "final_logit_softcapping"),
    ({"global_head_dim": "wide"}, "global_head_dim"),
])
def test_bad_configs_are_refused_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        gemma4.ModelArgs.from_dict(base_config(**overrides), "config.json")


def test_configs_as_google_writes_them():
    """Google's config.json names global_head_dim / num_global_key_value_heads (transformers turns them
    into per_layer_config); the KV-head override only applies with attention_k_eq_v.  "vision" runs
    text causally; unknown keys are kept."""
    config = base_config(global_head_dim=64, num_global_key_value_heads=1, use_bidirectional_attention="vision",
                         some_new_key=3)
    del config["per_layer_config"]
    args = gemma4.ModelArgs.from_dict(config)
    assert [args.layer_shape(i) for i in range(6)] == [(1, 32), (1, 32), (1, 64)] * 2
    assert args.extra["some_new_key"] == 3
    k_eq_v = gemma4.ModelArgs.from_dict({**config, "attention_k_eq_v": True, "num_kv_shared_layers": 0})
    assert k_eq_v.layer_shape(2) == (1, 64) and k_eq_v.layer_shape(0) == (1, 32)
    wide = gemma4.ModelArgs.from_dict({**config, "num_key_value_heads": 2})
    assert wide.layer_shape(2) == (2, 64)  # no k_eq_v: the global layers keep num_key_value_heads
    in_code = gemma4.ModelArgs.from_dict(base_config(per_layer_config={2: {"head_dim": 64}, 5: {"head_dim": 64}}))
    assert in_code.layer_shape(5) == (1, 64) and in_code.layer_shape(1) == (1, 32)
    with pytest.raises(ConfigError, match="different head dims"):  # one RoPE table per layer kind
        gemma4.ModelArgs.from_dict(base_config(per_layer_config={5: {"head_dim": 64}}))
    last = gemma4.ModelArgs.from_dict(base_config(layer_types=["sliding_attention"] * 6, per_layer_config=None,
                                                  num_kv_shared_layers=0))
    assert last.layer_types[-1] == "full_attention"  # forced global, as transformers' config does


def test_proportional_rope_rotates_only_its_share_of_pairs():
    """Global layers: partial_rotary_factor 0.25 of head dim 64 -> 8 of 32 pairs rotate, at transformers'
    frequencies 1e6 ** (-2i / 64); the rest do not move."""
    args = tiny("e2b")[0].args
    periods = np.array(args.rope["full_attention"])
    assert periods.shape == (32,) and np.isinf(periods[8:]).all()
    assert np.allclose(1 / periods[:8], 1e6 ** (-np.arange(0, 16, 2) / 64), rtol=1e-6)
    x = mx.random.normal((1, 1, 3, 64))
    moved = np.array(gemma4._rope(x, args.rope["full_attention"], offset=5))
    pairs = np.r_[8:32, 40:64]  # rotate_half pairs dim i with i + 32
    assert np.array_equal(moved[..., pairs], np.array(x)[..., pairs])


@pytest.mark.oracle
def test_live_transformers_parity_on_fresh_inputs():
    """A fresh batch through transformers' own Gemma4ForCausalLM (E2B-like fixture)."""
    import torch  # heavy optional dependency
    import transformers

    folder = FIXTURES / "tiny_gemma4_e2b"
    reference = transformers.Gemma4ForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    ids = np.random.default_rng(7).integers(3, 512, size=(2, 20))
    with torch.no_grad():
        expected = reference(torch.tensor(ids)).logits.numpy()
    assert_close(tiny("e2b")[0](mx.array(ids)), expected)
