"""`python -m mlx_gemma.lora --fine-tune-type full`: what trains (as mlx-lm), what is saved (a
complete model folder that mlx_gemma and mlx-lm load), resuming, and the refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

import mlx_gemma
from mlx_gemma.convert.writer import write_model_folder
from mlx_gemma.loading import load_model
from mlx_gemma.lora import main
from mlx_gemma.tensorfile import load_file
from mlx_gemma.tuner import full

from conftest import FIXTURES
from test_tuner_lora import IDS, assert_close
from test_tuner_trainer import cli_data

TINY = FIXTURES / "tiny_gemma"  # 3 blocks, tied embedding


@pytest.fixture
def fittable(tmp_path):
    """tiny_gemma's folder with embeddings 25x larger (its 0.02-std ones keep every logit near 0, so
    no training of the blocks could lower the loss much)."""
    weights = load_file(TINY / "model.safetensors")
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"] * 25
    return write_model_folder(tmp_path / "fittable", json.loads((TINY / "config.json").read_text()), weights,
                              TINY / "tokenizer.model", json.loads((TINY / "generation_config.json").read_text()))


def run_full(base, data, out, capsys, *extra):
    args = ["--model", str(base), "--data", str(data), "--fine-tune-type", "full", "--adapter-path", str(out),
            "--batch-size", "2", "--learning-rate", "1e-3", "--steps-per-report", "1", *extra]
    code = main(args)
    printed = capsys.readouterr()
    assert code == 0, printed.err
    return printed.out


def train_losses(printed: str) -> list[float]:
    return [float(line.split("train loss ")[1].split(",")[0]) for line in printed.splitlines() if "train loss" in line]


def test_full_fine_tune_trains_the_last_blocks_and_saves_a_model_folder(fittable, tmp_path, capsys):
    out = tmp_path / "trained"
    printed = run_full(fittable, cli_data(tmp_path), out, capsys, "--train", "--test", "--iters", "12",
                       "--num-layers", "2", "--save-every", "5")
    losses = train_losses(printed)
    print(f"train loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert len(losses) == 12 and losses[-1] < 0.5 * losses[0]
    assert f"Saved the fine-tuned model to {out}" in printed
    assert {"config.json", "model.safetensors", "tokenizer.model", "generation_config.json"} <= {
        p.name for p in out.iterdir()}
    before, after = load_file(fittable / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {k for k in before if not mx.array_equal(before[k], after[k]).item()}
    in_last_two = {k for k in before if k.startswith(("model.layers.1.", "model.layers.2."))}
    assert changed == in_last_two  # every weight of the last 2 blocks, nothing else (embedding, norm, block 0)
    assert all(after[k].dtype == before[k].dtype for k in before)
    # The saved folder is the trained model: testing it gives the test loss the run printed.
    test_line = [line for line in printed.splitlines() if line.startswith("Test loss")][0]
    assert test_line in run_full(out, tmp_path / "data", tmp_path / "unused", capsys, "--test")


def test_trainable_parameters_are_mlx_lms(fittable):
    """The same parameters train as under mlx-lm's `--fine-tune-type full` (its lora.py: freeze, then
    unfreeze the last num_layers blocks; -1 all): for -1, 1 and 3 of 3 blocks."""
    lm_load = pytest.importorskip("mlx_lm.utils").load
    for num_layers in (-1, 1, 3):
        ours = load_model(fittable)
        full.enable_full(ours, num_layers)
        theirs, _ = lm_load(str(fittable))
        theirs.freeze()
        for block in theirs.layers[-max(num_layers, 0):]:
            block.unfreeze()
        names = {k for k, _ in tree_flatten(ours.trainable_parameters())}
        assert names == {k for k, _ in tree_flatten(theirs.trainable_parameters())}
        assert "model.embed_tokens.weight" not in names and "model.norm.weight" not in names


@pytest.mark.oracle
def test_mlx_lm_loads_the_saved_folder(fittable, tmp_path, capsys):
    lm_load = pytest.importorskip("mlx_lm.utils").load
    out = tmp_path / "trained"
    run_full(fittable, cli_data(tmp_path), out, capsys, "--train", "--iters", "3", "--num-layers", "-1")
    ours, _ = mlx_gemma.load(out)
    theirs, _ = lm_load(str(out))
    # mlx-lm's Gemma 1 uses the exact GELU, transformers (and we) the tanh one: ~3e-4 apart.
    assert_close(theirs(mx.array(IDS)), ours(mx.array(IDS)), rtol=2e-3)


def test_resume_from_our_folder_and_from_mlx_lm_style_adapters(fittable, tmp_path, capsys):
    data, out = cli_data(tmp_path), tmp_path / "trained"
    run_full(fittable, data, out, capsys, "--train", "--iters", "3", "--num-layers", "2")
    trained = load_model(out)
    expected = trained(mx.array(IDS))
    # Our folder, as --resume-adapter-file: the run starts from the trained weights (test-only shows it).
    printed = run_full(fittable, data, tmp_path / "unused", capsys, "--test", "--resume-adapter-file", str(out))
    reference = run_full(out, data, tmp_path / "unused", capsys, "--test")
    assert printed.splitlines()[-1] == reference.splitlines()[-1]
    # mlx-lm's full run saves the trained blocks' weights as adapters.safetensors; resuming from it
    # gives the same model, and training on writes over our earlier folder.
    adapters = tmp_path / "mlx_lm_adapters"
    adapters.mkdir()
    full.enable_full(trained, 2)
    mx.save_safetensors(str(adapters / "adapters.safetensors"), dict(tree_flatten(trained.trainable_parameters())))
    resumed = full.load_full_weights(load_model(fittable), adapters / "adapters.safetensors")
    assert mx.array_equal(resumed(mx.array(IDS)), expected).item()
    run_full(fittable, data, out, capsys, "--train", "--iters", "1", "--num-layers", "2",
             "--resume-adapter-file", str(adapters))
    assert not mx.array_equal(load_model(out)(mx.array(IDS)), expected).item()


def quantized_folder(tmp_path):
    model = load_model(TINY)
    nn.quantize(model, group_size=32, bits=4)
    return write_model_folder(tmp_path / "q4", {**json.loads((TINY / "config.json").read_text()),
                                                "quantization": {"group_size": 32, "bits": 4}},
                              dict(tree_flatten(model.parameters())), TINY / "tokenizer.model")


@pytest.mark.parametrize("case, message", [
    ("quantized", "this model is quantized"),
    ("adapter folder", "holds files but no model"),
    ("too many layers", "num_layers must be between 1 and 3"),
    ("bad resume", "does not fit this model"),
    ("missing resume", "no such weights file or folder"),
])
def test_refusals_are_one_line_errors(case, message, tmp_path, capsys):
    data, out, model = cli_data(tmp_path), tmp_path / "out", TINY
    extra = ["--num-layers", "2"]
    if case == "quantized":
        model = quantized_folder(tmp_path)
    elif case == "adapter folder":
        out.mkdir()
        (out / "adapters.safetensors").write_bytes(b"")  # a LoRA run's output must survive
    elif case == "too many layers":
        extra = ["--num-layers", "4"]
    elif case == "bad resume":
        mx.save_safetensors(str(tmp_path / "w.safetensors"), {"model.norm.weight": mx.zeros((7,))})
        extra += ["--resume-adapter-file", str(tmp_path / "w.safetensors")]
    elif case == "missing resume":
        extra += ["--resume-adapter-file", str(tmp_path / "nothing")]
    args = ["--model", str(model), "--data", str(data), "--train", "--iters", "1", "--batch-size", "2",
            "--fine-tune-type", "full", "--adapter-path", str(out), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and "Traceback" not in err
    if case == "adapter folder":
        assert (out / "adapters.safetensors").exists()


def test_the_saved_weights_are_the_trained_ones_bit_for_bit(fittable, tmp_path):
    """save_full_model writes the model's parameters as they are (no cast, nothing dropped)."""
    model = load_model(fittable)
    full.enable_full(model, -1)
    rng = np.random.default_rng(0)
    model.layers[0].mlp.down_proj.weight = mx.array(rng.normal(0, 1, model.layers[0].mlp.down_proj.weight.shape),
                                                    dtype=model.layers[0].mlp.down_proj.weight.dtype)
    out = full.save_full_model(tmp_path / "saved", model)
    saved = load_file(out / "model.safetensors")
    assert saved.keys() == {k for k, _ in tree_flatten(model.parameters())}
    assert all(mx.array_equal(saved[k], v).item() for k, v in tree_flatten(model.parameters()))
