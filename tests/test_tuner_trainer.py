"""The fine-tuning loss and loop (data: test_tuner_datasets.py; keras-style fit: test_tasks_training.py).

References: transformers' causal-LM loss (labels -100 on prompts and padding)
and torch autograd through PEFT's adapters give the loss and the adapter
gradients for the same weights and batch; the plain full-logits cross-entropy
checks the chunked one (value and gradients).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_gemma.tuner import lora, trainer
from mlx_gemma.errors import TrainingError
from mlx_gemma.loading import load, load_model
from mlx_gemma.models import gemma
from mlx_gemma.tuner.datasets import load_jsonl, make_batch

from conftest import FIXTURES, TINY_MODELS
from test_tuner_lora import assert_close, load_into_peft, randomize_adapters
from test_tuner_datasets import PAIRS, pair_batch, tiny_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


# --- loss and gradients against transformers + PEFT ---------------------------------------------


@pytest.mark.oracle
@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize("checkpointed", [False, True])
def test_loss_and_adapter_gradients_match_transformers(name, checkpointed, tokenizer, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    folder = FIXTURES / f"tiny_{name}"
    model = load_model(folder)
    keys = ("q_proj", "v_proj", "down_proj")
    lora.enable_lora(model, rank=4, alpha=8, target_names=keys, num_layers=2)
    randomize_adapters(model)
    inputs, targets, weights = pair_batch(tokenizer, tmp_path)
    if checkpointed:
        trainer.grad_checkpoint(model)
    loss_and_grad = nn.value_and_grad(model, lambda m, *b: trainer.loss_fn(m, *b, chunk_size=5))
    (loss, ntoks), grads = loss_and_grad(model, inputs, targets, weights)
    grads = dict(tree_flatten(grads))

    n_layers = len(model.layers)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(keys), lora_dropout=0.0,
                             layers_to_transform=list(range(n_layers - 2, n_layers)))
    reference = peft.get_peft_model(reference, config)
    load_into_peft(reference, model)
    tokens = np.concatenate([np.array(inputs), np.array(targets)[:, -1:]], axis=1)
    labels = np.full(tokens.shape, -100)
    labels[:, 1:] = np.where(np.array(weights) > 0, np.array(targets), -100)  # transformers shifts labels itself
    out = reference(input_ids=torch.tensor(tokens), labels=torch.tensor(labels))
    out.loss.backward()

    assert int(ntoks.item()) == int((labels != -100).sum())
    assert_matches_peft(model, loss, grads, reference, out.loss)


def assert_matches_peft(model, loss, grads, reference, reference_loss):
    """Our loss and adapter gradients equal PEFT's (after its backward pass)."""
    assert abs(loss.item() - reference_loss.item()) <= 1e-5 * reference_loss.item()
    named = dict(reference.named_parameters())
    for path, _ in lora.lora_layers(model):
        for ours, theirs in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
            expected = named[f"base_model.model.{path}.{theirs}.default.weight"].grad.numpy().T
            assert_close(grads[f"{path}.{ours}"], expected, rtol=1e-4)
    assert len(grads) == 2 * len(lora.lora_layers(model))


# --- the chunked loss --------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 7, 32, 1000])
def test_chunked_loss_equals_full_loss_and_gradients(chunk, tokenizer, tmp_path):
    model = load_model(FIXTURES / "tiny_gemma2")  # with the final logit soft-cap
    lora.enable_lora(model, rank=4, target_names=lora.TARGETS)
    randomize_adapters(model)
    batch = pair_batch(tokenizer, tmp_path)
    (full, n_full), g_full = nn.value_and_grad(model, trainer.full_cross_entropy)(model, *batch)
    (chunked, n), g = nn.value_and_grad(model, lambda m, *b: trainer.loss_fn(m, *b, chunk_size=chunk))(model, *batch)
    assert n.item() == n_full.item()
    assert abs(chunked.item() - full.item()) <= 1e-6 * full.item()
    forward_only = trainer.loss_fn(model, *batch, chunk_size=chunk, differentiable=False)[0]  # as evaluate() runs it
    assert abs(forward_only.item() - full.item()) <= 1e-6 * full.item()
    g_full = dict(tree_flatten(g_full))
    for k, v in tree_flatten(g):
        assert_close(v, g_full[k], rtol=1e-5)


