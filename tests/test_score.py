"""score() against keras-hub's GemmaCausalLM.score on the tiny keras presets.

The reference numbers (logits, per-token losses, an intervention through
layer_intercept_fn, and a gradient through it) come from keras-hub itself:
tests/fixtures/make_score_reference.py.  Padding positions are compared where
score computes them as keras-hub does (trim_padding=False, all but leading left
padding: keras-hub zeroes the attention of a query that sees no key); trimmed
results are compared with untrimmed ones.
"""

from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx

from mlx_gemma.convert.keras import read_keras_preset
from mlx_gemma.errors import MlxGemmaError
from mlx_gemma.loading import load_model, load_model_from
from mlx_gemma.score import score

from conftest import FIXTURES
from test_tuner_lora import assert_close

REFERENCE = FIXTURES / "keras_score_reference.npz"


@pytest.fixture(scope="module", params=["keras_gemma", "keras_gemma2"])
def preset(request):
    ck = read_keras_preset(FIXTURES / request.param)
    weights = {k: mx.array(np.asarray(v, dtype=np.float32)) for k, v in ck.weights.items()}
    model = load_model_from(ck.config, weights)
    inputs = np.load(FIXTURES / request.param / "reference.npz")
    ref = {k.split("/", 1)[1]: v for k, v in np.load(REFERENCE).items() if k.startswith(request.param + "/")}
    return model, inputs["token_ids"], inputs["padding_mask"], ref


def real(x, mask):
    """The rows of x ([B, T, ...]) at real tokens."""
    return np.asarray(x)[np.asarray(mask) > 0]


def test_logits_and_losses_match_keras_hub(preset):
    model, ids, mask, ref = preset
    logits = score(model, mx.array(ids), mx.array(mask))
    assert_close(real(logits, mask), real(ref["logits"], mask), rtol=1e-4)
    loss = score(model, mx.array(ids), mx.array(mask), "loss", target_ids=mx.array(np.roll(ids, -1, axis=1)))
    assert loss.shape == ids.shape and loss.dtype == mx.float32
    assert_close(real(loss, mask), real(ref["loss"], mask), rtol=1e-5)


def test_intercepted_blocks_match_keras_hub(preset):
    model, ids, mask, ref = preset
    halved = score(model, mx.array(ids), mx.array(mask), layer_intercept_fn=lambda x, i: x * 0.5 if i == 0 else x)
    assert_close(real(halved, mask), real(ref["logits_halved"], mask), rtol=1e-4)


def test_gradient_through_score_matches_jax(preset):
    model, ids, mask, ref = preset
    # A masked loss has the same gradients, 0 at padding as keras-hub's, trimmed or not; row 1 alone
    # ends in 3 columns of padding, which trimming skips.
    for rows, trim in [(slice(None), True), (slice(None), False), (slice(1, 2), True), (slice(1, 2), False)]:
        b_ids, m = mx.array(ids[rows]), mx.array(mask[rows])
        targets = mx.array(np.roll(ids[rows], -1, axis=1))

        def total(delta):
            fn = lambda x, i: x + delta if i == 0 else x  # noqa: E731
            losses = score(model, b_ids, m, "loss", layer_intercept_fn=fn, target_ids=targets, trim_padding=trim)
            return (losses * m).sum()

        grad = mx.grad(total)(mx.zeros((*b_ids.shape, model.args.hidden_size)))
        assert_close(grad, ref["grad_delta"][rows], rtol=1e-4)


def test_loss_is_the_cross_entropy_of_the_logits(preset):
    model, ids, mask, _ = preset
    targets = np.roll(ids, -1, axis=1)
    logits = np.asarray(score(model, mx.array(ids)), dtype=np.float64)
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    by_hand = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    assert_close(score(model, mx.array(ids), scoring_mode="loss", target_ids=mx.array(targets)), by_hand, rtol=1e-5)


def score_seeing_every_layer(model, ids):
    """score's logits; an identity intercept changes nothing and sees [B, T, hidden] at -1 and each block."""
    seen = []

    def identity(x, i):
        seen.append((i, tuple(x.shape)))
        return x

    plain = score(model, ids)
    assert mx.array_equal(score(model, ids, layer_intercept_fn=identity), plain)
    assert seen == [(i, (*ids.shape, model.args.hidden_size)) for i in range(-1, len(model.layers))]
    return plain


