"""keras-hub style fine-tuning: backbone.enable_lora, compile, fit, save/load_lora_weights, score.

fit's loss is checked against trainer.loss_fn (itself checked against transformers
in test_tuner_trainer.py); score against mlx_gemma.score (checked against keras-hub).
"""

from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from mlx_gemma.errors import MlxGemmaError
from mlx_gemma.tasks import causal_lm_data
from mlx_gemma.tuner import trainer

from test_tuner_lora import assert_close, randomize_adapters
from test_tuner_trainer import fittable_tiny
from test_tuner_datasets import PAIRS, pair_batch, tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def keras_style_lm(sequence_length=24):
    from mlx_gemma.tasks import GemmaBackbone, GemmaCausalLM, GemmaCausalLMPreprocessor

    preprocessor = GemmaCausalLMPreprocessor(tiny_tokenizer(), sequence_length)
    return GemmaCausalLM(GemmaBackbone.from_model(fittable_tiny()), preprocessor)


def test_keras_style_fit_on_strings_lowers_the_loss(tmp_path):
    lm = keras_style_lm()
    lm.backbone.enable_lora(rank=4)
    assert lm.backbone.lora_config["lora_parameters"]["scale"] == 1.0  # keras: alpha defaults to the rank
    trainable = sorted(k for k, _ in tree_flatten(lm.model.trainable_parameters()))
    assert trainable == sorted(f"model.layers.{i}.self_attn.{p}.{leaf}" for i in range(3)
                               for p in ("q_proj", "v_proj") for leaf in ("lora_a", "lora_b"))
    lm.compile(optimizer="adamw", learning_rate=1e-2)
    texts = [p + c for p, c in PAIRS]
    history = lm.fit(x=texts, batch_size=2, epochs=8, verbose=0)
    losses = history.history["loss"]
    assert len(losses) == 8 and history.epoch == list(range(8))
    assert losses[-1] < losses[0] / 2
    assert not lm.model.training

    lm.backbone.save_lora_weights(tmp_path / "lora")
    other = keras_style_lm()
    other.backbone.load_lora_weights(tmp_path / "lora")
    ids = mx.array([[2, 30, 40, 50, 60]])
    assert mx.array_equal(other.model(ids), lm.model(ids))
    third = keras_style_lm()
    third.backbone.enable_lora(rank=2)
    with pytest.raises(MlxGemmaError, match="rank 4 differs"):
        third.backbone.load_lora_weights(tmp_path / "lora")


def test_keras_style_fit_on_token_ids_uses_the_sample_weights(tokenizer, tmp_path):
    lm = keras_style_lm()
    lm.preprocessor = None
    lm.backbone.enable_lora(rank=4, target_layer_names=["query", "value", "ffw_linear"])
    inputs, targets, weights = pair_batch(tokenizer, tmp_path)  # right padded, prompts weigh 0
    x = {"token_ids": np.array(inputs), "padding_mask": np.array(inputs) != tokenizer.pad_id}
    expected = trainer.loss_fn(lm.model, inputs, targets, weights)[0].item()
    lm.compile(optimizer="sgd", learning_rate=1e-3)
    history = lm.fit(x=x, y=np.array(targets), sample_weight=np.array(weights), batch_size=len(PAIRS), verbose=0)
    # One epoch of one batch: the reported loss is the loss before the step.
    assert abs(history.history["loss"][0] - expected) < 1e-5 * expected
    left = {"token_ids": x["token_ids"], "padding_mask": x["padding_mask"][:, ::-1]}
    with pytest.raises(MlxGemmaError, match="left padding"):
        lm.fit(x=left, y=np.array(targets))
    with pytest.raises(MlxGemmaError, match="needs y"):
        lm.fit(x=x)


def test_fit_reports_real_tokens_per_second(monkeypatch, capsys):
    """The printed rate counts the unpadded target tokens, and a slow rate is not printed as 0."""
    from types import SimpleNamespace

    lm = keras_style_lm(sequence_length=24)
    lm.backbone.enable_lora(rank=2)
    texts = ["The quick brown fox jumped.", "I forgot my homework."]
    _, _, weights = lm.preprocessor(texts)
    real = int((np.asarray(weights) != 0).sum())
    assert 0 < real < np.asarray(weights).size  # some of the 2 x 24 positions are padding
    clock = iter(range(0, 10**6, 1000))  # every reading 1000 s after the last
    monkeypatch.setattr(trainer, "time", SimpleNamespace(perf_counter=lambda: float(next(clock))))
    lm.fit(x=texts, batch_size=2, epochs=1, verbose=1)
    printed = capsys.readouterr().out
    assert f" {real / 1000:.3g} tok/s" in printed, printed


def test_keras_style_score_is_mlx_gemma_score():
    from mlx_gemma.score import score

    lm = keras_style_lm()
    ids = mx.array([[2, 30, 40, 50, 60, 0]])
    mask = mx.array([[1, 1, 1, 1, 1, 0]])
    assert mx.array_equal(lm.score(ids, mask), score(lm.model, ids, mask))
    with pytest.raises(ValueError, match="scoring_mode"):
        lm.score(ids, scoring_mode="perplexity")