def small_model(vocab_size: int, **extra) -> gemma.Model:
    config = dict(model_type="gemma", hidden_size=32, num_hidden_layers=1, intermediate_size=64,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=vocab_size, **extra)
    return gemma.Model(gemma.ModelArgs.from_dict(config))


def test_chunked_loss_in_bfloat16(tokenizer, tmp_path):
    """A bf16 model: the chunked gradients keep the activations' dtype and are as close to the float32
    model's gradients as the plain full-logits loss is (bf16 everywhere else dominates both errors)."""
    batch = pair_batch(tokenizer, tmp_path)

    def loss_and_grads(dtype, fn):
        model = load_model(FIXTURES / "tiny_gemma2", dtype=dtype)  # Gemma 2: the final soft-cap too
        lora.enable_lora(model, rank=4)
        mx.random.seed(3)
        randomize_adapters(model)
        (loss, _), g = nn.value_and_grad(model, fn)(model, *batch)
        return loss.item(), dict(tree_flatten(g))

    exact, g_exact = loss_and_grads(mx.float32, trainer.full_cross_entropy)
    full, g_full = loss_and_grads(mx.bfloat16, trainer.full_cross_entropy)
    chunked, g = loss_and_grads(mx.bfloat16, lambda m, *b: trainer.loss_fn(m, *b, chunk_size=8))
    assert abs(chunked - full) <= 1e-3 * full and abs(chunked - exact) <= 1e-3 * exact

    def error(grads):  # largest error relative to each exact gradient's largest magnitude
        return max(float(np.abs(np.asarray(v) - np.asarray(g_exact[k])).max() / np.abs(np.asarray(g_exact[k])).max())
                   for k, v in grads.items())

    assert all(v.dtype == mx.float32 for v in g.values())  # the adapters train in float
    assert error(g) <= 1.1 * error(g_full), (error(g), error(g_full))


