"""The fine-tuning loss, data pipeline and loop.

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

from mlx_gemma import lora, train
from mlx_gemma.errors import DatasetError, MlxGemmaError, TrainingError
from mlx_gemma.loading import load, load_model
from mlx_gemma.models import gemma
from mlx_gemma.train_data import iterate_batches, load_datasets, load_jsonl, make_batch

from conftest import FIXTURES, TINY_MODELS
from test_lora import assert_close, load_into_peft, randomize_adapters

PAIRS = [("What is two plus two?", " Four, of course."), ("Name a colour", " Blue"),
         ("Say hello in French, please, and then say goodbye", " Bonjour. Au revoir."), ("Hi", " Hello!")]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return load(FIXTURES / "tiny_gemma")[1]


def pair_batch(tokenizer, tmp_path, mask_prompt=True):
    file = write_jsonl(tmp_path / "train.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    return make_batch(load_jsonl(file, tokenizer, mask_prompt=mask_prompt), pad_id=tokenizer.pad_id)


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
        train.grad_checkpoint(model)
    loss_and_grad = nn.value_and_grad(model, lambda m, *b: train.loss_fn(m, *b, chunk_size=5))
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
    (full, n_full), g_full = nn.value_and_grad(model, train.full_cross_entropy)(model, *batch)
    (chunked, n), g = nn.value_and_grad(model, lambda m, *b: train.loss_fn(m, *b, chunk_size=chunk))(model, *batch)
    assert n.item() == n_full.item()
    assert abs(chunked.item() - full.item()) <= 1e-6 * full.item()
    forward_only = train.loss_fn(model, *batch, chunk_size=chunk, differentiable=False)[0]  # as evaluate() runs it
    assert abs(forward_only.item() - full.item()) <= 1e-6 * full.item()
    g_full = dict(tree_flatten(g_full))
    for k, v in tree_flatten(g):
        assert_close(v, g_full[k], rtol=1e-5)


def small_model(vocab_size: int, **extra) -> gemma.Model:
    config = dict(model_type="gemma", hidden_size=32, num_hidden_layers=1, intermediate_size=64,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=vocab_size, **extra)
    return gemma.Model(gemma.ModelArgs.from_dict(config))


def test_chunked_loss_in_bfloat16(tokenizer, tmp_path):
    """A bf16 model: the chunked gradients keep the activations' dtype and agree with the plain loss."""
    model = load_model(FIXTURES / "tiny_gemma2", dtype=mx.bfloat16)
    lora.enable_lora(model, rank=4)
    randomize_adapters(model)
    batch = pair_batch(tokenizer, tmp_path)
    (full, _), g_full = nn.value_and_grad(model, train.full_cross_entropy)(model, *batch)
    (chunked, _), g = nn.value_and_grad(model, lambda m, *b: train.loss_fn(m, *b, chunk_size=8))(model, *batch)
    assert abs(chunked.item() - full.item()) <= 1e-3 * full.item()
    g_full = dict(tree_flatten(g_full))
    for k, v in tree_flatten(g):
        assert v.dtype == mx.float32  # the adapters train in float
        assert_close(v, g_full[k], rtol=2e-2)  # bf16 logits rounded per chunk vs at once


def test_default_chunks_bound_the_logits_bytes():
    pieces = train._chunks((4, 100, 640), 262144, None)  # Gemma's vocabulary, batch of 4
    assert {p.stop - p.start for p in pieces[:-1]} == {train.CHUNK_BYTES // (4 * 4 * 262144)}
    assert pieces[-1].stop >= 100 and pieces[0].start == 0
    assert len(train._chunks((2, 100, 64), 512, None)) == 1  # a small vocabulary: one chunk


def test_chunked_loss_trains_an_untied_head():
    """Gradients reach trainable head weights through the checkpointed chunks."""
    model = small_model(97, tie_word_embeddings=False)
    model.freeze()
    model.lm_head.unfreeze()
    ids = mx.array(np.random.default_rng(0).integers(0, 97, (2, 11)))
    w = mx.ones((2, 10))
    (_, _), g_full = nn.value_and_grad(model, train.full_cross_entropy)(model, ids[:, :-1], ids[:, 1:], w)
    (_, _), g = nn.value_and_grad(model, lambda m, *b: train.loss_fn(m, *b, chunk_size=3))(
        model, ids[:, :-1], ids[:, 1:], w)
    assert_close(g["lm_head"]["weight"], g_full["lm_head"]["weight"], rtol=1e-5)


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
    full_step = nn.value_and_grad(model, train.full_cross_entropy)
    chunked_step = nn.value_and_grad(model, lambda m, *b: train.loss_fn(m, *b, chunk_size=128))
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


# --- data ----------------------------------------------------------------------------------------


def test_formats_and_prompt_masking(tokenizer, tmp_path):
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    file = write_jsonl(tmp_path / "d.jsonl", [{"text": "plain text"}, {"prompt": "Q:", "completion": " A"},
                                              {"messages": messages}])
    (t_ids, t_off), (p_ids, p_off), (m_ids, m_off) = load_jsonl(file, tokenizer, mask_prompt=True)
    assert t_ids == tokenizer.encode("plain text", add_eos=True) and t_off == 0
    head = tokenizer.encode("Q:")
    assert p_ids == head + tokenizer.encode(" A", add_bos=False, add_eos=True) and p_off == len(head)
    assert m_ids == tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=True)
    assert m_off == len(tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=True))
    assert load_jsonl(file, tokenizer)[1][1] == 0  # without mask_prompt: loss on everything