# ----- no work on padding: fit / evaluate / predict against the padded computation -------------------------

SHORT = ["Yes", "Blue", "Hello", "No way", "I am", "Hi there"]  # 4 to 7 tokens each, <bos> and <eos> included


class Recorder(optim.SGD):
    """An optimizer that keeps the gradients it is given (in its state, which the compiled step
    writes back) and leaves the weights as they are."""

    def __init__(self):
        super().__init__(learning_rate=0.0)

    def init_single(self, parameter, state):
        state["grad"] = mx.zeros_like(parameter)

    def apply_single(self, gradient, parameter, state):
        state["grad"] = gradient
        return parameter


def padded_loss_and_grads(model, texts, preprocessor):
    """The reference: mlx-lm's plain full-logits loss on rows padded to sequence_length, and its gradients."""
    x, y, w = preprocessor(texts)
    ids, targets, weights = mx.array(x["token_ids"]), mx.array(y), mx.array(w)
    (loss, _), grads = nn.value_and_grad(model, trainer.full_cross_entropy)(model, ids, targets, weights)
    return loss.item(), dict(tree_flatten(grads))


def batch_widths(monkeypatch):
    """The widths of the batches causal_lm_data.batch hands out, as they are made."""
    widths, make = [], causal_lm_data.batch
    monkeypatch.setattr(causal_lm_data, "batch", lambda *a, **k: widths.append(make(*a, **k)[0].shape[1])
                        or make(*a, **k))
    return widths


@pytest.mark.parametrize("tuning", ["full", "lora"])
def test_fit_on_heavy_padding_gives_the_padded_loss_and_gradients(monkeypatch, tuning):
    """6 rows of 4 to 7 tokens padded to 64: one batch cut to 32 columns (PAD_TO) gives the loss and every
    gradient of the padded computation, in a full fine-tune (the tied head trains) and with LoRA (it is frozen)."""
    lm = keras_style_lm(sequence_length=64)
    if tuning == "lora":
        lm.backbone.enable_lora(rank=4, target_layer_names=["query", "value", "ffw_linear"])
        randomize_adapters(lm.model)  # B = 0 would leave A without a gradient
    recorder = Recorder()
    lm.compile(optimizer=recorder)
    widths = batch_widths(monkeypatch)
    history = lm.fit(SHORT, batch_size=len(SHORT), shuffle=False, verbose=0)
    assert widths == [32]
    loss, grads = padded_loss_and_grads(lm.model, SHORT, lm.preprocessor)
    assert abs(history.history["loss"][0] - loss) <= 1e-6 * loss
    got = dict(tree_flatten(recorder.state))
    assert len(grads) == len(tree_flatten(lm.model.trainable_parameters())) >= 18
    for name, g in grads.items():
        scale = mx.abs(g).max().item()
        assert scale > 0 and mx.abs(got[name + ".grad"] - g).max().item() <= 1e-5 * scale, name


def test_fit_without_shuffle_keeps_the_order_and_each_batch_loss_is_the_padded_one(monkeypatch):
    lm = keras_style_lm(sequence_length=64)
    lm.compile(optimizer=Recorder())  # the weights stay: every batch's reference is computable after
    seen = []
    rows_of = causal_lm_data.row_batches
    monkeypatch.setattr(causal_lm_data, "row_batches", lambda *a, **k: seen.append(rows_of(*a, **k)) or seen[-1])
    history = lm.fit(SHORT, batch_size=2, epochs=2, shuffle=False, verbose=0)
    assert [[r.tolist() for r in rows] for rows in seen[:2]] == [[[0, 1], [2, 3], [4, 5]]] * 2
    batches = [padded_loss_and_grads(lm.model, SHORT[i:i + 2], lm.preprocessor)[0] for i in (0, 2, 4)]
    for loss in history.history["loss"]:  # an epoch's loss: the mean of its batches' losses
        assert abs(loss - np.mean(batches)) <= 1e-6 * loss


def test_shuffled_batches_are_bucketed_by_length():
    lengths = np.array([9, 3, 8, 4, 7, 3, 9, 5])
    rng = np.random.default_rng(0)
    epochs = [causal_lm_data.row_batches(lengths, 2, rng) for _ in range(4)]
    for batches in epochs:
        assert sorted(np.concatenate(batches).tolist()) == list(range(8))
        # Sorted by length, then cut: each batch holds neighbours in length.
        assert sorted(sorted(lengths[b].tolist()) for b in batches) == [[3, 3], [4, 5], [7, 8], [9, 9]]
    assert len({tuple(np.concatenate(b).tolist()) for b in epochs}) > 1  # reshuffled each epoch
    ordered = causal_lm_data.row_batches(lengths, 3)
    assert [b.tolist() for b in ordered] == [[0, 1, 2], [3, 4, 5], [6, 7]]