def test_default_chunks_bound_the_logits_bytes():
    pieces = trainer._chunks((4, 100, 640), 262144, None)  # Gemma's vocabulary, batch of 4
    assert {p.stop - p.start for p in pieces[:-1]} == {trainer.default_chunk_bytes() // (4 * 4 * 262144)}
    assert pieces[-1].stop >= 100 and pieces[0].start == 0
    assert len(trainer._chunks((2, 100, 64), 512, None)) == 1  # a small vocabulary: one chunk


def test_chunked_loss_trains_an_untied_head():
    """Gradients reach trainable head weights through the checkpointed chunks."""
    model = small_model(97, tie_word_embeddings=False)
    model.freeze()
    model.lm_head.unfreeze()
    ids = mx.array(np.random.default_rng(0).integers(0, 97, (2, 11)))
    w = mx.ones((2, 10))
    (_, _), g_full = nn.value_and_grad(model, trainer.full_cross_entropy)(model, ids[:, :-1], ids[:, 1:], w)
    (_, _), g = nn.value_and_grad(model, lambda m, *b: trainer.loss_fn(m, *b, chunk_size=3))(
        model, ids[:, :-1], ids[:, 1:], w)
    assert_close(g["lm_head"]["weight"], g_full["lm_head"]["weight"], rtol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_loss_through_a_quantized_head(tied):
    """QLoRA with the head quantized too (the tied embedding or lm_head): the chunk gradients go
    back through the quantized product, equal to the plain loss's."""
    model = small_model(256, tie_word_embeddings=tied)
    nn.quantize(model, group_size=32, bits=4)
    assert isinstance(model.model.embed_tokens if tied else model.lm_head, (nn.QuantizedEmbedding, nn.QuantizedLinear))
    lora.enable_lora(model, rank=4, target_names=lora.TARGETS)
    randomize_adapters(model)
    ids = mx.array(np.random.default_rng(1).integers(0, 256, (2, 13)))
    batch = (ids[:, :-1], ids[:, 1:], mx.array(np.random.default_rng(2).integers(0, 2, (2, 12)), dtype=mx.float32))
    (full, _), g_full = nn.value_and_grad(model, trainer.full_cross_entropy)(model, *batch)
    (chunked, _), g = nn.value_and_grad(model, lambda m, *b: trainer.loss_fn(m, *b, chunk_size=5))(model, *batch)
    assert abs(chunked.item() - full.item()) <= 1e-6 * full.item()
    g_full = dict(tree_flatten(g_full))
    for k, v in tree_flatten(g):
        assert_close(v, g_full[k], rtol=1e-5)


def peak_memory(fn, *args) -> int:
    mx.eval(args)
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(fn(*args))
    return mx.get_peak_memory() - base


def test_chunked_loss_peak_memory_is_a_fraction_of_the_full_loss():
    """A tiny-but-wide model (vocab 32k, 2 x 1024 tokens): the [B, T, V] float32 logits dominate the naive loss.

    MLX's CPU backend allocates ahead of the computation until it reaches its
    memory limit, so peaks are measured as a laptop runs: unlimited, and with
    a limit (64 MiB) that makes MLX wait for memory to be freed.
    """
    model = small_model(32768)
    lora.enable_lora(model, rank=4)
    mx.eval(model.parameters())
    ids = mx.array(np.random.default_rng(0).integers(0, 32768, (2, 1025)))
    batch = (ids[:, :-1], ids[:, 1:], mx.ones((2, 1024)))
    full_step = nn.value_and_grad(model, trainer.full_cross_entropy)
    chunked_step = nn.value_and_grad(model, lambda m, *b: trainer.loss_fn(m, *b, chunk_size=128))
    logits_bytes = 2 * 1024 * 32768 * 4
    peaks = {}
    limit = mx.get_memory_limit()
    try:
        for label, cap in (("unlimited", limit), ("64 MiB limit", 64 << 20)):
            mx.set_memory_limit(cap)
            peaks[label] = peak_memory(full_step, model, *batch), peak_memory(chunked_step, model, *batch)
    finally:
        mx.set_memory_limit(limit)
    for label, (full, chunked) in peaks.items():
        print(f"{label}: full-logits loss {full / 2**20:.0f} MiB, chunked {chunked / 2**20:.0f} MiB, "
              f"ratio {chunked / full:.2f} (one [2, 1024, 32768] f32 logits: {logits_bytes / 2**20:.0f} MiB)")
        assert full > 2 * logits_bytes  # the naive loss holds the logits and their gradient
    assert peaks["unlimited"][1] < 0.5 * peaks["unlimited"][0]
    assert peaks["64 MiB limit"][1] < logits_bytes / 2



def test_bad_settings_are_refused():
    with pytest.raises(TrainingError, match="unknown optimizer 'adagrad'"):
        trainer.build_optimizer("adagrad", 1e-3)
    with pytest.raises(TrainingError, match="unknown lr schedule"):
        trainer.build_schedule(1e-3, 10, "linear")
    with pytest.raises(TrainingError, match="warmup"):
        trainer.build_schedule(1e-3, 10, "cosine", warmup=10)


def test_schedule_warms_up_then_decays():
    schedule = trainer.build_schedule(1e-3, 100, "cosine", warmup=10)
    lrs = [schedule(mx.array(s)).item() for s in (0, 5, 10, 55, 100)]
    assert lrs[0] == 0 and abs(lrs[1] - 5e-4) < 1e-9 and abs(lrs[2] - 1e-3) < 1e-9
    assert lrs[2] > lrs[3] > lrs[4] and lrs[4] < 1e-8


# --- the loop ------------------------------------------------------------------------------------


def pair_examples(tokenizer, tmp_path, repeat=4):
    file = write_jsonl(tmp_path / "train.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS] * repeat)
    return load_jsonl(file, tokenizer, mask_prompt=True)


def fittable_tiny(quantize: bool = False):
    """tiny_gemma with embeddings 25x larger.

    The fixture's 0.02-std tied embeddings bound its logits to about +-1 (the
    final norm fixes the hidden size), so its loss cannot fall far below
    ln(vocab) whatever the adapters learn; scaled up, the model can fit data.
    """
    model = load_model(FIXTURES / "tiny_gemma")
    model.model.embed_tokens.weight = model.model.embed_tokens.weight * 25
    if quantize:
        nn.quantize(model, group_size=32, bits=4, class_predicate=lambda p, m: isinstance(m, nn.Linear))
    return model


def test_fifty_steps_lower_the_loss_and_the_saved_adapter_reloads(tokenizer, tmp_path):
    model = fittable_tiny()
    config = lora.enable_lora(model, rank=4, target_names=("q_proj", "v_proj", "down_proj"))
    examples = pair_examples(tokenizer, tmp_path)
    before = trainer.evaluate(model, examples, 4)
    saved = []

    def save(step):
        lora.save_adapters(tmp_path / "adapters", model, config)
        saved.append(step)

    args = trainer.TrainingArgs(batch_size=4, iters=50, steps_per_report=10, save_every=20, grad_accumulation_steps=2)
    history = trainer.train(model, trainer.build_optimizer("adamw", 1e-3), examples, examples[:4], args, save=save)
    after = trainer.evaluate(model, examples, 4)
    print(f"train-set loss {before:.3f} -> {after:.3f}")
    assert after < before / 4
    assert saved == [20, 40, 50]
    reports = [h for h in history if "train_loss" in h]
    assert [h["step"] for h in reports] == [10, 20, 30, 40, 50]
    assert all(h["tokens_per_second"] > 0 and h["peak_memory_gb"] > 0 for h in reports)
    assert {h["step"] for h in history if "val_loss" in h} == {1, 50}
    reloaded = lora.load_adapters(fittable_tiny(), tmp_path / "adapters")
    ids = mx.array([[2, 30, 40, 50, 60]])
    assert mx.array_equal(reloaded(ids), model(ids))


def test_qlora_trains_only_the_adapters(tokenizer, tmp_path):
    model = fittable_tiny(quantize=True)
    lora.enable_lora(model, rank=4, target_names=lora.TARGETS)
    frozen_before = {k: np.array(v) for k, v in tree_flatten(model.parameters()) if ".lora_" not in k}
    examples = pair_examples(tokenizer, tmp_path)
    before = trainer.evaluate(model, examples, 4)
    args = trainer.TrainingArgs(batch_size=4, iters=30, steps_per_report=30, grad_checkpoint=True, loss_chunk_size=8)
    trainer.train(model, trainer.build_optimizer("adamw", trainer.build_schedule(1e-3, 30, "cosine", 5)), examples,
                args=args)
    after = trainer.evaluate(model, examples, 4)
    print(f"QLoRA train-set loss {before:.3f} -> {after:.3f}")
    assert after < before / 4
    frozen_after = {k: np.array(v) for k, v in tree_flatten(model.parameters()) if ".lora_" not in k}
    assert frozen_after.keys() == frozen_before.keys()
    assert all(np.array_equal(frozen_after[k], v) for k, v in frozen_before.items())
    assert isinstance(model.layers[0].self_attn.q_proj.linear, nn.QuantizedLinear)
    assert type(model.layers[0]).__name__ == "TransformerBlock" and not hasattr(type(model.layers[0]),
                                                                               "_checkpointed_from")


def cli_data(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    chat = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c.strip()}]}
            for p, c in PAIRS]
    write_jsonl(data / "train.jsonl", chat * 2)
    write_jsonl(data / "valid.jsonl", chat[:2])
    write_jsonl(data / "test.jsonl", [{"text": p + c} for p, c in PAIRS])
    return data