def test_batches_weight_only_completion_tokens(tokenizer, tmp_path):
    file = write_jsonl(tmp_path / "d.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    examples = load_jsonl(file, tokenizer, mask_prompt=True)
    inputs, targets, weights = make_batch(examples, pad_id=tokenizer.pad_id)
    assert inputs.shape[1] % 32 == 0
    for row, (ids, offset) in enumerate(examples):
        picked = np.array(targets[row])[np.array(weights[row]) > 0].tolist()
        assert picked == ids[offset:]  # exactly the completion (with its <eos>)
        assert np.array(inputs[row])[:len(ids) - 1].tolist() == ids[:-1]


def test_batches_are_sorted_by_length_and_split_across_ranks(tokenizer, tmp_path):
    file = write_jsonl(tmp_path / "d.jsonl", [{"text": "word " * n} for n in (9, 1, 5, 3)])
    examples = load_jsonl(file, tokenizer)
    batches = list(iterate_batches(examples, 2, shuffle=False, pad_id=tokenizer.pad_id))
    firsts = [int(np.array(w).sum(axis=1).max()) for _, _, w in batches]
    assert firsts == sorted(firsts)
    halves = [list(iterate_batches(examples, 2, shuffle=False, rank=r, world=2)) for r in (0, 1)]
    assert all(b[0].shape[0] == 1 for h in halves for b in h)


def test_long_examples_are_truncated_with_a_warning(tokenizer, tmp_path):
    file = write_jsonl(tmp_path / "d.jsonl", [{"text": "word " * 50}, {"text": "short"}])
    with pytest.warns(UserWarning, match=r"d.jsonl: 1 example\(s\) longer than max_seq_length=16"):
        examples = load_jsonl(file, tokenizer, max_seq_length=16)
    assert max(len(ids) for ids, _ in examples) == 16


@pytest.mark.parametrize("lines, message", [
    (['{"text": "ok"}', '{"text": "ok"'], r"d.jsonl:2: not valid JSON"),
    (['{"text": "ok"}', '[1, 2]'], r"d.jsonl:2: expected a JSON object"),
    (['{"txt": "ok"}'], r"d.jsonl:1: no 'text'"),
    (['{"prompt": "a"}'], r"d.jsonl:1: 'prompt' and 'completion' must both be strings"),
    (['{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}'], r"d.jsonl:1: bad messages"),
    ([''], r"d.jsonl: holds no usable example"),
])
def test_bad_data_names_the_file_and_line(lines, message, tokenizer, tmp_path):
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=message):
        load_jsonl(tmp_path / "d.jsonl", tokenizer)


def test_missing_data(tokenizer, tmp_path):
    with pytest.raises(DatasetError, match="no such data folder"):
        load_datasets(tmp_path / "nope", tokenizer)
    with pytest.raises(DatasetError, match="fewer than batch_size=8"):
        next(iterate_batches([([2, 3, 4], 0)], 8))


def test_bad_settings_are_refused():
    with pytest.raises(TrainingError, match="unknown optimizer 'adagrad'"):
        train.build_optimizer("adagrad", 1e-3)
    with pytest.raises(TrainingError, match="unknown lr schedule"):
        train.build_schedule(1e-3, 10, "linear")
    with pytest.raises(TrainingError, match="warmup"):
        train.build_schedule(1e-3, 10, "cosine", warmup=10)