def test_intercepts_see_every_layer_and_change_the_result(preset):
    model, ids, mask, _ = preset
    ids = mx.array(ids[:1])
    plain = score_seeing_every_layer(model, ids)
    for layer in (-1, 0, len(model.layers) - 1):
        zeroed = score(model, ids, layer_intercept_fn=lambda x, i: mx.zeros_like(x) if i == layer else x)
        assert not np.allclose(np.asarray(zeroed), np.asarray(plain)), layer


def test_gradient_with_respect_to_the_embeddings(preset):
    """keras-hub's TensorFlow example, in MLX: d loss / d embeddings, here checked by a finite difference."""
    model, ids, _, _ = preset
    ids = mx.array(ids[:1])
    targets = mx.array(np.roll(np.asarray(ids), -1, axis=1))

    def total(delta):
        fn = lambda x, i: x + delta if i == -1 else x  # noqa: E731
        return score(model, ids, scoring_mode="loss", layer_intercept_fn=fn, target_ids=targets).sum()

    zero = mx.zeros((1, 12, model.args.hidden_size))
    grad = mx.grad(total)(zero)
    direction = mx.array(np.random.default_rng(0).normal(size=zero.shape).astype(np.float32))
    eps = 3e-3
    numeric = (total(eps * direction) - total(-eps * direction)).item() / (2 * eps)
    assert abs((grad * direction).sum().item() - numeric) <= 2e-3 * abs(numeric)


@pytest.mark.parametrize("kwargs, message", [
    (dict(scoring_mode="probs"), "unsupported scoring_mode 'probs'"),
    (dict(scoring_mode="loss"), "without targets"),
    (dict(padding_mask=mx.ones((1, 3))), "padding_mask has shape"),
])
def test_bad_arguments(preset, kwargs, message):
    model = preset[0]
    with pytest.raises(MlxGemmaError, match=message) as info:
        score(model, mx.array([[2, 5, 6, 7]]), **kwargs)
    assert isinstance(info.value, ValueError)