def test_cli_trains_saves_and_resumes(tmp_path, capsys):
    from mlx_gemma.lora import main

    data, out = cli_data(tmp_path), tmp_path / "adapters"
    (tmp_path / "cfg.json").write_text(json.dumps({"iters": 6, "batch_size": 2, "steps_per_report": 3,
                                                   "learning_rate": 1e-3, "num_layers": 2}))
    common = ["--model", str(FIXTURES / "tiny_gemma"), "--data", str(data), "-c", str(tmp_path / "cfg.json")]
    assert main(common + ["--train", "--test", "--adapter-path", str(out), "--save-every", "4", "--rank", "2",
                          "--mask-prompt", "--grad-checkpoint"]) == 0
    printed = capsys.readouterr().out
    assert "Iter 1: val loss" in printed and "Iter 6: train loss" in printed and "tok/s" in printed
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["num_layers"] == 2 and config["lora_parameters"]["rank"] == 2
    test_loss = [line for line in printed.splitlines() if line.startswith("Test loss")][0]
    # Resuming from the saved adapters and testing gives the same test loss.
    assert main(common + ["--test", "--rank", "2", "--resume-adapter-file", str(out / "adapters.safetensors")]) == 0
    assert test_loss in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--iters", "2"], "nothing to do"),
    (["--train", "--data", "/nonexistent"], "no such data folder"),
    (["--train", "--optimizer", "sgd", "--lr-schedule", "cosine", "--warmup", "9", "--iters", "3"], "warmup"),
    (["--train", "--resume-adapter-file", "/nonexistent.safetensors"], "no such adapter weights file"),
])
def test_cli_errors_are_one_line(args, message, tmp_path, capsys):
    from mlx_gemma.lora import main

    full = ["--model", str(FIXTURES / "tiny_gemma"), "--data", str(cli_data(tmp_path)), "--batch-size", "2",
            "--num-layers", "2"] + args
    assert main(full) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err


