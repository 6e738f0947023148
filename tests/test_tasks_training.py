"""keras-hub style fine-tuning: backbone.enable_lora, compile, fit, save/load_lora_weights, score.

fit's loss is checked against trainer.loss_fn (itself checked against transformers
in test_tuner_trainer.py); score against mlx_gemma.score (checked against keras-hub).
"""

from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_gemma.errors import MlxGemmaError
from mlx_gemma.tuner import trainer

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