def test_schedule_warms_up_then_decays():
    schedule = train.build_schedule(1e-3, 100, "cosine", warmup=10)
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
    before = train.evaluate(model, examples, 4)
    saved = []

    def save(step):
        lora.save_adapters(tmp_path / "adapters", model, config)
        saved.append(step)

    args = train.TrainingArgs(batch_size=4, iters=50, steps_per_report=10, save_every=20, grad_accumulation_steps=2)
    history = train.train(model, train.build_optimizer("adamw", 1e-3), examples, examples[:4], args, save=save)
    after = train.evaluate(model, examples, 4)
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
    before = train.evaluate(model, examples, 4)
    args = train.TrainingArgs(batch_size=4, iters=30, steps_per_report=30, grad_checkpoint=True, loss_chunk_size=8)
    train.train(model, train.build_optimizer("adamw", train.build_schedule(1e-3, 30, "cosine", 5)), examples,
                args=args)
    after = train.evaluate(model, examples, 4)
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
    from mlx_gemma.lora_cli import main

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
    from mlx_gemma.lora_cli import main

    full = ["--model", str(FIXTURES / "tiny_gemma"), "--data", str(cli_data(tmp_path)), "--batch-size", "2",
            "--num-layers", "2"] + args
    assert main(full) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err


def test_config_files(tmp_path):
    from mlx_gemma.lora_cli import settings

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


# --- keras-hub style: backbone.enable_lora, compile, fit, save/load_lora_weights -----------------


def keras_style_lm(sequence_length=24):
    from mlx_gemma.tasks import GemmaBackbone, GemmaCausalLM, GemmaCausalLMPreprocessor

    tokenizer = load(FIXTURES / "tiny_gemma")[1]
    return GemmaCausalLM(GemmaBackbone.from_model(fittable_tiny()), GemmaCausalLMPreprocessor(tokenizer, sequence_length))


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
    expected = train.loss_fn(lm.model, inputs, targets, weights)[0].item()
    lm.compile(optimizer="sgd", learning_rate=1e-3)
    history = lm.fit(x=x, y=np.array(targets), sample_weight=np.array(weights), batch_size=len(PAIRS), verbose=0)
    # One epoch of one batch: the reported loss is the loss before the step.
    assert abs(history.history["loss"][0] - expected) < 1e-5 * expected
    left = {"token_ids": x["token_ids"], "padding_mask": x["padding_mask"][:, ::-1]}
    with pytest.raises(MlxGemmaError, match="left padding"):
        lm.fit(x=left, y=np.array(targets))
    with pytest.raises(MlxGemmaError, match="needs y"):
        lm.fit(x=x)


def test_keras_style_score_is_mlx_gemma_score():
    from mlx_gemma.score import score

    lm = keras_style_lm()
    ids = mx.array([[2, 30, 40, 50, 60, 0]])
    mask = mx.array([[1, 1, 1, 1, 1, 0]])
    assert mx.array_equal(lm.score(ids, mask), score(lm.model, ids, mask))
    with pytest.raises(ValueError, match="scoring_mode"):
        lm.score(ids, scoring_mode="perplexity")


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
    (loss, ntoks), grads = nn.value_and_grad(model, lambda m, *b: train.loss_fn(m, *b, chunk_size=7))(model, *batch)
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
    from mlx_gemma.lora_cli import main

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


def test_image_examples_need_a_paligemma_and_existing_files(tokenizer, tmp_path):
    file = write_jsonl(tmp_path / "d.jsonl", [{"image": "missing.png", "prefix": "caption en", "suffix": "x"}])
    with pytest.raises(DatasetError, match=r"d.jsonl:1: an 'image' example needs a PaliGemma"):
        load_jsonl(file, tokenizer)
    with pytest.raises(DatasetError, match=r"d.jsonl:1: no such image file"):
        load_jsonl(file, tokenizer, images=(9, 6))


def test_a_diverging_run_stops_without_saving_broken_adapters(tokenizer, tmp_path):
    model = load_model(FIXTURES / "tiny_gemma")
    lora.enable_lora(model, rank=4)
    saved = []
    args = train.TrainingArgs(batch_size=4, iters=20, save_every=1, grad_checkpoint=True)
    with pytest.raises(TrainingError, match="became (nan|inf|NaN)"):
        train.train(model, train.build_optimizer("sgd", float("inf")), pair_examples(tokenizer, tmp_path), args=args,
                    save=saved.append)
    assert len(saved) < 20
    assert not hasattr(type(model.layers[0]), "_checkpointed_from")  # checkpointing undone on the way out