def test_cli_default_num_layers_adapts_every_block_of_a_shallow_model(tmp_path, capsys):
    """mlx-lm's default: the last 16 blocks, or all of a shallower model; an explicit count
    past the model's depth is refused."""
    from mlx_gemma.lora import main

    blocks = json.loads((FIXTURES / "tiny_gemma" / "config.json").read_text())["num_hidden_layers"]
    data, out = cli_data(tmp_path), tmp_path / "adapters"
    common = ["--model", str(FIXTURES / "tiny_gemma"), "--data", str(data), "--batch-size", "2"]
    assert main(common + ["--train", "--iters", "1", "--adapter-path", str(out)]) == 0
    assert blocks < 16 and json.loads((out / "adapter_config.json").read_text())["num_layers"] == blocks
    capsys.readouterr()
    too_many = ["--num-layers", str(blocks + 1), "--adapter-path", str(tmp_path / "b")]
    assert main(common + ["--train", "--iters", "1"] + too_many) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and f"between 1 and {blocks}" in err and f"got {blocks + 1}" in err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("text, message", [
    ('{"iters": "ten"}', "'iters' must be an integer"),
    ('{"learning_rate": null, "rank": true}', "'rank' must be an integer"),
    ('{"learning_rate": "1e-5"}', "'learning_rate' must be a finite number"),
    ('{"weight_decay": 1' + '0' * 400 + '}', "'weight_decay' must be a finite number"),  # too big for a float
    ('{"train": 1}', "'train' must be true or false"),
    ('{"optimizer": "lion"}', "'optimizer' must be one of adamw"),
    ('{"lora_keys": "q_proj"}', "'lora_keys' must be a non-empty list"),
    ('{"lora_parameters": {"keys": [1]}}', "'lora_keys' must be a non-empty list"),
    ('{"lora_parameters": []}', "lora_parameters takes"),
    ('[1, 2]', "must hold a mapping"),
    ('{"a": ' * 100000 + '1' + '}' * 100000, "not valid JSON"),
])
def test_config_file_values_are_checked(text, message, tmp_path):
    from mlx_gemma.lora import settings

    (tmp_path / "c.json").write_text(text)
    with pytest.raises(TrainingError, match="c.json: ") as raised:
        settings(["-c", str(tmp_path / "c.json")])
    assert message in str(raised.value)
    (tmp_path / "latin1.json").write_bytes(b'{"data": "caf\xe9"}')
    with pytest.raises(TrainingError, match="latin1.json: not UTF-8"):
        settings(["-c", str(tmp_path / "latin1.json")])