def test_example_score_gradients_runs():
    """examples/score_gradients.py (keras-hub's gradient example in MLX) prints the total loss score() gives."""
    import subprocess
    import sys

    import mlx_gemma

    folder = FIXTURES / "tiny_gemma3"
    script = FIXTURES.parent.parent / "examples" / "score_gradients.py"
    done = subprocess.run([sys.executable, str(script), "--model", str(folder)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    model, tokenizer = mlx_gemma.load(folder)
    total = 0.0
    for text in ["This is a test of scoring", "Where are you"]:
        ids = mx.array([tokenizer.encode(text)])
        total += score(model, ids, scoring_mode="loss", target_ids=mx.roll(ids, -1, axis=1))[0, :-1].sum().item()
    printed = float(done.stdout.splitlines()[0].split()[-1])
    assert abs(printed - total) <= 1e-4 * total
    assert len(done.stdout.splitlines()) == 1 + 2 + sum(len(tokenizer.encode(t)) for t in
                                                        ["This is a test of scoring", "Where are you"])


def test_score_takes_text_models_only():
    with pytest.raises(MlxGemmaError, match="takes a Gemma text model, not a 'paligemma'"):
        score(load_model(FIXTURES / "tiny_paligemma"), mx.array([[2, 5, 6]]))


# ----- padding: keras-hub's values at right padding, and trimmed columns ----------------------------------

def test_untrimmed_padding_positions_match_keras_hub(preset):
    """keras-hub's padding queries attend to their row's real keys: trim_padding=False gives its values
    at every position but leading left padding (a query that sees no real key: keras-hub zeroes its attention)."""
    model, ids, mask, ref = preset
    seen = np.ones(mask.shape, bool)
    seen[2, :2] = False  # row 2 starts with two padding tokens
    logits = score(model, mx.array(ids), mx.array(mask), trim_padding=False)
    assert_close(np.asarray(logits)[seen], ref["logits"][seen], rtol=1e-4)
    assert_close(real(logits, mask), real(ref["logits"], mask), rtol=1e-4)
    # Row 1 alone ends in 3 padding columns: trimmed they are 0, untrimmed keras-hub's.
    row = (mx.array(ids[1:2]), mx.array(mask[1:2]))
    assert_close(score(model, *row, trim_padding=False), ref["logits"][1:2], rtol=1e-4)
    trimmed = np.asarray(score(model, *row))
    assert trimmed.shape == (1, 12, model.args.vocab_size) and not trimmed[0, 9:].any()
    assert_close(trimmed[0, :9], ref["logits"][1, :9], rtol=1e-4)


def heavy_padding(model, rows=(3, 20, 5, 12), T=64, seed=0):
    """Right-padded ids [len(rows), T] with rows of the given real lengths, their mask and next-token targets."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(rows), T), np.int32)
    mask = np.zeros((len(rows), T), bool)
    for b, n in enumerate(rows):
        ids[b, :n] = [2, *rng.integers(3, model.args.vocab_size, n - 1)]
        mask[b, :n] = True
    return mx.array(ids), mx.array(mask), mx.array(np.roll(ids, -1, axis=1))


@pytest.fixture(scope="module", params=["keras_gemma2", "tiny_gemma2", "tiny_gemma3"])
def windowed(request):
    """Models whose sliding windows (tiny_gemma2: 6, tiny_gemma3: 5) are shorter than heavy_padding's rows."""
    if request.param.startswith("keras_"):
        ck = read_keras_preset(FIXTURES / request.param)
        return load_model_from(ck.config, {k: mx.array(np.asarray(v, dtype=np.float32)) for k, v in ck.weights.items()})
    return load_model(FIXTURES / request.param)


def test_trimmed_score_is_the_padded_one_at_real_positions(windowed):
    model = windowed
    ids, mask, targets = heavy_padding(model)
    real_mask = np.asarray(mask)
    for mode in ("logits", "loss"):
        full = score(model, ids, mask, mode, target_ids=targets, trim_padding=False)
        trimmed = score(model, ids, mask, mode, target_ids=targets)
        assert trimmed.shape == full.shape and trimmed.dtype == full.dtype
        assert_close(real(trimmed, real_mask), real(full, real_mask), rtol=1e-5)
        assert not np.asarray(trimmed)[:, 20:].any()  # past the longest row (20): not computed
        # Columns that are padding in some rows only are computed as untrimmed.
        assert_close(np.asarray(trimmed)[:, :20], np.asarray(full)[:, :20], rtol=1e-5)
    # The plain padded model call (the stack's own mask) agrees at real positions.
    assert_close(real(score(model, ids, mask), real_mask), real(model(ids), real_mask), rtol=1e-5)


def test_trimmed_gradients_through_score_are_the_padded_ones(windowed):
    """keras-hub's example (gradients of the masked losses with respect to the embeddings, through
    layer_intercept_fn), with heavy padding: the same gradients, trimmed or not, and the intercept
    sees full-width [B, T, hidden] tensors either way."""
    model = windowed
    ids, mask, targets = heavy_padding(model)
    shapes = []

    def total(delta, trim):
        def intercept(x, i):
            shapes.append(tuple(x.shape))
            return x + delta if i == -1 else x
        losses = score(model, ids, mask, "loss", intercept, targets, trim_padding=trim)
        return (losses * mask).sum()

    zero = mx.zeros((*ids.shape, model.args.hidden_size))
    padded, trimmed = mx.grad(total)(zero, False), mx.grad(total)(zero, True)
    assert set(shapes) == {(4, 64, model.args.hidden_size)}
    assert_close(trimmed, padded, rtol=1e-5)
    padded, real_mask = np.asarray(padded), np.asarray(mask)
    assert not padded[~real_mask].any()  # no real position reads a padding column
    assert (np.abs(padded[real_mask]).max(axis=-1) > 0).all()


# ----- Gemma 4 (text): against transformers' logits on the tiny fixtures -------------------------

GEMMA4 = ["e2b", "31b", "moe"]  # per-layer inputs + shared KV; k_eq_v with its own global heads; MoE


def gemma4_fixture(name):
    folder = FIXTURES / f"tiny_gemma4_{name}"
    return load_model(folder), dict(np.load(folder / "reference.npz"))


def log_softmax(logits):
    logits = np.asarray(logits, dtype=np.float64)
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


@pytest.mark.parametrize("name", GEMMA4)
def test_gemma4_log_probs_match_transformers(name):
    """Per-token losses are -log p(next token) under transformers' logits (reference.npz, fp32),
    for the full batch and, at real positions, the left-padded one."""
    model, ref = gemma4_fixture(name)
    for ids, mask, logits in ((ref["input_ids"], None, ref["logits"]),
                              (ref["padded_ids"], ref["padded_mask"], ref["padded_logits"])):
        targets = np.roll(ids, -1, axis=1)
        expected = -np.take_along_axis(log_softmax(logits), targets[..., None], -1)[..., 0]
        real_mask = np.ones(ids.shape, bool) if mask is None else mask.astype(bool)
        m = None if mask is None else mx.array(mask)
        ours = score(model, mx.array(ids), m, "loss", target_ids=mx.array(targets))
        assert_close(real(ours, real_mask), real(expected, real_mask), rtol=1e-4)
        assert_close(real(score(model, mx.array(ids), m), real_mask), real(logits, real_mask), rtol=1e-4)


def test_gemma4_intercepts_see_every_block_and_trimming_keeps_real_positions():
    model, ref = gemma4_fixture("e2b")
    ids = mx.array(ref["input_ids"])
    plain = score_seeing_every_layer(model, ids)
    for layer in (-1, 0, len(model.layers) - 1):  # the last block is KV-shared
        zeroed = score(model, ids, layer_intercept_fn=lambda x, i: x * 0.5 if i == layer else x)
        assert not np.allclose(np.asarray(zeroed), np.asarray(plain)), layer
    mask = np.ones(ids.shape, bool)
    mask[:, 11:] = False  # right padding: trailing columns not computed, real ones unchanged
    trimmed = score(model, ids, mx.array(mask))
    assert_close(np.asarray(trimmed)[:, :11], np.asarray(plain)[:, :11], rtol=1e-5)
    assert not np.asarray(trimmed)[:, 11:].any()


def test_gemma4_gradient_with_respect_to_the_embeddings():
    """d loss / d embeddings through layer_intercept_fn (the per-layer inputs read the intercepted
    embeddings too), checked by a central difference.  In float64 on the CPU: these random tiny
    models are so sharp that float32 differences are noise at any step size."""
    folder = FIXTURES / "tiny_gemma4_e2b"
    ids = mx.array(np.load(folder / "reference.npz")["input_ids"][:1, :6])
    targets = mx.array(np.roll(np.asarray(ids), -1, axis=1))
    with mx.stream(mx.cpu):
        model = load_model(folder, dtype=mx.float64)

        def total(delta):
            fn = lambda x, i: x + delta if i == -1 else x  # noqa: E731
            return score(model, ids, scoring_mode="loss", layer_intercept_fn=fn, target_ids=targets).sum()

        zero = mx.zeros((*ids.shape, model.args.hidden_size), dtype=mx.float64)
        grad = mx.grad(total)(zero)
        direction = mx.array(np.random.default_rng(0).normal(size=zero.shape))
        eps = 1e-6
        numeric = (total(eps * direction) - total(-eps * direction)).item() / (2 * eps)
        assert abs((grad * direction).sum().item() - numeric) <= 1e-3 * abs(numeric)


@pytest.mark.oracle
@pytest.mark.parametrize("name", ["e2b", "moe"])
def test_gemma4_losses_are_transformers_log_probs_on_fresh_ids(name):
    """transformers' own Gemma4ForCausalLM on a fresh right-padded batch: its log-probs of the next
    token, at real positions, are our per-token losses (negated)."""
    import torch  # heavy optional dependency
    import transformers

    folder = FIXTURES / f"tiny_gemma4_{name}"
    reference = transformers.Gemma4ForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    ids = np.random.default_rng(11).integers(3, 512, size=(2, 14))
    mask = np.ones(ids.shape, dtype=np.int64)
    mask[1, 9:] = 0
    with torch.no_grad():
        logits = reference(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    targets = np.roll(ids, -1, axis=1)
    expected = -np.take_along_axis(log_softmax(logits), targets[..., None], -1)[..., 0]
    ours = score(load_model(folder), mx.array(ids), mx.array(mask), "loss", target_ids=mx.array(targets))
    real_mask = mask.astype(bool)
    assert_close(real(ours, real_mask), real(expected, real_mask), rtol=1e-4)
