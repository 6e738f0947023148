"""Gemma, Gemma 2 and Gemma 3 against Hugging Face transformers, in fp32.

The committed fixtures (tests/fixtures/make_tiny_models.py) hold transformers'
logits and greedy tokens for tiny random-weight models; every test here compares
mlx_gemma with those numbers.  When transformers is installed, the last tests
also rebuild the reference live on fresh inputs.
"""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path

import numpy as np
import pytest

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_gemma.loading import load_model
from mlx_gemma.models import MODELS, Block, GemmaArgs, GemmaModel, gemma, gemma2, gemma3, gemma4
from mlx_gemma.models.decoder import DecoderStack
from mlx_gemma.models.layers import GeGLU, attention, build_mask, softcap

from conftest import FIXTURES, TINY_MODELS

RTOL = 1e-4


def assert_close(ours, reference, rtol=RTOL):
    """Agreement within rtol of the reference's largest magnitude."""
    ours, reference = np.asarray(ours, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    scale = np.abs(reference).max()
    err = np.abs(ours - reference).max()
    assert err <= rtol * scale, f"max abs error {err:.3g} > {rtol} x {scale:.3g}"


@pytest.fixture(scope="module", params=TINY_MODELS)
def tiny(request):
    folder = FIXTURES / f"tiny_{request.param}"
    return load_model(folder), dict(np.load(folder / "reference.npz"))


def test_logits_match_transformers_batch_of_two(tiny):
    model, ref = tiny
    logits = model(mx.array(ref["input_ids"]))
    assert logits.dtype == mx.float32
    assert_close(logits, ref["logits"])


def test_left_padded_batch_matches_transformers(tiny):
    model, ref = tiny
    mask = ref["padded_mask"].astype(bool)
    logits = np.array(model(mx.array(ref["padded_ids"]), padding_mask=mx.array(mask)))
    assert np.isfinite(logits).all(), "padding rows must stay finite"
    assert_close(logits[mask], ref["padded_logits"][mask])


def test_cached_decoding_equals_full_sequence(tiny):
    """Chunked prefill then one token at a time, across the window wrap."""
    model, ref = tiny
    ids = mx.array(ref["input_ids"])
    cache = model.make_cache()
    chunks = [ids[:, :4], ids[:, 4:7]] + [ids[:, i : i + 1] for i in range(7, ids.shape[1])]
    stepped = mx.concatenate([model(chunk, cache=cache) for chunk in chunks], axis=1)
    assert_close(stepped, ref["logits"])


def test_cached_left_padded_decoding(tiny):
    """A left-padded batch through the cache equals transformers on the real tokens."""
    model, ref = tiny
    mask = ref["padded_mask"].astype(bool)
    left_padding = mx.array((~mask).sum(axis=1))
    ids = mx.array(ref["padded_ids"])
    cache = model.make_cache(left_padding=left_padding)
    parts = [model(ids[:, :8], cache=cache)] + [model(ids[:, i : i + 1], cache=cache) for i in range(8, ids.shape[1])]
    logits = np.array(mx.concatenate(parts, axis=1))
    assert_close(logits[mask], ref["padded_logits"][mask])


def test_greedy_tokens_match_transformers(tiny):
    model, ref = tiny
    cache = model.make_cache()
    logits = model(mx.array(ref["greedy_prompt"])[None], cache=cache)
    tokens = []
    for _ in range(len(ref["greedy_ids"])):
        token = mx.argmax(logits[:, -1], axis=-1)
        tokens.append(token.item())
        logits = model(token[None], cache=cache)
    assert tokens == ref["greedy_ids"].tolist()


def test_hidden_states_intercept(tiny):
    """The intercept sees the embedding then each block, and its return value is used."""
    model, ref = tiny
    ids = mx.array(ref["input_ids"])
    seen = []
    model(ids, intercept=lambda h, i: (seen.append(i), h)[1])
    assert seen == list(range(-1, len(model.layers)))
    unchanged = model(ids, intercept=lambda h, i: h)
    assert_close(unchanged, ref["logits"])
    zeroed = model(ids, intercept=lambda h, i: mx.zeros_like(h) if i == 0 else h)
    assert np.abs(np.array(zeroed) - ref["logits"]).max() > 1e-2


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_half_precision_stays_close(dtype):
    folder = FIXTURES / "tiny_gemma3"
    ref = np.load(folder / "reference.npz")
    model = load_model(folder, dtype=dtype)
    assert model.model.embed_tokens.weight.dtype == dtype
    logits = np.array(model(mx.array(ref["input_ids"])).astype(mx.float32))
    assert np.isfinite(logits).all()
    assert_close(logits, ref["logits"], rtol=0.05)


def test_float16_residuals_do_not_overflow():
    """Activations beyond float16's range are clipped, not turned into inf/NaN."""
    args = gemma3.ModelArgs.from_dict(dict(
        hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, vocab_size=64, sliding_window=4,
    ))
    model = gemma3.Model(args)
    model.set_dtype(mx.float16)
    for layer in model.layers:  # a huge MLP output: ~1e5 per element, over fp16's 65504
        layer.post_feedforward_layernorm.weight = mx.full((32,), 3000.0, dtype=mx.float16)
    logits = model(mx.array([[1, 2, 3, 4, 5]]))
    assert np.isfinite(np.array(logits.astype(mx.float32))).all()


# --- configs -------------------------------------------------------------------------


def test_gemma3_legacy_config_layout_equals_new():
    """Pre-5.0 transformers configs (rope_theta/rope_local_base_freq/rope_scaling,
    sliding_window_pattern) describe the same model as the new rope_parameters layout."""
    shape = dict(hidden_size=64, num_hidden_layers=6, intermediate_size=128,
                 num_attention_heads=4, num_key_value_heads=2)
    old = gemma3.ModelArgs.from_dict({
        **shape, "sliding_window_pattern": 3, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
        "rope_scaling": {"rope_type": "linear", "factor": 4.0},
    })
    new = gemma3.ModelArgs.from_dict({
        **shape, "layer_types": ["sliding_attention"] * 2 + ["full_attention"] + ["sliding_attention"] * 2 + ["full_attention"],
        "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    })
    assert old.layer_types == new.layer_types
    assert old.rope == new.rope == {"full_attention": (1e6, 0.25), "sliding_attention": (1e4, 1.0)}


def test_gemma_legacy_gelu_means_tanh_but_explicit_activation_is_honoured():
    shape = dict(hidden_size=8, num_hidden_layers=1, intermediate_size=16, num_attention_heads=1, num_key_value_heads=1)
    assert gemma.ModelArgs.from_dict({**shape, "hidden_act": "gelu"}).hidden_activation == "gelu_pytorch_tanh"
    assert gemma.ModelArgs.from_dict({**shape, "hidden_activation": "gelu"}).hidden_activation == "gelu"


def test_gemma2_layers_alternate_local_global():
    args = gemma2.ModelArgs.from_dict(dict(hidden_size=8, num_hidden_layers=4, intermediate_size=16,
                                           num_attention_heads=2, num_key_value_heads=1, sliding_window=3))
    assert gemma2.Model(args).windows == [3, None, 3, None]


def test_unknown_config_keys_are_kept_not_dropped():
    args = gemma.ModelArgs.from_dict(dict(hidden_size=8, num_hidden_layers=1, intermediate_size=16,
                                          num_attention_heads=1, num_key_value_heads=1, my_new_setting=7))
    assert args.extra == {"my_new_setting": 7}


# --- masks ---------------------------------------------------------------------------


def test_sliding_window_mask_semantics():
    """A query at p sees p - window < k <= p (transformers' sliding-window overlay)."""
    m = np.array(build_mask(mx.arange(6), mx.arange(6), window=3))[0, 0]
    expected = np.array([[0 <= q - k < 3 for k in range(6)] for q in range(6)])
    np.testing.assert_array_equal(m, expected)


def test_padding_rows_always_see_themselves():
    valid = mx.array([[False, False, True, True]])
    m = np.array(build_mask(mx.arange(4), mx.arange(4), key_valid=valid))[0, 0]
    assert m.any(axis=-1).all()
    assert not m[2:, :2].any(), "real tokens never see padding"


# --- live oracle: transformers on fresh inputs ----------------------------------------


@pytest.mark.oracle
@pytest.mark.parametrize("name", TINY_MODELS)
def test_live_transformers_parity_on_fresh_inputs(name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    folder = FIXTURES / f"tiny_{name}"
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    model = load_model(folder)
    ids = np.random.default_rng(123).integers(3, 512, size=(3, 23))
    with torch.no_grad():
        expected = reference(torch.tensor(ids)).logits.numpy()
    assert_close(model(mx.array(ids)), expected)


@pytest.mark.oracle
def test_live_gemma_7b_style_multi_head_attention(tmp_path):
    """Gemma 7B's shape: as many KV heads as query heads, head_dim != hidden / heads."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.GemmaConfig(
        vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, head_dim=16, max_position_embeddings=64,
    )
    torch.manual_seed(7)
    reference = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0, 0.2)
    reference.save_pretrained(tmp_path, safe_serialization=True)
    ids = np.random.default_rng(7).integers(0, 300, size=(2, 11))
    with torch.no_grad():
        expected = reference(torch.tensor(ids)).logits.numpy()
    model = load_model(tmp_path)
    assert model.layers[0].self_attn.n_kv_heads == 4
    assert_close(model(mx.array(ids)), expected)


def test_explicit_null_softcap_means_no_cap():
    """`attn_logit_softcapping: null` in a Gemma 2 config is no cap, not the default 50."""
    shape = dict(hidden_size=8, num_hidden_layers=2, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1)
    args = gemma2.ModelArgs.from_dict({**shape, "attn_logit_softcapping": None, "final_logit_softcapping": None})
    assert args.attn_logit_softcapping is None and args.final_logit_softcapping is None
    assert gemma2.ModelArgs.from_dict(shape).attn_logit_softcapping == 50.0


# --- shared layers: fused forms give the op-by-op values -------------------------------


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize("activation", ["gelu_pytorch_tanh", "gelu"])
def test_gated_mlp_equals_op_by_op(dtype, activation):
    mx.random.seed(5)
    mlp = GeGLU(32, 80, activation)
    mlp.set_dtype(dtype)
    x = (mx.random.normal((2, 7, 32)) * 3).astype(dtype)
    op_by_op = mlp.down_proj(mlp.act(mlp.gate_proj(x)) * mlp.up_proj(x))
    assert mx.array_equal(mlp(x), op_by_op).item()


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
def test_softcapped_attention_rounds_its_float32_softmax_once(dtype):
    """The softmax of capped scores sums in float32 and is rounded once to the activation dtype,
    as transformers' eager attention does (softmax(dtype=float32).to(query.dtype))."""
    mx.random.seed(6)
    q, k, v = ((mx.random.normal((1, 4, 9, 16)) * 4).astype(dtype) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    mask = build_mask(mx.arange(9), mx.arange(9), window=4)
    got = attention(q, k, v, 0.25, mask, logit_softcap=50.0)
    qg = q.reshape(1, 2, 2, 9, 16) * 0.25
    scores = softcap(qg @ mx.expand_dims(k, 2).swapaxes(-1, -2), 50.0)
    scores = mx.where(mx.expand_dims(mask, 2), scores, mx.array(-mx.inf, dtype=dtype))
    weights = mx.softmax(scores.astype(mx.float32), axis=-1).astype(dtype)
    expected = (weights @ mx.expand_dims(v, 2)).reshape(1, 4, 9, 16)
    assert got.dtype == dtype and mx.array_equal(got, expected).item()


# ----- the model contract (mlx_gemma/models/base.py) -------------------------------------

# One tiny fixture per registered architecture (PaliGemma over both of its decoders).
CONTRACT_FIXTURES = ["tiny_gemma", "tiny_gemma2", "tiny_gemma3", "tiny_paligemma", "tiny_paligemma2", "tiny_gemma3_vlm",
                     "tiny_shieldgemma2", "tiny_gemma4_e2b", "tiny_gemma4_mm"]


def _conforms(value, hint) -> bool:
    """Whether `value` has the type a contract annotation declares (unions, tuples, protocols)."""
    origin, parts = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, part) for part in parts)
    if hint is type(None):
        return value is None
    if origin is tuple:  # tuple[X, ...]
        return isinstance(value, tuple) and all(_conforms(v, parts[0]) for v in value)
    if hint in (int, float):  # a bool is no count, and a soft-cap is a float, not an int
        return type(value) is hint
    return isinstance(value, hint)


def _data_fields(protocol) -> dict:
    """The protocol's declared attributes (not its methods or properties) and their types."""
    return typing.get_type_hints(protocol)


def test_every_registered_architecture_has_a_contract_fixture():
    built = {load_model(FIXTURES / name).model_type for name in CONTRACT_FIXTURES}
    assert built == set(MODELS)


@pytest.mark.parametrize("name", CONTRACT_FIXTURES)
def test_every_model_keeps_the_written_contract(name):
    folder = FIXTURES / name
    model = load_model(folder)
    assert isinstance(model, GemmaModel) and isinstance(model.args, GemmaArgs)
    # Each declared attribute is set by the class itself, with the declared type.
    for field, hint in _data_fields(GemmaModel).items():
        assert hasattr(model, field), f"{type(model).__module__}.Model does not set {field}"
        assert _conforms(getattr(model, field), hint), f"{name}: {field} = {getattr(model, field)!r} is not {hint}"
    for field, hint in _data_fields(GemmaArgs).items():
        assert _conforms(getattr(model.args, field), hint), f"{name}: args.{field} is not {hint}"
    for block in model.layers:
        assert isinstance(block, Block)
        assert _conforms(block.window, _data_fields(Block)["window"])
    # And means what it says.
    assert model.model_type in MODELS and model.path == folder
    assert model.windows == [block.window for block in model.layers]
    assert len(model.layers) == len(model.decoder.layers) and model.layers[0] is model.decoder.layers[0]
    assert isinstance(model.decoder, (DecoderStack, gemma4.Gemma4Stack))  # Gemma 4 runs its own stack
    assert len(model.make_cache(max_kv_size=16)) == len(model.layers)
    params = dict(tree_flatten(model.parameters()))
    assert set(model.sanitize(params)) == set(params)  # our own names pass through unchanged
    for prefix in model.float_prefixes:  # each prefix names weights the quantizer then skips
        assert any(k.startswith(prefix) for k in params), prefix
    if model.image_input is None:
        assert not model.prefix_lm and model.float_prefixes == ()
        ids = mx.array([[2, 5, 7, 9]])
        inputs = {}
    else:  # with images: the placeholders, the patches (or pooled soft tokens) and the pixels agree
        spec = model.image_input
        if spec.start_id is None:  # PaliGemma: one placeholder per patch, before <bos>; a prefix-LM
            assert model.prefix_lm
            assert spec.num_tokens == (spec.image_size // model.args.vision.patch_size) ** 2
            ids = mx.array([[spec.token_id] * spec.num_tokens + [2, 5, 7]])
        elif spec.variable:  # Gemma 4: one k x k window of patches -> one soft token; causal
            assert not model.prefix_lm and spec.image_size == 0
            k, p = model.args.vision.pooling_kernel_size, model.args.vision.patch_size
            ids = mx.array([[2, spec.start_id, spec.token_id, spec.end_id, 5, 7]])
            grid = mx.array([[[x, y] for y in range(k) for x in range(k)]])
            inputs = {"pixel_values": mx.zeros((1, k * k, 3 * p * p)), "image_positions": grid}
        else:  # Gemma 3: pooled soft tokens between <start_of_image> and <end_of_image>; causal
            assert not model.prefix_lm and spec.num_tokens == model.args.mm_tokens_per_image
            ids = mx.array([[2, spec.start_id] + [spec.token_id] * spec.num_tokens + [spec.end_id, 5, 7]])
        if not spec.variable:
            inputs = {"pixel_values": mx.zeros((1, spec.image_size, spec.image_size, 3))}
    hidden = model.model(ids, **inputs)  # [B, T, hidden]
    assert hidden.shape == (1, ids.shape[1], model.args.hidden_size)
    logits = model.logits(hidden)
    assert logits.shape == (1, ids.shape[1], model.args.vocab_size)
    assert mx.array_equal(logits, model(ids, **inputs)).item()


def test_no_caller_probes_a_model():
    """The contract is read directly: no getattr/hasattr on a model (or model.args), no self_attn.window."""
    probe = re.compile(r"\b(getattr|hasattr)\((self\.)?model\b|self_attn\.window")
    package = Path(__file__).resolve().parent.parent / "mlx_gemma"
    found = [f"{path.relative_to(package)}:{i}" for path in sorted(package.rglob("*.py"))
             for i, line in enumerate(path.read_text().splitlines(), 1) if probe.search(line)]
    assert found == []
