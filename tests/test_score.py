"""score() against keras-hub's GemmaCausalLM.score on the tiny keras presets.

The reference numbers (logits, per-token losses, an intervention through
layer_intercept_fn, and a gradient through it) come from keras-hub itself:
tests/fixtures/make_score_reference.py.  keras-hub gives padding positions
other values (it zeroes the attention of a query that sees no key), so
comparisons are on real tokens.
"""

from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx

from mlx_gemma.convert.keras import read_keras_preset
from mlx_gemma.errors import MlxGemmaError
from mlx_gemma.loading import load_model_from
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
    targets = mx.array(np.roll(ids, -1, axis=1))
    m = mx.array(mask)

    def total(delta):
        fn = lambda x, i: x + delta if i == 0 else x  # noqa: E731
        return (score(model, mx.array(ids), m, "loss", layer_intercept_fn=fn, target_ids=targets) * m).sum()

    grad = mx.grad(total)(mx.zeros((*ids.shape, model.args.hidden_size)))
    assert_close(real(grad, mask), real(ref["grad_delta"], mask), rtol=1e-4)


def test_loss_is_the_cross_entropy_of_the_logits(preset):
    model, ids, mask, _ = preset
    targets = np.roll(ids, -1, axis=1)
    logits = np.asarray(score(model, mx.array(ids)), dtype=np.float64)
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    by_hand = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    assert_close(score(model, mx.array(ids), scoring_mode="loss", target_ids=mx.array(targets)), by_hand, rtol=1e-5)


def test_intercepts_see_every_layer_and_change_the_result(preset):
    model, ids, mask, _ = preset
    ids = mx.array(ids[:1])
    seen = []

    def identity(x, i):
        seen.append((i, tuple(x.shape)))
        return x

    plain = score(model, ids)
    assert mx.array_equal(score(model, ids, layer_intercept_fn=identity), plain)
    hidden = model.args.hidden_size
    assert seen == [(i, (1, 12, hidden)) for i in range(-1, len(model.layers))]
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
    from mlx_gemma.loading import load_model

    with pytest.raises(MlxGemmaError, match="takes a Gemma text model, not a 'paligemma'"):
        score(load_model(FIXTURES / "tiny_paligemma"), mx.array([[2, 5, 6]]))