def test_config_files(tmp_path):
    from mlx_gemma.lora import settings

    (tmp_path / "c.json").write_text('{"rank": 16, "iters": 3}')
    s = settings(["-c", str(tmp_path / "c.json"), "--iters", "5"])
    assert (s.rank, s.iters, s.batch_size) == (16, 5, 4)  # file over defaults, flags over file
    (tmp_path / "mlx_lm.json").write_text('{"lora_parameters": {"rank": 2, "scale": 10.0, "keys": ["mlp.down_proj"]}}')
    s = settings(["-c", str(tmp_path / "mlx_lm.json")])  # mlx-lm's spelling
    assert (s.rank, s.scale, s.lora_keys) == (2, 10.0, ["mlp.down_proj"])
    (tmp_path / "bad.json").write_text('{"rnak": 16}')
    with pytest.raises(TrainingError, match="bad.json: unknown settings rnak"):
        settings(["-c", str(tmp_path / "bad.json")])
    pytest.importorskip("yaml")
    (tmp_path / "c.yaml").write_text("rank: 2\nlora_keys: [q_proj, o_proj]\n")
    s = settings(["-c", str(tmp_path / "c.yaml")])
    assert s.rank == 2 and s.lora_keys == ["q_proj", "o_proj"]


def test_the_cli_module_still_serves_the_adapter_api():
    """`from mlx_gemma import lora; lora.enable_lora(...)` (the old path) reaches tuner.lora's functions."""
    from mlx_gemma import lora as cli
    from mlx_gemma.tuner import lora as adapters

    assert cli.main and cli.enable_lora is adapters.enable_lora
    assert all(getattr(cli, name) is getattr(adapters, name) for name in cli.__all__ if name != "main")


@pytest.mark.parametrize("module", ["mlx_gemma.lora", "mlx_gemma.fuse"])
def test_cli_help_runs_without_a_runpy_warning(module):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=600,
                          cwd=FIXTURES.parent.parent)
    assert done.returncode == 0 and f"python -m {module}" in done.stdout
    assert "Warning" not in done.stderr, done.stderr


# --- data parallel -------------------------------------------------------------------------------


