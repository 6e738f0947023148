"""The fine-tuning loss with a trainable output head (a full fine-tune trains Gemma's tied
embedding), and the in-place Adam / AdamW: checked against the plain full-logits loss and
mlx's own optimizers, and for the memory they were written to save."""

from __future__ import annotations

import json

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from mlx_gemma import cpu_spread
from mlx_gemma.loading import load_model, load_model_from
from mlx_gemma.models import gemma
from mlx_gemma.tuner import losses, optimizers, trainer

from conftest import FIXTURES
from test_tuner_trainer import peak_memory


def model_for(name: str, tied: bool = True, dtype=mx.float32) -> nn.Module:
    """A fixture model (all parameters trainable) with embeddings large enough for logits of a useful
    size (the fixtures' 0.02-std ones keep every logit near 0), tied or with a separate lm_head."""
    config = json.loads((FIXTURES / name / "config.json").read_text())
    weights = dict(tree_flatten(load_model(FIXTURES / name).parameters()))
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"] * 10
    config["tie_word_embeddings"] = tied
    weights.pop("lm_head.weight", None)
    if not tied:
        rng = np.random.default_rng(5)
        weights["lm_head.weight"] = mx.array(rng.normal(0, 0.3, weights["model.embed_tokens.weight"].shape),
                                             dtype=mx.float32)
    return load_model_from(config, weights, dtype=dtype)


def random_batch(vocab: int, rows: int = 2, tokens: int = 13, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = mx.array(rng.integers(0, vocab, (rows, tokens + 1)))
    weights = rng.choice([0.0, 1.0, 0.5], size=(rows, tokens), p=[0.2, 0.6, 0.2])  # masked, whole and half
    return ids[:, :-1], ids[:, 1:], mx.array(weights, dtype=mx.float32)


def gradients(model, fn, batch):
    (loss, _), grads = nn.value_and_grad(model, fn)(model, *batch)
    return loss.item(), dict(tree_flatten(grads))


def chunked(chunk):
    return lambda m, *b: losses.loss_fn(m, *b, chunk_size=chunk)


def max_error(grads, reference) -> float:
    """Largest error over all parameters, relative to each reference gradient's largest magnitude."""
    return max(float(np.abs(np.asarray(g.astype(mx.float32)) - np.asarray(reference[k].astype(mx.float32))).max()
                     / np.abs(np.asarray(reference[k].astype(mx.float32))).max()) for k, g in grads.items())


@pytest.mark.parametrize("name, tied", [("tiny_gemma", True), ("tiny_gemma2", True), ("tiny_gemma3", True),
                                        ("tiny_gemma", False), ("tiny_gemma2", False)])
@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_trainable_head_gradients_equal_the_full_loss(name, tied, chunk):
    """Every parameter trains, the head too (tied: the embedding gets the head's and the lookup's
    gradients; gemma2: through the final soft-cap); float32, so the only differences are float32
    rounding (other summation orders)."""
    model = model_for(name, tied)
    assert isinstance(losses.output_head(model), (cpu_spread.SpreadEmbedding, cpu_spread.SpreadLinear))
    batch = random_batch(model.args.vocab_size)
    full, g_full = gradients(model, trainer.full_cross_entropy, batch)
    ours, g = gradients(model, chunked(chunk), batch)
    assert abs(ours - full) <= 1e-6 * full
    assert g.keys() == g_full.keys() and ("lm_head.weight" in g) == (not tied)
    assert max_error(g, g_full) <= 1e-5


def test_trainable_head_without_the_cpu_fast_path(monkeypatch):
    """A plain (unspread) head: its gradient is computed on one stream, with the same values."""
    monkeypatch.setenv(cpu_spread.FAST_PATH_ENV, "0")
    model = model_for("tiny_gemma2", tied=False)
    assert type(model.lm_head) is nn.Linear
    batch = random_batch(model.args.vocab_size, seed=3)
    _, g_full = gradients(model, trainer.full_cross_entropy, batch)
    _, g = gradients(model, chunked(3), batch)
    assert max_error(g, g_full) <= 1e-5


@pytest.mark.parametrize("name, tied", [("tiny_gemma", True), ("tiny_gemma2", True), ("tiny_gemma2", False)])
def test_trainable_head_in_bfloat16(name, tied):
    """bf16 weights (gradients in bf16): the chunked gradients are as close to the exact ones (the
    float32 model's) as the plain loss's bf16 gradients are; bf16 rounding dominates both."""
    batch = random_batch(512, seed=1)
    _, exact = gradients(model_for(name, tied), trainer.full_cross_entropy, batch)
    bf16 = model_for(name, tied, mx.bfloat16)
    full, g_full = gradients(bf16, trainer.full_cross_entropy, batch)
    ours, g = gradients(bf16, chunked(4), batch)
    assert all(v.dtype == mx.bfloat16 for v in g.values())
    assert abs(ours - full) <= 1e-3 * full
    print(f"largest gradient error against float32: chunked {max_error(g, exact):.2e}, full {max_error(g_full, exact):.2e}")
    assert max_error(g, exact) <= 1.25 * max_error(g_full, exact)


def test_a_trainable_quantized_or_biased_head_is_refused():
    model = gemma.Model(gemma.ModelArgs.from_dict(dict(
        model_type="gemma", hidden_size=32, num_hidden_layers=1, intermediate_size=64, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, vocab_size=97, tie_word_embeddings=False)))
    model.lm_head = nn.Linear(32, 97, bias=True)
    batch = random_batch(97)
    with pytest.raises(losses.TrainingError, match="trainable output head must be a plain weight"):
        gradients(model, chunked(4), batch)


def tiny_wide(vocab: int = 32768, hidden: int = 64) -> nn.Module:
    """One small block under a Gemma-sized vocabulary: the head's [V, D] weight dominates the memory."""
    config = dict(model_type="gemma", hidden_size=hidden, num_hidden_layers=1, intermediate_size=2 * hidden,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=32, vocab_size=vocab)
    model = cpu_spread.prepare_for_device(gemma.Model(gemma.ModelArgs.from_dict(config)))
    mx.eval(model.parameters())
    return model


def test_trainable_head_memory_does_not_grow_with_the_chunks():
    """The head's gradient is made once, not once per chunk and summed: 8x the tokens (8x the
    chunks) add activations, not [V, D] gradients.  Autodiff through the chunks (the earlier
    checkpointed path) held one dense [V, D] gradient per chunk until they were summed."""
    model = tiny_wide(vocab=16384, hidden=256)
    unit = model.args.vocab_size * model.args.hidden_size * 4  # one float32 [V, D]
    step = nn.value_and_grad(model, chunked(16))
    peaks = {}
    for tokens in (64, 512):  # 4 and 32 chunks of 2 x 16 rows
        peaks[tokens] = peak_memory(step, model, *random_batch(model.args.vocab_size, tokens=tokens, seed=tokens))
    print({k: f"{v / unit:.2f} x [V, D]" for k, v in peaks.items()})
    assert peaks[64] < 6 * unit
    assert peaks[512] - peaks[64] < 4 * unit  # one [V, D] per chunk would add 28


# --- the in-place Adam / AdamW --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("ours, theirs", [
    (lambda: optimizers.LeanAdam(1e-2), lambda: optim.Adam(1e-2)),
    (lambda: optimizers.LeanAdam(1e-2, bias_correction=True), lambda: optim.Adam(1e-2, bias_correction=True)),
    (lambda: optimizers.LeanAdamW(1e-2), lambda: optim.AdamW(1e-2)),
    (lambda: optimizers.LeanAdamW(optim.cosine_decay(1e-2, 5), weight_decay=0.1),
     lambda: optim.AdamW(optim.cosine_decay(1e-2, 5), weight_decay=0.1)),
])
def test_lean_adam_equals_mlx_adam_bit_for_bit(dtype, ours, theirs):
    rng = np.random.default_rng(0)
    start = {"w": mx.array(rng.normal(0, 1, (16, 8)), dtype=dtype), "b": mx.array(rng.normal(0, 1, (8,)), dtype=dtype)}
    grads = [{k: mx.array(rng.normal(0, 1, v.shape), dtype=dtype) for k, v in start.items()} for _ in range(4)]
    results = []
    for make in (ours, theirs):
        model, opt = nn.Module(), make()
        for k, v in start.items():
            setattr(model, k, v)
        for g in grads:
            opt.update(model, g)
            mx.eval(model.parameters(), opt.state)
        results.append((model.parameters(), opt.state))
    (w_ours, s_ours), (w_theirs, s_theirs) = results
    for k in start:
        assert w_ours[k].dtype == dtype and mx.array_equal(w_ours[k], w_theirs[k]).item()
        for moment in ("m", "v"):
            assert mx.array_equal(s_ours[k][moment], s_theirs[k][moment]).item()


