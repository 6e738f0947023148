"""Gradient checkpointing on Gemma 4 blocks (per-layer inputs, shared keys/values, MoE) and the
tuner's refusal of Gemma 4 with media towers.

Checkpointing must change nothing but memory: the loss and every gradient equal an unchecked run's,
including gradients that reach a block only through its extra arguments (the per-layer input table,
a store layer's keys/values read by the KV-shared blocks)."""

from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_gemma.errors import TrainingError
from mlx_gemma.loading import load_model
from mlx_gemma.lora import main as lora_main
from mlx_gemma.tuner import trainer
from mlx_gemma.tuner.datasets import training_images

from conftest import FIXTURES
from test_tuner_trainer import cli_data

TOL = 1e-5


def fixture(name: str):
    return FIXTURES / f"tiny_gemma4_{name}"


def batch(vocab: int):
    """Two rows of random ids, the second with its last three targets unweighted (padding)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, vocab, size=(2, 13))
    weights = np.ones((2, 12), dtype=np.float32)
    weights[1, -3:] = 0
    return mx.array(ids[:, :-1]), mx.array(ids[:, 1:]), mx.array(weights)


def loss_and_grads(model, checkpointed: bool):
    """(loss, {name: gradient}) of every parameter (a full fine-tune: everything trainable)."""
    trainer.grad_checkpoint(model, enable=checkpointed)
    loss_and_grad = nn.value_and_grad(model, lambda m, *b: trainer.loss_fn(m, *b, chunk_size=5))
    (loss, _), grads = loss_and_grad(model, *batch(model.args.vocab_size))
    mx.eval(loss, grads)
    trainer.grad_checkpoint(model, enable=False)
    return loss.item(), dict(tree_flatten(grads))


@pytest.mark.parametrize("name", ["e2b", "moe"])
def test_checkpointed_loss_and_gradients_equal_unchecked(name):
    model = load_model(fixture(name))
    model.train()
    plain_loss, plain = loss_and_grads(model, False)
    loss, grads = loss_and_grads(model, True)
    assert abs(loss - plain_loss) <= TOL * abs(plain_loss)
    assert grads.keys() == plain.keys()
    for key, expected in plain.items():
        scale = max(float(mx.abs(expected).max()), 1e-30)
        assert float(mx.abs(grads[key] - expected).max()) <= TOL * scale, key
    # The gradients that reach blocks only through their extra arguments are there (not zero).
    reached = ["model.embed_tokens_per_layer.weight", "model.per_layer_model_projection.weight"] if name == "e2b" \
        else ["model.layers.0.experts.gate_up_proj.weight"]
    for key in reached:
        assert float(mx.abs(plain[key]).max()) > 0, key
    if name == "e2b":  # a store layer's k_proj gets gradient from the KV-shared blocks that read its keys
        sources = model.args.kv_sources()
        store = next(s for s in sources if s is not None)
        assert float(mx.abs(plain[f"model.layers.{store}.self_attn.k_proj.weight"]).max()) > 0


@pytest.mark.parametrize("name", ["e2b", "moe"])
def test_cli_trains_with_grad_checkpoint(tmp_path, capsys, name):
    data = cli_data(tmp_path)
    args = ["--model", fixture(name), "--data", data, "--train", "--grad-checkpoint", "--iters", "1",
            "--batch-size", "2", "--steps-per-report", "1", "--adapter-path", tmp_path / "adapters"]
    code = lora_main([str(a) for a in args])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "Saved adapters" in printed.out
    assert (tmp_path / "adapters" / "adapters.safetensors").is_file()


def test_gemma4_with_towers_is_refused():
    model = load_model(fixture("mm"))
    assert model.model_type == "gemma4" and model.image_input is not None
    with pytest.raises(TrainingError, match="Gemma 4 with images"):
        training_images(model)
    with pytest.raises(TrainingError, match="Gemma 4 with images"):
        trainer.train(model, trainer.build_optimizer("adam", 1e-3), [([1, 2, 3], 0)],
                      args=trainer.TrainingArgs(batch_size=1, iters=1))