def test_two_process_data_parallel_step_equals_one_process_with_the_whole_batch(tmp_path):
    """`mlx.launch -n 2` on localhost: each rank takes half of every batch; one SGD step gives
    the adapters that one process computes from the whole batch."""
    import os
    import shutil
    import subprocess
    import sys

    from mlx_gemma.tensorfile import load_file

    launcher = shutil.which("mlx.launch")
    if launcher is None:
        pytest.skip("mlx.launch (MLX's launcher) is not on PATH")
    data = cli_data(tmp_path)
    args = ["-m", "mlx_gemma.lora", "--model", str(FIXTURES / "tiny_gemma"), "--data", str(data), "--train",
            "--iters", "2", "--batch-size", "4", "--optimizer", "sgd", "--learning-rate", "0.5", "--num-layers", "2",
            "--rank", "2", "--mask-prompt", "--val-batches", "1"]
    env = {**os.environ, "PYTHONPATH": str(FIXTURES.parent.parent)}
    one = subprocess.run([sys.executable, *args, "--adapter-path", str(tmp_path / "one")], capture_output=True,
                         text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    port = str(20000 + os.getpid() % 20000)  # other test runs on this machine may use the default port
    two = subprocess.run([launcher, "-n", "2", "--backend", "ring", "--starting-port", port, sys.executable, *args,
                          "--adapter-path", str(tmp_path / "two")], capture_output=True, text=True, env=env,
                         timeout=600)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    assert two.stdout.count("Saved adapters") == 1  # rank 0 alone reports and saves
    a, b = load_file(tmp_path / "one" / "adapters.safetensors"), load_file(tmp_path / "two" / "adapters.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert_close(b[k], a[k], rtol=1e-5)
    assert any(k.endswith("lora_b") and mx.abs(v).max().item() > 0 for k, v in a.items())  # the step moved B


# --- PaliGemma: {"image", "prefix", "suffix"} ------------------------------------------------------


def paligemma_data(tmp_path, model, tokenizer):
    from PIL import Image

    rng = np.random.default_rng(0)
    records = []
    for i, (prefix, suffix) in enumerate([("caption en", "a red square"), ("what colour?", "green"),
                                          ("caption en", "noise and more noise"), ("ocr", "HELLO")]):
        Image.fromarray(rng.integers(0, 255, (30 + i, 50, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        records.append({"image": f"{i}.png", "prefix": prefix, "suffix": suffix})
    file = write_jsonl(tmp_path / "train.jsonl", records)
    return load_jsonl(file, tokenizer, images=(model.args.num_image_tokens, model.args.image_token_index))


@pytest.mark.oracle
def test_paligemma_loss_and_gradients_match_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    folder = FIXTURES / "tiny_paligemma"
    model, tokenizer = load(folder)
    lora.enable_lora(model, rank=4, alpha=8)
    randomize_adapters(model)
    examples = paligemma_data(tmp_path, model, tokenizer)
    batch = make_batch(examples, tokenizer.pad_id, image_size=model.args.vision.image_size)
    assert len(batch) == 5 and batch[3].shape[1:] == (42, 42, 3)
    (loss, ntoks), grads = nn.value_and_grad(model, lambda m, *b: trainer.loss_fn(m, *b, chunk_size=7))(model, *batch)
    grads = dict(tree_flatten(grads))

    inputs, targets, weights, pixels, prefix = (np.array(x) for x in batch)
    tokens = np.concatenate([inputs, targets[:, -1:]], axis=1)
    positions = np.arange(tokens.shape[1])[None]
    lengths = np.array([len(ids) for ids, *_ in examples])[:, None]
    real = positions < lengths
    labels = np.where(real & (positions >= prefix[:, None]), tokens, -100)
    reference = transformers.AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="eager")
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                             target_modules=r".*language_model.*\.(q_proj|v_proj)")
    reference = peft.get_peft_model(reference, config)
    load_into_peft(reference, model)
    out = reference(input_ids=torch.tensor(tokens.astype(np.int64)), pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2),
                    attention_mask=torch.tensor(real.astype(np.int64)),
                    token_type_ids=torch.tensor((positions >= prefix[:, None]).astype(np.int64)),
                    labels=torch.tensor(labels.astype(np.int64)))
    out.loss.backward()
    assert int(ntoks.item()) == int((labels[:, 1:] != -100).sum())
    assert_matches_peft(model, loss, grads, reference, out.loss)


def test_paligemma_trains_with_the_cli(tmp_path, capsys):
    from mlx_gemma.lora import main

    model, tokenizer = load(FIXTURES / "tiny_paligemma")
    data = tmp_path / "data"
    data.mkdir()
    paligemma_data(data, model, tokenizer)
    assert main(["--model", str(FIXTURES / "tiny_paligemma"), "--data", str(data), "--train", "--iters", "3",
                 "--batch-size", "2", "--num-layers", "1", "--adapter-path", str(tmp_path / "a"),
                 "--steps-per-report", "3"]) == 0
    assert "Iter 3: train loss" in capsys.readouterr().out
    adapted = lora.load_adapters(load_model(FIXTURES / "tiny_paligemma"), tmp_path / "a")
    assert len(lora.lora_layers(adapted)) == 2


def test_a_diverging_run_stops_without_saving_broken_adapters(tokenizer, tmp_path):
    model = load_model(FIXTURES / "tiny_gemma")
    lora.enable_lora(model, rank=4)
    saved = []
    args = trainer.TrainingArgs(batch_size=4, iters=20, save_every=1, grad_checkpoint=True)
    with pytest.raises(TrainingError, match="became (nan|inf|NaN)"):
        trainer.train(model, trainer.build_optimizer("sgd", float("inf")), pair_examples(tokenizer, tmp_path), args=args,
                    save=saved.append)
    assert len(saved) < 20
    assert not hasattr(type(model.layers[0]), "_checkpointed_from")  # checkpointing undone on the way out