def test_evaluate_is_the_weighted_mean_loss_of_the_padded_computation():
    lm = keras_style_lm(sequence_length=64)
    loss, _ = padded_loss_and_grads(lm.model, SHORT, lm.preprocessor)
    assert abs(lm.evaluate(SHORT, batch_size=4) - loss) <= 1e-6 * loss  # batches of 4 and 2 rows
    x, y, w = lm.preprocessor(SHORT)
    w = w * np.linspace(0.5, 2, w.shape[1])[None]  # sample weights weigh the mean
    ids, targets, weights = mx.array(x["token_ids"]), mx.array(y), mx.array(w)
    expected = trainer.full_cross_entropy(lm.model, ids, targets, weights)[0].item()
    lm.preprocessor = None
    got = lm.evaluate(x, y, batch_size=5, sample_weight=w)
    assert abs(got - expected) <= 1e-6 * expected


def test_validation_loss_per_epoch(capsys):
    lm = keras_style_lm(sequence_length=64)
    lm.backbone.enable_lora(rank=4)
    lm.compile(optimizer="adamw", learning_rate=1e-2)
    texts = [p + c for p, c in PAIRS]
    history = lm.fit(texts, batch_size=2, epochs=3, validation_data=SHORT[:3], verbose=1)
    assert sorted(history.history) == ["loss", "val_loss"] and len(history.history["val_loss"]) == 3
    assert history.history["val_loss"][-1] == lm.evaluate(SHORT[:3], batch_size=2)  # the same weights, batches
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all("val_loss" in line and "tok/s" in line and "peak mem" in line for line in lines)
    assert "loss" in lm.fit(texts, verbose=0).history and "val_loss" not in lm.fit(texts, verbose=0).history

    lm.preprocessor = keras_style_lm(sequence_length=64).preprocessor
    x, y, w = lm.preprocessor(SHORT[:3])
    plain = keras_style_lm(sequence_length=64)
    plain.preprocessor = None
    plain.compile(optimizer=Recorder())
    val = plain.fit(x, y, sample_weight=w, validation_data=(x, y, w), verbose=0).history["val_loss"]
    reference = trainer.full_cross_entropy(plain.model, mx.array(x["token_ids"]), mx.array(y), mx.array(w))[0]
    assert abs(val[0] - reference.item()) <= 1e-6 * val[0]


def test_predict_is_score_at_real_positions_with_rows_in_place():
    lm = keras_style_lm(sequence_length=64)
    texts = SHORT[::-1] + ["Say hello in French"]  # lengths out of order: batches are sorted, rows come back
    x = lm.preprocessor(texts)[0]
    full = np.asarray(lm.score(x["token_ids"], x["padding_mask"], trim_padding=False))
    assert np.array_equal(lm.predict(texts, batch_size=3, trim_padding=False).shape, full.shape)
    assert_close(lm.predict(texts, batch_size=3, trim_padding=False), full, rtol=1e-5)
    trimmed = lm.predict(texts, batch_size=3)
    mask = x["padding_mask"]
    assert trimmed.shape == (len(texts), 64, lm.backbone.vocabulary_size)
    assert_close(trimmed[mask], full[mask], rtol=1e-5)
    assert not trimmed[:, mask.sum(1).max():].any()  # past every row: not computed
    lm.preprocessor = None
    assert_close(lm.predict(dict(x), batch_size=8)[mask], full[mask], rtol=1e-5)


@pytest.mark.parametrize("call, message", [
    (lambda lm: lm.fit(SHORT, epochs=0), "epochs must be a positive integer"),
    (lambda lm: lm.fit(SHORT, batch_size=2.0), "batch_size must be a positive integer"),
    (lambda lm: lm.fit(SHORT, shuffle="batch"), "shuffle must be True or False"),
    (lambda lm: lm.fit(SHORT, verbose=3), "verbose must be"),
    (lambda lm: lm.fit(SHORT, validation_data=(SHORT, None, None, None)), "validation_data as a tuple"),
    (lambda lm: lm.fit(SHORT, validation_data=42), "validation_data must be a string"),
    (lambda lm: lm.fit(SHORT, validation_data={"token_ids": np.ones((2, 4), int)}), "validation_data: .* needs y"),
    (lambda lm: lm.fit(SHORT, validation_data=[""][:0]), "validation_data holds no weighted target"),
    (lambda lm: lm.fit(SHORT, validation_data=({"token_ids": np.ones((2, 4), int)}, np.ones((2, 3), int))),
     r"validation_data: token_ids \(2, 4\)"),
    (lambda lm: lm.fit(SHORT, validation_data=(SHORT, SHORT)), "validation_data: with a preprocessor"),
    (lambda lm: lm.evaluate(SHORT, batch_size=0), "batch_size must be a positive integer"),
    (lambda lm: lm.predict(SHORT, batch_size=-1), "batch_size must be a positive integer"),
    (lambda lm: lm.predict({"ids": 1}), "needs 'token_ids'"),
    (lambda lm: lm.score(np.ones((1, 4), int), trim_padding="yes"), "trim_padding must be True or False"),
])
def test_bad_arguments_are_named(call, message):
    with pytest.raises(MlxGemmaError, match=message):
        call(keras_style_lm(sequence_length=16))