def test_float32_moments():
    opt = optimizers.build_optimizer("adamw", 1e-3, state_dtype="float32")
    model = nn.Module()
    model.w = mx.ones((4, 4), dtype=mx.bfloat16)
    opt.update(model, {"w": mx.full((4, 4), 0.5, dtype=mx.bfloat16)})
    mx.eval(model.parameters(), opt.state)
    assert opt.state["w"]["m"].dtype == mx.float32 and model.w.dtype == mx.bfloat16
    assert np.allclose(np.asarray(model.w.astype(mx.float32)), 1 - 1e-3, atol=4e-3)  # bf16's step near 1
    with pytest.raises(optimizers.TrainingError, match="state dtype"):
        optimizers.build_optimizer("adamw", 1e-3, state_dtype="float16")
    with pytest.raises(optimizers.TrainingError, match="sgd keeps no Adam moments"):
        optimizers.build_optimizer("sgd", 1e-3, state_dtype="float32")


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_lean_update_writes_in_place(name):
    """The update (as the training loop runs it: a lean optimizer outside the compiled step) holds no
    second copy of a big weight or its moments; mlx's Adam compiled into the step (as mlx-lm and, for
    other optimizers, our loop compile it) holds three: the new weight, m and v beside the old."""
    unit = 4096 * 1024 * 2  # one bf16 [4096, 1024] weight
    peaks = {}
    for label, opt in (("ours", optimizers.build_optimizer(name, 1e-4)), ("mlx", optim.Adam(1e-4))):
        model = nn.Module()
        model.w = mx.random.normal((4096, 1024)).astype(mx.bfloat16)
        opt.init(model.trainable_parameters())
        state = [model.state, opt.state]
        update = (lambda g: opt.update(model, g)) if label == "ours" else \
            mx.compile(lambda g: opt.update(model, g), inputs=state, outputs=state)
        grads = {"w": mx.random.normal((4096, 1024)).astype(mx.bfloat16)}
        mx.eval(state)
        peaks[label] = peak_memory(lambda g: (update(g), state)[1], grads)
    print({k: f"{v / unit:.2f} x the weight" for k, v in peaks.items()})
    assert peaks["ours"] < 0.1 * unit and peaks["mlx"] > 2.5 * unit
